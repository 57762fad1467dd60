"""Frobenius norm ``||A||_F`` with an error bar: ``curvkit.frobenius_norm(A, ...)``.

``"hutchinson"``: ``||A||_F^2 = E ||A v||^2`` for probes with ``E[v v^T] = I``; the mean of
``||A v_k||^2`` over ``m`` probes is unbiased for the square, its standard error is the
sample one (t quantile, ``m - 1`` dof), and the norm and its standard error follow by the
delta method (``se(sqrt(s)) = se(s) / (2 sqrt(s))``). The square root of an unbiased
estimate is biased low by about ``Var(s) / (8 s^{3/2})`` (second order; negligible once the
relative standard error is small). ``info["squared"]`` holds the unbiased estimate of
``||A||_F^2`` and its standard error. Works for rectangular operators too.

``"exact"``: ``D_in`` unit probes in blocks. ``"auto"``: exact when the budget is at least
``D_in``, else Hutchinson.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit.estimators._common import (
    batched_matmat,
    check_budget,
    check_replicates,
    finish_estimate,
    mean_stderr,
    squeeze_replicates,
    unit_blocks,
)
from curvkit.estimators.estimate import Estimate
from curvkit.estimators.probes import canonical_distribution, resolve_generator, sample_probes
from curvkit.linop import DenseOperator, LinearOperator, as_operator

__all__ = ["FROBENIUS_METHODS", "frobenius_norm"]

FROBENIUS_METHODS = ("hutchinson", "exact")


def frobenius_norm(
    A: LinearOperator | Tensor,
    method: str = "auto",
    num_matvecs: int | None = None,
    generator: torch.Generator | None = None,
    *,
    distribution: str = "rademacher",
    block_size: int = 256,
    replicates: int | None = None,
) -> Estimate:
    """Estimate ``||A||_F`` of an operator or dense 2-D tensor.

    Args:
        A: a :class:`curvkit.LinearOperator` or a dense 2-D tensor (any shape).
        method: ``"hutchinson"``, ``"exact"`` or ``"auto"``.
        num_matvecs: products with ``A`` (``None``: 100; ``D_in`` for ``"exact"``).
        generator: source of all randomness.
        distribution: probe distribution for ``"hutchinson"``.
        block_size: unit-probe block size for ``"exact"``.
        replicates: independent runs batched together (value gets a leading ``(R,)``).

    Returns:
        An :class:`Estimate` of the norm (0-d value and stderr).
    """
    if isinstance(A, Tensor):
        if A.ndim != 2:
            raise ValueError(f"frobenius_norm needs a 2-D tensor, got shape {tuple(A.shape)}")
        op = DenseOperator(A, symmetric=False)
    else:
        op = as_operator(A)
    D_in = op.shape[1]
    if method == "auto":
        method = "exact" if check_budget(num_matvecs) >= D_in else "hutchinson"
    if method == "exact":
        total = torch.zeros((), dtype=op.dtype, device=op.device)
        for _, _, E in unit_blocks(D_in, block_size, op.dtype, op.device):
            total = total + op.matmat(E).pow(2).sum()
        value = total.sqrt()
        return Estimate(value, torch.zeros_like(value), D_in, "exact", dof=0)
    if method != "hutchinson":
        raise ValueError(
            f"unknown frobenius_norm method {method!r}; known methods: 'auto', "
            + ", ".join(repr(m) for m in FROBENIUS_METHODS)
        )
    m = check_budget(num_matvecs)
    R = check_replicates(replicates)
    dist = canonical_distribution(distribution)
    g, seed = resolve_generator(generator)
    V = sample_probes((R, D_in, m), dist, g, op.dtype, op.device)
    samples = batched_matmat(op, V).pow(2).sum(-2)  # (R, m)
    sq, sq_se = mean_stderr(samples)
    value = sq.clamp_min(0).sqrt()
    stderr = sq_se / (2 * value.clamp_min(torch.finfo(value.dtype).tiny))
    info: dict = {
        "distribution": dist,
        "squared": squeeze_replicates(sq, replicates),
        "squared_stderr": squeeze_replicates(sq_se, replicates),
        "stderr": "delta method on the sample standard error of ||A||_F^2",
    }
    dof = m - 1 if m > 1 else None
    return finish_estimate(value, stderr, m, "hutchinson", dof, replicates, info, seed)
