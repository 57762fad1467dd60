"""The sweep runner: grid expansion, training to checkpoints, measurement, resume, sharding.

The grid is ``models x train_batch_sizes x curvature_batch_sizes x seeds x checkpoints x
draws``. At checkpoint 0 (initialisation) the training batch size plays no role, so those
points appear once, with ``train_batch_size = 0``; likewise the full training split is one
batch, measured once (``draw = 0``) however many draws the grid asks for.

Seeds (all derived from the grid seed with :func:`derive_seed`, so they do not depend on
``PYTHONHASHSEED``, the shard, or the order points run in):

- model initialisation: ``(seed, "init")`` — the same weights for every training batch size;
- training batch order: ``(seed, "train-order", train_batch_size)``;
- curvature batch: ``(seed, "curvature-batch", step, curvature_batch_size, draw)``, drawn
  from the training split without replacement (``"full"``: the whole split) — shared by all
  models, so architectures are compared on the same batches;
- estimators: ``(seed, model, train_batch_size, step, curvature_batch_size, draw)`` plus a
  per-quantity purpose string.

Same config and seed therefore give the same numbers (timings aside; to rounding, since the
operators' timed "auto" backend choice may differ between runs), whether the sweep runs
in one go, resumed, or split into shards. A folder resumed with a changed grid consolidates
to the tables of a fresh run of the new config (:func:`grid_selection`): finished points
outside the grid are left out (kept on disk), ``where`` first/last resolves against the new
grid, and a finished point it newly selects is measured again (its old folder kept under
``points/.superseded/``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from curvkit.datasets import Dataset, load_dataset
from curvkit.experiments.config import ConfigError, SweepConfig, load_config
from curvkit.experiments.quantities import (
    QUANTITIES,
    PointContext,
    derive_seed,
    matches_where,
)
from curvkit.experiments.tables import (
    KEY_COLUMNS,
    SUPERSEDED,
    consolidate,
    finished_points,
    write_point,
)
from curvkit.zoo import build_model

__all__ = [
    "SweepPlan",
    "SweepResult",
    "check_with_data",
    "expand_grid",
    "grid_selection",
    "parse_shard",
    "plan_sweep",
    "run_sweep",
    "shard_points",
    "wanted_quantities",
]


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; ``None`` -> ``(0, 1)``."""
    if text is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ConfigError(
            f"--shard must be i/n with 0 <= i < n (e.g. 0/4 for the first of 4), got {text!r}"
        )
    return int(m.group(1)), int(m.group(2))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "-", text).strip("-")


def expand_grid(cfg: SweepConfig, num_train: int) -> list[dict[str, Any]]:
    """Every grid point, in canonical order, as a dict of ``KEY_COLUMNS``."""
    points = []
    for spec in cfg.models:
        for seed in cfg.grid["seeds"]:
            for step in cfg.grid["checkpoints"]:
                tbs_list = [0] if step == 0 else cfg.grid["train_batch_sizes"]
                for tbs in tbs_list:
                    for cbs in cfg.grid["curvature_batch_sizes"]:
                        # the full split is the same batch in every draw: measure it once
                        draws = 1 if cbs == "full" else cfg.grid["draws"]
                        for draw in range(draws):
                            size = num_train if cbs == "full" else int(cbs)
                            pid = "__".join(
                                [
                                    _slug(spec.label),
                                    f"tb{tbs}",
                                    f"cb{cbs}",
                                    f"s{seed}",
                                    f"step{step}",
                                    f"d{draw}",
                                ]
                            )
                            points.append(
                                {
                                    "point_id": pid,
                                    "model": spec.label,
                                    "architecture": spec.name,
                                    "train_batch_size": tbs,
                                    "curvature_batch_size": size,
                                    "curvature_batch_spec": str(cbs),
                                    "full_batch": cbs == "full" or size == num_train,
                                    "seed": seed,
                                    "step": step,
                                    "draw": draw,
                                }
                            )
    ids = [p["point_id"] for p in points]
    if len(set(ids)) != len(ids):
        raise ConfigError("two grid points share an id; make the model labels more distinct")
    return points


