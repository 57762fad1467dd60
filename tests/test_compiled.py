"""The ``"compiled"`` backend (``torch.compile`` of forward over reverse) against the oracle.

Compilation takes seconds per compiled function, so these tests use ``"aot_eager"`` (no
code generation) on a representative subset of the case matrix; one test compiles with
``"inductor"``. Each operator compiles once per probe-chunk length and batch shape.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import curvkit as ck
from curvkit import autodiff
from curvkit.autodiff import BACKENDS, EAGER_BACKENDS
from curvkit.operators import hessian as hessian_module
from curvkit.operators.hessian import COMPILED_MARGIN, choose_backend
from tests.cases import dense_hessian, make_case, rel_err

TOL = 1e-10
FAST = "aot_eager"


def _probes(D: int, K: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D, K, generator=g, dtype=torch.float64)


def _compiled(case, **kwargs) -> ck.HessianOperator:
    kwargs.setdefault("backend", "compiled")
    kwargs.setdefault("compile_backend", FAST)
    return ck.HessianOperator(case.model, case.loss_fn, case.data, **kwargs)


def _broken_backend(gm, example_inputs):
    """A torch.compile backend that cannot compile anything."""
    raise RuntimeError("this backend cannot compile")


@pytest.fixture(autouse=True)
def _quiet_torch_internals():
    # torch.compile's first use in a process calls deprecated torch.jit internals
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        yield


@pytest.mark.parametrize(
    "spec",
    [
        ("mlp-tanh", "mse-mean", [7]),
        ("cnn", "mse-sum", [5]),
        ("layernorm-gelu", "ce-mean", [4, 3]),
        ("transformer", "ce-seq-mean", [4]),
    ],
    ids=lambda s: f"{s[0]}/{s[1]}/{'-'.join(map(str, s[2]))}",
)
def test_compiled_matches_dense_oracle(spec):
    """H @ v and H @ V (K = 5 in chunks of 2: a full and a tail chunk) to 1e-10."""
    case = make_case(*spec)
    H = dense_hessian(case)
    V = _probes(H.shape[0], 5)
    op = _compiled(case, max_probes_per_chunk=2)
    assert rel_err(op @ V[:, 0], H @ V[:, 0]) < TOL
    assert rel_err(op @ V, H @ V) < TOL
    assert op.backend == "compiled" and op.backend_fallback_reason is None
    # one compiled function per (chunk length, batch shape): 1 and 2 probes per batch size
    batch_sizes = {X.shape[0] for X, _ in case.batches}
    assert len(op.compiled_product.functions) == 2 * len(batch_sizes)
    assert op.compile_seconds > 0


def test_compiled_is_reused_and_sees_in_place_changes():
    """Parameters (differentiated or not) and buffers changed in place between products:
    the next product matches the new oracle, without compiling again."""
    case = make_case("bn-eval", "ce-mean", [3, 5])
    subset = case.subset()
    op = _compiled(case, params=subset)
    V = _probes(op.shape[0], 3)
    assert rel_err(op @ V, dense_hessian(case, subset) @ V) < TOL
    compiled = dict(op.compiled_product.functions)
    bn = case.model[1]
    with torch.no_grad():
        for p in case.model.parameters():  # the subset and the rest
            p.mul_(1.5).add_(0.1)
        bn.running_mean.add_(0.3)
        bn.running_var.mul_(2.0)
    H_new = dense_hessian(case, subset)
    assert rel_err(op @ V, H_new @ V) < TOL
    case.model[0].weight.data.normal_()  # values changed behind autograd's back
    H_data = dense_hessian(case, subset)
    assert rel_err(H_data, H_new) > 1e-3
    assert rel_err(op @ V, H_data @ V) < TOL
    assert op.compiled_product.functions == compiled  # nothing recompiled


def test_auto_with_compile_records_the_trial():
    case = make_case("mlp-relu", "ce-sum", [6])
    H = dense_hessian(case)
    op = _compiled(case, backend="auto", compile=True)
    v = _probes(H.shape[0], 1)[:, 0]
    assert rel_err(op @ v, H @ v) < TOL
    V = _probes(H.shape[0], 4)
    assert rel_err(op @ V, H @ V) < TOL
    for kind in ("single", "block"):
        trial = op.backend_trials[kind]
        assert "compiled" in trial and isinstance(trial["compiled"], float)
        assert op.backend_choices[kind] in BACKENDS
        assert op.backend_choices[kind] == choose_backend(trial)
    assert op.compile_seconds > 0
    assert rel_err(op @ V, H @ V) < TOL  # with the cached choice


def test_auto_keeps_compiled_when_it_wins(monkeypatch):
    """When the trial keeps "compiled", later products (new chunk lengths) use it."""
    monkeypatch.setattr(
        hessian_module, "choose_backend", lambda t: "compiled" if "compiled" in t else "?"
    )
    case = make_case("mlp-tanh", "mse-mean", [7])
    H = dense_hessian(case)
    op = _compiled(case, backend="auto", compile=True, max_probes_per_chunk=4)
    V = _probes(H.shape[0], 6)
    assert rel_err(op @ V, H @ V) < TOL  # trial on 4 probes, then chunks of 4 and 2
    assert op.backend_choices == {"block": "compiled"} and op.backend == "compiled"
    assert rel_err(op @ V[:, :2], H @ V[:, :2]) < TOL
    assert len(op.compiled_product.functions) == 2


def test_default_auto_never_compiles(monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("torch.compile called without compile=True")

    monkeypatch.setattr(torch, "compile", no_compile)
    case = make_case("mlp-tanh", "bce", [4, 3])
    H = dense_hessian(case)
    op = ck.HessianOperator(case.model, case.loss_fn, case.data)
    V = _probes(H.shape[0], 3)
    assert rel_err(op @ V[:, 0], H @ V[:, 0]) < TOL
    assert rel_err(op @ V, H @ V) < TOL
    assert set(op.backend_trials["single"]) <= set(EAGER_BACKENDS)
    assert set(op.backend_trials["block"]) <= set(EAGER_BACKENDS)
    assert op.compiled_product is None and op.compile_seconds == 0.0


@pytest.mark.parametrize("failure", ["backend", "torch.compile"])
def test_auto_drops_a_failing_compile(monkeypatch, failure):
    compile_backend = FAST
    if failure == "backend":
        compile_backend = _broken_backend
    else:

        def raising_compile(*args, **kwargs):
            raise RuntimeError("torch.compile is not available here")

        monkeypatch.setattr(torch, "compile", raising_compile)
    case = make_case("layernorm-gelu", "mse-mean", [5])
    H = dense_hessian(case)
    op = _compiled(case, backend="auto", compile=True, compile_backend=compile_backend)
    V = _probes(H.shape[0], 3)
    assert rel_err(op @ V[:, 0], H @ V[:, 0]) < TOL
    assert rel_err(op @ V, H @ V) < TOL
    for kind in ("single", "block"):
        reason = op.backend_trials[kind]["compiled"]
        assert isinstance(reason, str) and "compile" in reason
        assert op.backend_choices[kind] != "compiled"


def test_explicit_compiled_falls_back_to_double_backward():
    case = make_case("mlp-relu", "ce-mean", [3, 5, 2])
    H = dense_hessian(case)
    op = _compiled(case, compile_backend=_broken_backend)
    V = _probes(H.shape[0], 3)
    with pytest.warns(RuntimeWarning, match="compiled failed on this model"):
        out = op @ V
    assert rel_err(out, H @ V) < TOL
    assert op.backend == "double-backward"
    assert "cannot compile" in op.backend_fallback_reason
    assert rel_err(op @ V[:, 0], H @ V[:, 0]) < TOL  # no second warning: choice replaced


def test_failure_after_written_chunks_completes_only_the_rest(monkeypatch):
    """A compiled chunk that fails after earlier chunks of the product were added into the
    result (second batch, accumulating): double backward computes only the missing probes."""
    real_compile = autodiff.CompiledHVP._compile

    def fails_on_second_batch_tail(self, float_y):
        fn = real_compile(self, float_y)

        def run(primals, state, X, y, weight, tangents):
            if X.shape[0] == 5 and tangents[0].shape[0] == 1:
                raise RuntimeError("compiled code failed at run time")
            return fn(primals, state, X, y, weight, tangents)

        return run

    monkeypatch.setattr(autodiff.CompiledHVP, "_compile", fails_on_second_batch_tail)
    case = make_case("mlp-tanh", "mse-sum", [3, 5, 2])
    H = dense_hessian(case)
    op = _compiled(case, max_probes_per_chunk=2)
    # column-major, so one call per batch gets all 5 probes (a row-major block would be
    # staged in chunks of 2, one call each)
    V = _probes(5, H.shape[0]).T
    with pytest.warns(RuntimeWarning, match="run time"):
        out = op @ V
    assert rel_err(out, H @ V) < TOL
    assert op.backend == "double-backward"


def test_train_batchnorm_falls_back():
    """torch.func rejects train-mode BatchNorm's in-place update, compiled or not."""
    case = make_case("bn-train", "mse-sum", [4, 3])
    H = dense_hessian(case)
    before = [b.clone() for b in case.model.buffers()]
    op = _compiled(case)
    V = _probes(H.shape[0], 2)
    with pytest.warns(RuntimeWarning, match="using double-backward"):
        assert rel_err(op @ V, H @ V) < TOL
    assert all(torch.equal(a, b) for a, b in zip(before, case.model.buffers()))


