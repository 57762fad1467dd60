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


def _with_repeated(mult: int, D: int = 120, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric matrix whose top eigenvalue 2.0 has multiplicity ``mult`` (the rest in
    [-1, 1]), and its eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.cat([torch.full((mult,), 2.0), torch.linspace(-1, 1, D - mult)]).double()
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    return (Q * lam) @ Q.T, lam


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_every_copy_of_a_repeated_eigenvalue_is_found(which):
    """A Krylov space from one vector sees one direction of an eigenspace; the search of
    the converged pairs' complement finds the other copies (4 of 6 had come back)."""
    A, lam = _with_repeated(6)
    if which == "SA":
        A, lam = -A, -lam
    k = 8
    order = {
        "LA": lam.sort(descending=True),
        "SA": lam.sort(),
        "LM": lam.abs().sort(descending=True),
    }
    expected = (lam[order[which].indices[:k]]).sort().values
    for seed in range(3):
        vals, vecs = ck.eigenvalues(
            A, k, which=which, generator=torch.Generator().manual_seed(seed),
            return_eigenvectors=True,
        )  # fmt: skip
        torch.testing.assert_close(vals, expected, atol=1e-9, rtol=0)
        torch.testing.assert_close(vecs.T @ vecs, torch.eye(k, dtype=A.dtype), atol=1e-9, rtol=0)
        torch.testing.assert_close(A @ vecs, vecs * vals, atol=1e-8, rtol=0)
    fast = ck.eigenvalues(A, k, which=which, generator=torch.Generator().manual_seed(0),
                          verify=False)  # fmt: skip
    assert fast.shape == (k,)  # without the search: what one Krylov space gives


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_the_scale_of_the_operator_does_not_matter(scale):
    """The invariant-subspace tests are relative: a tiny operator is no invariant subspace
    at every step (a 1e-30 scale had returned 0.42 for 1.0)."""
    g = torch.Generator().manual_seed(1)
    lam = torch.linspace(-1, 1, 120, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(120, 120, generator=g, dtype=torch.float64))
    A = (Q * (scale * lam)) @ Q.T
    top = ck.eigenvalues(A, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(top / scale, lam[-2:], atol=1e-9, rtol=0)
    d = ck.spectral_density(A, num_probes=4, num_steps=30, generator=torch.Generator())
    assert d.num_matvecs == 4 * 30  # no run mistaken for exhausted


def test_the_complement_search_of_a_low_rank_operator_stops_at_once():
    """Beyond a GGN's rank the complement is (nearly) zero: its search is judged on the
    operator's scale, not on its own rounding (it had run 200 restarts and warned)."""
    import warnings

    g = torch.Generator().manual_seed(0)
    J = torch.randn(4, 83, generator=g, dtype=torch.float64)
    A = J.T @ J  # rank 4
    counted = []

    class Counting(ck.LinearOperator):
        def __init__(self):
            super().__init__((83, 83), A.dtype, A.device, symmetric=True, psd=True)

        def _matmat(self, V):
            counted.append(V.shape[1])
            return A @ V

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        vals = ck.eigenvalues(Counting(), 6, generator=torch.Generator().manual_seed(1))
    expected = torch.linalg.eigvalsh(A)[-6:]
    torch.testing.assert_close(vals, expected, atol=1e-9, rtol=0)
    assert sum(counted) < 200


def test_the_complement_search_stops_once_nothing_there_can_pass():
    """Where nothing was missed, the search costs a few products, not a converged solve:
    it stops once its Ritz pair, within its residual, cannot beat the k-th eigenvalue."""
    g = torch.Generator().manual_seed(3)
    lam = torch.cat([torch.tensor([5.0, 4.0, 3.0]), torch.linspace(-1, 1, 197)]).double()
    Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    A = (Q * lam) @ Q.T
    counts = {}
    for verify in (False, True):
        op = _Counting(A)
        vals = ck.eigenvalues(op, 3, generator=torch.Generator().manual_seed(0), verify=verify)
        torch.testing.assert_close(vals, lam[:3].flip(0), atol=1e-9, rtol=0)
        counts[verify] = op.columns
    assert counts[True] - counts[False] <= 12, counts


class _Counting(ck.LinearOperator):
    def __init__(self, A):
        super().__init__(tuple(A.shape), A.dtype, A.device, symmetric=True)
        self.A, self.columns = A, 0

    def _matmat(self, V):
        self.columns += V.shape[1]
        return self.A @ V