def wanted_quantities(cfg: SweepConfig, point: dict[str, Any]) -> list[str]:
    """The quantities measured at ``point``: those whose ``where`` it matches in this grid.

    ``where`` values such as ``step = "last"`` resolve against the grid, so extending the
    grid can move them from one point to another.
    """
    return [
        q
        for q in cfg.quantities
        if matches_where(point, cfg.quantity_options[q].get("where", {}), cfg.grid)
    ]


def grid_selection(cfg: SweepConfig) -> dict[str, list[str]]:
    """``{point_id: quantities measured there}`` over the whole grid of ``cfg``.

    What the consolidated tables hold: finished points outside the grid, and rows of
    quantities a point no longer measures (e.g. ``step = "last"`` before checkpoints were
    added), are left out, so a resumed or extended sweep gives the tables of a fresh run.
    """
    # point ids and `where` matching depend on the grid only, not on the data's size
    return {p["point_id"]: wanted_quantities(cfg, p) for p in expand_grid(cfg, num_train=0)}


def shard_points(points: list[dict], shard: tuple[int, int]) -> list[dict]:
    """Round-robin share ``i`` of ``n`` of the canonical point list (disjoint, covering)."""
    i, n = shard
    return [p for k, p in enumerate(points) if k % n == i]


@dataclass
class SweepResult:
    """What :func:`run_sweep` did."""

    output: Path
    total_points: int
    shard_points: int
    skipped: int
    computed: int
    seconds: float
    figures: list[Path]
    left_out: int = 0  # finished points in the folder outside this grid, not in the tables


@dataclass
class SweepPlan:
    """What :func:`run_sweep` would do, found without computing or writing anything."""

    cfg: SweepConfig
    root: Path
    shard: tuple[int, int]
    data: Dataset
    points: list[dict]  # the whole grid, canonical order
    mine: list[dict]  # this shard's share
    pending: list[dict]  # this shard's points to compute now (after ``max_points``)
    remeasure: set[str]  # finished points to measure again (their `where` now matches more)
    left_out: list[str]  # finished points in the folder that are not in the grid


class _Trainer:
    """One training run: a model trained step by step with a seeded batch order."""

    def __init__(
        self,
        model: nn.Module,
        data: Dataset,
        cfg: SweepConfig,
        tbs: int,
        seed: int,
        lr: float | None = None,
    ):
        self.model, self.data, self.tbs = model, data, tbs
        self.loss_fn = data.loss_fn()
        tr = dict(cfg.training, lr=cfg.training["lr"] if lr is None else lr)
        params = [p for p in model.parameters() if p.requires_grad]
        if tr["optimizer"] == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=tr["lr"], momentum=tr["momentum"], weight_decay=tr["weight_decay"]
            )
        else:
            self.opt = torch.optim.Adam(params, lr=tr["lr"], weight_decay=tr["weight_decay"])
        self.gen = torch.Generator().manual_seed(derive_seed(seed, "train-order", tbs))
        self.order = torch.empty(0, dtype=torch.int64)
        self.steps = 0
        self.last_loss = float("nan")

    def _next_indices(self) -> torch.Tensor:
        if len(self.order) < self.tbs:
            self.order = torch.randperm(self.data.num_train, generator=self.gen)
        idx, self.order = self.order[: self.tbs], self.order[self.tbs :]
        return idx

    def train_to(self, step: int) -> None:
        self.model.train()
        X, y = self.data.train
        while self.steps < step:
            idx = self._next_indices().to(X.device)
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model(X[idx]), y[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training diverged at step {self.steps} (loss {float(loss)}); lower "
                    "training.lr (or the model's lr) in the config"
                )
            loss.backward()
            self.opt.step()
            self.steps += 1
            self.last_loss = float(loss.detach())
        self.opt.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Put ``model`` in the sweep's curvature mode, restoring its mode afterwards."""
    was = {m: m.training for m in model.modules()}
    model.train(mode == "train")
    try:
        yield
    finally:
        for m, t in was.items():
            m.training = t


def _curvature_batch(data: Dataset, point: dict) -> tuple[torch.Tensor, torch.Tensor]:
    X, y = data.train
    if point["curvature_batch_spec"] == "full":
        return X, y
    g = torch.Generator().manual_seed(
        derive_seed(
            point["seed"],
            "curvature-batch",
            point["step"],
            point["curvature_batch_spec"],
            point["draw"],
        )
    )
    idx = torch.randperm(data.num_train, generator=g)[: point["curvature_batch_size"]]
    return X[idx.to(X.device)], y[idx.to(y.device)]


