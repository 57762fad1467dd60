"""Every autodiff backend against the dense float64 oracle, and the ``"auto"`` choice."""

from __future__ import annotations

import warnings

import pytest
import torch

import curvkit as ck
from curvkit import autodiff
from curvkit.autodiff import BACKENDS, EAGER_BACKENDS, chunk_size_for
from curvkit.live_memory import peak_allocated_bytes
from curvkit.operators import hessian as hessian_module
from curvkit.operators.hessian import choose_backend
from tests.cases import dense_hessian, make_case, rel_err

TOL = 1e-10
_DENSE: dict[str, torch.Tensor] = {}


def _dense(case) -> torch.Tensor:
    """The dense oracle, cached per case (cases are deterministic in their spec)."""
    if case.name not in _DENSE:
        _DENSE[case.name] = dense_hessian(case)
    return _DENSE[case.name]


def _probes(D: int, K: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D, K, generator=g, dtype=torch.float64)


def _quiet_operator(case, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # documented fallbacks
        return ck.HessianOperator(case.model, case.loss_fn, case.data, **kwargs)


# "compiled" compiles per case: tested on a subset in tests/test_compiled.py
@pytest.mark.parametrize("backend", [*EAGER_BACKENDS, "auto"])
def test_backend_matches_dense_oracle(case, backend):
    """H @ v and H @ V (K = 5, chunks of 2) agree with the dense Hessian to 1e-10."""
    H = _dense(case)
    V = _probes(H.shape[0], 5)
    op = _quiet_operator(case, backend=backend, max_probes_per_chunk=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        single = op @ V[:, 0]
        block = op @ V
    assert rel_err(single, H @ V[:, 0]) < TOL
    assert rel_err(block, H @ V) < TOL
    assert op.backend in BACKENDS
    if backend == "reverse-over-forward":  # its rules cover the whole matrix: no fallback
        assert op.backend == backend and op.backend_fallback_reason is None


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_backend_restores_model_state(backend):
    case = make_case("bn-train", "mse-sum", [4, 3])
    before = [b.clone() for b in case.model.buffers()]
    params = [p.clone() for p in case.model.parameters()]
    op = _quiet_operator(case, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        op @ _probes(op.shape[0], 3)
    assert case.model.training
    assert all(torch.equal(a, b) for a, b in zip(before, case.model.buffers()))
    assert all(torch.equal(a, b) for a, b in zip(params, case.model.parameters()))
    assert all(p.grad is None for p in case.model.parameters())


def test_auto_records_a_correct_choice_per_kind():
    case = make_case("layernorm-gelu", "ce-mean", [4, 3])
    H = _dense(case)
    op = ck.HessianOperator(case.model, case.loss_fn, case.data)
    assert op.backend == "auto" and op.backend_choices == {}
    v = _probes(H.shape[0], 1)[:, 0]
    assert rel_err(op @ v, H @ v) < TOL
    single = op.backend_choices["single"]
    assert op.backend == single and single in BACKENDS
    trial = op.backend_trials["single"]
    assert set(trial) == {
        "double-backward",
        "forward-ad",
        "reverse-over-forward",
        "forward-over-reverse",
    }
    assert isinstance(trial[single], float)
    assert single == choose_backend(trial)
    V = _probes(H.shape[0], 4)
    assert rel_err(op @ V, H @ V) < TOL
    assert op.backend_choices["block"] in BACKENDS
    assert op.backend == op.backend_choices["block"]
    # cached: no second trial
    trials = dict(op.backend_trials)
    op @ V
    assert op.backend_trials == trials


def test_fixed_backend_skips_the_trial():
    case = make_case("mlp-tanh", "bce", [4, 3])
    op = ck.HessianOperator(case.model, case.loss_fn, case.data, backend="forward-ad")
    op @ _probes(op.shape[0], 2)
    assert op.backend == "forward-ad" and op.backend_trials == {}


def test_auto_drops_a_backend_that_disagrees(monkeypatch):
    """A candidate whose product differs from double backward is never chosen."""
    real = hessian_module.batch_hvp

    def wrong_forward_ad(*args):
        out = real(*args)
        return [1.01 * o for o in out] if args[8] == "forward-ad" else out

    monkeypatch.setattr(hessian_module, "batch_hvp", wrong_forward_ad)
    case = make_case("mlp-relu", "ce-sum", [6])
    H = _dense(case)
    op = ck.HessianOperator(case.model, case.loss_fn, case.data)
    v = _probes(H.shape[0], 1)[:, 0]
    assert rel_err(op @ v, H @ v) < TOL
    assert "disagrees" in op.backend_trials["single"]["forward-ad"]
    assert op.backend != "forward-ad"


def test_auto_drops_a_backend_that_fails(monkeypatch):
    real = hessian_module.batch_hvp

    def failing(*args):
        if args[8] == "forward-over-reverse":
            raise RuntimeError("no forward-mode rule for this op")
        return real(*args)

    monkeypatch.setattr(hessian_module, "batch_hvp", failing)
    case = make_case("cnn", "mse-sum", [5])
    H = _dense(case)
    op = ck.HessianOperator(case.model, case.loss_fn, case.data)
    V = _probes(H.shape[0], 3)
    assert rel_err(op @ V, H @ V) < TOL
    assert op.backend_trials["block"]["forward-over-reverse"].startswith("RuntimeError")
    assert op.backend != "forward-over-reverse"


@pytest.mark.parametrize("backend", ["forward-over-reverse", "forward-ad"])
def test_forward_mode_failure_falls_back_to_double_backward(monkeypatch, backend):
    real = hessian_module.batch_hvp

    def failing(*args):
        if args[8] == backend:
            raise RuntimeError("Trying to use forward AD with an op that does not support it")
        return real(*args)

    monkeypatch.setattr(hessian_module, "batch_hvp", failing)
    case = make_case("mlp-tanh", "mse-sum", [3, 5, 2])
    H = _dense(case)
    op = ck.HessianOperator(case.model, case.loss_fn, case.data, backend=backend)
    V = _probes(H.shape[0], 3)
    with pytest.warns(RuntimeWarning, match="using double-backward"):
        out = op @ V
    assert rel_err(out, H @ V) < TOL
    assert op.backend == "double-backward"
    assert "forward AD" in op.backend_fallback_reason


def test_train_batchnorm_under_forward_over_reverse_is_exact():
    """torch.func rejects train-mode BN's in-place update; the fallback keeps the result."""
    case = make_case("bn-train", "ce-mean", [6])
    H = _dense(case)
    op = _quiet_operator(case, backend="forward-over-reverse")
    V = _probes(H.shape[0], 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert rel_err(op @ V, H @ V) < TOL


def test_chunk_size_for():
    assert chunk_size_for(100, None, 16) == 16
    assert chunk_size_for(100, float("inf"), 16) == 16
    assert chunk_size_for(100, 300, 16) == 3
    assert chunk_size_for(100, 50, 16) == 1


@pytest.mark.parametrize("backend", ["batched", "forward-over-reverse"])
def test_block_products_stay_within_the_memory_budget(backend):
    """Chunks sized from measured peaks: a K-probe product holds at most the budget beyond
    its (D, K) result (default: 4 gradients' peak), and a larger budget takes larger chunks;
    the products stay exact."""
    case = make_case("transformer", "ce-seq-mean", [4])
    H = _dense(case)
    D, K = H.shape[0], 12
    V = _probes(K, D).T  # column-major, as estimators draw them (a row-major block is
    # transposed through a staging buffer of one chunk, which the budget does not cover)
    result = (K - 1) * D * 8

    def product_peak(op):
        op @ V  # sizes the chunks
        op.clear_cache()
        return peak_allocated_bytes(lambda: op @ V) - result

    default = ck.HessianOperator(case.model, case.loss_fn, case.data, backend=backend)
    assert product_peak(default) <= 4 * default.gradient_peak_bytes
    assert rel_err(default @ V, H @ V) < TOL
    chunks = [default.chunk_sizes[backend]]
    for factor in (8, 32):
        budget = factor * default.gradient_peak_bytes
        op = ck.HessianOperator(
            case.model, case.loss_fn, case.data, backend=backend, memory_budget=budget
        )
        assert product_peak(op) <= budget
        chunks.append(op.chunk_sizes[backend])
        assert rel_err(op @ V, H @ V) < TOL
    assert chunks == sorted(chunks) and chunks[-1] > chunks[0], chunks
    unlimited = ck.HessianOperator(
        case.model, case.loss_fn, case.data, backend=backend, memory_budget=float("inf")
    )
    assert unlimited.chunk_size == 16 and rel_err(unlimited @ V, H @ V) < TOL
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="memory_budget"):
            ck.HessianOperator(case.model, case.loss_fn, case.data, memory_budget=bad)


def test_trial_drops_a_batched_backend_over_the_budget():
    """A batched backend that needs more than the budget for one probe is not a candidate
    for block products; the loop over the kept graph still is."""
    case = make_case("mlp-tanh", "mse-sum", [3, 5, 2])
    op = ck.HessianOperator(case.model, case.loss_fn, case.data, memory_budget=1)
    op @ _probes(op.shape[0], 4)
    trial = op.backend_trials["block"]
    for name in ("batched", "forward-over-reverse"):
        assert trial[name].startswith("one probe needs"), trial
    assert op.backend_choices["block"] == "double-backward"


def test_backends_agree_in_float32():
    """Single precision: all backends agree to rounding (relative 1e-5)."""
    case = make_case("transformer", "ce-seq-sum", [2, 3])
    case.model.float()
    case.batches = [(X, y) for X, y in case.batches]
    V = _probes(sum(p.numel() for p in case.params), 3).float()
    outs = {}
    for backend in EAGER_BACKENDS:
        op = ck.HessianOperator(case.model, case.loss_fn, case.data, backend=backend)
        outs[backend] = op @ V
    ref = outs["double-backward"]
    for backend, out in outs.items():
        assert rel_err(out, ref) < 1e-5, backend


def test_choice_prefers_the_one_graph_loop_on_a_near_tie():
    assert choose_backend({"double-backward": 1.0, "batched": 0.95}) == "double-backward"
    assert choose_backend({"double-backward": 1.0, "batched": 0.85}) == "batched"
    assert choose_backend({"double-backward": 1.0, "forward-ad": 0.97}) == "forward-ad"
    # the leanest backend wins within 10% of the fastest, not beyond
    lean = {"double-backward": 1.0, "forward-ad": 0.9, "reverse-over-forward": 0.98}
    assert choose_backend(lean) == "reverse-over-forward"
    lean["reverse-over-forward"] = 1.0
    assert choose_backend(lean) == "forward-ad"
    lean["reverse-over-forward"] = "TaylorUnsupportedError: no rule"
    assert choose_backend(lean) == "forward-ad"
    assert (
        choose_backend({"double-backward": "RuntimeError: x", "batched": 2.0, "forward-ad": 3.0})
        == "batched"
    )


def test_grad_into_writes_adds_and_zeros_what_is_unused():
    """``grad_into`` hands each gradient's slot back to autograd: written, or added with
    ``accumulate``; an unused parameter's slot is zeroed (or left); no hook stays behind."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    loss = (w**3).sum()
    expected = 3 * w.detach() ** 2
    out = [
        torch.full((2, 3, 4), 7.0, dtype=torch.float64),
        torch.full((2,), 7.0, dtype=torch.float64),
    ]
    slots = [out[0][1], out[1]]  # a view into a larger block, as the operators pass
    autodiff.grad_into([loss], [w, unused], None, slots, accumulate=False, retain_graph=True)
    assert torch.allclose(out[0][1], expected) and torch.equal(
        out[0][0], torch.full((3, 4), 7.0, dtype=torch.float64)
    )
    assert torch.equal(out[1], torch.zeros(2, dtype=torch.float64))
    autodiff.grad_into([loss], [w, unused], None, slots, accumulate=True)
    assert torch.allclose(out[0][1], 2 * expected) and torch.equal(
        out[1], torch.zeros(2, dtype=torch.float64)
    )
    assert not w._backward_hooks and not unused._backward_hooks


def test_agreement_tolerance_is_tf32s_where_cuda_may_use_it(monkeypatch):
    """sqrt(eps) of the precision products run in: TF32's for float32 convolutions on CUDA
    (cuDNN's default) and for float32 matrix products once they are allowed TF32."""
    from curvkit.operators.quadratic_forms import agreement_tolerance

    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten())
    mlp = torch.nn.Linear(3, 2)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    f32 = torch.finfo(torch.float32).eps ** 0.5
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert agreement_tolerance(conv, torch.float32, cuda) == 2.0**-5
    assert agreement_tolerance(mlp, torch.float32, cuda) == f32  # matmul TF32 is off
    assert agreement_tolerance(conv, torch.float32, cpu) == f32
    assert agreement_tolerance(conv, torch.float64, cuda) == torch.finfo(torch.float64).eps ** 0.5
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert agreement_tolerance(conv, torch.float32, cuda) == f32
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert agreement_tolerance(mlp, torch.float32, cuda) == 2.0**-5
        torch.set_float32_matmul_precision("medium")
        assert agreement_tolerance(mlp, torch.float32, cuda) == 2.0**-3.5
    finally:
        torch.set_float32_matmul_precision(previous)


def test_trials_compare_within_the_agreement_tolerance(monkeypatch):
    """The backend and quadratic-form trials take their tolerance from agreement_tolerance:
    below every rounding difference, only double backward (run twice, bitwise equal on a
    CPU) survives, and Taylor mode's forms are dropped."""
    from curvkit.operators import quadratic_forms

    monkeypatch.setattr(hessian_module, "agreement_tolerance", lambda *args: 1e-300)
    monkeypatch.setattr(quadratic_forms, "agreement_tolerance", lambda *args: 1e-300)
    case = make_case("mlp-tanh", "mse-sum", [3, 5, 2])
    case.model.float()
    data = [(X.float(), y.float()) for X, y in case.batches]
    op = ck.HessianOperator(case.model, case.loss_fn, data, check_deterministic=False)
    g = torch.Generator().manual_seed(0)
    op @ torch.randn(op.shape[0], generator=g)
    trial = op.backend_trials["single"]
    assert op.backend_choices["single"] == "double-backward"
    dropped = [t for name, t in trial.items() if name != "double-backward"]
    assert dropped and all(isinstance(t, str) and t.startswith("disagrees") for t in dropped)
    op.quadratic_form(torch.randn(op.shape[0], 4, generator=g))
    assert op.quadratic_form_choice == "hvp"
    assert op.quadratic_form_trial["taylor"].startswith("disagrees")


def test_single_products_size_no_chunks():
    """Sizing a batched backend's chunks runs it and drops the kept graph: a single product
    (and its trial, where that would be charged to a timed candidate) needs no chunk."""
    case = make_case("cnn", "ce-mean", [4, 2])
    op = ck.HessianOperator(case.model, case.loss_fn, case.data)
    op @ _probes(op.shape[0], 1)[:, 0]
    assert op.chunk_sizes == {} and "block" not in op.backend_trials
    op @ _probes(op.shape[0], 3)
    assert set(op.chunk_sizes) == {"batched", "forward-over-reverse"}


def test_affine_batchnorm_swaps_only_eval_layers_with_statistics_and_restores():
    """Eval BatchNorm runs as ``x * scale + shift`` inside the context (same values), and
    nothing else changes; the original forward is back afterwards, also after an error."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3),
        torch.nn.BatchNorm2d(3),
        torch.nn.Flatten(),
        torch.nn.BatchNorm1d(12, affine=False),
        torch.nn.BatchNorm1d(12, track_running_stats=False),
    ).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1), model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 2), model[1].bias.uniform_(-1, 1)
        model[3].running_mean.uniform_(-1, 1), model[3].running_var.uniform_(0.5, 2)
    model.eval()
    X = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    expected = model(X)
    with autodiff.affine_batchnorm(model):
        assert "forward" in model[1].__dict__ and "forward" in model[3].__dict__
        assert "forward" not in model[4].__dict__  # no running statistics: batch statistics
        torch.testing.assert_close(model(X), expected, rtol=1e-12, atol=1e-12)
    assert all("forward" not in m.__dict__ for m in model)
    model[1].train()
    with pytest.raises(RuntimeError, match="boom"), autodiff.affine_batchnorm(model):
        assert "forward" not in model[1].__dict__  # train mode: left alone
        raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in model)


class _ReusedLinear(torch.nn.Module):
    """One ``Linear`` registered under two names (weight sharing by module reuse)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 3)
        self.b = self.a

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _reused_linear_oracle(X, y, W, b):
    """Dense Hessian and GGN of the same loss written out by hand, over (W, b) flattened."""

    def out_of(theta):
        W_, b_ = theta[:9].reshape(3, 3), theta[9:]
        return torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(X, W_, b_)), W_, b_)

    theta = torch.cat([W.detach().flatten(), b.detach()])
    H = torch.autograd.functional.hessian(lambda t: ((out_of(t) - y) ** 2).mean(), theta)
    J = torch.autograd.functional.jacobian(out_of, theta).reshape(-1, theta.numel())
    return H, J.T @ J * (2.0 / y.numel())


