"""The "ggn-cv" control-variate estimator: exact on ReLU nets, unbiased and calibrated elsewhere."""

from __future__ import annotations

import copy

import pytest
import torch

import curvkit as ck
from curvkit.estimators.control_variates import ggn_cv_diagonal, ggn_cv_trace, parameter_blocks
from curvkit.estimators.diagonal import diagonal
from curvkit.estimators.trace import trace
from tests.cases import CASE_SPECS, make_case
from tests.test_ggn import oracles, rel


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _setup(spec):
    index = CASE_SPECS.index(spec)
    case = make_case(*spec)
    G_dense, H_dense = oracles(index)
    H = ck.HessianOperator(case.model, case.loss_fn, case.data)
    return case, H, G_dense, H_dense


@pytest.mark.parametrize(
    "spec",
    [("mlp-relu", "ce-mean", [3, 5, 2]), ("mlp-relu", "ce-sum", [6]), ("cnn", "ce-mean", [4, 2])],
)
def test_relu_networks_ggn_cv_is_exact(spec) -> None:
    """diag(H) = diag(G) and tr(H) = tr(G) while R = H - G is large; ggn-cv is then exact."""
    case, H, G_dense, H_dense = _setup(spec)
    R = H_dense - G_dense
    assert float(R.norm() / H_dense.norm()) > 0.8  # measured 0.88 (MLP) and 0.92 (CNN)
    assert rel(G_dense.diagonal(), H_dense.diagonal()) < 1e-12
    scale = float(H_dense.diagonal().abs().sum())
    t = trace(H, method="ggn-cv", num_matvecs=12, generator=_gen(0))
    assert t.method == "ggn-cv" and t.num_matvecs == 12 and t.num_backward > 0
    assert abs(float(t.value) - float(H_dense.trace())) < 1e-12 * scale
    assert float(t.stderr) < 1e-12 * scale
    lo, hi = t.ci
    assert float(hi - lo) < 1e-11 * scale
    d = diagonal(H, method="ggn-cv", num_matvecs=12, generator=_gen(1))
    assert d.method == "ggn-cv" and d.value.shape == (H.shape[0],)
    assert rel(d.value, H_dense.diagonal()) < 1e-12
    assert float(d.stderr.max()) < 1e-12 * scale
    # full-vector probes of R pick up its cross-layer blocks: no longer exact
    full = ggn_cv_trace(H, 12, _gen(0), blocks="all")
    assert full.info["blocks"][0]["name"] == "all"
    assert float(full.stderr) > 1e-6 * scale


@pytest.mark.parametrize(
    "spec",
    [("mlp-tanh", "mse-mean", [7]), ("layernorm-gelu", "ce-mean", [4, 3])],
)
def test_smooth_networks_unbiased_and_calibrated(spec) -> None:
    case, H, G_dense, H_dense = _setup(spec)
    truth = float(H_dense.trace())
    ggn_diag = ck.GGNOperator(case.model, case.loss_fn, case.data).diagonal()
    n_seeds, budget = 300, 12
    values, covered = [], 0
    diag_cover = torch.zeros(H.shape[0], dtype=torch.float64)
    diag_values = []
    for seed in range(n_seeds):
        t = ggn_cv_trace(H, budget, _gen(seed), ggn_diagonal=ggn_diag)
        values.append(float(t.value))
        lo, hi = t.ci
        covered += int(float(lo) <= truth <= float(hi))
        if seed < 100:
            d = ggn_cv_diagonal(H, budget, _gen(10_000 + seed), ggn_diagonal=ggn_diag)
            lo, hi = d.ci
            diag_cover += ((lo <= H_dense.diagonal()) & (H_dense.diagonal() <= hi)).double()
            diag_values.append(d.value)
    v = torch.tensor(values, dtype=torch.float64)
    sem = float(v.std() / n_seeds**0.5)
    assert float(v.std()) > 0  # a genuinely random estimate
    assert abs(float(v.mean()) - truth) < 4 * sem
    assert 0.85 <= covered / n_seeds <= 0.995
    # diagonal: unbiased entry by entry, and the per-entry intervals cover sanely on average
    dv = torch.stack(diag_values)
    d_sem = dv.std(0) / dv.shape[0] ** 0.5
    slack = 4.5 * d_sem + 1e-12 * H_dense.diagonal().abs().max()
    assert bool(((dv.mean(0) - H_dense.diagonal()).abs() <= slack).all())
    noisy = dv.std(0) > 0
    assert 0.85 <= float(diag_cover[noisy].mean() / 100) <= 0.995