def measure_point(
    cfg: SweepConfig, model: nn.Module, data: Dataset, point: dict
) -> tuple[dict[str, pd.DataFrame], dict]:
    """All configured quantities at one point; returns its tables and notes."""
    X, y = _curvature_batch(data, point)
    ctx = PointContext(
        model=model,
        loss_fn=data.loss_fn(),
        X=X,
        y=y,
        dataset=data,
        point=point,
        seed=derive_seed(
            point["seed"],
            point["model"],
            point["train_batch_size"],
            point["step"],
            point["curvature_batch_spec"],
            point["draw"],
        ),
    )
    ctx.cache["options"] = cfg.quantity_options
    ctx.cache["backend"] = cfg.backend
    ctx.cache["train_split"] = data.train
    ctx.cache["test_split"] = data.test
    keys = {k: point[k] for k in KEY_COLUMNS}
    rows: list[dict] = []
    arrays: dict[str, list[dict]] = {}
    notes: list[str] = []
    timing: dict[str, float] = {}
    quantities = wanted_quantities(cfg, point)
    with _mode(model, cfg.curvature_mode):
        for q in quantities:
            opt = cfg.quantity_options[q]
            t0 = time.perf_counter()
            measured = QUANTITIES[q].fn(ctx, opt)
            seconds = time.perf_counter() - t0
            timing[q] = seconds
            notes += measured.notes
            for r in measured.rows:
                rows.append({**keys, "group": q, **r, "seconds": seconds})
            for name, table in measured.tables.items():
                arrays.setdefault(name, []).extend({**keys, **r} for r in table)
    tables = {
        "measurements": pd.DataFrame(
            rows,
            columns=[
                *KEY_COLUMNS,
                "group",
                "quantity",
                "value",
                "stderr",
                "dof",
                "method",
                "num_matvecs",
                "cost",
                "seconds",
            ],
        )
    }
    for name, table in arrays.items():
        tables[name] = pd.DataFrame(table)
    return tables, {"measured": quantities, "notes": notes, "seconds_by_quantity": timing}


def _check_resumable(root: Path, fingerprint: str, done: dict[str, dict]) -> None:
    stale = [pid for pid, meta in done.items() if meta.get("fingerprint") != fingerprint]
    if stale:
        raise ConfigError(
            f"{root} holds {len(stale)} finished point(s) made with different settings "
            f"(data, models, training or quantity options changed; e.g. {stale[0]}). Resuming "
            "would mix old and new numbers: pass another --output folder, or delete "
            f"{root / 'points'} to start over. (Adding seeds or batch sizes to the grid is fine.)"
        )


def check_with_data(cfg: SweepConfig) -> Dataset:
    """Load the config's dataset and check everything that depends on it; return the data.

    Raises :class:`ConfigError` (or ``FileNotFoundError`` for data not on disk) before any
    compute. ``curvkit sweep --check`` and :func:`run_sweep` both call it.
    """
    options = {k: v for k, v in cfg.data.items() if k not in ("name", "seed")}
    try:
        data = load_dataset(cfg.data["name"], seed=cfg.data.get("seed", 0), **options)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"[data] {cfg.data['name']!r}: {err}") from None
    data = data.to(cfg.torch_dtype)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {cfg.device!r} requested but CUDA is not available")
    for key in ("train_batch_sizes", "curvature_batch_sizes"):
        too_big = [b for b in cfg.grid[key] if b != "full" and b > data.num_train]
        if too_big:
            raise ConfigError(
                f"grid.{key} {too_big} exceed the {data.num_train} training samples of "
                f'{data.name}; use smaller sizes or "full"'
            )
    for spec in cfg.models:  # build each once: catches shape problems
        try:
            build_model(spec.name, data.input_shape, data.num_outputs, seed=0, **spec.knobs)
        except ValueError as err:
            raise ConfigError(f"model {spec.label!r} on {data.name}: {err}") from None
    import curvkit as ck

    needs = {
        "trace": "trace",
        "eigenvalues": "eigenvalues",
        "density": "spectral_density",
        "diagonal": "diagonal",
        "row_sum": "row_sum",
        "frobenius": "frobenius_norm",
        "ggn_residual": "GGNOperator",
        "estimator_error": "trace",
        "cost": "GGNOperator",
    }
    for q in cfg.quantities:
        if q in needs and not hasattr(ck, needs[q]):
            raise ConfigError(
                f"quantity {q!r} needs curvkit.{needs[q]}, which this curvkit does not provide"
            )
    return data


