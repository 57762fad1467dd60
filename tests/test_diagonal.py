"""``curvkit.diagonal`` and ``curvkit.row_sum``: methods, budgets, exact, vs curvlinops."""

import warnings

import pytest
import torch

import curvkit as ck
from curvkit.estimators import DIAGONAL_METHODS
from curvkit.linop import DenseOperator, LinearOperator
from tests.cases import dense_hessian, make_case
from tests.spectra import family_matrix


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


class Counting(LinearOperator):
    def __init__(self, A, symmetric=True):
        super().__init__(tuple(A.shape), A.dtype, A.device, symmetric=symmetric)
        self.A, self.columns = A, 0

    def _matmat(self, V):
        self.columns += V.shape[1]
        return self.A @ V

    def _rmatmat(self, V):
        self.columns += V.shape[1]
        return self.A.T @ V


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
@pytest.mark.parametrize("budget", [12, 31])
def test_shapes_budget_rounding(method, budget):
    A, _ = family_matrix("poly1", 50)
    op = Counting(A)
    est = ck.diagonal(op, method, budget, _gen())
    assert est.value.shape == (50,) and est.stderr.shape == (50,)
    assert op.columns == est.num_matvecs
    assert est.num_matvecs + est.info.get("unused_matvecs", 0) == budget
    assert est.method == method and (est.stderr > 0).all()


def test_xdiag_nonsymmetric_uses_adjoint():
    g = _gen(3)
    A = torch.randn(40, 40, generator=g, dtype=torch.float64)
    G = torch.randn(40, 3, generator=g, dtype=torch.float64)
    B = G @ torch.randn(3, 40, generator=g, dtype=torch.float64)  # rank 3, not symmetric
    op = Counting(B, symmetric=False)
    est = ck.diagonal(op, "xdiag", 20, _gen())
    torch.testing.assert_close(est.value, B.diagonal(), rtol=0, atol=1e-9)
    est = ck.diagonal(DenseOperator(A, symmetric=False), "xdiag", 60, _gen(), replicates=200)
    z = (est.value.mean(0) - A.diagonal()) / (est.value.std(0) / 200**0.5)
    assert float((z**2).mean()) < 1.6


def test_unknown_method_and_auto():
    A, _ = family_matrix("flat", 30)
    with pytest.raises(ValueError, match="unknown diagonal method 'xdaig'.*'xdiag'"):
        ck.diagonal(A, "xdaig")
    assert ck.diagonal(A).method == "exact"
    assert ck.diagonal(A, "auto", 10, _gen()).method == "xdiag"
    assert ck.diagonal(A, "auto", 5, _gen()).method == "hutchinson"
    assert "xdiag" in DIAGONAL_METHODS


def test_reproducible():
    A, _ = family_matrix("exp", 40)
    for method in ("hutchinson", "xdiag"):
        a = ck.diagonal(A, method, 16, _gen(2))
        b = ck.diagonal(A, method, 16, _gen(2))
        assert torch.equal(a.value, b.value)


def test_rademacher_hutchinson_exact_on_diagonal_matrix():
    d = torch.linspace(-1, 3, 25, dtype=torch.float64)
    est = ck.diagonal(torch.diag(d), "hutchinson", 3, _gen())
    torch.testing.assert_close(est.value, d)
    assert float(est.stderr.max()) == 0


CASES = [
    ("mlp-tanh", "bce", [4, 3]),
    ("cnn", "mse-sum", [5]),
    ("layernorm-gelu", "mse-mean", [5]),
    ("transformer", "ce-seq-sum", [2, 3]),
]


@pytest.mark.parametrize("spec", CASES, ids=lambda s: f"{s[0]}/{s[1]}")
def test_exact_and_row_sum_match_dense_oracle(spec):
    case = make_case(*spec)
    H = dense_hessian(case)
    op = ck.HessianOperator(case.model, case.loss_fn, case.data)
    est = ck.diagonal(op, "exact", block_size=64)
    assert est.num_matvecs == H.shape[0]
    scale = float(H.abs().max())
    assert float((est.value - H.diagonal()).abs().max()) <= 1e-10 * scale
    assert float((ck.row_sum(op) - H.sum(1)).abs().max()) <= 1e-10 * float(H.abs().sum(1).max())
    torch.testing.assert_close(ck.row_sum(H), H.sum(1))


def test_row_sum_inputs():
    M = torch.arange(6.0).reshape(2, 3)
    torch.testing.assert_close(ck.row_sum(M), torch.tensor([3.0, 12.0]))
    with pytest.raises(ValueError):
        ck.row_sum(torch.ones(3))
    with pytest.raises(TypeError):
        ck.row_sum([1, 2])


@pytest.mark.parametrize("spec", [("mlp-relu", "ce-sum", [6]), ("cnn", "ce-mean", [4, 2])])
def test_error_no_worse_than_curvlinops(spec):
    curvlinops = pytest.importorskip("curvlinops")
    H = dense_hessian(make_case(*spec))
    truth = H.diagonal()
    reps, m = 600, 24
    for method, peer in (("hutchinson", curvlinops.hutchinson_diag), ("xdiag", curvlinops.xdiag)):
        ours = ck.diagonal(H, method, m, _gen(1), replicates=reps).value
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            theirs = torch.stack([peer(H, m) for _ in range(reps)])
        mse_ours = float(((ours - truth) ** 2).sum(-1).mean())
        mse_theirs = float(((theirs - truth) ** 2).sum(-1).mean())
        assert mse_ours <= 1.3 * mse_theirs, f"{method}: {mse_ours:.3g} vs {mse_theirs:.3g}"
