"""``curvkit.spectral_density`` (stochastic Lanczos quadrature)."""

import pytest
import torch

import curvkit as ck
from curvkit.linop import LinearOperator
from tests.cases import dense_hessian, make_case
from tests.spectra import family_matrix


class Counting(LinearOperator):
    def __init__(self, A):
        super().__init__(tuple(A.shape), A.dtype, A.device, symmetric=True)
        self.A, self.calls, self.columns = A, 0, 0

    def _matmat(self, V):
        self.calls += 1
        self.columns += V.shape[1]
        return self.A @ V


def test_moments_match_traces_of_powers_on_network_hessian():
    H = dense_hessian(make_case("cnn", "ce-mean", [4, 2]))
    D = H.shape[0]
    res = ck.spectral_density(
        H, num_probes=400, num_steps=10, generator=torch.Generator().manual_seed(0)
    )
    P = torch.eye(D, dtype=H.dtype)
    for j in (1, 2, 3):
        P = P @ H
        truth = torch.trace(P) / D
        est = res.moment(j)
        assert abs(float(est.value - truth)) < 4 * float(est.stderr), f"moment {j}"
    # the smoothed density's mean is the quadrature mean, its variance adds sigma^2
    torch.testing.assert_close(res.smoothed_moment(1), res.moment(1).value, rtol=1e-6, atol=1e-9)
    var_q = res.moment(2).value - res.moment(1).value ** 2
    var_s = res.smoothed_moment(2) - res.smoothed_moment(1) ** 2
    torch.testing.assert_close(var_s, var_q + res.sigma**2, rtol=1e-4, atol=1e-9)


def test_density_integrates_to_one_and_batches_probes():
    A, lam = family_matrix("indefinite", 90)
    op = Counting(A)
    res = ck.spectral_density(
        op, num_probes=8, num_steps=30, generator=torch.Generator().manual_seed(1)
    )
    grid, density = res[0], res[1]
    assert grid.shape == density.shape == (1000,)
    torch.testing.assert_close(torch.trapezoid(density, grid), torch.tensor(1.0, dtype=A.dtype))
    assert (density >= 0).all()
    assert op.calls == 30 and op.columns == 8 * 30 == res.num_matvecs  # one (D, P) block per step
    assert res.nodes.shape == res.weights.shape == (8, 30)
    torch.testing.assert_close(res.weights.sum(-1), torch.ones(8, dtype=A.dtype))
    # nodes lie inside the spectrum, and the extreme ones are found after 30 steps
    assert float(res.nodes.min()) >= float(lam.min()) - 1e-10
    assert abs(float(res.nodes.max()) - float(lam.max())) < 1e-6


def test_full_krylov_space_recovers_exact_spectrum():
    lam = torch.tensor([-1.0, 0.0, 0.5, 2.0, 2.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    A = (U * lam) @ U.T
    op = Counting(A)
    res = ck.spectral_density(
        op, num_probes=3, num_steps=20, generator=torch.Generator().manual_seed(0)
    )
    # breakdown (repeated eigenvalue): padding carries no weight; every node is an eigenvalue
    mask = res.weights > 1e-12
    dist = (res.nodes[mask][:, None] - lam[None, :]).abs().min(-1).values
    assert float(dist.max()) < 1e-8
    # the count says what was multiplied
    assert op.columns == res.num_matvecs <= 3 * 5  # at most D = 5 steps a run


def test_a_stopped_run_is_neither_multiplied_nor_counted():
    """Runs stop at different steps; only running columns go through the operator."""
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0] + [0.0] * 37, dtype=torch.float64))
    V0 = torch.zeros(40, 2, dtype=torch.float64)
    V0[:2, 0] = 1.0  # spans two eigenvectors: stops after 2 steps
    V0[:, 1] = 1.0  # four distinct eigenvalues: 4 steps
    op = Counting(A)
    alpha, beta, steps = ck.estimators.eigen.lanczos_tridiag(op, V0, 30)
    assert steps.tolist() == [2, 4] and op.columns == 6
    assert alpha[0, 2:].abs().max() == 0 and beta[0, 1:].abs().max() == 0
    T = torch.diag(alpha[1, :4]) + torch.diag(beta[1, :3], 1) + torch.diag(beta[1, :3], -1)
    torch.testing.assert_close(
        torch.linalg.eigvalsh(T), torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    )


def test_custom_grid_sigma_and_errors():
    A, _ = family_matrix("poly1", 40)
    grid = torch.linspace(-0.5, 1.5, 301, dtype=torch.float64)
    res = ck.spectral_density(A, num_probes=4, num_steps=10, grid=grid, sigma=0.05)
    assert torch.equal(res.grid, grid) and res.sigma == 0.05
    with pytest.raises(ValueError):
        ck.spectral_density(A, num_probes=0)
    with pytest.raises(ValueError, match="sigma"):
        ck.spectral_density(A, sigma=-1.0)


def test_a_custom_grid_is_not_renormalised_and_bad_grids_are_refused():
    A, _ = family_matrix("poly1", 60)
    g = torch.Generator().manual_seed(0)
    whole = ck.spectral_density(A, 8, 30, sigma=0.02, generator=g)
    part = torch.linspace(0.0, 0.2, 101, dtype=torch.float64)
    cut = ck.spectral_density(A, 8, 30, grid=part, sigma=0.02,
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
    # the same density where the grids overlap (it had been scaled up to mass 1 on [0, 0.2])
    at = torch.tensor([0.1], dtype=torch.float64)
    expected = torch.from_numpy(
        __import__("numpy").interp(at.numpy(), whole.grid.numpy(), whole.density.numpy())
    )
    torch.testing.assert_close(cut.density[50:51], expected, rtol=5e-3, atol=0)
    assert float(torch.trapezoid(cut.density, cut.grid)) < 0.9
    for bad in (1, 0, True, 100.0, part.flip(0), part[torch.randperm(101, generator=g)],
                part.reshape(1, -1)):  # fmt: skip
        with pytest.raises(ValueError, match="grid"):
            ck.spectral_density(A, 4, 10, grid=bad, sigma=0.02)
    for sigma in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="sigma"):
            ck.spectral_density(A, 4, 10, sigma=sigma)


def test_moments_beyond_the_quadratures_degree_say_they_are_biased():
    A, _ = family_matrix("poly1", 60)
    d = ck.spectral_density(A, 4, 2, generator=torch.Generator().manual_seed(0))
    assert d.exact_below == 4
    assert "biased" not in d.moment(3).info
    with pytest.warns(RuntimeWarning, match="biased"):
        assert d.moment(4).info["biased"]
    exhausted = ck.spectral_density(A[:3, :3], 2, 10, generator=torch.Generator())
    assert exhausted.exact_below is None  # three steps span a 3-dimensional space
