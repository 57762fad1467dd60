"""``curvkit.frobenius_norm``."""

import pytest
import torch

import curvkit as ck
from curvkit.linop import DenseOperator
from tests.cases import dense_hessian, make_case
from tests.spectra import family_matrix


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "spec", [("mlp-relu", "ce-mean", [3, 5, 2]), ("mlp-tanh", "mse-mean", [7])]
)
def test_exact_matches_oracle(spec):
    case = make_case(*spec)
    H = dense_hessian(case)
    op = ck.HessianOperator(case.model, case.loss_fn, case.data)
    est = ck.frobenius_norm(op, "exact", block_size=16)
    assert est.method == "exact" and est.num_matvecs == H.shape[0]
    assert abs(float(est.value - H.norm())) <= 1e-10 * float(H.norm())


def test_hutchinson_estimate_and_fields():
    A, lam = family_matrix("poly1", 80)
    est = ck.frobenius_norm(A, "hutchinson", 200, _gen())
    assert est.num_matvecs == 200 and est.dof == 199
    assert abs(float(est.value) - float(lam.norm())) < 4 * float(est.stderr)
    assert est.info["squared"].shape == ()
    torch.testing.assert_close(est.stderr, est.info["squared_stderr"] / (2 * est.value))


def test_rectangular_and_auto():
    g = _gen(1)
    M = torch.randn(7, 30, generator=g, dtype=torch.float64)
    assert ck.frobenius_norm(M, "auto", 100).method == "exact"
    torch.testing.assert_close(ck.frobenius_norm(M).value, M.norm())
    est = ck.frobenius_norm(DenseOperator(M), "hutchinson", 500, _gen(2))
    assert abs(float(est.value - M.norm())) < 4 * float(est.stderr)
    with pytest.raises(ValueError, match="unknown frobenius_norm method"):
        ck.frobenius_norm(M, "xtrace")
