"""Taylor-mode quadratic forms ``v^T H v`` (curvkit/taylor.py) against the dense oracle.

Every case of the matrix (LayerNorm, train-mode BatchNorm and attention included), per
probe and collapsed over groups, plus small models that exercise the rules the matrix does
not reach (causal attention, strided convolutions with bias, pooling, more elementwise
functions and losses).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvkit as ck
from curvkit.autodiff import batch_hvp
from curvkit.live_memory import peak_allocated_bytes
from curvkit.taylor import (
    TaylorUnsupportedError,
    loss_directional_derivatives,
    taylor_quadratic_forms,
)
from tests.cases import DTYPE, Case, dense_hessian, make_case, rel_err

TOL = 1e-10


def _probes(D: int, K: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D, K, generator=g, dtype=DTYPE)


def _oracle_forms(H: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    return (V * (H @ V)).sum(0)


def _taylor_op(case, **kwargs):
    return ck.HessianOperator(
        case.model, case.loss_fn, case.data, quadratic_form_method="taylor", **kwargs
    )


def test_every_case_per_probe_and_collapsed(case):
    H = dense_hessian(case)
    V = _probes(H.shape[0], 6)
    expected = _oracle_forms(H, V)
    op = _taylor_op(case)
    assert rel_err(op.quadratic_form(V), expected) < TOL
    sums = op.quadratic_form(V, group_size=3)
    assert sums.shape == (2,)
    assert rel_err(sums, expected.reshape(2, 3).sum(1)) < TOL
    assert rel_err(op.quadratic_form(V, group_size=6), expected.sum().reshape(1)) < TOL
    v = V[:, 0]
    assert abs(float(op.quadratic_form(v) - v @ H @ v)) < TOL * float(abs(v @ H @ v))
    assert op.backend == "auto"  # no Hessian-vector product was run


def test_parameter_subset_gives_the_block(case):
    params = case.subset()
    H = dense_hessian(case, params)
    op = ck.HessianOperator(
        case.model, case.loss_fn, case.data, params=params, quadratic_form_method="taylor"
    )
    V = _probes(H.shape[0], 4)
    assert rel_err(op.quadratic_form(V), _oracle_forms(H, V)) < TOL


# ---------------------------------------------------------------------- more rules
class CausalAttention(nn.Module):
    """Token embeddings, one pre-norm causal attention block through
    ``F.scaled_dot_product_attention``, a GELU (tanh approximation) MLP and a head."""

    def __init__(self, vocab: int = 5, d: int = 4, heads: int = 2, seq: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(seq + 2, d))
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d, bias=False)
        self.fc = nn.Linear(d, 2 * d)
        self.head = nn.Linear(2 * d, vocab)

    def forward(self, tokens):
        N, T = tokens.shape
        x = self.embed(tokens) + self.pos[:T]
        q, k, v = self.qkv(self.ln(x)).view(N, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(N, T, -1))
        return self.head(F.gelu(self.fc(x), approximate="tanh"))


class ConvZoo(nn.Module):
    """Strided convolution with bias, eval BatchNorm2d (affine and not), a residual sum,
    average, max and adaptive pooling, SiLU and sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(3).eval()
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3, affine=False).eval()
        self.head = nn.Linear(3 * 2 * 2 + 3 + 3 * 2 * 2, 2)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_()
            self.bn.bias.normal_()
            self.bn2.running_mean.normal_()
            self.bn2.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = F.silu(self.bn(self.conv1(x)))  # (N, 3, 4, 4)
        h = torch.sigmoid(self.bn2(self.conv2(h))) + h
        a = F.avg_pool2d(h, 2).flatten(1)  # (N, 12)
        m, _ = F.adaptive_max_pool2d(h, 1, return_indices=True)
        p, _ = F.max_pool2d(h, 2, 2, 0, 1, False, True)  # return_indices by position
        return self.head(torch.cat([a, m.flatten(1), p.flatten(1)], dim=1))


