"""Measure the "ggn-cv" control variates against plain estimators at equal total cost.

For each network (ReLU MLP untrained and trained, ReLU CNN, tanh MLP, LayerNorm+GELU MLP;
cross-entropy, briefly trained on a synthetic teacher task) and each total budget ``C`` in
gradient-equivalents:

* ``ggn-cv`` gets ``C - c_G`` residual products, where ``c_G`` is the exact GGN diagonal's
  cost (``Estimate.num_backward``, ``C - 1`` for ``C`` classes);
* ``ggn-cv`` with one block of all parameters (full-vector probes of ``R``), same budget;
* ``hutchinson`` and ``xtrace`` (trace) / ``hutchinson`` and ``xdiag`` (diagonal) get ``C``
  Hessian-vector products.

Over ``--seeds`` generator seeds it reports the relative RMS error against the exact
Hessian trace/diagonal (dense, float64), the variance ratio to Hutchinson and the
coverage of the 95% interval. ``--write`` puts the table into ``docs/ggn.md`` between the
``ggn-cv-table`` markers.

    python scripts/control_variates.py --write
"""

from __future__ import annotations

import argparse
import math
import re
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

import curvkit as ck
from curvkit.estimators.control_variates import ggn_cv_diagonal, ggn_cv_trace
from curvkit.estimators.trace import TRACE_METHODS

DTYPE = torch.float64
DOC = Path(__file__).resolve().parents[1] / "docs" / "ggn.md"
BEGIN, END = "<!-- ggn-cv-table:begin -->", "<!-- ggn-cv-table:end -->"


def make_network(kind: str, seed: int) -> tuple[nn.Module, str]:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if kind == "relu-mlp":
            net = nn.Sequential(
                nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 5)
            )
            return net.to(DTYPE), "vector"
        if kind == "relu-cnn":
            net = nn.Sequential(
                nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3), nn.ReLU(),
                nn.Flatten(), nn.Linear(8, 5),
            )  # fmt: skip
            return net.to(DTYPE), "image"
        if kind == "tanh-mlp":
            net = nn.Sequential(
                nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 5)
            )
            return net.to(DTYPE), "vector"
        if kind == "gelu-ln-mlp":
            net = nn.Sequential(
                nn.Linear(8, 24), nn.LayerNorm(24), nn.GELU(), nn.Linear(24, 24), nn.GELU(),
                nn.Linear(24, 5),
            )  # fmt: skip
            return net.to(DTYPE), "vector"
    raise ValueError(kind)


def make_problem(kind: str, n: int, steps: int, seed: int = 0):
    """A network trained for ``steps`` Adam steps on a teacher task, and its data."""
    g = torch.Generator().manual_seed(seed)
    net, data_kind = make_network(kind, seed)
    X = (
        torch.randn(n, 1, 8, 8, generator=g, dtype=DTYPE)
        if data_kind == "image"
        else torch.randn(n, 8, generator=g, dtype=DTYPE)
    )
    teacher = torch.randn(X[0].numel(), 5, generator=g, dtype=DTYPE)
    y = (X.flatten(1) @ teacher).argmax(1)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(net(X), y).backward()
        opt.step()
    for p in net.parameters():
        p.grad = None
    return net, loss_fn, (X, y)


def summarise(v: torch.Tensor, truth: torch.Tensor, covered: list[float]) -> dict:
    """Relative RMS error, total variance and mean coverage of ``v`` (seeds first)."""
    err = v - truth
    if err.ndim == 1:  # scalar estimates over seeds
        rel = float(err.square().mean().sqrt() / abs(float(truth)))
        var = float(v.var())
    else:  # (seeds, D) diagonals
        rel = float((err.norm(dim=1).square().mean().sqrt()) / truth.norm())
        var = float(v.var(0).sum())
    return {"rel": rel, "var": var, "cover": sum(covered) / len(covered)}


