"""The kept first-backward graph, probe layouts and quadratic forms, against the dense oracle.

A one-batch ``HessianOperator`` keeps its gradient graph between products; every change that
makes the kept graph stale must be noticed (the product then matches the *new* Hessian).
"""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch

import curvkit as ck
from curvkit.autodiff import differentiable_attention
from curvkit.live_memory import peak_allocated_bytes
from tests.cases import dense_hessian, make_case, rel_err

TOL = 1e-10


def _probes(D: int, K: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D, K, generator=g, dtype=torch.float64)


def _count_forwards(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _track_activations(model: torch.nn.Module) -> list[weakref.ref]:
    """Weak references to every module output of every forward pass from now on."""
    refs: list[weakref.ref] = []
    for m in model.modules():
        m.register_forward_hook(lambda _m, _i, out: refs.append(weakref.ref(out)))
    return refs


def _alive(refs: list[weakref.ref]) -> int:
    """How many of the tracked activations a graph (or anything else) still holds."""
    gc.collect()
    return sum(r() is not None for r in refs)


def _operator(case, **kwargs):
    return ck.HessianOperator(
        case.model, case.loss_fn, case.data, backend="double-backward", **kwargs
    )


@pytest.mark.parametrize(
    "spec", [("mlp-relu", "ce-sum", [6]), ("bn-eval", "ce-mean", [5]), ("cnn", "mse-sum", [5])]
)
def test_second_product_reuses_the_graph(spec):
    case = make_case(*spec)
    H = dense_hessian(case)
    op = _operator(case)
    calls = _count_forwards(case.model)
    activations = _track_activations(case.model)
    V = _probes(H.shape[0], 3)
    assert rel_err(op @ V, H @ V) < TOL
    assert calls[0] == 1 and _alive(activations) > 0  # the graph holds them
    assert rel_err(op @ V[:, 0], H @ V[:, 0]) < TOL
    assert rel_err(op @ V[:, 1:], H @ V[:, 1:]) < TOL
    assert calls[0] == 1  # no forward pass after the first product
    op.clear_cache()
    assert _alive(activations) == 0
    assert rel_err(op @ V[:, 2], H @ V[:, 2]) < TOL
    assert calls[0] == 2


def test_cache_graph_false_rebuilds_every_product():
    case = make_case("mlp-tanh", "mse-mean", [7])
    op = _operator(case, cache_graph=False)
    calls = _count_forwards(case.model)
    activations = _track_activations(case.model)
    v = _probes(op.shape[0], 1)[:, 0]
    op @ v
    op @ v
    assert calls[0] == 2 and op._graph is None
    assert len(activations) > 0 and _alive(activations) == 0  # nothing kept the graph


def test_several_batches_never_keep_a_graph():
    case = make_case("mlp-tanh", "mse-sum", [3, 5, 2])
    H = dense_hessian(case)
    op = _operator(case)
    assert not op.cache_graph
    calls = _count_forwards(case.model)
    activations = _track_activations(case.model)
    V = _probes(H.shape[0], 4)
    assert rel_err(op @ V, H @ V) < TOL
    assert calls[0] == 3  # one forward per batch, shared by all four probes
    assert op._graph is None and _alive(activations) == 0


def _scale_first_weight_in_place(case):
    with torch.no_grad():
        case.params[0].mul_(1.5)


def _scale_first_weight_through_data(case):
    case.params[0].data.mul_(1.5)  # bypasses version counters


def _replace_first_weight(case):
    case.params[0].data = case.params[0].data * 1.5


def _scale_inputs_in_place(case):
    case.data[0].mul_(1.5)


def _scale_inputs_through_data(case):
    case.data[0].data.mul_(1.5)  # bypasses version counters


def _shift_running_mean(case):
    case.model[1].running_mean.data.add_(0.5)


def _switch_to_train_mode(case):
    case.model.train()


@pytest.mark.parametrize(
    "change",
    [
        _scale_first_weight_in_place,
        _scale_first_weight_through_data,
        _replace_first_weight,
        _scale_inputs_in_place,
        _scale_inputs_through_data,
        _shift_running_mean,
        _switch_to_train_mode,
    ],
)
def test_a_stale_graph_is_rebuilt(change):
    """After any change the next product equals the new Hessian, not the kept one."""
    case = make_case("bn-eval", "ce-mean", [5])
    op = _operator(case)
    V = _probes(op.shape[0], 2)
    before = dense_hessian(case)
    assert rel_err(op @ V, before @ V) < TOL
    change(case)
    after = dense_hessian(case)
    assert rel_err(after @ V, before @ V) > 1e-3  # the change matters
    assert rel_err(op @ V, after @ V) < TOL


def test_train_mode_batchnorm_does_not_keep_its_graph():
    case = make_case("bn-train", "ce-mean", [6])
    H = dense_hessian(case)
    op = _operator(case)
    buffers = [b.clone() for b in case.model.buffers()]
    activations = _track_activations(case.model)
    V = _probes(H.shape[0], 2)
    for _ in range(2):
        assert rel_err(op @ V, H @ V) < TOL
    assert op._graph is None and _alive(activations) == 0
    assert all(torch.equal(a, b) for a, b in zip(buffers, case.model.buffers()))


def test_auto_backend_with_a_kept_graph_matches_the_oracle(case):
    H = dense_hessian(case)
    op = ck.HessianOperator(case.model, case.loss_fn, case.data)
    V = _probes(H.shape[0], 3)
    for _ in range(2):
        assert rel_err(op @ V, H @ V) < TOL
        assert rel_err(op @ V[:, 0], H @ V[:, 0]) < TOL


@pytest.mark.parametrize("operator", ["hessian", "ggn"])
def test_row_and_column_major_blocks_give_the_same_product(operator):
    """A row-major block is staged in chunks; a column-major one is read in place."""
    case = make_case("mlp-relu", "ce-mean", [3, 5, 2])
    cls = ck.HessianOperator if operator == "hessian" else ck.GGNOperator
    op = cls(case.model, case.loss_fn, case.data, max_probes_per_chunk=2)
    V = _probes(op.shape[0], 5)
    column_major = V.T.contiguous().T
    assert not V.T.is_contiguous() and column_major.T.is_contiguous()
    a, b = op @ V, op @ column_major
    assert a.shape == (op.shape[0], 5)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    reference = op.to_dense() @ V
    assert rel_err(a, reference) < TOL


@pytest.mark.parametrize(
    "spec", [("mlp-tanh", "mse-sum", [3, 5, 2]), ("transformer", "ce-seq-mean", [4])]
)
def test_quadratic_form_matches_the_oracle(spec):
    case = make_case(*spec)
    H = dense_hessian(case)
    op = ck.HessianOperator(case.model, case.loss_fn, case.data)
    V = _probes(H.shape[0], 7)
    expected = (V * (H @ V)).sum(0)
    assert rel_err(op.quadratic_form(V), expected) < TOL
    assert rel_err(op.quadratic_form(V.T.contiguous().T), expected) < TOL
    v = V[:, 0]
    assert op.quadratic_form(v).shape == ()
    assert abs(float(op.quadratic_form(v) - v @ H @ v)) < TOL * float(abs(v @ H @ v))


def test_quadratic_form_chunks_to_its_buffer(monkeypatch):
    """With a buffer of one probe, every probe is its own chunk; the result is unchanged."""
    from curvkit.operators import base

    case = make_case("cnn", "ce-mean", [4, 2])
    H = dense_hessian(case)
    op = ck.HessianOperator(case.model, case.loss_fn, case.data)
    V = _probes(H.shape[0], 4)
    D = H.shape[0]
    monkeypatch.setattr(base, "QUADRATIC_FORM_BUFFER_BYTES", D * 8)
    assert rel_err(op.quadratic_form(V), (V * (H @ V)).sum(0)) < TOL


def test_quadratic_form_of_other_operators():
    case = make_case("mlp-relu", "ce-sum", [6])
    G = ck.GGNOperator(case.model, case.loss_fn, case.data)
    dense = G.to_dense()
    V = _probes(G.shape[0], 3)
    assert rel_err(G.quadratic_form(V), (V * (dense @ V)).sum(0)) < TOL
    A = ck.DenseOperator(dense)
    assert rel_err((2 * A).quadratic_form(V), 2 * (V * (dense @ V)).sum(0)) < TOL
    with pytest.raises(ValueError, match="square"):
        ck.DenseOperator(torch.ones(3, 2, dtype=torch.float64)).quadratic_form(torch.ones(2))
    with pytest.raises(ValueError, match="shape mismatch"):
        G.quadratic_form(torch.ones(G.shape[0] + 1, dtype=torch.float64))


# ---------------------------------------------------------------------- GGN
def _ggn_reference(case) -> torch.Tensor:
    """The GGN without graph reuse (checked against J^T Lambda J in test_ggn.py)."""
    return ck.GGNOperator(case.model, case.loss_fn, case.data, cache_graph=False).to_dense()


@pytest.mark.parametrize("backend", ["double-vjp", "forward"])
def test_ggn_second_product_reuses_the_graph(backend):
    case = make_case("mlp-relu", "ce-mean", [6])
    G = _ggn_reference(case)
    op = ck.GGNOperator(case.model, case.loss_fn, case.data, backend=backend)
    calls = _count_forwards(case.model)
    V = _probes(G.shape[0], 3)
    assert rel_err(op @ V, G @ V) < TOL
    first = calls[0]
    assert first == 1 or backend == "forward"  # "forward": torch.func's own passes too
    assert rel_err(op @ V[:, 0], G @ V[:, 0]) < TOL
    # the second product reuses the model's forward graph; "forward" adds its one jvp pass
    assert calls[0] == first + (0 if backend == "double-vjp" else 1)
    with torch.no_grad():
        case.params[0].mul_(1.5)
    G_new = _ggn_reference(case)
    assert rel_err(op @ V, G_new @ V) < TOL


def test_ggn_stale_graph_after_data_change_is_rebuilt():
    case = make_case("bn-eval", "mse-sum", [5])
    op = ck.GGNOperator(case.model, case.loss_fn, case.data)
    V = _probes(op.shape[0], 2)
    before = _ggn_reference(case)
    assert rel_err(op @ V, before @ V) < TOL
    _shift_running_mean(case)
    after = _ggn_reference(case)
    assert rel_err(after @ V, before @ V) > 1e-3
    assert rel_err(op @ V, after @ V) < TOL


def test_a_block_is_rebuilt_when_another_layer_changes():
    """The curvature of a parameter subset depends on the parameters outside it."""
    case = make_case("mlp-tanh", "mse-mean", [7])
    subset = case.subset()
    op = ck.HessianOperator(case.model, case.loss_fn, case.data, params=subset)
    V = _probes(op.shape[0], 2)
    before = dense_hessian(case, subset)
    assert rel_err(op @ V, before @ V) < TOL
    with torch.no_grad():
        case.params[0].mul_(1.5)  # not in the subset
    after = dense_hessian(case, subset)
    assert rel_err(after @ V, before @ V) > 1e-3
    assert rel_err(op @ V, after @ V) < TOL


def test_kept_graph_with_data_in_another_dtype_and_under_no_grad():
    """Data cast on every product (float32 data, float64 model) still reuses the graph;
    products under torch.no_grad() work and reuse it too."""
    case = make_case("mlp-relu", "ce-sum", [6])
    X, y = case.data
    op = ck.HessianOperator(case.model, case.loss_fn, (X.float(), y), backend="double-backward")
    H = dense_hessian(case)  # the oracle on the float64 data; float32 inputs round X
    V = _probes(H.shape[0], 2)
    calls = _count_forwards(case.model)
    first = op @ V
    with torch.no_grad():
        second = op @ V
    assert calls[0] == 1
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert rel_err(first, H @ V) < 1e-6


class _HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that make the host wait for a GPU (a value read back to Python)."""

    WAITS = ("aten::equal", "aten::_local_scalar_dense", "aten::is_nonzero")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func._schema.name in self.WAITS
        return func(*args, **(kwargs or {}))


def _deep_bn_net(depth: int) -> torch.nn.Module:
    layers = [m for _ in range(depth) for m in (torch.nn.Linear(6, 6), torch.nn.BatchNorm1d(6))]
    return torch.nn.Sequential(*layers, torch.nn.Linear(6, 3)).double().eval()


@pytest.mark.parametrize("backend", ["double-backward", "reverse-over-forward"])
def test_host_waits_per_product_do_not_grow_with_the_model(backend):
    """The state checks (kept graph, buffers) compare all tensors at once: a product makes
    the same few host synchronisations for 2 and for 30 layers with their buffers (on a
    GPU each costs a round trip; one per tensor had cost ResNet-18 about a gradient)."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,))
    counts = {}
    for depth in (2, 30):
        torch.manual_seed(depth)
        model = _deep_bn_net(depth)
        v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
        for cache_graph in (True, False):
            H = ck.HessianOperator(
                model,
                torch.nn.CrossEntropyLoss(),
                (X, y),
                backend=backend,
                cache_graph=cache_graph,
                check_deterministic=False,
            )
            H @ v, H @ v  # the kept graph is validated from the second product on
            with _HostSyncs() as syncs:
                H @ v
            counts[depth, cache_graph] = syncs.count
    for cache_graph in (True, False):
        assert counts[2, cache_graph] == counts[30, cache_graph] <= 6, counts


def test_state_snapshots_are_copies_even_of_one_tensor():
    """``flat_by_dtype`` of a dtype with a single tensor is a copy, not a view of it (a
    view would change with the tensor and hide the change from the staleness check)."""
    from curvkit.operators.base import flat_by_dtype

    t = torch.arange(6.0).reshape(2, 3)
    snapshot = flat_by_dtype([t, torch.arange(3)])
    t.data.mul_(2)
    assert torch.equal(snapshot[torch.float32, t.device], torch.arange(6.0))


def test_a_change_to_data_alone_in_its_dtype_is_noticed():
    """Float32 inputs to a float64 model: the inputs are the only float32 tensor of the
    state, and a change through ``.data`` (no version bump) still rebuilds the graph."""
    case = make_case("mlp-relu", "ce-sum", [6])
    X, y = case.data
    X32 = X.float()
    op = ck.HessianOperator(case.model, case.loss_fn, (X32, y), backend="double-backward")
    V = _probes(op.shape[0], 2)
    first = op @ V
    op @ V  # validated from the second product on
    X32.data.mul_(1.5)
    case.batches = [(X32.double(), y)]
    assert rel_err(first, dense_hessian(case) @ V) > 1e-3  # the change matters
    assert rel_err(op @ V, dense_hessian(case) @ V) < 1e-6


def test_a_change_to_strided_data_is_noticed():
    """Inputs that are a transposed view (not contiguous): the staleness samples are views
    of their memory, not copies, so a change through ``.data`` still rebuilds the graph."""
    case = make_case("mlp-relu", "ce-sum", [6])
    X, y = case.data
    Xt = X.T.contiguous().T  # same values, column-major
    assert not Xt.is_contiguous()
    op = ck.HessianOperator(case.model, case.loss_fn, (Xt, y), backend="double-backward")
    V = _probes(op.shape[0], 2)
    first = op @ V
    op @ V  # validated from the second product on
    Xt.data.mul_(1.5)
    case.batches = [(Xt, y)]
    assert rel_err(first, dense_hessian(case) @ V) > 1e-3  # the change matters
    assert rel_err(op @ V, dense_hessian(case) @ V) < TOL


def test_a_zero_size_parameter_in_single_products():
    """A parameter with no entries (a zero-width layer) has its empty slot in a single
    product's views, and the product equals that of the other parameters."""
    case = make_case("mlp-relu", "ce-sum", [6])
    empty = torch.nn.Parameter(torch.empty(0, 3, dtype=torch.float64))
    case.model.register_parameter("empty", empty)
    params = list(case.model.parameters())
    assert params[0] is empty
    op = ck.HessianOperator(case.model, case.loss_fn, case.data, backend="double-backward")
    v = _probes(op.shape[0], 1)[:, 0]
    rest = ck.HessianOperator(case.model, case.loss_fn, case.data, params=params[1:])
    torch.testing.assert_close(op @ v, rest @ v, rtol=1e-12, atol=1e-12)
    assert rel_err(op @ v, dense_hessian(case) @ v) < TOL


# ---------------------------------------------------------------------- last use of a graph
def _retaining(fn):
    """``fn`` with ``retain_graph`` forced on: what a product cost before graphs were freed
    at their last use."""
    return lambda *args, **kwargs: fn(*args, **{**kwargs, "retain_graph": True})


@pytest.mark.parametrize(
    "operator, backend",
    [
        ("hessian", "double-backward"),
        ("hessian", "batched"),
        ("ggn", "double-vjp"),
        ("ggn", "taylor-jvp"),
    ],
)
def test_a_graph_built_for_one_product_is_freed_by_its_last_pass(operator, backend, monkeypatch):
    """A single product through a graph that is not kept lets its last backward free each
    node's saved tensors as it runs (retain_graph=False): a lower peak than holding them all
    to the end, and for the Hessian no more than a plain double backward without
    retain_graph; the product stays exact and the graph is dropped."""
    case = make_case("transformer", "ce-seq-mean", [4])
    make = ck.HessianOperator if operator == "hessian" else ck.GGNOperator
    op = make(case.model, case.loss_fn, case.data, backend=backend, cache_graph=False)
    reference = dense_hessian(case) if operator == "hessian" else _ggn_reference(case)
    v = _probes(op.shape[0], 1)[:, 0]
    assert rel_err(op @ v, reference @ v) < TOL
    freed = peak_allocated_bytes(lambda: op @ v)
    module = ck.operators.hessian if operator == "hessian" else ck.operators.ggn
    name = "graph_hvp" if operator == "hessian" else "batched_grad"
    monkeypatch.setattr(module, name, _retaining(getattr(module, name)))
    held = peak_allocated_bytes(lambda: op @ v)
    assert freed < 0.95 * held, (freed, held)
    if operator == "hessian":
        X, y = case.data
        vs = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in case.params]), case.params)]

        def plain():
            g = torch.autograd.grad(case.loss_fn(case.model(X), y), case.params, create_graph=True)
            return torch.autograd.grad(g, case.params, vs)

        with differentiable_attention():
            assert freed <= peak_allocated_bytes(plain)


