"""The seed-compatible functional API: hvp, hessian_row_sum, hessian_block_row_sums."""

import pytest
import torch
from torch import nn

import curvkit as ck
from tests.cases import make_case, rel_err


def _toy():
    x1 = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    x2 = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    f = x1**2 + 2 * x1**2 * x2 - 3 * x2**3
    return f, [x1, x2]


def test_acceptance_polynomial_row_sum():
    """f = x1^2 + 2 x1^2 x2 - 3 x2^3 at (1, 2): H = [[10, 4], [4, -36]], H @ 1 = (14, -32)."""
    f, params = _toy()
    rs = ck.hessian_row_sum(f, params)
    assert rs.shape == (2,)
    torch.testing.assert_close(rs, torch.tensor([14.0, -32.0], dtype=torch.float64))


def test_acceptance_linear_relu_mse_row_sum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4, bias=False), nn.ReLU())
    X, y = torch.randn(3, 5), torch.randn(3, 4)
    params = list(model.parameters())
    f = nn.MSELoss()(model(X), y)
    rs = ck.hessian_row_sum(f, params)
    assert rs.shape == (20,)

    def loss_of(w):
        return nn.MSELoss()(torch.relu(X @ w.reshape(4, 5).T), y)

    H = torch.autograd.functional.hessian(loss_of, params[0].detach().reshape(-1))
    torch.testing.assert_close(rs, H.sum(1), rtol=1e-5, atol=1e-6)


def test_hvp_is_reusable_and_shaped_like_params():
    f, params = _toy()
    e1 = ck.hvp(
        f, params, [torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)]
    )
    e2 = ck.hvp(
        f, params, [torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)]
    )
    assert isinstance(e1, tuple) and len(e1) == 2
    assert [float(t) for t in e1] == [10.0, 4.0]
    assert [float(t) for t in e2] == [4.0, -36.0]
    f.backward()  # the graph is still usable
    assert params[0].grad is not None


def test_hvp_matches_backpack_and_dense():
    from backpack.hessianfree.hvp import hessian_vector_product

    case = make_case("mlp-tanh", "ce-mean", [6])
    X, y = case.batches[0]
    params = case.params
    f = case.loss_fn(case.model(X), y)
    g = torch.Generator().manual_seed(3)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    ours = ck.hvp(f, params, v)
    theirs = hessian_vector_product(f, params, v)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        assert rel_err(a, b) < 1e-12
    H = ck.HessianOperator(case.model, case.loss_fn, case.data)
    flat = torch.cat([o.reshape(-1) for o in ours])
    assert rel_err(flat, H @ torch.cat([t.reshape(-1) for t in v])) < 1e-12


def test_block_row_sums_functional():
    f, params = _toy()
    blocks = ck.hessian_block_row_sums(f, params)
    assert [float(b) for b in blocks] == [10.0, -36.0]


def test_unused_parameter_gives_zero_rows():
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor(3.0, requires_grad=True)
    f = (a**3).sum()
    rs = ck.hessian_row_sum(f, [a, b])
    torch.testing.assert_close(rs, torch.tensor([6.0, 12.0, 0.0]))


def test_errors():
    f, params = _toy()
    no_grad = torch.tensor(1.0)
    with pytest.raises(ValueError, match="does not require grad"):
        ck.hvp(f, [params[0], no_grad], [torch.ones(()), torch.ones(())])
    with pytest.raises(ValueError, match="shaped like params"):
        ck.hvp(f, params, [torch.ones(2), torch.ones(())])
    with pytest.raises(ValueError, match="shaped like params"):
        ck.hvp(f, params, [torch.ones(())])
    x = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="must be a scalar"):
        ck.hessian_row_sum(x * 2, [x])
    with pytest.raises(FloatingPointError, match="not finite"):
        ck.hessian_row_sum((x * float("nan")).sum(), [x])
    with pytest.raises(FloatingPointError, match="not finite"):
        ck.hvp((x * float("inf")).sum(), [x], [torch.ones(3)])
    with pytest.raises(ValueError, match="no autograd graph"):
        ck.hessian_row_sum(torch.tensor(1.0), [x])
