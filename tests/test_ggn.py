"""GGNOperator and ResidualOperator against a dense ``J^T Lambda J`` built by hand (float64)."""

from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import curvkit as ck
from curvkit.autodiff import differentiable_attention
from curvkit.linop import unflatten_vector
from tests.cases import (
    CASE_SPECS,
    DTYPE,
    Case,
    _weights,
    case_ids,
    dense_hessian,
    make_case,
    rel_err,
)

TOL = 1e-10


def dense_ggn(case: Case, params: list[Tensor] | None = None) -> Tensor:
    """``sum_groups J^T Lambda J`` in float64.

    ``J`` is the Jacobian of the stacked outputs w.r.t. the flattened params
    (``torch.autograd.functional.jacobian``), ``Lambda`` the Hessian of the weighted loss
    w.r.t. the stacked outputs (``torch.autograd.functional.hessian``). Groups: the
    concatenated data, or each batch on its own for train-mode BatchNorm.
    """
    params = case.params if params is None else params
    names = {id(p): n for n, p in case.model.named_parameters()}
    pnames = [names[id(p)] for p in params]
    shapes = [p.shape for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    if case.couples_samples:
        groups = [(X, y, w) for (X, y), w in zip(case.batches, _weights(case))]
    else:
        X = torch.cat([b[0] for b in case.batches])
        y = torch.cat([b[1] for b in case.batches])
        groups = [(X, y, 1.0)]
    buffers = {n: b.clone() for n, b in case.model.named_buffers()}
    G = torch.zeros(theta.numel(), theta.numel(), dtype=DTYPE)
    with differentiable_attention():
        for X, y, w in groups:

            def f(th, X=X):
                pieces = unflatten_vector(th, shapes)
                return functional_call(case.model, {**dict(zip(pnames, pieces)), **buffers}, (X,))

            out = f(theta).detach()
            J = torch.autograd.functional.jacobian(f, theta).reshape(out.numel(), -1)
            L = torch.autograd.functional.hessian(
                lambda o, y=y, w=w, shape=out.shape: w * case.loss_fn(o.reshape(shape), y),
                out.reshape(-1),
            )
            G += J.T @ L @ J
    return G


@functools.cache
def oracles(spec_index: int) -> tuple[Tensor, Tensor]:
    """Dense (GGN, Hessian) of a case-matrix entry, cached across tests."""
    case = make_case(*CASE_SPECS[spec_index])
    return dense_ggn(case), dense_hessian(case)


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


SPEC_IDS = case_ids()


@pytest.mark.parametrize("backend", ["double-vjp", "forward", "taylor-jvp", "auto"])
@pytest.mark.parametrize("index", range(len(CASE_SPECS)), ids=SPEC_IDS)
def test_ggn_matches_dense_oracle(index: int, backend: str) -> None:
    case = make_case(*CASE_SPECS[index])
    G_dense = dense_ggn(case)
    # auto without a kept graph: Taylor-mode J V, one forward per chunk of probes
    cache = backend != "auto"
    G = ck.GGNOperator(case.model, case.loss_fn, case.data, backend=backend, cache_graph=cache)
    assert G.is_psd and G.is_symmetric
    expect_fallback = backend == "forward" and case.couples_samples
    with pytest.warns(RuntimeWarning) if expect_fallback else contextlib.nullcontext():
        assert rel(G.to_dense(), G_dense) < TOL
    # a random (D, K) block and a (D,) vector
    g = torch.Generator().manual_seed(0)
    V = torch.randn(G.shape[0], 5, generator=g, dtype=DTYPE)
    assert rel(G @ V, G_dense @ V) < TOL
    assert rel(G @ V[:, 0], G_dense @ V[:, 0]) < TOL
    if backend in ("taylor-jvp", "auto"):  # the rules cover the whole matrix: no fallback
        assert G.backend == "taylor-jvp" and G.backend_fallback_reason is None
    # the dense GGN of a PSD loss is PSD
    assert float(torch.linalg.eigvalsh(G_dense).min()) > -1e-12 * float(G_dense.norm())


@pytest.mark.parametrize("spec", [("mlp-tanh", "mse-sum", [3, 5, 2]), ("cnn", "ce-mean", [4, 2])])
def test_ggn_parameter_subset(spec) -> None:
    case = make_case(*spec)
    sub = case.subset()
    G = ck.GGNOperator(case.model, case.loss_fn, case.data, params=sub)
    assert rel(G.to_dense(), dense_ggn(case, sub)) < TOL


RESIDUAL_CASES = [0, 3, 5, 7, 8, 10]


@pytest.mark.parametrize("index", RESIDUAL_CASES, ids=[SPEC_IDS[i] for i in RESIDUAL_CASES])
def test_residual_is_hessian_minus_ggn(index: int) -> None:
    case = make_case(*CASE_SPECS[index])
    G_dense, H_dense = oracles(index)
    R = ck.ResidualOperator(case.model, case.loss_fn, case.data)
    assert R.is_symmetric and not R.is_psd
    assert rel(R.to_dense(), H_dense - G_dense) < TOL


def test_relu_residual_has_zero_layer_blocks() -> None:
    """Piecewise-linear net: R is large but every per-layer diagonal block vanishes."""
    index = CASE_SPECS.index(("mlp-relu", "ce-mean", [3, 5, 2]))
    case = make_case(*CASE_SPECS[index])
    G_dense, H_dense = oracles(index)
    R = H_dense - G_dense
    assert float(R.norm() / H_dense.norm()) > 0.3
    start = 0
    for layer in (0, 2, 4):
        size = sum(p.numel() for p in case.model[layer].parameters())
        block = R[start : start + size, start : start + size]
        assert float(block.abs().max()) < 1e-14 * float(H_dense.abs().max())
        start += size


def test_model_left_as_it_was() -> None:
    case = make_case("bn-train", "ce-mean", [6])
    model = case.model
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    G = ck.GGNOperator(model, case.loss_fn, case.data)
    G.to_dense()
    G.diagonal()
    G.diagonal("mc", mc_samples=2, generator=torch.Generator().manual_seed(0))
    ck.ResidualOperator(model, case.loss_fn, case.data).to_dense()
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    assert torch.equal(torch.get_rng_state(), rng)


def test_errors() -> None:
    case = make_case("mlp-tanh", "mse-mean", [7])
    with pytest.raises(ValueError, match="unknown GGN backend"):
        ck.GGNOperator(case.model, case.loss_fn, case.data, backend="nope")

    class TupleOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3).to(DTYPE)

        def forward(self, x):
            return self.lin(x), x

    G = ck.GGNOperator(TupleOut(), case.loss_fn, case.data)
    with pytest.raises(TypeError, match="one tensor"):
        G @ torch.ones(G.shape[0], dtype=DTYPE)

    class Coupled(nn.Module):  # a loss that couples the samples of a batch
        reduction = "sum"

        def forward(self, out, y):
            return (out - y).sum() ** 2

    G = ck.GGNOperator(case.model, Coupled(), case.data)
    with pytest.raises(ValueError, match="couples the samples"):
        G.diagonal()