@pytest.mark.parametrize("operator", ["hessian", "ggn"])
def test_staged_probes_share_each_batch_graph(operator):
    """Over several batches, a row-major block is staged in chunks: each batch's graph
    serves every chunk and is freed only by the last (one forward per batch; freeing it
    earlier would rebuild it for the next chunk)."""
    case = make_case("mlp-tanh", "mse-sum", [3, 5, 2])
    if operator == "hessian":
        op = _operator(case, max_probes_per_chunk=2)
        reference = dense_hessian(case)
    else:
        op = ck.GGNOperator(case.model, case.loss_fn, case.data, backend="double-vjp")
        reference = _ggn_reference(case)
    calls = _count_forwards(case.model)
    V = _probes(op.shape[0], 20)  # row-major: staged in several chunks per batch
    assert not V.T.is_contiguous() and op._probe_chunk() < 20
    assert rel_err(op @ V, reference @ V) < TOL
    assert calls[0] == 3


def _plain_hvp(case, loss_fn, V: torch.Tensor) -> torch.Tensor:
    """``H @ V`` of the sum over the case's batches of ``loss_fn``, by plain double backward
    on the model's own parameters (graphs retained: they may be shared with the caller)."""
    params = [p for p in case.model.parameters() if p.requires_grad]
    with torch.enable_grad():
        total = sum(loss_fn(case.model(X), y) for X, y in case.batches)
        grads = torch.autograd.grad(total, params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        rows = [
            torch.cat(
                [h.reshape(-1) for h in torch.autograd.grad(flat @ v, params, retain_graph=True)]
            )
            for v in V.T
        ]
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("backend", ["double-backward", "batched", "auto"])
@pytest.mark.parametrize(
    "sizes, cache_graph", [([3, 4], True), ([6], False)], ids=["two-batches", "not-kept"]
)
def test_a_graph_shared_with_the_caller_is_never_freed(backend, sizes, cache_graph):
    """A penalty computed once from the parameters and closed over by ``loss_fn`` is part of
    every forward pass's graph. Graphs the operator does not keep are freed by their last
    pass only when the operator built all of them: here the shared part stays, so the next
    batch, the next product and the caller's own backward still run through it. (The
    forward-mode backends see only what the model's forward pass does with the parameters,
    so they miss such a penalty's curvature; ``"auto"``'s agreement check drops them.)"""
    case = make_case("mlp-tanh", "mse-sum", sizes)
    penalty = torch.tanh(case.params[0]).pow(2).sum()

    def loss_fn(out, y):
        return case.loss_fn(out, y) + 0.1 * penalty

    op = ck.HessianOperator(
        case.model, loss_fn, case.data, backend=backend, reduction="sum", cache_graph=cache_graph
    )
    V = _probes(op.shape[0], 3)
    expected = _plain_hvp(case, loss_fn, V)
    for _ in range(2):
        assert rel_err(op @ V[:, 0], expected[:, 0]) < TOL
        assert rel_err(op @ V, expected) < TOL
    penalty.backward()  # the caller's graph is whole


class _Doubled(torch.nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


@pytest.mark.parametrize(
    "operator, backend",
    [
        ("hessian", "double-backward"),
        ("hessian", "reverse-over-forward"),
        ("hessian", "forward-over-reverse"),
        ("hessian", "auto"),
        ("ggn", "double-vjp"),
        ("ggn", "taylor-jvp"),
        ("ggn", "auto"),
    ],
)
def test_products_under_a_cached_parametrization(operator, backend):
    """Under ``parametrize.cached()`` every forward pass reuses the weight tensor the first
    computed from the parameter. From the first product on, products over several batches
    equal those without the cache, and the cached weight's graph stays whole for the caller.
    Backends that run the model on stand-ins for the parameters (forward mode, Taylor mode)
    would differentiate the cached weight as a constant: they step aside for double
    backward / double VJP there, with a warning when asked for by name."""
    from torch.nn.utils import parametrize

    case = make_case("mlp-tanh", "mse-sum", [3, 4])
    parametrize.register_parametrization(case.model[0], "weight", _Doubled())
    make = ck.HessianOperator if operator == "hessian" else ck.GGNOperator
    V = _probes(sum(p.numel() for p in case.params), 3)
    expected = make(case.model, case.loss_fn, case.data, reduction="sum") @ V
    if operator == "hessian":
        assert rel_err(expected, _plain_hvp(case, case.loss_fn, V)) < TOL
    X = case.batches[0][0]
    case.model(X).sum().backward()
    grads = [p.grad.clone() for p in case.params]
    case.model.zero_grad()
    op = make(case.model, case.loss_fn, case.data, backend=backend, reduction="sum")
    with parametrize.cached(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an explicit backend warns that it fell back
        for _ in range(2):
            assert rel_err(op @ V, expected) < TOL
            assert rel_err(op @ V[:, 1], expected[:, 1]) < TOL
        case.model(X).sum().backward()  # through the cached weight: its graph is whole
    assert all(rel_err(p.grad, g) < TOL for p, g in zip(case.params, grads))


def test_a_penalty_another_thread_made_is_not_freed():
    """Autograd numbers nodes per thread: a penalty whose nodes the main thread numbered is
    older than a product run in a fresh thread, whose numbers start lower. It must still be
    taken as shared."""
    import threading

    from curvkit.autodiff import graph_mark

    case = make_case("mlp-tanh", "mse-sum", [3, 4])
    while graph_mark() < 10_000:  # numbers above any the fresh thread's product reaches
        pass
    penalty = torch.tanh(case.params[0]).pow(2).sum()

    def loss_fn(out, y):
        return case.loss_fn(out, y) + 0.1 * penalty

    op = ck.HessianOperator(
        case.model, loss_fn, case.data, backend="double-backward", reduction="sum"
    )
    V = _probes(op.shape[0], 2)
    expected = _plain_hvp(case, loss_fn, V)
    results = []
    worker = threading.Thread(target=lambda: results.append(op @ V))
    worker.start()
    worker.join()
    assert results and rel_err(results[0], expected) < TOL
    penalty.backward()


def test_built_since_tells_new_graphs_from_shared_ones():
    from curvkit.autodiff import built_since, graph_mark

    w = torch.ones(3, requires_grad=True)
    old = w.exp()
    mark = graph_mark()
    new = (w * 2).sum()
    assert built_since(mark, new) and built_since(mark, new, None)
    assert not built_since(mark, (old * 2).sum())
    assert not built_since(graph_mark(), new)  # made before this mark
    with torch.nn.utils.parametrize.cached():  # may keep a tensor made now for later
        assert not built_since(mark, new)


def _penalised_case():
    """A case whose loss_fn adds a penalty on a parameter it holds itself."""
    case = make_case("mlp-tanh", "mse-sum", [3, 4])
    weight = case.params[0]

    def penalised(out, y):
        return case.loss_fn(out, y) + 0.1 * torch.tanh(weight).pow(2).sum()

    return case, penalised


@pytest.mark.parametrize("backend", ["reverse-over-forward", "forward-over-reverse", "forward-ad"])
def test_a_forward_mode_backend_refuses_a_loss_that_holds_the_parameters(backend):
    """A forward-mode backend differentiates the model's forward pass only: asked for by
    name with a loss_fn that uses a parameter itself, it raises instead of returning a
    product without that term's curvature."""
    case, penalised = _penalised_case()
    op = ck.HessianOperator(case.model, penalised, case.data, backend=backend, reduction="sum")
    v = _probes(op.shape[0], 1)[:, 0]
    with pytest.raises(ValueError, match=f"uses the parameters directly.*{backend}"):
        op @ v
    plain = ck.HessianOperator(
        case.model, case.loss_fn, case.data, backend=backend, reduction="sum"
    )
    assert rel_err(plain @ v, dense_hessian(case) @ v) < TOL


def test_taylor_forms_refuse_a_loss_that_holds_the_parameters():
    """Taylor-mode quadratic forms likewise: asked for by name they raise; under "auto"
    they disagree with v^T (H v) in the trial and are dropped."""
    case, penalised = _penalised_case()
    taylor = ck.HessianOperator(
        case.model, penalised, case.data, reduction="sum", quadratic_form_method="taylor"
    )
    V = _probes(taylor.shape[0], 2)
    with pytest.raises(ValueError, match="Taylor mode differentiates only"):
        taylor.quadratic_form(V)
    auto = ck.HessianOperator(case.model, penalised, case.data, reduction="sum")
    expected = (V * _plain_hvp(case, penalised, V)).sum(0)
    assert rel_err(auto.quadratic_form(V), expected) < TOL
    assert auto.quadratic_form_choice == "hvp"
    assert "uses the parameters directly" in auto.quadratic_form_trial["taylor"]


def test_auto_leaves_forward_mode_out_for_a_loss_that_holds_the_parameters():
    """However small the penalty's curvature (here below the trial's agreement tolerance),
    "auto" never times a backend that would miss it."""
    case = make_case("mlp-tanh", "mse-sum", [6])
    weight = case.params[0]

    def decayed(out, y):
        return case.loss_fn(out, y) + 1e-12 * weight.pow(2).sum()

    op = ck.HessianOperator(case.model, decayed, case.data, reduction="sum", cache_graph=False)
    V = _probes(op.shape[0], 3)
    expected = _plain_hvp(case, decayed, V)
    assert rel_err(op @ V[:, 0], expected[:, 0]) < TOL
    assert rel_err(op @ V, expected) < TOL
    for kind in ("single", "block"):
        trial = op.backend_trials[kind]
        assert all(
            trial[name] == "loss_fn uses the parameters beyond the model's output"
            for name in trial
            if name in ("forward-ad", "reverse-over-forward", "forward-over-reverse")
        )
        assert op.backend_choices[kind] in ("double-backward", "batched")
    plain = ck.HessianOperator(case.model, case.loss_fn, case.data, reduction="sum")
    plain @ V[:, 0]
    assert isinstance(plain.backend_trials["single"]["reverse-over-forward"], float)


def test_the_loss_check_leaves_random_streams_and_integer_outputs_alone():
    """The check's forward pass draws no random numbers from the product's stream (dropout
    masks of the first product equal the later ones'), and a model that returns integer
    tensors beside its output is fine."""

    class WithLabels(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Dropout(0.5))

        def forward(self, X):
            return self.net(X), torch.zeros(X.shape[0], dtype=torch.long)

    def loss_fn(out, y):
        return (out[0] - y).pow(2).sum()

    torch.manual_seed(0)
    model = WithLabels().double().train()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    op = ck.HessianOperator(
        model, loss_fn, (X, y), backend="forward-ad", reduction="sum", check_deterministic=False
    )
    v = _probes(op.shape[0], 1)[:, 0]
    torch.manual_seed(1)
    first = op @ v
    torch.manual_seed(1)
    assert torch.equal(op @ v, first)
