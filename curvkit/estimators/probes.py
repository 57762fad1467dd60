"""Random probe vectors for the stochastic estimators.

Every random draw in curvkit's estimators goes through this module and takes a
``torch.Generator``; the global RNG is never touched. A generator lives on one device (a CUDA
generator is needed for CUDA sampling): probes are sampled on the *generator's* device and
then moved to the operator's device and dtype, so a CPU generator works with a CUDA operator
(and gives the same numbers as on CPU).

``generator=None`` creates a fresh, non-deterministically seeded CPU generator; its seed is
returned by :func:`resolve_generator` so estimators can report it (``Estimate.info["seed"]``)
and a run can be repeated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["DISTRIBUTIONS", "resolve_generator", "sample_independent_probes", "sample_probes"]

#: Probe distributions: i.i.d. signs, i.i.d. standard normals, and uniform on the sphere of
#: radius ``sqrt(D)`` (normalised Gaussians). All three have ``E[v v^T] = I``.
DISTRIBUTIONS = ("rademacher", "gaussian", "sphere")

_ALIASES = {"normal": "gaussian", "signs": "rademacher"}


def resolve_generator(generator: torch.Generator | None) -> tuple[torch.Generator, int | None]:
    """Return ``(generator, seed)``: the given generator (seed ``None``: the caller owns it),
    or a fresh CPU generator seeded non-deterministically and its seed."""
    if generator is None:
        g = torch.Generator()
        seed = g.seed()
        return g, seed
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")
    return generator, None


def canonical_distribution(distribution: str) -> str:
    """Validate a distribution name (``"normal"`` is accepted for ``"gaussian"``)."""
    name = _ALIASES.get(distribution, distribution)
    if name not in DISTRIBUTIONS:
        raise ValueError(
            f"unknown probe distribution {distribution!r}; choose one of {list(DISTRIBUTIONS)}"
        )
    return name


def sample_probes(
    shape: tuple[int, ...],
    distribution: str,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device | str,
) -> Tensor:
    """Probes of ``shape`` (e.g. ``(D, K)`` or ``(R, D, K)``; the dimension ``-2`` is ``D``).

    ``"rademacher"``: entries ``+-1``; ``"gaussian"``: standard normal; ``"sphere"``: each
    column (along dim ``-2``) uniform on the sphere of radius ``sqrt(D)``. Sampled on the
    generator's device in ``dtype`` and then moved to ``device``.
    """
    name = canonical_distribution(distribution)
    gdev = generator.device
    sample_dtype = dtype if dtype.is_floating_point else torch.float64
    # drawn as (..., K, D) and returned as its transpose: column-major probe blocks go into
    # curvature products without a transposing copy (see CurvatureOperator._matmat)
    drawn = (*shape[:-2], shape[-1], shape[-2]) if len(shape) >= 2 else tuple(shape)
    if name == "rademacher":
        bits = torch.randint(0, 2, drawn, generator=generator, device=gdev, dtype=torch.int8)
        out = bits.to(sample_dtype).mul_(2).sub_(1)
    else:
        out = torch.randn(drawn, generator=generator, device=gdev, dtype=sample_dtype)
        if name == "sphere":
            D = drawn[-1]
            out = out * (math.sqrt(D) / out.norm(dim=-1, keepdim=True).clamp_min(1e-30))
    out = out.to(device=device, dtype=dtype)
    return out.transpose(-1, -2) if len(shape) >= 2 else out


#: Rademacher probes ``(D, k)`` are checked for linear dependence where ``D - k`` is below
#: this: a square ``10 x 10`` sign matrix is singular 38% of the time (measured), while with
#: 64 spare dimensions the chance is below ``k^2 2^-64``.
DEPENDENCE_CHECK_SPARE = 64


def sample_independent_probes(
    shape: tuple[int, int, int],
    distribution: str,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device | str,
    method: str,
) -> Tensor:
    """:func:`sample_probes` ``(R, D, k)`` for a leave-one-out sketch (XTrace, XNysTrace,
    XDiag), which needs each replicate's ``k`` probes linearly independent.

    Gaussian and sphere probes are, with probability one. Rademacher probes with ``k`` near
    ``D`` often are not, and then the leave-one-out formulas invert a singular factor and
    return numbers without meaning; that is checked (on the probes, before any product)
    and raised. Redrawing instead would bias the estimate (a probe would no longer be
    independent of the others).
    """
    W = sample_probes(shape, distribution, generator, dtype, device)
    D, k = shape[-2], shape[-1]
    if canonical_distribution(distribution) != "rademacher" or D - k >= DEPENDENCE_CHECK_SPARE:
        return W
    if bool((torch.linalg.matrix_rank(W) < k).any()):
        raise FloatingPointError(
            f"{method}: the {k} Rademacher probes drawn are linearly dependent (likely with "
            f"k = {k} this close to D = {D}), and its leave-one-out sketches need independent "
            f"probes; use distribution='gaussian', a smaller num_matvecs, or method='exact' "
            f"(D = {D} products)"
        )
    return W