def test_auto_takes_taylor_jvp_where_no_graph_is_kept() -> None:
    one = make_case("layernorm-gelu", "ce-mean", [4])
    G_dense = dense_ggn(one)
    v = torch.randn(G_dense.shape[0], 3, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    cold = ck.GGNOperator(one.model, one.loss_fn, one.data, cache_graph=False)
    assert rel(cold @ v[:, 0], G_dense @ v[:, 0]) < TOL and cold.backend == "taylor-jvp"
    assert rel(cold @ v, G_dense @ v) < TOL and cold.backend == "taylor-jvp"  # chunks of 2
    kept = ck.GGNOperator(one.model, one.loss_fn, one.data)
    assert rel(kept @ v[:, 0], G_dense @ v[:, 0]) < TOL  # a trial picks the backend
    assert kept.backend == kept.backend_choices["single"]
    assert all(
        isinstance(kept.backend_trials["single"][n], float) for n in ("double-vjp", "taylor-jvp")
    )
    two = make_case("layernorm-gelu", "ce-mean", [4, 3])
    G_two = dense_ggn(two)
    several = ck.GGNOperator(two.model, two.loss_fn, two.data)
    assert rel(several @ v[:, :2], G_two @ v[:, :2]) < TOL and several.backend == "taylor-jvp"


@pytest.mark.parametrize("name", ["causal-attention", "conv-zoo", "elementwise"])
def test_taylor_jvp_through_the_other_rules(name) -> None:
    from tests.test_taylor import _extra_case

    case = _extra_case(name)
    G_dense = dense_ggn(case)
    V = torch.randn(G_dense.shape[0], 3, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    G = ck.GGNOperator(case.model, case.loss_fn, case.data, backend="taylor-jvp")
    assert rel(G @ V, G_dense @ V) < TOL
    assert G.backend == "taylor-jvp" and G.backend_fallback_reason is None


def test_taylor_jvp_falls_back_without_a_rule() -> None:
    case = make_case("mlp-tanh", "mse-mean", [4])
    case.model[1] = nn.Hardswish()  # no Taylor-mode rule
    G_dense = dense_ggn(case)
    v = torch.randn(G_dense.shape[0], generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    auto = ck.GGNOperator(case.model, case.loss_fn, case.data, cache_graph=False)
    assert rel(auto @ v, G_dense @ v) < TOL  # silently: auto's choice
    assert auto.backend == "double-vjp"
    assert "TaylorUnsupportedError" in auto.backend_fallback_reason
    assert rel(auto @ v, G_dense @ v) < TOL and auto.backend == "double-vjp"  # not retried
    explicit = ck.GGNOperator(case.model, case.loss_fn, case.data, backend="taylor-jvp")
    with pytest.warns(RuntimeWarning, match="using double-vjp"):
        assert rel(explicit @ v, G_dense @ v) < TOL
    assert explicit.backend == "double-vjp"


class _ItemAssignment(nn.Module):
    """``h[:, 0] = 0``: fine for autograd, impossible on a Taylor-mode jet."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.lin(x)
        h[:, 0] = 0.0
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("cache_graph", [True, False])
def test_a_model_the_rules_cannot_run_keeps_the_defaults_working(cache_graph) -> None:
    """Item assignment on a jet (a TypeError in the rules) is a TaylorUnsupportedError: the
    Hessian trial drops reverse-over-forward, the GGN's auto uses double VJP."""
    case = make_case("mlp-tanh", "mse-mean", [4])
    torch.manual_seed(0)
    case.model = _ItemAssignment().to(DTYPE)
    G_dense, H_dense = dense_ggn(case), dense_hessian(case)
    v = torch.randn(G_dense.shape[0], generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    H = ck.HessianOperator(case.model, case.loss_fn, case.data, cache_graph=cache_graph)
    assert rel(H @ v, H_dense @ v) < TOL
    assert "item assignment" in H.backend_trials["single"]["reverse-over-forward"]
    G = ck.GGNOperator(case.model, case.loss_fn, case.data, cache_graph=cache_graph)
    assert rel(G @ v, G_dense @ v) < TOL and G.backend == "double-vjp"
    if not cache_graph:
        assert "item assignment" in G.backend_fallback_reason


def test_output_tangents_keep_no_graph_of_their_own() -> None:
    from curvkit.taylor import output_tangents

    case = make_case("layernorm-gelu", "ce-mean", [4])
    params = case.params
    probes = [torch.randn(3, *p.shape, dtype=DTYPE) for p in params]
    out, JV = output_tangents(case.model, case.batches[0][0], params, probes)
    assert out.requires_grad and not JV.requires_grad and JV.shape == (3, *out.shape)


def test_block_chunk_sized_to_four_gradients(monkeypatch) -> None:
    """CUDA's default chunking (max_probes_per_chunk=None) of a Taylor-mode pass, forced
    on the CPU: the chunk is measured to keep a K-probe product within 4 gradients' peak
    beyond its result, and the products stay exact; 16 probes per pass hold more."""
    from curvkit.live_memory import peak_allocated_bytes

    case = make_case("transformer", "ce-seq-mean", [4])
    G_dense = dense_ggn(case)
    G = ck.GGNOperator(case.model, case.loss_fn, case.data, backend="taylor-jvp")
    monkeypatch.setattr(G, "_measures_chunks", lambda: True)
    D, K = G.shape[0], 12
    V = torch.randn(K, D, generator=torch.Generator().manual_seed(0), dtype=DTYPE).T
    assert rel(G @ V, G_dense @ V) < TOL
    assert 1 <= G.block_chunk < 16 and G.block_chunk == G.chunk_sizes["taylor-jvp"]
    assert G.chunk_memory["taylor-jvp"]["budget"] == 4 * G.gradient_peak_bytes
    G.clear_cache()
    peak = peak_allocated_bytes(lambda: G @ V) - (K - 1) * D * V.element_size()
    assert peak <= 4 * G.gradient_peak_bytes
    wide = ck.GGNOperator(
        case.model, case.loss_fn, case.data, backend="taylor-jvp", max_probes_per_chunk=16
    )
    assert wide.block_chunk == 16
    wide @ V
    wide.clear_cache()
    assert peak_allocated_bytes(lambda: wide @ V) - (K - 1) * D * V.element_size() > peak


def _fake_trial_times(monkeypatch, seconds: dict[str, float]) -> None:
    """Make every timed trial run of a GGN backend take ``seconds[backend]``."""

    def timed(self, run):
        out = run()
        return out, seconds[self.backend]

    monkeypatch.setattr(ck.GGNOperator, "_timed", timed)


@pytest.mark.parametrize("faster", ["double-vjp", "taylor-jvp"])
def test_kept_graph_trial_keeps_the_faster_backend(monkeypatch, faster) -> None:
    """With a kept graph, ``auto`` times double VJP against Taylor mode once per kind and
    keeps the faster (Taylor mode only below ``TAYLOR_MARGIN`` of double VJP); the products
    match the oracle whichever is kept, and the graph stays for double VJP."""
    from curvkit.operators import ggn

    times = {"double-vjp": 1.0, "taylor-jvp": 0.5 if faster == "taylor-jvp" else 0.97}
    assert times["taylor-jvp"] < 1.0 and (faster == "taylor-jvp") == (
        times["taylor-jvp"] < ggn.TAYLOR_MARGIN
    )
    _fake_trial_times(monkeypatch, times)
    case = make_case("bn-eval", "ce-mean", [5])
    G_dense = dense_ggn(case)
    # column-major, more probes than a trial runs: the rest goes through the chosen backend
    V = torch.randn(11, G_dense.shape[0], generator=torch.Generator().manual_seed(7), dtype=DTYPE).T
    G = ck.GGNOperator(case.model, case.loss_fn, case.data)
    assert rel(G @ V[:, 0], G_dense @ V[:, 0]) < TOL
    assert rel(G @ V, G_dense @ V) < TOL
    assert G.backend_choices == {"single": faster, "block": faster} and G.backend == faster
    assert G.backend_trials["block"] == times
    assert rel(G @ V, G_dense @ V) < TOL and G.backend_trials["block"] == times  # no new trial


def test_kept_graph_trial_drops_taylor_mode_without_a_rule() -> None:
    case = make_case("mlp-tanh", "mse-mean", [4])
    case.model[1] = nn.Hardswish()  # no Taylor-mode rule
    G_dense = dense_ggn(case)
    v = torch.randn(G_dense.shape[0], generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    G = ck.GGNOperator(case.model, case.loss_fn, case.data)
    with warnings_as_errors():
        assert rel(G @ v, G_dense @ v) < TOL
    assert G.backend == "double-vjp" == G.backend_choices["single"]
    assert "TaylorUnsupportedError" in G.backend_trials["single"]["taylor-jvp"]
    G @ torch.stack([v, v], 1)
    assert "block" not in G.backend_trials  # no trial once Taylor mode is known to fail
    assert G.backend == "double-vjp"


def test_kept_graph_trial_drops_a_disagreeing_taylor_mode(monkeypatch) -> None:
    case = make_case("mlp-tanh", "mse-mean", [4])
    G_dense = dense_ggn(case)
    v = torch.randn(G_dense.shape[0], generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    G = ck.GGNOperator(case.model, case.loss_fn, case.data)
    right = G._taylor_jvp_product
    monkeypatch.setattr(G, "_taylor_jvp_product", lambda *a: [1.01 * r for r in right(*a)])
    assert rel(G @ v, G_dense @ v) < TOL
    assert G.backend_choices["single"] == "double-vjp"
    assert "disagrees with double-vjp" in G.backend_trials["single"]["taylor-jvp"]


@contextlib.contextmanager
def warnings_as_errors():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_cpu_default_chunks() -> None:
    """On a CPU double VJP takes one probe at a time and Taylor mode two, unmeasured."""
    from curvkit.operators import ggn

    case = make_case("mlp-tanh", "mse-mean", [4])
    G = ck.GGNOperator(case.model, case.loss_fn, case.data)
    assert G._chunk_for("double-vjp") == 1
    assert G._chunk_for("taylor-jvp") == ggn.CPU_FORWARD_CHUNK == 2
    assert G.chunk_memory == {}
    explicit = ck.GGNOperator(case.model, case.loss_fn, case.data, max_probes_per_chunk=3)
    assert explicit._chunk_for("double-vjp") == explicit._chunk_for("taylor-jvp") == 3


def test_auto_without_a_kept_graph_checks_taylor_mode_once(monkeypatch):
    """Without a kept graph "auto" takes Taylor mode untimed; a Taylor mode that differs
    from double VJP (here made to, by 1%) is caught on the first product and dropped."""
    case = make_case("mlp-tanh", "mse-mean", [3, 5, 2])  # several batches: nothing kept
    G = dense_ggn(case)
    V = torch.randn(G.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=G.dtype)
    agreeing = ck.GGNOperator(case.model, case.loss_fn, case.data)
    assert rel_err(agreeing @ V, G @ V) < 1e-10
    assert agreeing.backend == "taylor-jvp" and agreeing.backend_fallback_reason is None
    off = ck.GGNOperator(case.model, case.loss_fn, case.data)
    exact = off._taylor_jvp_product
    monkeypatch.setattr(off, "_taylor_jvp_product", lambda *a: [1.01 * r for r in exact(*a)])
    for _ in range(2):
        assert rel_err(off @ V, G @ V) < 1e-10
    assert off.backend == "double-vjp"
    assert "taylor-jvp disagrees with double-vjp" in off.backend_fallback_reason