def measure(
    net: str, quantity: str, budget: int, estimators: dict, truth: torch.Tensor, seeds: int
) -> list[dict]:
    """Run each estimator ``fn(generator)`` over ``seeds`` seeds; one row per estimator.

    Coverage counts the truth inside the 95% interval widened by ``1e-10 * |truth|`` (so
    an exact method with a zero-width interval is not failed by rounding).
    """
    stats = {}
    slack = 1e-10 * truth.abs().max()
    for name, fn in estimators.items():
        vals, cov, cost = [], [], 0.0
        for s in range(seeds):
            e = fn(torch.Generator().manual_seed(s))
            lo, hi = e.ci
            vals.append(e.value)
            inside = (lo - slack <= truth) & (truth <= hi + slack)
            cov.append(float(inside.double().mean()))
            cost = e.cost
        stats[name] = {**summarise(torch.stack(vals), truth, cov), "cost": cost}
    ref = max(stats["hutchinson"]["var"], 1e-300)
    return [
        {"net": net, "quantity": quantity, "budget": budget, "method": name, **st,
         "var_ratio": st["var"] / ref}
        for name, st in stats.items()
    ]  # fmt: skip


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    diag_methods = {}
    try:
        from curvkit.estimators.diagonal import DIAGONAL_METHODS

        diag_methods = {k: DIAGONAL_METHODS[k] for k in ("hutchinson", "xdiag")}
    except (ImportError, KeyError):
        print("no DIAGONAL_METHODS registry with 'hutchinson'/'xdiag': diagonal rows skipped")
    for kind in args.networks:
        base, _, when = kind.partition("@")  # "relu-mlp@init": untrained
        steps = 0 if when == "init" else args.train_steps
        net, loss_fn, data = make_problem(base, args.samples, steps)
        H = ck.HessianOperator(net, loss_fn, data)
        G = ck.GGNOperator(net, loss_fn, data)
        t0 = time.perf_counter()
        H_dense = H.to_dense()
        truth_diag = H_dense.diagonal()
        truth = truth_diag.sum()
        g_diag = G.diagonal()
        R_dense = H_dense - G.to_dense()
        ratio = float(R_dense.norm() / H_dense.norm())
        print(
            f"{kind}: D={H.shape[0]}, tr(H)={float(truth):.4g}, ||R||/||H||={ratio:.2f}, "
            f"GGN diag cost {g_diag.num_backward:g} grads, oracle {time.perf_counter() - t0:.1f}s"
        )
        c_g = math.ceil(g_diag.num_backward)
        for C in args.budgets:
            trace_estimators = {
                "ggn-cv": partial(ggn_cv_trace, H, C - c_g, ggn_diagonal=g_diag),
                # one block holding every parameter: full-vector probes of R
                "ggn-cv, full-vector probes": partial(
                    ggn_cv_trace, H, C - c_g, ggn_diagonal=g_diag, blocks="all"
                ),
                "hutchinson": partial(TRACE_METHODS["hutchinson"], H, C),
                "xtrace": partial(TRACE_METHODS["xtrace"], H, C),
            }
            rows += measure(kind, "trace", C, trace_estimators, truth, args.seeds)
            if diag_methods:
                diag_estimators = {
                    "ggn-cv": partial(ggn_cv_diagonal, H, C - c_g, ggn_diagonal=g_diag),
                    **{name: partial(fn, H, C) for name, fn in diag_methods.items()},
                }
                rows += measure(kind, "diagonal", C, diag_estimators, truth_diag, args.seeds)
    return rows


def to_markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Cross-entropy, 5 classes, {args.samples} samples, trained {args.train_steps} Adam "
        f"steps; {args.seeds} seeds per cell; float64, CPU.",
        "",
        "| network | quantity | cost (grad-eq.) | method | rel. RMS error | variance / Hutchinson "
        "| 95% CI coverage |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['net']} | {r['quantity']} | {r['cost']:g} | {r['method']} | {r['rel']:.2e} | "
            f"{r['var_ratio']:.2e} | {r['cover']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--networks",
        nargs="+",
        default=["relu-mlp@init", "relu-mlp", "relu-cnn", "tanh-mlp", "gelu-ln-mlp"],
        help="relu-mlp, relu-cnn, tanh-mlp, gelu-ln-mlp; suffix @init for the untrained net",
    )
    parser.add_argument("--budgets", nargs="+", type=int, default=[24, 96])
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true", help=f"update the table in {DOC}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    table = to_markdown(run(args), args)
    print(table)
    print(f"({time.perf_counter() - t0:.0f}s)")
    if args.write:
        text = DOC.read_text()
        block = f"{BEGIN}\n{table}\n{END}"
        new, n = re.subn(
            re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S
        )
        if n != 1:
            raise SystemExit(f"{DOC} has no {BEGIN} ... {END} block")
        DOC.write_text(new)
        print(f"wrote the table to {DOC}")


if __name__ == "__main__":
    main()