def _measured(meta: dict, cfg: SweepConfig) -> set[str]:
    """The quantities a finished point measured (older points: from their timings)."""
    if "measured" in meta:
        return set(meta["measured"])
    if "seconds_by_quantity" in meta:
        return set(meta["seconds_by_quantity"])
    return set(cfg.quantities)


def plan_sweep(
    config: SweepConfig | str | Path,
    *,
    output: str | Path | None = None,
    shard: tuple[int, int] | str | None = None,
    max_points: int | None = None,
) -> SweepPlan:
    """Every check of :func:`run_sweep`, and the points it would compute; writes nothing."""
    cfg = config if isinstance(config, SweepConfig) else load_config(config)
    shard = parse_shard(shard) if shard is None or isinstance(shard, str) else shard
    if max_points is not None and (
        isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 0
    ):
        raise ConfigError(f"--max-points must be a non-negative integer, got {max_points!r}")
    root = Path(output) if output is not None else cfg.output
    data = check_with_data(cfg)
    points = expand_grid(cfg, data.num_train)
    mine = shard_points(points, shard)
    done_all = finished_points(root)
    ids = {p["point_id"] for p in points}
    done = {k: v for k, v in done_all.items() if k in ids}
    _check_resumable(root, cfg.fingerprint(), done)
    # a point measured before the grid grew may lack a quantity whose `where` now resolves
    # to it (e.g. step = "last" after removing a checkpoint): measure it again
    remeasure = {
        p["point_id"]
        for p in points
        if p["point_id"] in done
        and not set(wanted_quantities(cfg, p)) <= _measured(done[p["point_id"]], cfg)
    }
    pending = [p for p in mine if p["point_id"] not in done or p["point_id"] in remeasure]
    if max_points is not None:
        pending = pending[:max_points]
    left_out = sorted(set(done_all) - ids)
    return SweepPlan(cfg, root, shard, data, points, mine, pending, remeasure, left_out)


def _record_config(cfg: SweepConfig, root: Path) -> None:
    """Write the config that made the folder to ``root/config.toml`` (atomically)."""
    from curvkit.experiments.config import config_toml

    target = root / "config.toml"
    if cfg.source is not None:
        text = Path(cfg.source).read_text()
    else:
        text = config_toml(cfg)
        if text is None:  # not expressible as TOML: a stale copy would name the wrong grid
            target.unlink(missing_ok=True)
            return
    tmp = root / f".config.toml.{os.getpid()}.tmp"
    tmp.write_text(text)
    os.replace(tmp, target)