@pytest.mark.parametrize(
    "product",
    [
        *[("hessian", b) for b in ("auto", *EAGER_BACKENDS)],
        *[("ggn", b) for b in ("auto", "double-vjp", "forward", "taylor-jvp")],
        ("hessian", "taylor forms"),
        ("ggn", "exact diagonal"),
    ],
    ids=str,
)
def test_a_module_used_twice_keeps_its_parameters(product):
    """PyTorch's functional_call puts a swapped-in tensor back into a module registered
    under two names; every route through it must leave the model's parameters in place
    (and give the oracle's numbers)."""
    torch.manual_seed(0)
    model = _ReusedLinear().double()
    X, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 3, dtype=torch.float64)
    weight, bias = model.a.weight, model.a.bias
    H, G = _reused_linear_oracle(X, y, weight, bias)
    V = _probes(12, 3)
    kind, how = product
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if how == "taylor forms":
            op = ck.HessianOperator(
                model, torch.nn.MSELoss(), (X, y), quadratic_form_method="taylor"
            )
        elif kind == "hessian":
            op = ck.HessianOperator(model, torch.nn.MSELoss(), (X, y), backend=how)
        else:
            backend = "auto" if how == "exact diagonal" else how
            op = ck.GGNOperator(model, torch.nn.MSELoss(), (X, y), backend=backend)
        oracle = H if kind == "hessian" else G
        if how == "taylor forms":
            assert rel_err(op.quadratic_form(V), (V * (oracle @ V)).sum(0)) < TOL
        elif how == "exact diagonal":
            assert rel_err(op.diagonal("exact").value, oracle.diagonal()) < TOL
        else:
            for _ in range(2):
                assert rel_err(op @ V, oracle @ V) < TOL
                assert rel_err(op @ V[:, 0], oracle @ V[:, 0]) < TOL
    assert model.a.weight is weight and model.b.bias is bias
    assert isinstance(model.a._parameters["weight"], torch.nn.Parameter)
    assert [n for n, _ in model.named_parameters()] == ["a.weight", "a.bias"]
