"""Diagonal estimation with per-entry error bars: ``curvkit.diagonal(A, method=..., ...)``.

Methods (``DIAGONAL_METHODS``), cost counted in matvecs:

``"hutchinson"``
    Bekas–Kokiopoulou–Saad: ``mean_k v_k * (A v_k)`` over ``m`` probes (Rademacher by
    default; for Rademacher probes this equals BKS's ratio ``sum v*Av / sum v*v``, and with
    Gaussian probes the plain mean stays unbiased). Per-entry standard error: sample std
    over probes / ``sqrt(m)``, t quantile with ``m - 1`` dof (i.i.d. samples: honest up to
    the t approximation).
``"xdiag"``
    XDiag (Epperly, Tropp & Webber 2024): ``m // 2`` probes ``w_i``, the basis ``Q`` of
    ``A W`` and ``A^T Q``; leave-one-out estimates ``d_i = diag(Q_iQ_i^T A) +
    w_i * ((I - Q_iQ_i^T) A w_i)``, each unbiased, averaged. Exact for operators of rank
    below ``m // 2``. **Per-entry errors are a heuristic**: the leave-one-out spread /
    ``sqrt(m/2)``, inflated by ``XDIAG_STDERR_INFLATION`` (calibrated on the test families,
    see docs/estimators.md); t quantile with ``m/2 - 1`` dof. Needs the adjoint product of
    non-symmetric operators.
``"exact"``
    ``D`` unit probes in blocks of ``block_size``; zero standard error.
``"auto"``
    ``"exact"`` when the budget is at least ``D``; else ``"xdiag"`` (on the Hessians of
    trained MLPs/CNNs in scripts/estimator_accuracy.py it is 5-80x more accurate than
    Hutchinson at 48-192 matvecs), or ``"hutchinson"`` below 8 matvecs. On flat spectra
    Hutchinson is better; choose it explicitly there (see docs/estimators.md).

Budgets: ``num_matvecs=None`` means 100 (``D`` for ``"exact"``); budgets that cannot split
evenly are rounded down and reported in ``info["unused_matvecs"]``.

**Registry contract.** ``DIAGONAL_METHODS`` maps a name to::

    fn(A: LinearOperator, num_matvecs: int | None, generator: torch.Generator | None,
       **kwargs) -> Estimate

with ``A`` a square :class:`curvkit.LinearOperator`, and ``value``/``stderr`` of shape
``(D,)`` on ``A``'s device; otherwise as for :data:`curvkit.estimators.trace.TRACE_METHODS`
(``method`` the resolved name, ``dof``, ``num_backward`` for non-matvec work, randomness only
from ``generator``). Register with ``@register_diagonal_method("name")``. The built-in
stochastic methods accept ``replicates=R`` (``R`` independent runs in the same products;
value ``(R, D)``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from curvkit.estimators._common import (
    batched_matmat,
    check_budget,
    check_replicates,
    exact_diagonal_sweep,
    finish_estimate,
    lookup_method,
    mean_stderr,
    method_registrar,
    need_budget,
    solve_upper_transposed_identity,
    to_square_operator,
)
from curvkit.estimators.estimate import Estimate
from curvkit.estimators.probes import (
    canonical_distribution,
    resolve_generator,
    sample_independent_probes,
    sample_probes,
)
from curvkit.linop import LinearOperator

__all__ = [
    "DIAGONAL_METHODS",
    "XDIAG_STDERR_INFLATION",
    "diagonal",
    "register_diagonal_method",
    "row_sum",
]

DiagonalMethod = Callable[..., Estimate]

#: name -> ``fn(A, num_matvecs, generator, **kwargs) -> Estimate`` (see the module docstring).
DIAGONAL_METHODS: dict[str, DiagonalMethod] = {}

#: Factor on XDiag's per-entry leave-one-out standard errors (heuristic, see docs).
XDIAG_STDERR_INFLATION = 1.25


register_diagonal_method = method_registrar(DIAGONAL_METHODS, "diagonal")


def diagonal(
    A: LinearOperator | Tensor,
    method: str = "auto",
    num_matvecs: int | None = None,
    generator: torch.Generator | None = None,
    **kwargs,
) -> Estimate:
    """Estimate ``diag(A)`` of a square operator or dense ``(D, D)`` tensor.

    Args:
        A: a square :class:`curvkit.LinearOperator` or dense ``(D, D)`` tensor.
        method: a name in ``DIAGONAL_METHODS`` or ``"auto"`` (see the module docstring).
        num_matvecs: budget in products (``None``: 100, or ``D`` for ``"exact"``).
        generator: source of all randomness (``None``: a fresh one, seed in ``info``).
        **kwargs: passed to the method (``distribution``, ``block_size``, ...).

    Returns:
        An :class:`Estimate` with ``value`` and per-entry ``stderr`` of shape ``(D,)``.
    """
    op = to_square_operator(A, "diagonal")
    if method == "auto":
        budget = check_budget(num_matvecs)
        if budget >= op.shape[0]:
            method = "exact"
        else:
            method = "xdiag" if budget >= 8 else "hutchinson"
    fn = lookup_method(DIAGONAL_METHODS, method, "diagonal")
    return fn(op, num_matvecs, generator, **kwargs)


def row_sum(A: LinearOperator | Tensor) -> Tensor:
    """``A @ 1``: the ``(D_out,)`` row sums of an operator or a dense 2-D tensor (exact, one
    product)."""
    if isinstance(A, Tensor):
        if A.ndim != 2:
            raise ValueError(f"row_sum needs a 2-D tensor, got shape {tuple(A.shape)}")
        return A @ torch.ones(A.shape[1], dtype=A.dtype, device=A.device)
    if not isinstance(A, LinearOperator):
        raise TypeError(f"row_sum needs a LinearOperator or a tensor, got {type(A).__name__}")
    return A.row_sum()


@register_diagonal_method("hutchinson", "bks")
def hutchinson_diagonal(
    A: LinearOperator,
    num_matvecs: int | None,
    generator: torch.Generator | None,
    *,
    distribution: str = "rademacher",
    replicates: int | None = None,
) -> Estimate:
    """Bekas–Kokiopoulou–Saad diagonal estimate from ``num_matvecs`` probes."""
    m = check_budget(num_matvecs)
    R = check_replicates(replicates)
    dist = canonical_distribution(distribution)
    g, seed = resolve_generator(generator)
    D = A.shape[0]
    V = sample_probes((R, D, m), dist, g, A.dtype, A.device)
    value, stderr = mean_stderr(V * batched_matmat(A, V))  # (R, D)
    info = {"distribution": dist, "stderr": "sample standard error (i.i.d. probes)"}
    return finish_estimate(
        value, stderr, m, "hutchinson", m - 1 if m > 1 else None, replicates, info, seed
    )


@register_diagonal_method("xdiag")
def xdiag(
    A: LinearOperator,
    num_matvecs: int | None,
    generator: torch.Generator | None,
    *,
    distribution: str = "rademacher",
    replicates: int | None = None,
) -> Estimate:
    """XDiag of Epperly, Tropp & Webber (2024); see the module docstring."""
    m = check_budget(num_matvecs)
    need_budget("xdiag", m, 4, "two probes and their deflation products")
    R = check_replicates(replicates)
    dist = canonical_distribution(distribution)
    g, seed = resolve_generator(generator)
    D = A.shape[0]
    k = min(m // 2, D)
    info: dict = {"distribution": dist, "num_probes": k}
    if 2 * k < m:
        info["unused_matvecs"] = m - 2 * k
    W = sample_independent_probes((R, D, k), dist, g, A.dtype, A.device, "xdiag")
    Y = batched_matmat(A, W)
    Q, Rm = torch.linalg.qr(Y)
    Z = batched_matmat(A, Q, adjoint=not A.is_symmetric)  # A^T Q
    X = solve_upper_transposed_identity(Rm)
    Sn = X / X.norm(dim=-2, keepdim=True)  # leave-one-out directions s_i
    base = (Q * Z).sum(-1, keepdim=True)  # diag(Q Q^T A), (R, D, 1)
    loo = (Q @ Sn) * (Z @ Sn)  # diag(Q s_i s_i^T Q^T A), (R, D, k)
    # (I - Q_i Q_i^T) A w_i = Y_i - Q (R_i - s_i s_i^T R_i)
    resid = Y - Q @ (Rm - Sn * (Sn * Rm).sum(-2, keepdim=True))
    d = base - loo + W * resid  # (R, D, k)
    if not bool(torch.isfinite(d).all()):
        raise FloatingPointError(
            "xdiag: the sketch A W is numerically rank deficient (the operator has rank below "
            f"{k}); its diagonal is then captured exactly by fewer probes: lower the budget or "
            "use method='exact'"
        )
    value, stderr = mean_stderr(d)
    stderr = stderr * XDIAG_STDERR_INFLATION
    info["stderr"] = "heuristic: per-entry leave-one-out spread, inflated by XDIAG_STDERR_INFLATION"
    return finish_estimate(value, stderr, 2 * k, "xdiag", k - 1, replicates, info, seed)


@register_diagonal_method("exact")
def exact_diagonal(
    A: LinearOperator,
    num_matvecs: int | None,
    generator: torch.Generator | None,
    *,
    block_size: int = 256,
) -> Estimate:
    """``diag(A)`` from ``D`` unit probes in blocks (``num_matvecs``/``generator`` ignored)."""
    D = A.shape[0]
    value = exact_diagonal_sweep(A, block_size)
    info = {}
    if num_matvecs is not None and num_matvecs != D:
        info["note"] = f"exact diagonal needs D = {D} products; num_matvecs={num_matvecs} ignored"
    return Estimate(value, torch.zeros_like(value), D, "exact", dof=0, info=info)