class Elementwise(nn.Module):
    """A linear layer feeding many elementwise functions, softmax and products of jets."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.head = nn.Linear(4 * 12, 2)

    def forward(self, x):
        h = self.lin(x)
        parts = [
            torch.exp(-0.5 * h * h),
            torch.sqrt(h * h + 1.0),
            h**3 / (1.0 + h**2),
            F.softplus(h),
            torch.log(torch.sigmoid(h)),
            h.softmax(-1) * 3.0,
            torch.tanh(h).pow(2) - 2 * h.mean(-1, keepdim=True),
            (h.unsqueeze(-1) @ h.unsqueeze(-1).mT).diagonal(dim1=-2, dim2=-1) + h.T.T,
            F.leaky_relu(h, 0.2),
            F.elu(h, 0.5),
            F.hardtanh(h, -0.5, 0.7),
            F.softplus(h, beta=2.0),
        ]
        return self.head(torch.stack(parts, dim=1).flatten(1))


def _extra_case(name: str) -> Case:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "causal-attention":
        model = CausalAttention()
        X = torch.randint(0, 5, (3, 3), generator=g)
        y = torch.randint(0, 5, (3, 3), generator=g)

        def loss(out, target):
            return F.cross_entropy(out.flatten(0, 1), target.flatten())

        loss.reduction = "mean"
        return Case(name, model.to(DTYPE), loss, [(X, y)])
    if name == "conv-zoo":
        X = torch.randn(3, 2, 8, 8, generator=g, dtype=DTYPE)
        y = torch.randint(0, 2, (3, 2), generator=g).to(DTYPE)
        loss = nn.BCEWithLogitsLoss(weight=torch.tensor([0.3, 2.0], dtype=DTYPE))
        return Case(name, ConvZoo().to(DTYPE), loss, [(X, y)])
    X = torch.randn(5, 3, generator=g, dtype=DTYPE)
    y = torch.randn(5, 2, generator=g, dtype=DTYPE)
    return Case(name, Elementwise().to(DTYPE), nn.MSELoss(reduction="sum"), [(X, y)])


@pytest.mark.parametrize("name", ["causal-attention", "conv-zoo", "elementwise"])
def test_more_rules_match_the_oracle(name):
    case = _extra_case(name)
    H = dense_hessian(case)
    V = _probes(H.shape[0], 4, seed=3)
    op = _taylor_op(case)
    expected = _oracle_forms(H, V)
    assert rel_err(op.quadratic_form(V), expected) < TOL
    assert rel_err(op.quadratic_form(V, group_size=2), expected.reshape(2, 2).sum(1)) < TOL
    assert rel_err(op.quadratic_form(V, group_size=4), expected.sum().reshape(1)) < TOL


# ---------------------------------------------------------------------- operator behaviour
def test_auto_trial_checks_times_and_records():
    case = make_case("mlp-tanh", "mse-mean", [7])
    H = dense_hessian(case)
    op = ck.HessianOperator(case.model, case.loss_fn, case.data)
    assert op.quadratic_form_method == "auto" and op.quadratic_form_choice is None
    V = _probes(H.shape[0], 20)
    assert rel_err(op.quadratic_form(V), _oracle_forms(H, V)) < TOL
    assert op.quadratic_form_choice in ("taylor", "hvp")
    assert set(op.quadratic_form_trial) == {"taylor", "hvp"}
    assert all(isinstance(t, float) for t in op.quadratic_form_trial.values())
    # later calls use the choice without a new trial
    trial = dict(op.quadratic_form_trial)
    grouped = op.quadratic_form(V, group_size=4)
    assert rel_err(grouped, _oracle_forms(H, V).reshape(5, 4).sum(1)) < TOL
    assert op.quadratic_form_trial == trial


class Cumulative(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return torch.cumsum(self.lin(x), dim=1)


def test_an_op_without_a_rule_falls_back_or_raises():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(6, 4, generator=g, dtype=DTYPE), torch.randn(6, 3, generator=g, dtype=DTYPE)
    model = Cumulative().to(DTYPE)
    case = Case("cumsum", model, nn.MSELoss(), [(X, y)])
    H = dense_hessian(case)
    V = _probes(H.shape[0], 3)
    explicit = ck.HessianOperator(model, nn.MSELoss(), (X, y), quadratic_form_method="taylor")
    with pytest.raises(TaylorUnsupportedError, match="cumsum"):
        explicit.quadratic_form(V)
    # the parameters are back in place after the failure
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    assert isinstance(model.lin.weight, nn.Parameter)
    auto = ck.HessianOperator(model, nn.MSELoss(), (X, y))
    assert rel_err(auto.quadratic_form(V), _oracle_forms(H, V)) < TOL
    assert auto.quadratic_form_choice == "hvp"
    assert "cumsum" in auto.quadratic_form_trial["taylor"]
    assert not auto.collapses_quadratic_forms
    # Hutchinson on a fresh operator asks for the group size first: sizing Taylor mode
    # fails there, and the estimate comes from v^T (A v) probe by probe
    fresh = ck.HessianOperator(model, nn.MSELoss(), (X, y))
    gen = torch.Generator().manual_seed(0)
    est = ck.trace(fresh, method="hutchinson", num_matvecs=16, generator=gen)
    assert fresh.quadratic_form_choice == "hvp" and "cumsum" in fresh.quadratic_form_trial["taylor"]
    assert "group_size" not in est.info
    same = ck.trace(ck.DenseOperator(H), method="hutchinson", num_matvecs=16,
                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert abs(float(est.value - same.value)) < 1e-10 * abs(float(same.value))


def test_chunks_within_a_memory_budget_and_row_major_probes():
    case = make_case("cnn", "ce-mean", [4, 2])
    H = dense_hessian(case)
    V = _probes(H.shape[0], 6)
    expected = _oracle_forms(H, V)
    op = _taylor_op(case, memory_budget=1)  # one probe per pass (or one group)
    assert op.taylor_chunk_size == 1
    assert rel_err(op.quadratic_form(V), expected) < TOL
    assert rel_err(op.quadratic_form(V.T.contiguous().T), expected) < TOL
    grouped = op.quadratic_form(V.contiguous(), group_size=2)
    assert rel_err(grouped, expected.view(3, 2).sum(1)) < TOL
    default = _taylor_op(case)
    assert 1 <= default.taylor_chunk_size <= default.max_probes_per_chunk
    memory = default.taylor_memory
    assert memory["gradient"] > 0 and memory["per_probe"] > 0
    # a budget of the fixed part and three probes: three probes per pass
    budget = memory["base"] + 3 * memory["per_probe"]
    three = _taylor_op(case, memory_budget=budget)
    assert three.taylor_memory == memory  # measured, not guessed: the same on a new operator
    assert three.taylor_chunk_size == 3
    assert rel_err(three.quadratic_form(V), expected) < TOL


def test_train_batchnorm_buffers_are_unchanged():
    case = make_case("bn-train", "ce-mean", [6])
    bn = case.model[1]
    before = [b.clone() for b in case.model.buffers()]
    op = _taylor_op(case)
    H = dense_hessian(case)
    V = _probes(H.shape[0], 3)
    assert rel_err(op.quadratic_form(V), _oracle_forms(H, V)) < TOL
    assert all(torch.equal(a, b) for a, b in zip(before, case.model.buffers()))
    assert bn.training


def test_group_size_validation():
    case = make_case("mlp-tanh", "mse-mean", [7])
    op = _taylor_op(case)
    V = _probes(op.shape[0], 6)
    with pytest.raises(ValueError, match="does not divide"):
        op.quadratic_form(V, group_size=4)
    with pytest.raises(ValueError, match="positive int"):
        op.quadratic_form(V, group_size=0)
    with pytest.raises(ValueError, match="group_size 1"):
        op.quadratic_form(V[:, 0], group_size=2)
    with pytest.raises(ValueError, match="divide"):
        taylor_quadratic_forms(
            case.model, case.loss_fn, *case.batches[0], 1.0, op.params,
            op._split_rows(V.T.contiguous()), group_size=4,
        )  # fmt: skip
    dense = ck.DenseOperator(torch.eye(3, dtype=DTYPE) * 2)
    assert torch.allclose(
        dense.quadratic_form(torch.ones(3, 4, dtype=DTYPE), group_size=2),
        torch.full((2,), 12.0, dtype=DTYPE),
    )


# ---------------------------------------------------------------------- Hutchinson
def test_hutchinson_collapses_groups_on_a_hessian():
    case = make_case("layernorm-gelu", "mse-mean", [5])
    H = dense_hessian(case)
    # a budget that fits 16 probes per pass: the group is limited by the 8 groups only
    op = ck.HessianOperator(case.model, case.loss_fn, case.data, memory_budget=2**30)
    assert op.max_collapsed_group == 16
    est = ck.trace(
        op, method="hutchinson", num_matvecs=32, generator=torch.Generator().manual_seed(5)
    )
    assert est.info["group_size"] == 4 and est.dof == 7
    # same probes one by one: the same estimate, a standard error from 32 samples
    per_probe = ck.trace(
        op, method="hutchinson", num_matvecs=32, generator=torch.Generator().manual_seed(5),
        group_size=1,
    )  # fmt: skip
    assert "group_size" not in per_probe.info and per_probe.dof == 31
    assert abs(float(est.value - per_probe.value)) < 1e-10 * abs(float(per_probe.value))
    assert math.isfinite(float(est.stderr)) and float(est.stderr) > 0
    with pytest.raises(ValueError, match="does not divide"):
        ck.trace(op, method="hutchinson", num_matvecs=30, group_size=4)
    tight = ck.HessianOperator(case.model, case.loss_fn, case.data, memory_budget=1)
    assert tight.max_collapsed_group == 1
    assert "group_size" not in ck.trace(tight, method="hutchinson", num_matvecs=32).info
    dense = ck.DenseOperator(H)  # not collapsing: one group per probe by default
    assert "group_size" not in ck.trace(dense, method="hutchinson", num_matvecs=32).info


def test_hutchinson_keeps_its_default_group_after_the_trial():
    """The same call twice gives the same error bar, whichever way the operator's timed
    trial went in between (it decides after the first call's group was chosen)."""
    case = make_case("mlp-tanh", "mse-sum", [3, 5, 2])
    op = ck.HessianOperator(case.model, case.loss_fn, case.data)

    def run(m=64):
        g = torch.Generator().manual_seed(0)
        return ck.trace(op, method="hutchinson", num_matvecs=m, generator=g)

    first = run()
    assert first.info["group_size"] > 1 and op.quadratic_form_choice is not None
    op.quadratic_form_choice = "hvp"  # as the trial decides where v^T (A v) is faster
    again = run()
    assert again.info["group_size"] == first.info["group_size"] and again.dof == first.dof
    assert torch.equal(again.stderr, first.stderr) and torch.equal(again.value, first.value)
    assert run(32).info.get("group_size", 1) == 1  # a new m: settled afresh, now by v^T (A v)


def test_a_lowered_memory_budget_settles_the_hutchinson_group_again():
    case = make_case("mlp-tanh", "mse-sum", [6])
    op = ck.HessianOperator(
        case.model, case.loss_fn, case.data, quadratic_form_method="taylor",
        memory_budget=float("inf"),
    )  # fmt: skip

    def group():
        g = torch.Generator().manual_seed(0)
        return ck.trace(op, "hutchinson", 128, g).info.get("group_size", 1)

    assert group() == 16
    op.memory_budget = op.taylor_memory["base"] + 2 * op.taylor_memory["per_probe"]
    assert group() == 2  # a pass holds two probes now


# ---------------------------------------------------------------------- Gauss-Newton
def test_ggn_forms_by_the_linearised_model(case):
    from tests.test_ggn import dense_ggn

    G = dense_ggn(case)
    V = _probes(G.shape[0], 4, seed=7)
    expected = _oracle_forms(G, V)
    op = ck.GGNOperator(case.model, case.loss_fn, case.data, quadratic_form_method="taylor")
    assert rel_err(op.quadratic_form(V), expected) < TOL
    assert rel_err(op.quadratic_form(V, group_size=2), expected.view(2, 2).sum(1)) < TOL
    auto = ck.GGNOperator(case.model, case.loss_fn, case.data)
    assert rel_err(auto.quadratic_form(V), expected) < TOL
    assert auto.quadratic_form_choice in ("taylor", "hvp")
    assert all(isinstance(t, float) for t in auto.quadratic_form_trial.values())


@pytest.mark.parametrize("name", ["causal-attention", "conv-zoo", "elementwise"])
def test_ggn_forms_drop_every_cross_term_of_the_model(name):
    """The linearised model through the rules the matrix does not reach (affine eval
    BatchNorm, softmax, attention, products of jets): the dense GGN oracle."""
    from tests.test_ggn import dense_ggn

    case = _extra_case(name)
    G = dense_ggn(case)
    V = _probes(G.shape[0], 4, seed=8)
    expected = _oracle_forms(G, V)
    op = ck.GGNOperator(case.model, case.loss_fn, case.data, quadratic_form_method="taylor")
    assert rel_err(op.quadratic_form(V), expected) < TOL
    assert rel_err(op.quadratic_form(V, group_size=4), expected.sum().reshape(1)) < TOL


def test_ggn_trace_by_hutchinson_collapses():
    case = make_case("mlp-relu", "ce-mean", [3, 5, 2])
    op = ck.GGNOperator(case.model, case.loss_fn, case.data, quadratic_form_method="taylor")
    assert op.collapses_quadratic_forms
    est = ck.trace(
        op, method="hutchinson", num_matvecs=16, generator=torch.Generator().manual_seed(0)
    )
    exact = op.trace().value
    assert est.info.get("group_size", 1) >= 1
    assert abs(float(est.value - exact)) < 5 * float(est.stderr) + 1e-12


class TiedLM(nn.Module):
    """Embedding and output layer sharing one weight (weight tying)."""

    def __init__(self, vocab: int = 5, d: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def test_tied_weights_carry_their_tangent_everywhere():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    X, y = torch.randint(0, 5, (4, 3), generator=g), torch.randint(0, 5, (4, 3), generator=g)

    def loss(out, target):
        return F.cross_entropy(out.flatten(0, 1), target.flatten())

    loss.reduction = "mean"
    case = Case("tied", TiedLM().to(DTYPE), loss, [(X, y)])
    assert len(case.params) == 3  # the tied weight once
    H = dense_hessian(case)
    V = _probes(H.shape[0], 3)
    op = _taylor_op(case)
    assert rel_err(op.quadratic_form(V), _oracle_forms(H, V)) < TOL
    assert case.model.head.weight is case.model.embed.weight  # restored, still tied


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_estimates_equal_the_dense_operator_s(method):
    """Same probes, same estimate: the Hessian's quadratic forms (Taylor mode here) and the
    dense matrix's."""
    case = make_case("layernorm-gelu", "ce-mean", [4, 3])
    H = dense_hessian(case)
    op = _taylor_op(case)
    kwargs = {"group_size": 1} if method == "hutchinson" else {}
    est = ck.trace(
        op, method=method, num_matvecs=12, generator=torch.Generator().manual_seed(3), **kwargs
    )
    ref = ck.trace(
        ck.DenseOperator(H),
        method=method,
        num_matvecs=12,
        generator=torch.Generator().manual_seed(3),
    )
    assert abs(float(est.value - ref.value)) < 1e-10 * max(1.0, abs(float(ref.value)))
    assert abs(float(est.stderr - ref.stderr)) < 1e-10 * max(1.0, float(ref.stderr))


class DetachedWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return x @ self.lin.weight.data.T + self.lin.bias


def test_a_tensor_attribute_without_a_rule_is_reported():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(6, 4, generator=g, dtype=DTYPE), torch.randn(6, 3, generator=g, dtype=DTYPE)
    model = DetachedWeight().to(DTYPE)
    explicit = ck.HessianOperator(model, nn.MSELoss(), (X, y), quadratic_form_method="taylor")
    V = _probes(explicit.shape[0], 2)
    with pytest.raises(TaylorUnsupportedError, match="attribute 'data'"):
        explicit.quadratic_form(V)
    auto = ck.HessianOperator(model, nn.MSELoss(), (X, y))
    expected = (V * (auto @ V)).sum(0)
    assert rel_err(auto.quadratic_form(V), expected) < TOL
    assert auto.quadratic_form_choice == "hvp"


@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 5)])
def test_linear_rule_matches_the_generic_bilinear_rule(shape):
    """``F.linear``'s batched-product rule against ``vmap`` of the bilinear map, with jets
    (second orders included) in every combination of input, weight and bias."""
    from curvkit.taylor import Jet, _add, _bilinear, _linear_jet

    g = torch.Generator().manual_seed(1)
    K, m = 4, 2

    def jet(*s):
        def r(*t):
            return torch.randn(*t, generator=g, dtype=DTYPE)

        return Jet(r(*s), r(K, *s), r(K // m, *s), K, m)

    for combo in range(1, 8):
        x = jet(*shape) if combo & 1 else torch.randn(*shape, generator=g, dtype=DTYPE)
        W = jet(6, 5) if combo & 2 else torch.randn(6, 5, generator=g, dtype=DTYPE)
        b = jet(6) if combo & 4 else torch.randn(6, generator=g, dtype=DTYPE)
        fast, generic = _linear_jet(x, W, b), _add(_bilinear(F.linear, x, W), b)
        for order in ("x0", "x1", "x2"):
            a, r = getattr(fast, order), getattr(generic, order)
            assert a.shape == r.shape
            assert torch.allclose(a, r, rtol=1e-12, atol=1e-12), (combo, order)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5), (4,)])
