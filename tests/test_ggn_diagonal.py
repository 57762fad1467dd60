"""Exact and Monte-Carlo GGN diagonal/trace, and BackPACK's exact GGN and Hessian diagonals."""

from __future__ import annotations

import pytest
import torch

import curvkit as ck
from curvkit.estimators.control_variates import (
    ggn_backpack_diagonal,
    ggn_exact_diagonal,
    ggn_exact_trace,
    ggn_mc_trace,
    hessian_backpack_diagonal,
    hessian_backpack_trace,
)
from curvkit.estimators.diagonal import DIAGONAL_METHODS, diagonal
from curvkit.estimators.trace import TRACE_METHODS, trace
from tests.cases import CASE_SPECS, case_ids, make_case
from tests.test_ggn import oracles, rel

TOL = 1e-10
SPEC_IDS = case_ids()
# models and losses BackPACK 1.7.1 supports (Sequential of Linear/Conv/ReLU/Tanh/MaxPool/
# Flatten, eval-mode BatchNorm for the GGN only; MSE and cross-entropy)
BACKPACK_GGN = [0, 1, 3, 4, 5, 6, 7]
BACKPACK_HESSIAN = [0, 1, 3, 4, 5, 6]


@pytest.mark.parametrize("index", range(len(CASE_SPECS)), ids=SPEC_IDS)
def test_exact_ggn_diagonal_and_trace(index: int) -> None:
    case = make_case(*CASE_SPECS[index])
    G_dense, _ = oracles(index)
    G = ck.GGNOperator(case.model, case.loss_fn, case.data)
    d = G.diagonal()
    assert d.method == "ggn-exact" and d.num_matvecs == 0 and d.dof == 0
    assert rel(d.value, G_dense.diagonal()) < TOL
    assert float(d.stderr.abs().max()) == 0.0
    # one VJP per non-zero eigen-direction of the output Hessian and sample
    # (cross-entropy over C classes has rank C - 1; 3 tokens x 5 classes for the transformer)
    rank = 3 * 4 if "ce-seq" in case.name else 2 if "/ce" in case.name else 3
    assert d.info["factor_rank"] == rank
    assert d.info["vjp_path"] == ("autograd" if case.couples_samples else "vmap")
    if not case.couples_samples:
        assert d.num_backward == pytest.approx(rank)
    t = G.trace()
    assert t.value.ndim == 0 and float(t.stderr) == 0.0
    assert abs(float(t.value) - float(G_dense.trace())) <= TOL * abs(float(G_dense.trace()))


@pytest.mark.parametrize(
    "spec", [("cnn", "ce-mean", [4, 2]), ("transformer", "ce-seq-sum", [2, 3])]
)
def test_autograd_path_and_tiny_memory_budget_agree(spec) -> None:
    case = make_case(*spec)
    G = ck.GGNOperator(case.model, case.loss_fn, case.data, memory_budget=1)
    reference = G.diagonal(path="vmap").value
    d = G.diagonal(path="autograd")
    assert d.info["vjp_path"] == "autograd"
    assert rel(d.value, reference) < TOL
    assert d.num_backward > G.diagonal(path="vmap").num_backward  # whole-batch VJPs cost more


@pytest.mark.parametrize("index", BACKPACK_GGN, ids=[SPEC_IDS[i] for i in BACKPACK_GGN])
def test_against_backpack_diag_ggn_exact(index: int) -> None:
    case = make_case(*CASE_SPECS[index])
    G_dense, _ = oracles(index)
    G = ck.GGNOperator(case.model, case.loss_fn, case.data)
    ours = G.diagonal().value
    theirs = ggn_backpack_diagonal(G)
    assert theirs.method == "ggn-backpack"
    assert rel(ours, theirs.value) < TOL
    assert rel(theirs.value, G_dense.diagonal()) < TOL
    # the user's model is untouched: no BackPACK hooks, no new attributes
    for p in case.model.parameters():
        assert not hasattr(p, "diag_ggn_exact")
    assert all(not m._forward_hooks for m in case.model.modules())


@pytest.mark.parametrize("index", BACKPACK_HESSIAN, ids=[SPEC_IDS[i] for i in BACKPACK_HESSIAN])
def test_against_backpack_diag_hessian(index: int) -> None:
    case = make_case(*CASE_SPECS[index])
    _, H_dense = oracles(index)
    H = ck.HessianOperator(case.model, case.loss_fn, case.data)
    d = hessian_backpack_diagonal(H)
    assert d.method == "hessian-backpack"
    assert rel(d.value, H_dense.diagonal()) < TOL
    t = hessian_backpack_trace(H)
    assert float(t.value) == pytest.approx(float(H_dense.trace()), rel=TOL)


@pytest.mark.parametrize(
    "spec", [("layernorm-gelu", "mse-mean", [5]), ("bn-train", "ce-mean", [6])]
)
def test_backpack_unsupported_is_a_clear_error(spec) -> None:
    case = make_case(*spec)
    G = ck.GGNOperator(case.model, case.loss_fn, case.data)
    with pytest.raises(NotImplementedError, match="ggn-exact"):
        G.diagonal("backpack")
    H = ck.HessianOperator(case.model, case.loss_fn, case.data)
    with pytest.raises(NotImplementedError, match="BackPACK"):
        hessian_backpack_diagonal(H)


