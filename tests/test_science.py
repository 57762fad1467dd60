"""Science checks: the sweep's numbers reproduce known results, with statistical margins.

These hold in expectation at fixed parameters for per-sample-additive losses, so each check
averages over independent curvature batches and repeats over several seeds (each seed has
its own parameters); margins are a few standard errors of the mean over batches.

1. The mini-batch Hessian is an unbiased estimate of the full-batch Hessian (batches drawn
   uniformly without replacement), so the mean mini-batch trace does not depend on the
   curvature batch size.
2. ``lambda_max`` is convex in the matrix, so by Jensen the mean mini-batch ``lambda_max``
   is at least the full-batch one, and it falls toward it as the batch grows.
3. For a piecewise-linear (ReLU) network with cross-entropy the residual ``R = H - G`` has
   zero diagonal blocks per layer: the Hessian and GGN diagonals and traces agree to
   rounding, while the full matrices do not.
4. A trained ``C``-class classifier has ``C - 1`` to ``C + 1`` outlier eigenvalues. Criterion:
   among the top 25 eigenvalues ``l_1 >= l_2 >= ...`` the number of outliers ``k`` is where
   the largest ratio ``l_k / l_{k+1}`` occurs, i.e. the widest gap of the spectrum on a log
   scale (the gap between the outliers and the bulk of the smoothed log-density).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import curvkit as ck
from curvkit.datasets import load_dataset
from curvkit.experiments import parse_config, run_sweep
from curvkit.experiments.tables import load_tables
from curvkit.zoo import build_model

SEEDS = [0, 1, 2]


def _sweep(tmp_path, **cfg) -> dict[str, pd.DataFrame]:
    base = {"name": "science", "dtype": "float64", "threads": 1}
    run_sweep(parse_config({**base, **cfg}), output=tmp_path, progress=False, figures=False)
    return load_tables(tmp_path)


@pytest.fixture(scope="module")
def batch_sweep(tmp_path_factory):
    """Exact traces and top eigenvalues of many mini-batch Hessians of a small trained net."""
    tables = _sweep(
        tmp_path_factory.mktemp("batches"),
        data={
            "name": "teacher-student-classification",
            "num_samples": 128,
            "dim": 6,
            "num_classes": 4,
        },
        models=[{"name": "mlp", "depth": 1, "width": 6, "activation": "tanh", "label": "mlp"}],
        grid={
            "seeds": SEEDS,
            "train_batch_sizes": [16],
            "checkpoints": [40],
            "curvature_batch_sizes": [4, 32, "full"],
            "draws": 16,
        },
        training={"lr": 0.2},
        quantities={
            "measure": ["trace", "eigenvalues"],
            "trace": {"method": "exact"},
            "eigenvalues": {"top_k": 1, "bottom_k": 0},
        },
    )
    m = tables["measurements"]
    return m[m["quantity"].isin(["trace", "lambda_max"])]


def _by_batch(m: pd.DataFrame, quantity: str, seed: int) -> pd.DataFrame:
    d = m[(m["quantity"] == quantity) & (m["seed"] == seed)]
    g = d.groupby("curvature_batch_size")["value"]
    return pd.DataFrame({"mean": g.mean(), "sem": g.std(ddof=1) / np.sqrt(g.size()), "n": g.size()})


def test_minibatch_trace_is_unbiased(batch_sweep):
    for seed in SEEDS:
        t = _by_batch(batch_sweep, "trace", seed)
        full = t["mean"].iloc[-1]  # the full split: one batch, measured once
        assert t["n"].iloc[-1] == 1
        for b, row in t.iloc[:-1].iterrows():
            assert row["n"] == 16
            assert abs(row["mean"] - full) <= 4 * row["sem"] + 1e-9, (seed, b, row, full)


def test_minibatch_lambda_max_is_biased_up_and_falls_with_batch_size(batch_sweep):
    stats = [_by_batch(batch_sweep, "lambda_max", seed) for seed in SEEDS]
    for seed, lam in zip(SEEDS, stats):
        means, sems = lam["mean"].to_numpy(), np.nan_to_num(lam["sem"].to_numpy())
        full = means[-1]
        # Jensen: every mini-batch average is at least the full-batch value ...
        assert (means[:-1] >= full - 3 * sems[:-1]).all(), (seed, lam)
        # ... and clearly above it at the larger mini-batch (32 of 96 samples)
        assert means[-2] - full > 2 * sems[-2], (seed, lam)
    # falls toward it as the batch grows: 4 > 32 > full. Small batches make lambda_max
    # heavy-tailed, so the step 4 -> 32 is tested on the seeds pooled (z > 2).
    means = np.stack([s["mean"].to_numpy() for s in stats])
    sems = np.nan_to_num(np.stack([s["sem"].to_numpy() for s in stats]))
    for a in range(means.shape[1] - 1):
        diff = (means[:, a] - means[:, a + 1]).sum()
        se = np.sqrt((sems[:, a] ** 2 + sems[:, a + 1] ** 2).sum())
        assert diff > 2 * se, (a, means, sems)


@pytest.mark.parametrize("seed", SEEDS)
def test_relu_ce_hessian_and_ggn_diagonals_agree_but_matrices_do_not(seed):
    ds = load_dataset(
        "teacher-student-classification", seed=seed, num_samples=64, dim=5, num_classes=4
    ).to(torch.float64)
    X, y = ds.train
    loss = ds.loss_fn()
    for activation, agree in (("relu", True), ("tanh", False)):
        model = build_model(
            "mlp",
            ds.input_shape,
            4,
            seed=seed,
            dtype=torch.float64,
            depth=2,
            width=5,
            activation=activation,
        ).eval()
        H = ck.HessianOperator(model, loss, (X, y))
        G = ck.GGNOperator(model, loss, (X, y))
        dH = ck.diagonal(H, method="exact").value
        dG = G.diagonal().value
        tH, tG = ck.trace(H, method="exact").value, G.trace().value
        Hd, Gd = H.to_dense(), G.to_dense()
        assert torch.allclose(torch.diagonal(Hd), dH, atol=1e-12)
        scale = dH.abs().max()
        if agree:
            assert (dH - dG).abs().max() <= 1e-10 * scale
            assert abs(tH - tG) <= 1e-10 * abs(tH)
            # the cross-layer blocks of the residual are large
            assert torch.linalg.norm(Hd - Gd) / torch.linalg.norm(Hd) > 0.1
        else:
            assert (dH - dG).abs().max() > 1e-4 * scale


def test_trained_classifier_has_c_minus_one_to_c_plus_one_outliers(tmp_path):
    tables = _sweep(
        tmp_path,
        data={"name": "digits", "test_fraction": 0.5},
        models=[{"name": "mlp", "depth": 1, "width": 32, "label": "mlp"}],
        grid={
            "seeds": SEEDS,
            "train_batch_sizes": [64],
            "checkpoints": [200],
            "curvature_batch_sizes": ["full"],
        },
        training={"lr": 0.05, "momentum": 0.9},
        quantities={
            "measure": ["accuracy", "eigenvalues"],
            "eigenvalues": {"top_k": 25, "bottom_k": 0},
        },
    )
    C = 10
    acc = tables["measurements"].query("quantity == 'accuracy_test'")["value"]
    assert (acc > 0.85).all(), "the classifier must be trained for the outliers to appear"
    eig = tables["eigenvalues"]
    for seed in SEEDS:
        top = eig[(eig["seed"] == seed) & (eig["which"] == "top")].sort_values("rank")
        lam = top["value"].to_numpy()
        assert len(lam) == 25 and (np.diff(lam) <= 1e-9 * lam[0]).all()
        ratios = lam[:-1] / lam[1:]
        k = int(ratios.argmax()) + 1
        assert C - 1 <= k <= C + 1, (seed, k, np.round(ratios, 2))
        assert ratios[k - 1] > 1.5, (seed, np.round(ratios, 2))
