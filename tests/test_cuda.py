"""Every backend on a CUDA device against the CPU's dense float64 oracle.

Runs only where CUDA is available (never in CI; on the leased GPU machine, see
docs/performance.md). The models are the case matrix's, moved to the GPU in float64; the
oracles are built on the CPU, so a device-specific kernel (cuBLAS, cuDNN, the GPU's
``*_backward`` kernels under reverse over forward, Triton under ``"compiled"``) that
computed something else would fail here.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import curvkit as ck
from curvkit.autodiff import EAGER_BACKENDS
from tests.cases import CASE_SPECS, case_ids, dense_hessian, make_case, rel_err
from tests.test_ggn import dense_ggn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOL = 1e-10
_DENSE: dict[tuple[str, str], torch.Tensor] = {}


def _oracle(case, kind: str) -> torch.Tensor:
    """The dense Hessian or GGN on the CPU, cached per case (cases are deterministic)."""
    key = (case.name, kind)
    if key not in _DENSE:
        _DENSE[key] = dense_hessian(case) if kind == "hessian" else dense_ggn(case)
    return _DENSE[key]


def _on_cuda(case):
    """The case's model on the GPU; its batches stay on the CPU (moved per batch)."""
    case.model.cuda()
    return case.data


def _probes(D: int, K: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(D, K, generator=g, dtype=torch.float64).cuda()


def _problem(spec, kind: str, K: int):
    """``(case, data, V, expected)``: a case with its model on the GPU, ``K`` probes on the
    GPU and the oracle's products (``kind``: ``"hessian"`` or ``"ggn"``) moved there."""
    case = make_case(*spec)
    dense = _oracle(case, kind)
    data = _on_cuda(case)
    V = _probes(dense.shape[0], K)
    return case, data, V, (dense @ V.cpu()).cuda()


@pytest.mark.parametrize(
    "spec", [("mlp-tanh", "ce-mean", [3, 5]), ("transformer", "ce-seq-mean", [4])]
)
def test_products_on_cuda_match_cpu_oracle(spec):
    case = make_case(*spec)
    H_dense = dense_hessian(case)
    model = case.model.cuda()
    batches = [(X, y) for X, y in case.batches]  # left on the CPU: moved per batch
    H = ck.HessianOperator(model, case.loss_fn, batches if len(batches) > 1 else batches[0])
    assert H.device.type == "cuda"
    V = torch.randn(H.shape[0], 3, dtype=torch.float64, device="cuda")
    rng = torch.cuda.get_rng_state()
    out = H @ V
    assert out.device.type == "cuda"
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    assert rel_err(out.cpu(), H_dense @ V.cpu()) < 1e-10


@pytest.mark.parametrize("backend", [*EAGER_BACKENDS, "auto"])
@pytest.mark.parametrize("spec", CASE_SPECS, ids=case_ids())
def test_every_hessian_backend_on_cuda(spec, backend):
    """H @ v and H @ V (K = 5, chunks of 2), kept graph and isolated products."""
    case, data, V, expected = _problem(spec, "hessian", 5)
    for cache_graph in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # documented fallbacks
            op = ck.HessianOperator(
                case.model,
                case.loss_fn,
                data,
                backend=backend,
                max_probes_per_chunk=2,
                cache_graph=cache_graph,
            )
            single, block = op @ V[:, 0], op @ V
        assert single.device.type == "cuda" and block.device.type == "cuda"
        assert rel_err(single, expected[:, 0]) < TOL
        assert rel_err(block, expected) < TOL
        if backend == "reverse-over-forward":  # its rules cover the matrix: no fallback
            assert op.backend == backend and op.backend_fallback_reason is None


@pytest.mark.parametrize("spec", CASE_SPECS, ids=case_ids())
def test_taylor_quadratic_forms_on_cuda(spec):
    """Per-probe and collapsed Taylor-mode vᵀHv, and the GGN's vᵀGv."""
    case = make_case(*spec)
    H_dense, G_dense = _oracle(case, "hessian"), _oracle(case, "ggn")
    data = _on_cuda(case)
    V = _probes(H_dense.shape[0], 6)
    Vc = V.cpu()
    args = (case.model, case.loss_fn, data)
    for op, dense in (
        (ck.HessianOperator(*args, quadratic_form_method="taylor"), H_dense),
        (ck.GGNOperator(*args, quadratic_form_method="taylor"), G_dense),
    ):
        forms = (Vc * (dense @ Vc)).sum(0)
        assert rel_err(op.quadratic_form(V).cpu(), forms) < TOL
        sums = op.quadratic_form(V, group_size=3).cpu()
        assert rel_err(sums, forms.reshape(2, 3).sum(1)) < TOL


@pytest.mark.parametrize("backend", ["double-vjp", "forward", "taylor-jvp", "auto"])
@pytest.mark.parametrize("spec", CASE_SPECS, ids=case_ids())
def test_every_ggn_backend_on_cuda(spec, backend):
    case, data, V, expected = _problem(spec, "ggn", 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # forward mode on train BatchNorm
        G = ck.GGNOperator(
            case.model, case.loss_fn, data, backend=backend, cache_graph=backend != "auto"
        )
        assert rel_err(G @ V, expected) < TOL
        assert rel_err(G @ V[:, 0], expected[:, 0]) < TOL
    if backend in ("taylor-jvp", "auto"):
        assert G.backend == "taylor-jvp" and G.backend_fallback_reason is None


@pytest.mark.parametrize(
    "spec", [("mlp-tanh", "ce-mean", [4]), ("cnn", "ce-mean", [4]), ("bn-eval", "ce-mean", [5])]
)
def test_ggn_kept_graph_trial_on_cuda(spec):
    """With a kept graph, the GGN's trial (double VJP against Taylor mode, each backend's
    chunks sized on CUDA) keeps a backend per kind; the products match the oracle."""
    case, data, V, expected = _problem(spec, "ggn", 11)
    G = ck.GGNOperator(case.model, case.loss_fn, data)
    assert rel_err(G @ V[:, 0], expected[:, 0]) < TOL
    assert rel_err(G @ V, expected) < TOL
    assert rel_err(G @ V, expected) < TOL  # the kept choice, (maybe) the kept graph
    assert set(G.backend_choices) == {"single", "block"}
    assert {"double-vjp", "taylor-jvp"} <= set(G.backend_trials["block"])
    assert set(G.backend_trials["block"]) <= {"double-vjp", "taylor-jvp", "graphed"}
    assert G.block_chunk >= 1


GRAPHED_SPECS = [
    ("mlp-relu", "ce-sum", [6]),
    ("cnn", "mse-sum", [5]),
    ("bn-eval", "ce-mean", [5]),
    ("layernorm-gelu", "mse-mean", [5]),
    ("transformer", "ce-seq-mean", [4]),
]


@pytest.mark.parametrize("spec", GRAPHED_SPECS, ids=lambda s: "/".join(map(str, s[:2])))
def test_graphed_backend_captures_and_replays_on_cuda(spec):
    """A real CUDA-graph capture of the kept graph's second backward: the first product runs
    uncaptured, the second captures, later ones replay; after a parameter changes, the
    replay of the old graph is dropped. Every product matches the oracle."""
    case, data, V, expected = _problem(spec, "hessian", 4)
    H = ck.HessianOperator(case.model, case.loss_fn, data, backend="graphed")
    assert rel_err(H @ V[:, 0], expected[:, 0]) < TOL
    assert H.replay is None
    assert rel_err(H @ V[:, 1], expected[:, 1]) < TOL
    assert H.backend == "graphed" and H.backend_fallback_reason is None
    assert H.replay is not None and H.replay.reserved_bytes > 0
    assert rel_err(H @ V, expected) < TOL
    assert H.replay.replays == 1 + 4
    with torch.no_grad():
        next(case.model.parameters()).mul_(1.5)
    reference = make_case(*spec)  # the oracle runs on the CPU (the case's model is on CUDA)
    with torch.no_grad():
        next(reference.model.parameters()).mul_(1.5)
    changed = (dense_hessian(reference) @ V.cpu()).cuda()
    for _ in range(3):
        assert rel_err(H @ V, changed) < TOL
    assert H.replay is not None and H.replay.replays == 2 * 4  # captured at the second


def test_graphed_with_a_live_default_stream_graph_on_cuda():
    """A loss graph kept alive on the default stream holds the parameters' gradient
    accumulators (made on the default stream): the captured graph is built against leaves
    aliasing the parameters, so the capture still succeeds, and every product is right."""
    case, data, V, expected = _problem(GRAPHED_SPECS[0], "hessian", 3)
    X, y = data
    loss = case.loss_fn(case.model(X.cuda()), y.cuda())
    loss.backward(retain_graph=True)
    for backend in ("graphed", "auto"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a documented fallback
            H = ck.HessianOperator(case.model, case.loss_fn, data, backend=backend)
            for i in range(3):
                assert rel_err(H @ V[:, i], expected[:, i]) < TOL
                assert rel_err(H @ V, expected) < TOL
        assert H.graphed_failure is None, H.graphed_failure
        assert H.replay is not None or backend == "auto"
    del loss


@pytest.mark.parametrize("spec", GRAPHED_SPECS, ids=lambda s: "/".join(map(str, s[:2])))
def test_graphed_ggn_captures_and_replays_on_cuda(spec):
    """The GGN's double VJP (three passes through the kept graph) as a real CUDA graph."""
    case, data, V, expected = _problem(spec, "ggn", 4)
    G = ck.GGNOperator(case.model, case.loss_fn, data, backend="graphed")
    for _ in range(3):
        assert rel_err(G @ V[:, 0], expected[:, 0]) < TOL
        assert rel_err(G @ V, expected) < TOL
    assert G.backend == "graphed" and G.backend_fallback_reason is None
    assert G.replay is not None and G.replay.reserved_bytes > 0
    assert G.replay.replays == 4 + 2 * (1 + 4)  # captured at the second product


@pytest.mark.parametrize("spec", GRAPHED_SPECS[:2], ids=lambda s: "/".join(map(str, s[:2])))
def test_auto_times_the_graphed_backend_on_cuda(spec):
    """``"auto"`` on CUDA with a kept graph captures and times ``"graphed"`` (a string in
    the trial would be the reason the capture failed)."""
    case, data, V, expected = _problem(spec, "hessian", 3)
    H = ck.HessianOperator(case.model, case.loss_fn, data)
    assert rel_err(H @ V[:, 0], expected[:, 0]) < TOL
    assert isinstance(H.backend_trials["single"]["graphed"], float), H.backend_trials
    assert rel_err(H @ V, expected) < TOL
    assert isinstance(H.backend_trials["block"]["graphed"], float), H.backend_trials
    assert rel_err(H @ V[:, 2], expected[:, 2]) < TOL
    case, data, V, expected = _problem(spec, "ggn", 3)
    G = ck.GGNOperator(case.model, case.loss_fn, data)
    assert rel_err(G @ V[:, 0], expected[:, 0]) < TOL
    assert isinstance(G.backend_trials["single"]["graphed"], float), G.backend_trials
    assert rel_err(G @ V, expected) < TOL
    assert rel_err(G @ V, expected) < TOL


@pytest.mark.parametrize("spec", [("mlp-tanh", "ce-mean", [3, 5]), ("cnn", "ce-mean", [4])])
def test_compiled_backend_on_cuda(spec):
    """torch.compile's Triton kernels: the compiled product against the oracle."""
    case = make_case(*spec)
    H_dense = _oracle(case, "hessian")
    data = _on_cuda(case)
    V = _probes(H_dense.shape[0], 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        op = ck.HessianOperator(case.model, case.loss_fn, data, backend="compiled")
        out = op @ V
    assert op.backend == "compiled", op.backend_fallback_reason
    assert rel_err(out.cpu(), H_dense @ V.cpu()) < TOL


@pytest.mark.parametrize("operator", ["hessian", "ggn"])
def test_graphs_built_on_cuda_are_the_operators_own(operator):
    """On CUDA the backward that builds ``d loss / d out`` (and the first backward) runs on
    autograd's device thread, which numbers its nodes itself: the graphs must still count
    as the operator's own, so that an isolated product frees them as its last pass runs."""
    case, data, V, _ = _problem(("transformer", "ce-seq-mean", [4]), operator, 1)
    make = ck.HessianOperator if operator == "hessian" else ck.GGNOperator
    backend = "double-backward" if operator == "hessian" else "double-vjp"
    op = make(case.model, case.loss_fn, data, backend=backend)
    X, y = op._prepare(*op.batches.first())
    with torch.enable_grad():
        assert op._build_graph(X, y, 1.0).own


def test_an_isolated_product_on_cuda_peaks_where_plain_double_backward_does():
    """CUDA allocator peak of an isolated double-backward product against plain double
    backward (``autograd.grad(g, params, v)``, no retained graph) on the same batch."""
    case, data, V, expected = _problem(("transformer", "ce-seq-mean", [4]), "hessian", 1)
    op = ck.HessianOperator(
        case.model, case.loss_fn, data, backend="double-backward", cache_graph=False
    )
    v = V[:, 0]
    assert rel_err(op @ v, expected[:, 0]) < TOL
    X, y = (t.cuda() for t in case.batches[0])
    params = case.params
    vs = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)]

    def peak(run) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = run()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - before

    def plain():
        from curvkit.autodiff import differentiable_attention

        with differentiable_attention():
            g = torch.autograd.grad(case.loss_fn(case.model(X), y), params, create_graph=True)
            return torch.autograd.grad(g, params, vs)

    plain()  # warm-up
    reference = peak(plain)
    result_bytes = v.numel() * v.element_size()
    assert peak(lambda: op @ v) <= reference + 2 * result_bytes + 2**16


def test_a_failed_capture_leaves_this_thread_on_its_stream():
    """torch.cuda.graph ends the capture before it leaves the capture stream: a capture that
    fails (here on a host synchronisation, illegal while capturing) must not leave the
    caller's later work on curvkit's capture stream."""
    from curvkit import cuda_graphs

    device = torch.device("cuda")
    x = torch.ones(4, device=device)

    def run():
        y = x * 2
        y.sum().item()  # fine uncaptured (the warm-up), illegal under capture
        return [y]

    before = torch.cuda.current_stream(device)
    with pytest.raises(Exception):  # noqa: B017 (CUDA's error type varies by version)
        cuda_graphs.capture(run, device)
    assert torch.cuda.current_stream(device) == before
    assert float((x * 3).sum()) == 12.0  # the device still works
