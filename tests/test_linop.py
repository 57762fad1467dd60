"""LinearOperator algebra, conversions and SciPy interop against dense matrices."""

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch

import curvkit as ck
from curvkit.linop import DenseOperator, IdentityOperator

D = 12


@pytest.fixture
def mats():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(D, D, generator=g, dtype=torch.float64)
    B = torch.randn(D, D, generator=g, dtype=torch.float64)
    S = A + A.T
    return A, B, S


class MatmatOnly(ck.LinearOperator):
    """A subclass implementing only the batched product (and its adjoint)."""

    def __init__(self, M):
        super().__init__(tuple(M.shape), M.dtype, M.device)
        self.M = M

    def _matmat(self, V):
        return self.M @ V

    def _rmatmat(self, V):
        return self.M.T @ V


def _cases(A, B, S):
    opA, opB, opS = MatmatOnly(A), MatmatOnly(B), DenseOperator(S)
    eye = torch.eye(D, dtype=torch.float64)
    return [
        (opA, A),
        (opA + opB, A + B),
        (opA - opB, A - B),
        (2.5 * opA, 2.5 * A),
        (opA * -3, -3 * A),
        (opA / 4, A / 4),
        (-opA, -A),
        (opA @ opB, A @ B),
        (opA.T, A.T),
        ((opA @ opB).T, B.T @ A.T),
        (opS.shift(0.7), S + 0.7 * eye),
        (opS - 0.3 * IdentityOperator(D, torch.float64), S - 0.3 * eye),
        (opA + opS @ opB - 2 * opA.T, A + S @ B - 2 * A.T),
    ]


def test_algebra_matches_dense(mats):
    g = torch.Generator().manual_seed(1)
    v = torch.randn(D, generator=g, dtype=torch.float64)
    V = torch.randn(D, 5, generator=g, dtype=torch.float64)
    for op, M in _cases(*mats):
        assert op.shape == tuple(M.shape)
        torch.testing.assert_close(op @ v, M @ v, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(op @ V, M @ V, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(op.to_dense(block_size=5), M, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(V.T @ op, V.T @ M, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(op.row_sum(), M.sum(1), rtol=1e-12, atol=1e-12)


def test_flags_propagate(mats):
    A, _, S = mats
    opS = DenseOperator(S)
    assert opS.is_symmetric and not opS.is_psd
    assert not DenseOperator(A).is_symmetric
    psd = DenseOperator(A @ A.T, psd=True)
    assert (psd + 2 * psd).is_psd
    assert not (psd - psd).is_psd
    assert (psd - opS).is_symmetric
    assert psd.T is psd


def test_parameter_list_helpers():
    shapes = [torch.Size([2, 3]), torch.Size([3])]
    M = torch.randn(9, 9, dtype=torch.float64)
    op = MatmatOnly(M)
    op.param_shapes = shapes
    vs = [torch.randn(2, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    out = op @ vs
    flat = M @ torch.cat([v.reshape(-1) for v in vs])
    assert [o.shape for o in out] == shapes
    torch.testing.assert_close(ck.LinearOperator.flatten(out), flat)
    with pytest.raises(ValueError, match="shape mismatch"):
        op @ [torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]


def test_input_errors(mats):
    op = DenseOperator(mats[0])
    with pytest.raises(ValueError, match="shape mismatch"):
        op @ torch.zeros(D + 1, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype mismatch"):
        op @ torch.zeros(D, dtype=torch.float32)
    with pytest.raises(ValueError, match="expected a vector"):
        op @ torch.zeros(D, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="cannot add"):
        op + DenseOperator(torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="cannot compose"):
        op @ DenseOperator(torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        ck.as_operator(torch.zeros(3, 4))
    with pytest.raises(TypeError, match="LinearOperator or a dense"):
        ck.as_operator(np.zeros((3, 3)))


def test_to_scipy_products_and_solvers(mats):
    A, _, S = mats
    for op, M in [(MatmatOnly(A), A), (DenseOperator(S), S)]:
        sp = op.to_scipy()
        Mn = M.numpy()
        x = np.random.default_rng(0).standard_normal(D)
        X = np.random.default_rng(1).standard_normal((D, 3))
        assert sp.dtype == np.float64 and sp.shape == (D, D)
        np.testing.assert_allclose(sp @ x, Mn @ x, rtol=1e-12)
        np.testing.assert_allclose(sp.matvec(x.reshape(D, 1)).ravel(), Mn @ x, rtol=1e-12)
        np.testing.assert_allclose(sp @ X, Mn @ X, rtol=1e-12)
        np.testing.assert_allclose(sp.rmatvec(x), Mn.T @ x, rtol=1e-12)
        np.testing.assert_allclose(sp.H @ X, Mn.T @ X, rtol=1e-12)
    # float32 operators take and return float64 numpy
    sp32 = DenseOperator(S.float()).to_scipy()
    assert (sp32 @ np.ones(D)).dtype == np.float64
    # eigsh, cg, minres and onenormest unchanged on a symmetric operator
    sp = DenseOperator(S).to_scipy()
    evals = np.linalg.eigvalsh(S.numpy())
    top = sla.eigsh(sp, k=1, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(top, evals[-1:], rtol=1e-10)
    shifted = DenseOperator(S).shift(abs(evals[0]) + 1.0).to_scipy()
    b = np.arange(D, dtype=np.float64)
    x, info = sla.cg(shifted, b, rtol=1e-12, atol=0)
    assert info == 0
    np.testing.assert_allclose(
        x, np.linalg.solve(S.numpy() + (abs(evals[0]) + 1) * np.eye(D), b), rtol=1e-8
    )
    x, info = sla.minres(sp, b, rtol=1e-12)
    np.testing.assert_allclose(S.numpy() @ x, b, rtol=1e-6, atol=1e-6)
    est = sla.onenormest(sp)
    true = np.abs(S.numpy()).sum(0).max()
    assert 0.3 * true <= est <= true * (1 + 1e-12)