def test_cross_entropy_rule_matches_log_softmax_and_nll(reduction, shape):
    """The per-sample cross-entropy rule against the composition of the log-softmax rule
    and ``nll_loss`` (a linear map), with class weights and ignored targets."""
    from curvkit.taylor import Jet, _cross_entropy_jet, _linear, _log_softmax_jet

    g = torch.Generator().manual_seed(2)
    K, m = 4, 2

    def r(*t):
        return torch.randn(*t, generator=g, dtype=DTYPE)

    x = Jet(r(*shape), r(K, *shape), r(K // m, *shape), K, m)
    C = shape[1] if len(shape) > 1 else shape[0]
    tshape = (shape[0], *shape[2:]) if len(shape) > 1 else ()
    target = torch.randint(0, C, tshape, generator=g)
    if target.ndim:
        target.view(-1)[0] = -100  # ignored
    weight = torch.rand(C, generator=g, dtype=DTYPE) + 0.5
    for w in (None, weight):
        kw = {"weight": w, "ignore_index": -100, "reduction": reduction}
        fast = _cross_entropy_jet(x, target, w, -100, reduction)
        dim = 1 if len(shape) > 1 else 0
        generic = _linear(F.nll_loss, (_log_softmax_jet(x, dim), target), kw)
        for order in ("x0", "x1", "x2"):
            a, b = getattr(fast, order), getattr(generic, order)
            assert a.shape == b.shape, order
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), order


# ---------------------------------------------------------------------- reverse over forward
@pytest.mark.parametrize("name", ["causal-attention", "conv-zoo", "elementwise"])
def test_reverse_over_forward_products_match_the_oracle(name):
    """The first-order rules under autograd: ``g^T v`` is the gradient's directional
    derivative, and its backward (backend ``"reverse-over-forward"``) is ``H v`` -- also
    through the recorded ReLU/GELU/sigmoid tangents and the generic elementwise ones."""
    case = _extra_case(name)
    H = dense_hessian(case)
    V = _probes(H.shape[0], 3, seed=4)
    op = ck.HessianOperator(case.model, case.loss_fn, case.data, backend="reverse-over-forward")
    assert rel_err(op @ V, H @ V) < TOL
    assert op.backend == "reverse-over-forward" and op.backend_fallback_reason is None

    (X, y), params = case.batches[0], list(case.model.parameters())
    grads = torch.autograd.grad(case.loss_fn(case.model(X), y), params)
    probes = [
        v.reshape(3, *p.shape) for v, p in zip(V.T.split([p.numel() for p in params], 1), params)
    ]
    slopes = loss_directional_derivatives(case.model, case.loss_fn, X, y, 1.0, params, probes)
    expected = sum((g.flatten() @ v.reshape(3, -1).T) for g, v in zip(grads, probes))
    assert rel_err(slopes.detach(), expected) < TOL


def test_reverse_over_forward_holds_less_than_double_backward():
    """No gradient-sized tensors in its graph, and each parameter's product written into
    the result block as the backward makes it (an isolated product holds the block and one
    layer's gradient beyond the forward's activations); double backward holds the first
    backward's graph and a second full result as well."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )
    X, y = torch.randn(8, 512), torch.randint(0, 4, (8,))
    params = list(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    v = torch.randn(sum(p.numel() for p in params))

    def operator(backend):
        return ck.HessianOperator(model, loss_fn, (X, y), backend=backend, cache_graph=False)

    lean, double = operator("reverse-over-forward"), operator("double-backward")
    assert torch.allclose(lean @ v, double @ v, rtol=1e-4, atol=1e-6)
    gradient_peak = peak_allocated_bytes(lambda: torch.autograd.grad(loss_fn(model(X), y), params))
    rof = peak_allocated_bytes(lambda: lean @ v)
    db = peak_allocated_bytes(lambda: double @ v)
    assert rof < 0.95 * db and rof < 1.95 * gradient_peak
    # batch_hvp without a result block returns autograd's tensors as they are
    V = [torch.randn(1, *p.shape) for p in params]
    direct = peak_allocated_bytes(
        lambda: batch_hvp(model, loss_fn, X, y, 1.0, params, [], V, "reverse-over-forward", 1)
    )
    assert direct < 1.2 * gradient_peak


def test_reverse_over_forward_falls_back_without_a_rule():
    case = make_case("mlp-tanh", "mse-mean", [4])
    case.model[1] = nn.Hardswish()  # no Taylor-mode rule
    H = dense_hessian(case)
    v = _probes(H.shape[0], 1)[:, 0]
    op = ck.HessianOperator(case.model, case.loss_fn, case.data, backend="reverse-over-forward")
    with pytest.warns(RuntimeWarning, match="reverse-over-forward failed"):
        assert rel_err(op @ v, H @ v) < TOL
    assert op.backend == "double-backward"
    assert "TaylorUnsupportedError" in op.backend_fallback_reason
    auto = ck.HessianOperator(case.model, case.loss_fn, case.data, cache_graph=False)
    assert rel_err(auto @ v, H @ v) < TOL
    assert "TaylorUnsupportedError" in auto.backend_trials["single"]["reverse-over-forward"]


# ------------------------------------------------- what the rules must not get silently wrong
class _Reversal(torch.autograd.Function):
    """Gradient reversal: its backward is not the derivative of its forward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return -g


class _Unusual(nn.Module):
    """Small models whose forward does what the Taylor rules could follow wrongly."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        if kind.endswith("padding"):
            self.emb = nn.Embedding(6, 2, padding_idx=0 if kind == "padding" else -1)
            self.b = nn.Linear(4, 3)
        elif kind == "unbatched conv":
            self.conv = nn.Conv2d(1, 4, 3)  # a 6x6 input gives 4 x 4x4: C_out = H_out
            self.head = nn.Linear(64, 3)
        else:
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(4, 4)

    def forward(self, x):
        kind = self.kind
        if kind.endswith("padding"):
            return self.b(torch.tanh(self.emb(x).flatten(1)))
        if kind == "unbatched conv":
            return self.head(torch.stack([torch.tanh(self.conv(xi)).flatten() for xi in x]))
        h = self.a(x)
        if kind == "in-place result unused":
            h.mul_(2.0)
        elif kind == "+= seen by an alias":
            keep = h
            h += self.c(x)
            h = keep
        elif kind == "in-place through a view":
            h.view(-1).mul_(2.0)
        elif kind == "no_grad block":
            with torch.no_grad():
                scale = (h * h).mean()
            h = h / (scale + 1.0)
        elif kind == "autograd.Function":
            h = _Reversal.apply(torch.tanh(h))
        return self.b(torch.tanh(h))


UNUSUAL = [
    "in-place result unused",
    "+= seen by an alias",
    "in-place through a view",
    "no_grad block",
    "autograd.Function",
    "padding",
    "negative padding",
    "unbatched conv",
]


def _unusual_case(kind: str) -> Case:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind.endswith("padding"):
        X = torch.randint(0, 6, (6, 2), generator=g)
        X[:, 1] = 0 if kind == "padding" else 5  # the padding row in every sample
    elif kind == "unbatched conv":
        X = torch.randn(6, 1, 6, 6, generator=g, dtype=DTYPE)
    else:
        X = torch.randn(6, 4, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (6,), generator=g)
    return Case(kind, _Unusual(kind).to(DTYPE), nn.CrossEntropyLoss(), [(X, y)])


def _args(case: Case) -> tuple:
    return case.model, case.loss_fn, case.data


@pytest.mark.parametrize("kind", UNUSUAL)
def test_taylor_paths_match_the_oracle_or_step_aside(kind):
    """Every route through the Taylor rules gives the oracle's numbers, by the rules or by
    the fallback they hand over to (an explicit Taylor-mode form may raise instead)."""
    import warnings

    from tests.test_ggn import dense_ggn

    case = _unusual_case(kind)
    H, G = dense_hessian(case), dense_ggn(case)
    V = _probes(H.shape[0], 4, seed=2)
    build = {"check_deterministic": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the documented fallbacks
        rof = ck.HessianOperator(*_args(case), backend="reverse-over-forward", **build)
        assert rel_err(rof @ V, H @ V) < TOL
        auto_forms = ck.HessianOperator(*_args(case), **build).quadratic_form(V, group_size=2)
        assert rel_err(auto_forms, _oracle_forms(H, V).reshape(2, 2).sum(1)) < TOL
        ggn = ck.GGNOperator(*_args(case), backend="taylor-jvp", **build)
        assert rel_err(ggn @ V, G @ V) < TOL
        unkept = ck.GGNOperator(*_args(case), cache_graph=False, **build)  # "auto", untimed
        assert rel_err(unkept @ V, G @ V) < TOL
        for op, oracle in ((_taylor_op(case, **build), H), (ck.GGNOperator(
            *_args(case), quadratic_form_method="taylor", **build), G)):  # fmt: skip
            try:
                forms = op.quadratic_form(V)
            except TaylorUnsupportedError:
                continue
            assert rel_err(forms, _oracle_forms(oracle, V)) < TOL
