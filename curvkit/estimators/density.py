"""Spectral density by stochastic Lanczos quadrature: ``curvkit.spectral_density(A, ...)``.

The spectral density ``phi(t) = (1/D) sum_i delta(t - lambda_i)`` is estimated as in
Ubaru, Chen & Saad (2017), Ghorbani, Krishnan & Xiao (2019) and PyHessian: for each of
``num_probes`` random unit vectors ``u`` (Rademacher, normalised), ``num_steps`` Lanczos steps
give a tridiagonal ``T = U diag(theta) U^T``, and the Gauss quadrature
``sum_j tau_j delta(t - theta_j)`` with ``tau_j = U[0, j]^2`` matches ``u^T f(A) u`` for every
polynomial ``f`` of degree below ``2 * num_steps``. Averaging over probes gives an unbiased
estimate of ``tr(f(A)) / D`` for such ``f`` (see :meth:`SpectralDensity.moment`). The density
on the grid is the average of Gaussian bumps of width ``sigma`` at the nodes, renormalised to
integrate to one on the grid (trapezoid rule).

All probes run together: each Lanczos step is one ``(D, num_probes)`` product.

Defaults: ``num_probes=16``, ``num_steps=80`` (capped at ``D``), ``sigma`` = 1% of the
spread of the nodes, ``grid`` = 1000 points over ``[min node - 5 sigma, max node + 5 sigma]``.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from curvkit.estimators._common import mean_stderr, to_square_operator
from curvkit.estimators.eigen import lanczos_tridiag
from curvkit.estimators.estimate import Estimate
from curvkit.estimators.probes import resolve_generator, sample_probes
from curvkit.linop import LinearOperator

__all__ = ["SpectralDensity", "spectral_density"]


class SpectralDensity(NamedTuple):
    """Result of :func:`spectral_density`; unpacks as ``grid, density, *rest``.

    Attributes:
        grid: ``(G,)`` points.
        density: ``(G,)`` Gaussian-smoothed density on ``grid`` (integrates to 1 on the
            default grid).
        nodes: ``(P, S)`` Ritz values per probe (``P`` probes, ``S`` steps).
        weights: ``(P, S)`` quadrature weights per probe (each row sums to 1; zero for the
            padding of a run that stopped early at an invariant subspace).
        sigma: the smoothing width used.
        num_matvecs: products used (the columns multiplied; at most ``P * S``).
        exact_below: the power below which every probe's quadrature moment is exact
            (``2 S`` for a run of ``S`` steps that did not exhaust its Krylov space;
            ``None`` where every run did).
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    num_matvecs: int
    exact_below: int | None = None

    def moment(self, power: int) -> Estimate:
        """Estimate of ``tr(A^power) / D`` from the quadrature (exact per probe for powers
        below ``exact_below``, so unbiased over probes; sample standard error). A higher
        power is biased (the quadrature of ``S`` nodes integrates polynomials of degree
        below ``2 S`` exactly): a warning says so, and ``info["biased"]`` is set."""
        per_probe = (self.weights * self.nodes**power).sum(-1)
        value, stderr = mean_stderr(per_probe)
        P = per_probe.shape[0]
        info = {}
        if self.exact_below is not None and power >= self.exact_below:
            warnings.warn(
                f"moment({power}) is biased: the quadrature is exact only for powers below "
                f"{self.exact_below} (2 x num_steps); raise num_steps",
                RuntimeWarning,
                stacklevel=2,
            )
            info["biased"] = True
        return Estimate(
            value, stderr, self.num_matvecs, "slq", dof=P - 1 if P > 1 else None, info=info
        )

    def smoothed_moment(self, power: int) -> Tensor:
        """``integral t^power density(t) dt`` on the grid (trapezoid rule)."""
        return torch.trapezoid(self.grid**power * self.density, self.grid)


