"""The ``"graphed"`` backend's bookkeeping, on the CPU, with an eager stand-in for the capture.

A real capture needs CUDA (tests/test_cuda.py runs it there). Here ``capture`` is replaced by
one that runs the product at each replay and writes it into the outputs of its first run,
as a replayed CUDA graph does. So everything around the capture is tested against the dense
oracle: when it captures, that a replay belongs to one kept graph (a replay that outlived a
rebuilt graph would return the old graph's products), the zero-padding of short chunks, the
trial and the fallbacks.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import curvkit as ck
from curvkit import cuda_graphs
from curvkit.operators.ggn import TAYLOR_MARGIN, choose_ggn_backend
from curvkit.operators.hessian import GRAPHED_MARGIN, choose_backend
from tests.cases import dense_hessian, make_case, rel_err
from tests.test_ggn import dense_ggn

TOL = 1e-10


class EagerCapture:
    """``cuda_graphs.capture`` without CUDA: each replay reruns ``run`` into the outputs."""

    def __init__(self) -> None:
        self.captures = 0
        self.fail = False

    def __call__(self, run, device):
        if self.fail:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        self.captures += 1
        outputs = run()

        def replay() -> None:
            for o, r in zip(outputs, run()):
                o.copy_(r)

        return outputs, replay


@pytest.fixture
def capture(monkeypatch) -> EagerCapture:
    stand_in = EagerCapture()
    monkeypatch.setattr(cuda_graphs, "capture", stand_in)
    monkeypatch.setattr(cuda_graphs, "available", lambda device: True)
    return stand_in


def _probes(D: int, K: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(D, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _products_match(op, dense: torch.Tensor, capture: EagerCapture) -> torch.Tensor:
    """Products of ``op`` (backend ``"graphed"``) against ``dense``: one uncaptured, then
    three rounds of a block of 3 and a single probe. Returns the probes."""
    V = _probes(op.shape[0], 3)
    assert rel_err(op @ V[:, 0], dense @ V[:, 0]) < TOL
    assert capture.captures == 0
    for i in range(3):
        assert rel_err(op @ V, dense @ V) < TOL
        assert rel_err(op @ V[:, i], dense @ V[:, i]) < TOL
    return V


@pytest.mark.parametrize(
    "spec",
    [
        ("mlp-relu", "ce-sum", [6]),
        ("cnn", "mse-sum", [5]),
        ("bn-eval", "ce-mean", [3, 5]),  # two batches: no kept graph, double backward
        ("bn-train", "ce-mean", [6]),  # train-mode BatchNorm: no kept graph
        ("transformer", "ce-seq-mean", [4]),
    ],
)
def test_graphed_matches_dense_oracle(capture, spec):
    """The first product on a kept graph runs uncaptured, the second captures, later ones
    replay; all match the dense Hessian. Without a kept graph nothing is captured."""
    case = make_case(*spec)
    H = ck.HessianOperator(case.model, case.loss_fn, case.data, backend="graphed")
    _products_match(H, dense_hessian(case), capture)
    if H._keeps_graph():
        assert capture.captures == 1
        assert H.replay.replays == 3 * (3 + 1)
    else:
        assert capture.captures == 0 and H.replay is None


def test_graphed_replay_is_dropped_with_its_graph(capture):
    """A parameter changed in place rebuilds the graph; the replay of the old graph must go
    with it (else it returns the old Hessian's products), and the capture waits for the
    second product on the new graph."""
    case = make_case("mlp-tanh", "mse-mean", [7])
    H = ck.HessianOperator(case.model, case.loss_fn, case.data, backend="graphed")
    v = _probes(H.shape[0], 1)[:, 0]
    H @ v
    H @ v
    assert capture.captures == 1
    with torch.no_grad():
        next(case.model.parameters()).mul_(1.5)
    dense = dense_hessian(case)
    assert rel_err(H @ v, dense @ v) < TOL
    assert H.replay is None and capture.captures == 1
    assert rel_err(H @ v, dense @ v) < TOL
    assert capture.captures == 2
    H.clear_cache()
    assert H.replay is None


def test_auto_tries_graphed_only_with_a_kept_graph(capture):
    case = make_case("mlp-relu", "ce-sum", [6])
    v = _probes(sum(p.numel() for p in case.model.parameters()), 1)[:, 0]
    H = ck.HessianOperator(case.model, case.loss_fn, case.data)
    H @ v
    assert isinstance(H.backend_trials["single"]["graphed"], float)
    assert capture.captures == 1
    if H.backend_choices["single"] != "graphed":  # not chosen: its memory is not held
        assert H.replay is None
    for kwargs in ({"cache_graph": False}, {"cuda_graphs": False}):
        H = ck.HessianOperator(case.model, case.loss_fn, case.data, **kwargs)
        H @ v
        assert "graphed" not in H.backend_trials["single"]


def test_auto_chooses_graphed_when_faster_and_replays(capture, monkeypatch):
    from curvkit.operators import hessian as hessian_module

    monkeypatch.setattr(
        hessian_module, "choose_backend", lambda t: "graphed" if "graphed" in t else "?"
    )
    case = make_case("cnn", "ce-mean", [4, 2])  # two batches
    dense = dense_hessian(case)
    X = torch.cat([X for X, _ in case.batches])
    y = torch.cat([y for _, y in case.batches])
    H = ck.HessianOperator(case.model, case.loss_fn, (X, y))
    V = _probes(H.shape[0], 4)
    for _ in range(2):
        assert rel_err(H @ V[:, 0], dense @ V[:, 0]) < TOL
        assert rel_err(H @ V, dense @ V) < TOL
    assert H.backend_choices == {"single": "graphed", "block": "graphed"}
    # the block trial sizes the batched backend's chunks, which rebuilds the graph: the
    # single trial's capture goes with the old graph, and the block trial captures again
    assert capture.captures == 2
    assert H.replay.replays > 2 * 4


def test_failing_capture_is_dropped_by_auto_and_falls_back_when_asked(capture):
    capture.fail = True
    case = make_case("mlp-tanh", "bce", [4, 3])
    X = torch.cat([X for X, _ in case.batches])
    y = torch.cat([y for _, y in case.batches])
    dense = dense_hessian(case)
    v = _probes(dense.shape[0], 1)[:, 0]
    H = ck.HessianOperator(case.model, case.loss_fn, (X, y))
    assert rel_err(H @ v, dense @ v) < TOL
    assert "not permitted when stream is capturing" in H.backend_trials["single"]["graphed"]
    assert H.replay is None
    H = ck.HessianOperator(case.model, case.loss_fn, (X, y), backend="graphed")
    H @ v  # uncaptured
    with pytest.warns(RuntimeWarning, match="graphed failed"):
        assert rel_err(H @ v, dense @ v) < TOL
    assert H.backend == "double-backward" and "stream is capturing" in H.backend_fallback_reason
    assert rel_err(H @ v, dense @ v) < TOL


def test_replay_pads_short_chunks_and_overwrites_its_outputs(capture):
    W = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    replay = cuda_graphs.Replay(lambda vs: [vs[0] @ W.T], [torch.zeros(4, dtype=W.dtype)], 4)
    a = torch.randn(4, 4, dtype=W.dtype)
    assert torch.equal(replay([a])[0], a @ W.T)
    first = replay([a[:2]])[0]
    assert torch.equal(first, a[:2] @ W.T) and torch.equal(replay.probes[0][2:], torch.zeros(2, 4))
    second = replay([2 * a[:2]])[0]
    assert torch.equal(first, second)  # views of the same outputs: valid until the next call
    with pytest.raises(ValueError, match="at most 4 probes"):
        replay([torch.zeros(5, 4, dtype=W.dtype)])
    assert replay.reserved_bytes == 0  # measured on CUDA only


def test_graphed_backend_needs_cuda():
    case = make_case("mlp-tanh", "mse-mean", [7])
    for cls in (ck.HessianOperator, ck.GGNOperator):
        with pytest.raises(ValueError, match="replays CUDA graphs.*double-backward"):
            cls(case.model, case.loss_fn, case.data, backend="graphed")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        H = ck.HessianOperator(case.model, case.loss_fn, case.data)
        H @ torch.ones(H.shape[0], dtype=torch.float64)
    assert "graphed" not in H.backend_trials["single"]  # not offered off CUDA


def test_choose_backend_keeps_graphed_only_when_clearly_faster():
    eager = {"double-backward": 1.0, "batched": 2.0}
    assert choose_backend({**eager, "graphed": GRAPHED_MARGIN * 0.99}) == "graphed"
    assert choose_backend({**eager, "graphed": GRAPHED_MARGIN * 1.01}) == "double-backward"
    assert choose_backend({**eager, "graphed": 0.5, "compiled": 0.4}) == "compiled"
    assert choose_backend({**eager, "graphed": 0.4, "compiled": 0.5}) == "graphed"
    assert choose_backend({**eager, "graphed": "RuntimeError: ..."}) == "double-backward"
    assert choose_backend({"graphed": 0.4}) == "graphed"


def test_choose_ggn_backend():
    assert choose_ggn_backend({"double-vjp": 1.0, "taylor-jvp": TAYLOR_MARGIN * 1.01}) == (
        "double-vjp"
    )
    assert choose_ggn_backend({"double-vjp": 1.0, "taylor-jvp": 0.5, "graphed": 0.44}) == (
        "graphed"
    )
    assert choose_ggn_backend({"double-vjp": 1.0, "taylor-jvp": 0.5, "graphed": 0.46}) == (
        "taylor-jvp"
    )
    assert choose_ggn_backend({"double-vjp": 1.0, "taylor-jvp": "no rule", "graphed": 0.8}) == (
        "graphed"
    )
    assert choose_ggn_backend({"double-vjp": 1.0, "graphed": "RuntimeError: ..."}) == "double-vjp"


@pytest.mark.parametrize(
    "spec",
    [
        ("mlp-tanh", "ce-mean", [4]),
        ("cnn", "ce-mean", [4, 2]),  # two batches: no kept graph, double VJP
        ("bn-eval", "ce-mean", [5]),
        ("transformer", "ce-seq-mean", [4]),
    ],
)
def test_graphed_ggn_matches_dense_oracle(capture, spec):
    """The GGN's double VJP (three passes through the kept graph) captured and replayed."""
    case = make_case(*spec)
    G = ck.GGNOperator(case.model, case.loss_fn, case.data, backend="graphed")
    V = _products_match(G, dense_ggn(case), capture)
    assert G.backend == "graphed"
    if G._keeps_graph():
        assert capture.captures == 1 and G.replay.replays == 3 * (3 + 1)
        with torch.no_grad():
            next(case.model.parameters()).mul_(1.5)
        changed = dense_ggn(case)
        for _ in range(2):
            assert rel_err(G @ V, changed @ V) < TOL
        assert capture.captures == 2
    else:
        assert capture.captures == 0 and G.replay is None


def test_ggn_auto_times_graphed_and_falls_back_when_capture_fails(capture, monkeypatch):
    from curvkit.operators import ggn as ggn_module

    case = make_case("mlp-relu", "ce-sum", [6])
    dense = dense_ggn(case)
    V = _probes(dense.shape[0], 4)
    G = ck.GGNOperator(case.model, case.loss_fn, case.data)
    assert rel_err(G @ V[:, 0], dense @ V[:, 0]) < TOL
    assert isinstance(G.backend_trials["single"]["graphed"], float)
    monkeypatch.setattr(
        ggn_module, "choose_ggn_backend", lambda t: "graphed" if "graphed" in t else "?"
    )
    G = ck.GGNOperator(case.model, case.loss_fn, case.data)
    for _ in range(2):
        assert rel_err(G @ V, dense @ V) < TOL
        assert rel_err(G @ V[:, 1], dense @ V[:, 1]) < TOL
    assert G.backend_choices == {"single": "graphed", "block": "graphed"}
    assert G.backend == "graphed" and G.replay is not None
    G.clear_cache()  # rebuilt: the first product runs uncaptured, the second captures
    capture.fail = True
    assert rel_err(G @ V, dense @ V) < TOL
    with pytest.warns(RuntimeWarning, match="graphed failed"):
        assert rel_err(G @ V, dense @ V) < TOL
    assert G.backend == "double-vjp" and "stream is capturing" in G.backend_fallback_reason
    assert G.backend_choices == {"single": "double-vjp", "block": "double-vjp"}
    assert rel_err(G @ V[:, 2], dense @ V[:, 2]) < TOL


def test_ggn_graphed_on_a_model_without_taylor_rules(capture, monkeypatch):
    """Taylor mode fails on Hardswish: the trials weigh graphed against double VJP alone,
    and a graphed choice runs graphed (not double VJP under its name)."""
    from torch import nn

    from curvkit.operators import ggn as ggn_module

    monkeypatch.setattr(
        ggn_module, "choose_ggn_backend", lambda t: "graphed" if "graphed" in t else "?"
    )
    case = make_case("mlp-tanh", "mse-mean", [4])
    case.model[1] = nn.Hardswish()  # no Taylor-mode rule
    dense = dense_ggn(case)
    V = _probes(dense.shape[0], 3)
    G = ck.GGNOperator(case.model, case.loss_fn, case.data)
    for _ in range(2):
        assert rel_err(G @ V[:, 0], dense @ V[:, 0]) < TOL
        assert rel_err(G @ V, dense @ V) < TOL
    assert "TaylorUnsupportedError" in G.backend_trials["single"]["taylor-jvp"]
    assert G.backend_choices == {"single": "graphed", "block": "graphed"}
    assert isinstance(G.backend_trials["block"]["graphed"], float)
    assert G.backend == "graphed" and G.replay.replays >= 2 * (1 + 3)


def test_ggn_without_taylor_rules_or_graphs_runs_no_further_trial(monkeypatch):
    """Once Taylor mode has failed and no capture is offered (a CPU), double VJP is the
    only candidate: no block trial, nothing timed."""
    from torch import nn

    case = make_case("mlp-tanh", "mse-mean", [4])
    case.model[1] = nn.Hardswish()
    dense = dense_ggn(case)
    V = _probes(dense.shape[0], 3)
    G = ck.GGNOperator(case.model, case.loss_fn, case.data)
    assert rel_err(G @ V[:, 0], dense @ V[:, 0]) < TOL
    assert "TaylorUnsupportedError" in G.backend_trials["single"]["taylor-jvp"]
    timed = []
    monkeypatch.setattr(G, "_timed", lambda run: timed.append(1) or (run(), 0.0))
    assert rel_err(G @ V, dense @ V) < TOL
    assert timed == [] and G.backend_choices == {"single": "double-vjp"}


def test_graphs_leave_the_capture_stream_once_graphed_is_rejected(capture, monkeypatch):
    """A graph is built on the capture stream only while it may be captured: asked for,
    chosen, or not yet tried for both kinds of product."""
    from curvkit.operators import hessian as hessian_module

    monkeypatch.setattr(hessian_module, "choose_backend", lambda t: "double-backward")
    case = make_case("mlp-relu", "ce-sum", [6])
    V = _probes(sum(p.numel() for p in case.model.parameters()), 3)
    H = ck.HessianOperator(case.model, case.loss_fn, case.data)
    assert H._may_capture()
    H @ V[:, 0]
    assert H._may_capture()  # the block products are still to be tried
    H @ V
    assert not H._may_capture() and H.replay is None
    H = ck.HessianOperator(case.model, case.loss_fn, case.data, backend="graphed")
    H @ V
    assert H._may_capture()
    capture.fail = True
    with pytest.warns(RuntimeWarning, match="graphed failed"):
        H @ V
    assert not H._may_capture() and "stream is capturing" in H.graphed_failure


def test_stale_stream_redirection_is_restored():
    from curvkit.cuda_graphs import _stale_streams_redirected

    get = getattr(torch._C, "_override_stale_capture_stream", None)
    if get is None:
        pytest.skip("this PyTorch has no stale-stream redirection")
    assert get() is False
    with _stale_streams_redirected():
        assert get() is True
    assert get() is False


def test_captured_graphs_are_built_on_the_capture_stream(capture, monkeypatch):
    """Every graph a capture may record is built inside ``on_capture_stream`` (autograd
    runs backward ops on their forward op's stream); other graphs are not."""
    import contextlib

    from curvkit.operators.ggn import GGNOperator
    from curvkit.operators.hessian import HessianOperator

    inside = []

    @contextlib.contextmanager
    def stream(device):
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    built = []
    for cls in (HessianOperator, GGNOperator):
        original = cls._build_graph

        def recording(self, X, y, weight, original=original):
            # whether the graph's forward pass runs on the stream
            def hook(module, args):
                built.append((type(self).__name__, self.requested_backend, bool(inside)))

            handle = self.model.register_forward_pre_hook(hook)
            try:
                return original(self, X, y, weight)
            finally:
                handle.remove()

        monkeypatch.setattr(cls, "_build_graph", recording)
    monkeypatch.setattr(cuda_graphs, "on_capture_stream", stream)
    case = make_case("mlp-relu", "ce-sum", [6])
    V = _probes(sum(p.numel() for p in case.model.parameters()), 2)
    for cls in (ck.HessianOperator, ck.GGNOperator):
        for backend in ("graphed", "auto"):
            op = cls(case.model, case.loss_fn, case.data, backend=backend)
            for _ in range(3):
                op @ V[:, 0]
            assert op.replay is not None or backend == "auto"
    H = ck.HessianOperator(case.model, case.loss_fn, case.data, backend="double-backward")
    H @ V[:, 0]
    assert built[-1] == ("HessianOperator", "double-backward", False)
    assert all(on for _, backend, on in built[:-1]), built


class _Tied(torch.nn.Module):
    """Two layers sharing one weight (one parameter under two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("cls", [ck.HessianOperator, ck.GGNOperator])
def test_captured_graphs_differentiate_leaves_aliasing_the_parameters(capture, cls):
    """A graph that may be captured is built through ``functional_call`` against fresh
    leaves aliasing the parameters (their gradient accumulators are the graph's own):
    products equal the uncaptured backend's, tied weights included, and a change through
    ``.data`` or in place still rebuilds the graph."""
    torch.manual_seed(0)
    model = _Tied().double()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    loss_fn = torch.nn.MSELoss()
    uncaptured = "double-backward" if cls is ck.HessianOperator else "double-vjp"
    op = cls(model, loss_fn, (X, y), backend="graphed")
    V = _probes(op.shape[0], 3)
    for change in (None, "data", "in place"):
        if change == "data":
            model.a.weight.data = model.a.weight.data * 1.5
        elif change == "in place":
            with torch.no_grad():
                model.b.bias.add_(0.5)
        expected = cls(model, loss_fn, (X, y), backend=uncaptured) @ V
        for _ in range(3):
            assert rel_err(op @ V, expected) < TOL
    inputs = op._graph[3].inputs
    assert all(a is not p and a.data_ptr() == p.data_ptr() for a, p in zip(inputs, op.params))
    assert capture.captures == 3


class _Bypassing(torch.nn.Module):
    """Uses its second layer's weight through a closure as well as through the module:
    ``functional_call`` swaps only the latter."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        weight = self.b.weight
        self.extra = lambda h: h @ weight

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h) + torch.tanh(self.extra(h))


@pytest.mark.parametrize("cls", [ck.HessianOperator, ck.GGNOperator])
def test_a_model_bypassing_functional_call_is_built_against_its_parameters(capture, cls):
    """Leaves aliasing the parameters would miss the closure's use of a weight (a wrong
    curvature): the build finds the weight itself in the graph and uses the parameters."""
    torch.manual_seed(0)
    model = _Bypassing().double()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    loss_fn = torch.nn.MSELoss()
    uncaptured = "double-backward" if cls is ck.HessianOperator else "double-vjp"
    expected_op = cls(model, loss_fn, (X, y), backend=uncaptured)
    op = cls(model, loss_fn, (X, y), backend="graphed")
    V = _probes(op.shape[0], 2)
    expected = expected_op @ V
    for _ in range(3):
        assert rel_err(op @ V, expected) < TOL
    assert not op.aliases_parameters and capture.captures == 1
    assert all(a is p for a, p in zip(op._graph[3].inputs, op.params))


def test_reaches_finds_leaves_in_a_graph():
    from curvkit.autodiff import reaches

    a, b, c = (torch.randn(3, requires_grad=True) for _ in range(3))
    out = (a * 2).sin().sum() + (b.exp() * a).sum()
    assert reaches(out, [b]) and reaches(out, [c, a]) and not reaches(out, [c])
    assert not reaches(torch.ones(2), [a])


def test_a_parameter_replaced_after_construction_is_an_error(capture):
    case = make_case("mlp-tanh", "mse-mean", [7])
    H = ck.HessianOperator(case.model, case.loss_fn, case.data, backend="graphed")
    v = _probes(H.shape[0], 1)[:, 0]
    H @ v
    case.model[0].weight = torch.nn.Parameter(case.model[0].weight.detach() * 2)
    with pytest.raises(ValueError, match="was replaced after the operator was built"):
        H @ v