def test_backpack_is_not_handed_ignored_targets() -> None:
    """BackPACK counts targets equal to ignore_index as real ones (a diagonal 4-50% off)."""
    case = make_case("mlp-tanh", "ce-mean", [7])
    X, y = case.data
    y = y.clone()
    y[:2] = -100
    G = ck.GGNOperator(case.model, case.loss_fn, (X, y))
    H = ck.HessianOperator(case.model, case.loss_fn, (X, y))
    with pytest.raises(NotImplementedError, match=r"ignored targets.*'ggn-exact'"):
        G.diagonal("backpack")
    with pytest.raises(NotImplementedError, match=r"ignored targets.*'exact'/'xdiag'"):
        hessian_backpack_diagonal(H)
    kept = torch.ones_like(y, dtype=torch.bool)
    kept[:2] = False  # the exact diagonal counts only the others
    alone = ck.GGNOperator(case.model, case.loss_fn, (X[kept], y[kept])).diagonal("exact")
    assert rel(G.diagonal("exact").value, alone.value) < 1e-12


def test_a_loss_coupling_samples_slightly_is_caught_in_float32() -> None:
    """The separability check's float32 tolerance follows eps: a fixed 1e-3 let a coupling
    of 1e-5 through, and the exact diagonal silently dropped it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))

    def coupled(out, target):
        ce = torch.nn.functional.cross_entropy(out, target)
        return ce + 1e-5 * out.mean(0).square().sum()

    with pytest.raises(ValueError, match="couples the samples"):
        ck.GGNOperator(model, coupled, (X, y), reduction="mean").diagonal("exact")
    plain = torch.nn.CrossEntropyLoss()
    assert torch.isfinite(ck.GGNOperator(model, plain, (X, y)).diagonal("exact").value).all()


def test_monte_carlo_diagonal_is_unbiased_with_honest_error() -> None:
    index = CASE_SPECS.index(("mlp-tanh", "mse-sum", [3, 5, 2]))
    case = make_case(*CASE_SPECS[index])
    G_dense, _ = oracles(index)
    G = ck.GGNOperator(case.model, case.loss_fn, case.data)
    g = torch.Generator().manual_seed(3)
    d = G.diagonal("mc", mc_samples=64, generator=g)
    assert d.method == "ggn-mc" and d.dof == 63 and d.num_backward == pytest.approx(64)
    # entries with no Monte-Carlo noise (last-layer bias under MSE) are exact
    slack = 5.0 * d.stderr + 1e-10 * G_dense.diagonal().abs().max()
    assert bool(((d.value - G_dense.diagonal()).abs() <= slack).all())
    t = ggn_mc_trace(G, 64, torch.Generator().manual_seed(4))
    assert abs(float(t.value) - float(G_dense.trace())) < 4 * float(t.stderr)
    # reproducible from the generator
    again = G.diagonal("mc", mc_samples=64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.value, d.value)
    # the Monte-Carlo error is real, and shrinks with the number of samples
    few = G.diagonal("mc", mc_samples=4, generator=torch.Generator().manual_seed(5))
    assert float(few.stderr.mean()) > float(d.stderr.mean())


def test_monte_carlo_without_a_generator_draws_afresh_and_records_its_seed() -> None:
    """Not from the global RNG (which the operator restores after each call, so every call
    would draw the same 'random' samples), and reproducible from ``info["seed"]``."""
    case = make_case("mlp-tanh", "mse-sum", [3, 5, 2])
    G = ck.GGNOperator(case.model, case.loss_fn, case.data)
    global_state = torch.get_rng_state()
    first, second = (G.diagonal("mc", mc_samples=2) for _ in range(2))
    assert not torch.equal(first.value, second.value)
    assert torch.equal(torch.get_rng_state(), global_state)
    replay = G.diagonal(
        "mc", mc_samples=2, generator=torch.Generator().manual_seed(first.info["seed"])
    )
    assert torch.equal(replay.value, first.value)
    seeded = G.diagonal("mc", mc_samples=2, generator=torch.Generator().manual_seed(0))
    assert "seed" not in seeded.info  # the caller owns the generator
    assert G.trace("mc", mc_samples=2).info["seed"] != first.info["seed"]


def test_registry_entries() -> None:
    case = make_case("cnn", "ce-mean", [4, 2])
    G = ck.GGNOperator(case.model, case.loss_fn, case.data)
    for name in ("ggn-exact", "ggn-mc", "ggn-backpack", "hessian-backpack", "ggn-cv"):
        assert name in TRACE_METHODS
    for name in ("ggn-exact", "ggn-mc", "ggn-backpack", "hessian-backpack", "ggn-cv"):
        assert name in DIAGONAL_METHODS
    d = diagonal(G, method="ggn-mc", num_matvecs=3, generator=torch.Generator().manual_seed(0))
    assert d.method == "ggn-mc" and d.info["mc_samples"] == 3 and d.dof == 2
    t = trace(G, method="ggn-exact")
    assert float(t.value) == pytest.approx(float(ggn_exact_trace(G).value), rel=1e-14)
    assert rel(ggn_exact_diagonal(G).value, G.diagonal().value) < 1e-14
    H = ck.HessianOperator(case.model, case.loss_fn, case.data)
    with pytest.raises(TypeError, match="GGNOperator"):
        ggn_exact_trace(H)
    with pytest.raises(TypeError, match="HessianOperator"):
        hessian_backpack_diagonal(G)
    with pytest.raises(ValueError, match="train-mode BatchNorm"):
        bn = make_case("bn-train", "ce-mean", [6])
        ck.GGNOperator(bn.model, bn.loss_fn, bn.data).diagonal(path="vmap")