def run_sweep(
    config: SweepConfig | str | Path,
    *,
    output: str | Path | None = None,
    shard: tuple[int, int] | str | None = None,
    progress: bool = True,
    figures: bool = True,
    max_points: int | None = None,
) -> SweepResult:
    """Run (or resume) a sweep; write tables per finished point; then make the figures.

    Every check (config, data, resumability) runs before anything is written. At the end
    the consolidated tables are rebuilt from the point folders of the current grid (always),
    then the figures are drawn (unless ``figures=False``).

    Args:
        config: a :class:`SweepConfig` or the path of a TOML config.
        output: results folder (default: the config's ``output``, ``results/<name>``).
        shard: ``(i, n)`` or ``"i/n"``: run only share ``i`` of ``n`` of the grid points.
        progress: show a tqdm progress bar (on stderr) with time estimates.
        figures: call :func:`curvkit.experiments.figures.make_figures` at the end.
        max_points: stop after computing this many points (for smoke tests; ``>= 0``).
    """
    t_start = time.perf_counter()
    plan = plan_sweep(config, output=output, shard=shard, max_points=max_points)
    cfg, root, data, points, mine = plan.cfg, plan.root, plan.data, plan.points, plan.mine
    shard, pending = plan.shard, plan.pending
    device = torch.device(cfg.device)
    skipped = len(mine) - len(pending)
    fingerprint = cfg.fingerprint()
    # every check has passed: only now touch the folder
    root.mkdir(parents=True, exist_ok=True)
    _record_config(cfg, root)
    again = [p["point_id"] for p in pending if p["point_id"] in plan.remeasure]
    if again:
        warnings.warn(
            f"{len(again)} finished point(s) are measured again (e.g. {again[0]}): in the "
            "changed grid a `where` with a first/last step or seed selects them for more "
            f"quantities; their earlier results are kept under {root / 'points' / SUPERSEDED}",
            stacklevel=2,
        )

    threads_before = torch.get_num_threads()
    if cfg.threads:
        # Small models gain nothing from intra-op threads, and on a shared, oversubscribed
        # machine OpenMP threads that wait for each other can slow convolutions 30-fold.
        torch.set_num_threads(cfg.threads)
    data = Dataset(
        data.name,
        data.X_train.to(device),
        data.y_train.to(device),
        data.X_test.to(device),
        data.y_test.to(device),
        data.task,
        data.num_outputs,
    )
    specs = {m.label: m for m in cfg.models}
    runs: dict[tuple, list[dict]] = {}
    for p in pending:
        runs.setdefault((p["model"], p["train_batch_size"], p["seed"]), []).append(p)

    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(pending),
        desc=f"sweep {cfg.name}" + (f" [shard {shard[0]}/{shard[1]}]" if shard[1] > 1 else ""),
        unit="pt",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    computed = 0
    try:
        for (label, tbs, seed), pts in runs.items():
            spec = specs[label]
            model = build_model(
                spec.name,
                data.input_shape,
                data.num_outputs,
                seed=derive_seed(seed, "init"),
                dtype=cfg.torch_dtype,
                **spec.knobs,
            ).to(device)
            trainer = _Trainer(model, data, cfg, max(tbs, 1), seed, lr=spec.lr)
            for p in sorted(pts, key=lambda p: p["step"]):
                bar.set_postfix_str(
                    f"{label} tb={tbs} cb={p['curvature_batch_spec']} s={seed} step={p['step']}",
                    refresh=False,
                )
                trainer.train_to(p["step"])
                t0 = time.perf_counter()
                tables, info = measure_point(cfg, model, data, p)
                seconds = time.perf_counter() - t0
                tables["points"] = pd.DataFrame(
                    [
                        {
                            **{k: p[k] for k in KEY_COLUMNS},
                            "dataset": data.name,
                            "task": data.task,
                            "num_params": sum(
                                q.numel() for q in model.parameters() if q.requires_grad
                            ),
                            "num_train": data.num_train,
                            "num_outputs": data.num_outputs,
                            "curvature_mode": cfg.curvature_mode,
                            "dtype": cfg.dtype,
                            "training_loss_last_step": trainer.last_loss,
                            "seconds": seconds,
                        }
                    ]
                )
                meta = {
                    "point": p,
                    "fingerprint": fingerprint,
                    "config": cfg.name,
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "seconds": seconds,
                    **info,
                }
                write_point(
                    root, p["point_id"], tables, meta, replace=p["point_id"] in plan.remeasure
                )
                computed += 1
                bar.update(1)
    finally:
        bar.close()
        torch.set_num_threads(threads_before)

    selection = grid_selection(cfg)
    tables = consolidate(root, select=selection)
    finished = finished_points(root)
    left_out = sorted(set(finished) - set(selection))
    (root / "sweep.json").write_text(
        json.dumps(
            {
                "config": cfg.name,
                "fingerprint": fingerprint,
                "points": len(points),
                "finished": len(set(finished) & set(selection)),
                "left_out": len(left_out),
                "left_out_example": left_out[0] if left_out else None,
            },
            indent=1,
        )
    )
    made: list[Path] = []
    if figures:
        from curvkit.experiments.figures import make_figures

        made = make_figures(root, tables=tables)
    return SweepResult(
        root,
        len(points),
        len(mine),
        skipped,
        computed,
        time.perf_counter() - t_start,
        made,
        len(left_out),
    )
