"""``curvkit.eigenvalues`` against ``torch.linalg.eigvalsh`` on dense network Hessians."""

import pytest
import torch

import curvkit as ck
from curvkit.linop import DenseOperator
from tests.cases import CASE_SPECS, dense_hessian, make_case
from tests.spectra import family_matrix

SPECS = [CASE_SPECS[i] for i in (0, 3, 5, 8, 11)]  # tanh, relu, cnn, bn-train, LayerNorm


def _reference(ev, k, which):
    if which == "LA":
        return ev[-k:]
    if which == "SA":
        return ev[:k]
    return ev[ev.abs().argsort()[-k:]].sort().values


@pytest.fixture(scope="module")
def hessians():
    return {
        spec: dense_hessian(make_case(*spec))
        for spec in map(tuple, [(m, l, tuple(s)) for m, l, s in SPECS])
    }


@pytest.mark.parametrize("method", ["lanczos", "scipy"])
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s[0]}/{s[1]}")
def test_matches_eigvalsh_both_ends(spec, which, method, hessians):
    H = hessians[(spec[0], spec[1], tuple(spec[2]))]
    ev = torch.linalg.eigvalsh(H)
    k = 4
    vals, vecs = ck.eigenvalues(
        H, k, which, torch.Generator().manual_seed(0), method=method, return_eigenvectors=True
    )
    ref = _reference(ev, k, which)
    assert vals.shape == (k,) and vecs.shape == (H.shape[0], k)
    assert torch.all(vals[1:] >= vals[:-1]), "not ascending"
    rel = (vals - ref).abs() / ref.abs().clamp_min(1e-12 * ev.abs().max())
    assert float(rel.max()) < 1e-8, f"relative errors {rel}"
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(k, dtype=H.dtype), atol=1e-8, rtol=0)
    resid = (H @ vecs - vecs * vals).norm(dim=0)
    assert float(resid.max()) < 1e-6 * float(ev.abs().max())


def test_hessian_operator_and_restarts():
    spec = CASE_SPECS[4]  # relu MLP, D = 83: with ncv = 12 < D, restarts happen
    case = make_case(*spec)
    op = ck.HessianOperator(case.model, case.loss_fn, case.data)
    H = dense_hessian(case)
    ev = torch.linalg.eigvalsh(H)
    vals = ck.eigenvalues(op, 2, "SA", torch.Generator().manual_seed(1), ncv=12)
    torch.testing.assert_close(vals, ev[:2], rtol=1e-8, atol=1e-12)


def test_repeated_eigenvalues_and_k_equals_d():
    lam = torch.tensor([5.0, 5.0, 5.0, 1.0, 0.5, -2.0, -2.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))
    A = (U * lam) @ U.T
    A = (A + A.T) / 2
    top = ck.eigenvalues(A, 3, "LA", torch.Generator().manual_seed(0))
    torch.testing.assert_close(top, torch.full((3,), 5.0, dtype=torch.float64))
    every = ck.eigenvalues(A, 7, "SA", torch.Generator().manual_seed(0))
    torch.testing.assert_close(every, lam.sort().values)


def test_float32_and_errors():
    A, lam = family_matrix("indefinite", 60)
    vals = ck.eigenvalues(A.float(), 2, "LM", torch.Generator().manual_seed(0))
    assert vals.dtype == torch.float32
    ref = lam[lam.abs().argsort()[-2:]].sort().values.float()
    torch.testing.assert_close(vals, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="symmetric"):
        ck.eigenvalues(DenseOperator(torch.randn(5, 5), symmetric=False), 1)
    with pytest.raises(ValueError, match="which"):
        ck.eigenvalues(A, 1, "BE")
    with pytest.raises(ValueError, match="k must be"):
        ck.eigenvalues(A, 0)
    with pytest.raises(ValueError, match="k < D"):
        ck.eigenvalues(A, 60, method="scipy")