def test_budget_split_and_rounding_reported() -> None:
    case, H, G_dense, H_dense = _setup(("mlp-tanh", "mse-mean", [7]))
    blocks = parameter_blocks(H.param_names)
    assert [name for name, _ in blocks] == ["0", "2"]
    t = ggn_cv_trace(H, 13, _gen(0))
    assert t.num_matvecs == 13 and t.info["unused_matvecs"] == 0
    assert sum(b["probes"] for b in t.info["blocks"]) == 13
    assert t.info["requested_matvecs"] == 13
    assert t.dof >= 1
    # per-tensor blocks: a share reaching a bias vector's size (3 and 5 entries) is spent
    # on unit probes (exact), the surplus goes to the other blocks
    tp = ggn_cv_trace(H, 40, _gen(0), blocks="param")
    exact = {b["name"]: b["exact"] for b in tp.info["blocks"]}
    assert exact["2.bias"] and exact["0.bias"] and not exact["0.weight"]
    assert tp.num_matvecs == 40
    # a budget covering every block: exact, the surplus reported, never an error
    D = H.shape[0]
    e = ggn_cv_trace(H, D + 7, _gen(0))
    assert e.num_matvecs == D and e.info["unused_matvecs"] == 7
    assert float(e.stderr) == 0.0 and e.dof == 0
    assert abs(float(e.value) - float(H_dense.trace())) < 1e-10 * float(H_dense.abs().max())
    ed = ggn_cv_diagonal(H, D, _gen(0))
    assert rel(ed.value, H_dense.diagonal()) < 1e-10
    # reproducible from the generator
    assert float(ggn_cv_trace(H, 13, _gen(0)).value) == float(t.value)


def test_backpack_ggn_and_precomputed_diagonal_agree() -> None:
    case, H, _, _ = _setup(("mlp-tanh", "mse-sum", [3, 5, 2]))
    a = ggn_cv_trace(H, 10, _gen(2))
    b = ggn_cv_trace(H, 10, _gen(2), ggn_method="backpack")
    assert float(a.value) == pytest.approx(float(b.value), rel=1e-12)
    assert b.info["ggn_method"] == "ggn-backpack"
    diag = ck.GGNOperator(case.model, case.loss_fn, case.data).diagonal()
    c = ggn_cv_trace(H, 10, _gen(2), ggn_diagonal=diag)
    assert float(c.value) == pytest.approx(float(a.value), rel=1e-12)
    assert c.num_backward == a.num_backward
    # a Monte-Carlo diagonal would be taken as exact and its error dropped: refused
    mc = ck.GGNOperator(case.model, case.loss_fn, case.data).diagonal("mc", mc_samples=4)
    with pytest.raises(ValueError, match="must be the exact GGN diagonal"):
        ggn_cv_trace(H, 10, _gen(2), ggn_diagonal=mc)


def test_model_left_as_it_was() -> None:
    case, H, _, _ = _setup(("cnn", "ce-mean", [4, 2]))
    for p in case.model.parameters():
        p.grad = torch.ones_like(p)
    before = copy.deepcopy(case.model.state_dict())
    rng = torch.get_rng_state()
    ggn_cv_trace(H, 8, _gen(0))
    ggn_cv_diagonal(H, 8, _gen(0), ggn_method="backpack")
    assert all(torch.equal(v, before[k]) for k, v in case.model.state_dict().items())
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in case.model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert case.model.training


def test_errors() -> None:
    bn = make_case("bn-train", "ce-mean", [6])
    H_bn = ck.HessianOperator(bn.model, bn.loss_fn, bn.data)
    with pytest.raises(ValueError, match="BatchNorm in training mode"):
        trace(H_bn, method="ggn-cv", num_matvecs=20, generator=_gen(0))
    with pytest.raises(ValueError, match="BatchNorm in training mode"):
        ggn_cv_diagonal(H_bn, 20, _gen(0))
    case = make_case("mlp-tanh", "mse-mean", [7])
    G = ck.GGNOperator(case.model, case.loss_fn, case.data)
    with pytest.raises(TypeError, match="HessianOperator"):
        trace(G, method="ggn-cv", num_matvecs=20, generator=_gen(0))
    with pytest.raises(TypeError, match="HessianOperator"):
        ggn_cv_diagonal(torch.eye(4, dtype=torch.float64), 20, _gen(0))
    H = ck.HessianOperator(case.model, case.loss_fn, case.data)
    with pytest.raises(ValueError, match="needs num_matvecs >= 4"):
        ggn_cv_trace(H, 3, _gen(0))
    with pytest.raises(ValueError, match="partition"):
        ggn_cv_trace(H, 10, _gen(0), blocks=[[0, 1]])
    with pytest.raises(ValueError, match="allocation"):
        ggn_cv_trace(H, 10, _gen(0), allocation="nope")