def spectral_density(
    A: LinearOperator | Tensor,
    num_probes: int = 16,
    num_steps: int = 80,
    grid: Tensor | int = 1000,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
    *,
    reorthogonalize: bool = True,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature estimate of the spectral density of a symmetric ``A``.

    Args:
        A: a symmetric :class:`curvkit.LinearOperator` or dense symmetric ``(D, D)`` tensor.
        num_probes: random starting vectors ``P`` (default 16).
        num_steps: Lanczos steps ``S`` per probe (default 80, capped at ``D``).
        grid: the number of points (at least 2) of the default grid (default 1000 over the
            node range padded by ``5 sigma``; the density is normalised to integrate to 1
            on it), or a 1-D increasing tensor of points, where the smoothed density is
            evaluated as it is (a grid that leaves out part of the spectrum holds less
            than all the mass).
        sigma: Gaussian smoothing width (default 1% of the node spread, or 1e-3 when all
            nodes coincide, scaled by their magnitude).
        generator: source of the probes (``None``: a fresh generator).
        reorthogonalize: full reorthogonalisation within each run (memory ``S * D * P``);
            without it, ghost copies of converged eigenvalues distort the weights.

    Returns:
        A :class:`SpectralDensity` ``(grid, density, nodes, weights, sigma, num_matvecs)``.
    """
    op = to_square_operator(A, "spectral_density")
    if not op.is_symmetric:
        raise ValueError(f"spectral_density needs a symmetric operator, got {op!r}")
    for name, value in (("num_probes", num_probes), ("num_steps", num_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int of at least 1, got {value!r}")
    D = op.shape[0]
    g, _ = resolve_generator(generator)
    V0 = sample_probes((D, num_probes), "rademacher", g, op.dtype, op.device)
    alpha, beta, steps = lanczos_tridiag(op, V0, num_steps, reorthogonalize)
    S = alpha.shape[1]
    T = torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    # runs that stopped early: decouple the padding so it carries zero weight
    pad = torch.arange(S, device=op.device)[None, :] >= steps[:, None]
    theta, U = torch.linalg.eigh(T)
    weights = U[:, 0, :] ** 2
    nodes = theta
    if bool(pad.any()):
        nodes, weights = _mask_padding(T, steps)
    weights = weights / weights.sum(-1, keepdim=True)

    valid = weights > 0
    lo = nodes[valid].min()
    hi = nodes[valid].max()
    if sigma is None:
        spread = float(hi - lo)
        sigma = 0.01 * spread if spread > 0 else 1e-3 * max(float(hi.abs()), 1.0)
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive finite number, got {sigma}")
    default_grid = isinstance(grid, int) and not isinstance(grid, bool)
    if default_grid:
        if grid < 2:
            raise ValueError(f"grid must be at least 2 points, got {grid}")
        grid_t = torch.linspace(
            float(lo) - 5 * sigma, float(hi) + 5 * sigma, grid, dtype=op.dtype, device=op.device
        )
    elif isinstance(grid, Tensor) and grid.ndim == 1 and grid.numel() >= 2:
        grid_t = grid.to(dtype=op.dtype, device=op.device)
        if not bool(torch.isfinite(grid_t).all() and (grid_t.diff() > 0).all()):
            raise ValueError("a grid tensor must be finite and strictly increasing")
    else:
        raise ValueError(
            "grid must be a number of points (an int >= 2) or a 1-D tensor of at least 2 "
            f"increasing points, got {grid!r}"
        )
    bumps = torch.exp(-0.5 * ((grid_t[:, None] - nodes.reshape(1, -1)) / sigma) ** 2)
    density = (bumps * weights.reshape(1, -1)).sum(-1) / (
        num_probes * sigma * (2 * torch.pi) ** 0.5
    )
    if default_grid:  # it spans every node +- 5 sigma: only the discretisation is corrected
        density = density / torch.trapezoid(density, grid_t)
    # a run that stopped early exhausted its Krylov space: exact for every power
    full = bool((steps == S).any()) and S < D
    return SpectralDensity(
        grid_t, density, nodes, weights, sigma, int(steps.sum()), 2 * S if full else None
    )


def _mask_padding(T: Tensor, steps: Tensor) -> tuple[Tensor, Tensor]:
    """Per-run eigendecomposition of the leading ``steps[p]`` block; zero-weight padding."""
    P, S = T.shape[0], T.shape[1]
    nodes = torch.zeros(P, S, dtype=T.dtype, device=T.device)
    weights = torch.zeros(P, S, dtype=T.dtype, device=T.device)
    for p in range(P):
        n = int(steps[p])
        th, U = torch.linalg.eigh(T[p, :n, :n])
        nodes[p, :n] = th
        nodes[p, n:] = th[-1]
        weights[p, :n] = U[0] ** 2
    return nodes, weights