def test_unknown_compile_backend_is_rejected():
    case = make_case("mlp-tanh", "mse-mean", [7])
    with pytest.raises(ValueError, match="unknown torch.compile backend 'no-such-backend'"):
        _compiled(case, compile_backend="no-such-backend")
    with pytest.raises(ValueError, match="unknown torch.compile backend"):
        _compiled(case, backend="auto", compile=True, compile_backend="no-such-backend")
    # not checked (nor compiled) when nothing will be compiled
    ck.HessianOperator(case.model, case.loss_fn, case.data, compile_backend="no-such-backend")


def test_choose_backend_keeps_compiled_only_when_clearly_faster():
    eager = {"double-backward": 1.0, "batched": 0.95, "forward-over-reverse": "failed"}
    assert choose_backend({**eager, "compiled": COMPILED_MARGIN * 0.95 * 0.99}) == "compiled"
    assert choose_backend({**eager, "compiled": COMPILED_MARGIN * 0.95 * 1.01}) == (
        "double-backward"  # batched is within VECTORISED_MARGIN of the loop
    )
    assert choose_backend({**eager, "compiled": "BackendCompilerFailed: ..."}) == (
        "double-backward"
    )
    assert choose_backend({"double-backward": 1.0, "forward-ad": 0.5, "compiled": 0.44}) == (
        "compiled"
    )
    assert choose_backend({"double-backward": 1.0, "forward-ad": 0.5, "compiled": 0.46}) == (
        "forward-ad"
    )


@pytest.mark.slow
def test_inductor_on_a_small_mlp():
    """The default compile backend (C++ code generation on CPU), float64, to 1e-10.

    About 7 s with inductor's on-disk cache warm, 22 s cold on 2 CPU cores."""
    case = make_case("mlp-tanh", "mse-mean", [7])
    H = dense_hessian(case)
    op = _compiled(case, compile_backend="inductor")
    V = _probes(H.shape[0], 3)
    assert rel_err(op @ V, H @ V) < TOL
    assert op.backend == "compiled" and op.backend_fallback_reason is None
    assert len(op.compiled_product.functions) == 1


def test_compiled_agrees_in_float32():
    """Single precision: the compiled product agrees with double backward to rounding."""
    case = make_case("cnn", "ce-mean", [4, 2])
    case.model.float()
    V = _probes(sum(p.numel() for p in case.params), 3).float()
    ref = ck.HessianOperator(case.model, case.loss_fn, case.data, backend="double-backward") @ V
    out = _compiled(case) @ V
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5
