"""The ``curvkit`` command: ``demo``, ``sweep CONFIG``, ``figures RESULTS``."""

from __future__ import annotations

import argparse
import sys
import warnings

_default_show_warning = warnings.showwarning


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curvkit", description="Matrix-free curvature of neural-network losses."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="row-sum examples and a curvature summary of a small net")
    demo.add_argument("--seed", type=int, default=0)

    sweep = sub.add_parser(
        "sweep",
        help="run (or resume) an experiment grid from a TOML config; ends with the figures",
        description="Run an architecture x batch-size x seed x checkpoint sweep. Finished "
        "points are written as they complete; a rerun skips them.",
    )
    sweep.add_argument(
        "config",
        help="TOML config file, or the name of one in the repository's experiments/configs/ "
        "(e.g. 'default')",
    )
    sweep.add_argument("--output", "-o", help="results folder (default: results/<config name>)")
    sweep.add_argument("--shard", help="run share i of n of the grid points, e.g. 0/4")
    sweep.add_argument("--no-figures", action="store_true", help="skip the figures at the end")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    sweep.add_argument(
        "--max-points",
        type=_non_negative_int,
        default=None,
        help="stop after computing this many points (>= 0)",
    )
    sweep.add_argument(
        "--check",
        action="store_true",
        help="run every check of a sweep (config, data, models, resumability of the output "
        "folder) and print the grid size; computes and writes nothing",
    )

    figures = sub.add_parser(
        "figures", help="draw the paper figures (PDF + PNG) from a results folder's tables"
    )
    figures.add_argument("results", help="results folder written by `curvkit sweep`")
    figures.add_argument("--out", help="figure folder (default: RESULTS/figures)")
    figures.add_argument(
        "--all-points",
        action="store_true",
        help="draw every finished point under RESULTS/points, also those outside the grid of "
        "RESULTS/config.toml (the config of the last sweep there; used by default)",
    )
    return parser


def _resolve_config(name: str):
    """A config path as given, else ``<repo>/experiments/configs/<name>[.toml]``."""
    from pathlib import Path

    path = Path(name)
    if path.is_file():
        return path
    repo_configs = Path(__file__).resolve().parent.parent / "experiments" / "configs"
    for candidate in (repo_configs / name, repo_configs / f"{name}.toml"):
        if candidate.is_file():
            return candidate
    return path  # load_config reports that it does not exist


def _sweep(args: argparse.Namespace) -> int:
    from curvkit.experiments.config import ConfigError, load_config

    try:
        cfg = load_config(_resolve_config(args.config))
        if args.check:
            from curvkit.experiments.runner import plan_sweep

            # the same checks as a real run (data, models, resumability), nothing written
            plan = plan_sweep(cfg, output=args.output, shard=args.shard)
            done = len(plan.mine) - len(plan.pending)
            print(
                f"{cfg.name}: {len(plan.points)} grid points ({len(plan.mine)} in this shard, "
                f"{done} of them already finished in {plan.root}), "
                f"quantities: {', '.join(cfg.quantities)}"
            )
            return 0
        from curvkit.experiments.runner import run_sweep

        result = run_sweep(
            cfg,
            output=args.output,
            shard=args.shard,
            progress=not args.no_progress,
            figures=not args.no_figures,
            max_points=args.max_points,
        )
    except (ConfigError, FileNotFoundError) as err:
        print(f"curvkit sweep: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\ncurvkit sweep: interrupted; finished points are kept, rerun the same command "
            "to resume",
            file=sys.stderr,
        )
        return 130
    print(
        f"{result.output}: {result.computed} point(s) computed, {result.skipped} already done "
        f"({result.shard_points} in this shard of {result.total_points}) in "
        f"{result.seconds:.0f} s; {len(result.figures)} figure file(s) in "
        f"{result.output / 'figures'}"
    )
    if result.left_out:
        print(
            f"{result.left_out} finished point(s) in {result.output / 'points'} are not in "
            "this config's grid: kept on disk, left out of the tables and figures"
        )
    return 0


def _figures(args: argparse.Namespace) -> int:
    from curvkit.experiments.figures import make_figures

    try:
        written = make_figures(args.results, out=args.out, all_points=args.all_points)
    except FileNotFoundError as err:
        print(f"curvkit figures: error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """curvkit's own warnings as one plain line; others as Python prints them."""
    from pathlib import Path

    if Path(__file__).resolve().parent in Path(filename).resolve().parents:
        print(f"curvkit: warning: {message}", file=sys.stderr if file is None else file)
    else:
        _default_show_warning(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from curvkit.demo import run_demo

        run_demo(seed=args.seed)
        return 0
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "figures":
        return _figures(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
