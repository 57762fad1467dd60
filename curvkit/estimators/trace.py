"""Trace estimation with honest error bars: ``curvkit.trace(A, method=..., ...)``.

Methods (``TRACE_METHODS``), each counting its cost in matvecs (columns pushed through ``A``):

``"hutchinson"``
    Girard–Hutchinson: ``mean_k v_k^T A v_k`` over ``m`` probes (Rademacher by default, or
    ``distribution="gaussian"``). Standard error: sample std / ``sqrt(m)``, t quantile with
    ``m - 1`` degrees of freedom. Exact sampling theory (i.i.d. samples); the only
    approximation is the t distribution for a non-normal mean. ``group_size=g`` (dividing
    ``m``) asks the operator only for the sums over groups of ``g`` probes, which operators
    that collapse probes compute more cheaply (``HessianOperator``'s Taylor mode: one
    second-order term per group instead of per probe); the estimate is the same, the
    standard error comes from the ``m / g`` i.i.d. group means (``m / g - 1`` dof). The
    default ``group_size=None`` picks, for operators that collapse
    (``collapses_quadratic_forms``), the largest ``g`` dividing ``m`` that leaves at least
    ``MIN_GROUPS = 8`` groups, at most 16 and at most the operator's
    ``max_collapsed_group`` (what one pass holds within its memory budget), and 1
    otherwise. An operator keeps the group it first settled on for ``m`` probes and its
    memory budget (``default_group_sizes``): under ``"auto"`` its timed trial may later find
    ``v^T (A v)`` faster than Taylor mode, and the same call with the same seed still
    returns the same estimate with the same standard error and degrees of freedom.
``"hutch++"``
    Meyer–Musco–Musco–Woodruff: ``k = m // 3`` sketch products, ``k`` products for
    ``A Q``, the remaining ``m - 2k`` as Hutchinson probes of the deflated
    ``(I - QQ^T) A (I - QQ^T)`` (quadratic forms ``g'^T A g'`` of the deflated probes
    ``g' = (I - QQ^T) g``, so curvature operators may use Taylor mode for them). Its
    standard error is the Hutchinson part's sample error; since the estimate is unbiased
    *conditionally on Q*, that is an honest estimate of the total variance (t quantile,
    ``m - 2k - 1`` degrees of freedom).
``"xtrace"``
    XTrace (Epperly, Tropp & Webber 2024, SIMAX): ``m // 2`` probes ``w_i``, the basis ``Q``
    of ``A W`` and ``A Q``; each leave-one-out estimate ``t_i = tr(Q_i^T A Q_i) +
    w_i^T (I - Q_iQ_i^T) A (I - Q_iQ_i^T) w_i`` (``Q_i``: basis of ``A W`` without column
    ``i``) is unbiased, and the estimate is their mean. Default Gaussian probes with the
    paper's improved normalisation of the Hutchinson part (``distribution="rademacher"``:
    the plain variant). **The error estimate is a heuristic**: ``std(t_i) / sqrt(m/2)``
    treats the exchangeable (not independent) ``t_i`` as independent and under-covers; it
    is inflated by ``XTRACE_STDERR_INFLATION = 1.25`` (calibrated on the test families, see
    docs/estimators.md) and reported with a t quantile (``m/2 - 1`` dof).
``"xnystrace"`` (alias ``"nystrom++"``)
    XNysTrace (same paper) for **PSD** operators: ``m`` probes, Nyström approximation
    from all but one probe plus a Hutchinson correction with the left-out probe, in closed
    form from one Cholesky factor. Much more accurate than XTrace on PSD operators with
    decaying spectra at equal cost. Raises on an operator not declared PSD unless
    ``assume_psd=True``. **The error estimate is a heuristic**: the leave-one-out spread
    under-estimates (down to 0.3x the true error on fast-decaying spectra), the jackknife
    from closed-form leave-two-out estimates over-estimates (Efron–Stein, and the error
    falls faster than ``1/m``); their geometric mean was within 0.95-1.25x of the true
    standard error on the test families. t quantile with ``m - 1`` dof.
``"exact"``
    ``D`` unit probes pushed through in blocks of ``block_size``; zero standard error.
``"auto"``
    ``"exact"`` when the budget is at least ``D``; otherwise ``"xnystrace"`` for operators
    declared PSD and ``"xtrace"`` for the rest; ``"hutchinson"`` below 8 matvecs. The
    resolved name is ``Estimate.method``.

Budgets: ``num_matvecs=None`` means ``DEFAULT_NUM_MATVECS`` (100; ``D`` for ``"exact"``). A
budget a method cannot split evenly is rounded down; the unused products are reported in
``Estimate.info["unused_matvecs"]``, never an error. Budgets below a method's minimum raise.

**Registry contract.** ``TRACE_METHODS`` maps a method name to a function::

    fn(A: LinearOperator, num_matvecs: int | None, generator: torch.Generator | None,
       **kwargs) -> Estimate

``A`` is already a square :class:`curvkit.LinearOperator` (``trace`` converts dense
tensors). The function must return an :class:`Estimate` whose ``value``/``stderr`` are 0-d
tensors on ``A``'s device, with ``num_matvecs`` the products actually used, ``method`` its
own name, ``dof`` for the t quantile (``None``: normal, ``0``: exact), ``num_backward`` any
non-matvec work in gradient-equivalents, and ``info`` for extras (budget rounding). Every
random choice must come from ``generator`` (``None``: a fresh generator whose seed goes in
``info["seed"]``, see :func:`curvkit.estimators.probes.resolve_generator`). Add a method with
``@register_trace_method("name")``; ``trace(A, method="name", **kwargs)`` passes extra keyword
arguments through.

The built-in stochastic methods also accept ``replicates=R``: ``R`` independent runs batched
into the same products (value and stderr get a leading ``(R,)`` dimension), used for
calibration studies.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from curvkit.estimators._common import (
    DEFAULT_NUM_MATVECS,
    batched_matmat,
    batched_quadratic_form,
    check_budget,
    check_replicates,
    finish_estimate,
    lookup_method,
    mean_stderr,
    method_registrar,
    need_budget,
    solve_upper_transposed_identity,
    squeeze_replicates,
    to_square_operator,
    unit_blocks,
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
    "TRACE_METHODS",
    "XNYSTRACE_STDERR_INFLATION",
    "XTRACE_STDERR_INFLATION",
    "register_trace_method",
    "trace",
]

TraceMethod = Callable[..., Estimate]

#: name -> ``fn(A, num_matvecs, generator, **kwargs) -> Estimate`` (see the module docstring).
TRACE_METHODS: dict[str, TraceMethod] = {}

#: Factor on XTrace's leave-one-out standard error (heuristic; see docs/estimators.md). The
#: leave-one-out spread ignores the covariance of the exchangeable estimates and was measured
#: at 0.65-0.95 of the true standard error on the test families at budgets 30-100.
XTRACE_STDERR_INFLATION = 1.25
#: Factor on XNysTrace's leave-one-out standard error (heuristic; see docs/estimators.md).
XNYSTRACE_STDERR_INFLATION = 1.0

_AUTO_MIN_BUDGET = 8


register_trace_method = method_registrar(TRACE_METHODS, "trace")


def trace(
    A: LinearOperator | Tensor,
    method: str = "auto",
    num_matvecs: int | None = None,
    generator: torch.Generator | None = None,
    **kwargs,
) -> Estimate:
    """Estimate ``tr(A)`` of a square operator or dense ``(D, D)`` tensor.

    Args:
        A: a square :class:`curvkit.LinearOperator` or a dense ``(D, D)`` tensor.
        method: a name in ``TRACE_METHODS`` or ``"auto"`` (see the module docstring).
        num_matvecs: budget in products with ``A`` (``None``: 100, or ``D`` for ``"exact"``).
        generator: source of all randomness (``None``: a fresh one, seed in ``info``).
        **kwargs: passed to the method (e.g. ``distribution="gaussian"``, ``block_size``,
            ``assume_psd``).

    Returns:
        An :class:`Estimate` with 0-d ``value`` and ``stderr``; ``method`` is the resolved
        name; ``confidence_interval()`` uses the t quantile with ``Estimate.dof``.
    """
    op = to_square_operator(A, "trace")
    if method == "auto":
        method = _auto_method(op, num_matvecs)
    fn = lookup_method(TRACE_METHODS, method, "trace")
    return fn(op, num_matvecs, generator, **kwargs)


def _auto_method(op: LinearOperator, num_matvecs: int | None) -> str:
    D = op.shape[0]
    budget = check_budget(num_matvecs)
    if budget >= D:
        return "exact"
    if budget < _AUTO_MIN_BUDGET:
        return "hutchinson"
    return "xnystrace" if op.is_psd else "xtrace"


# ---------------------------------------------------------------------------- hutchinson
#: fewest probe groups the default ``group_size`` of Hutchinson leaves for the error bar
MIN_GROUPS = 8
#: largest default ``group_size`` (a group is propagated in one pass)
MAX_DEFAULT_GROUP = 16


def hutchinson_group_size(A: LinearOperator, m: int, group_size: int | None) -> int:
    """The probe group size of a Hutchinson run with ``m`` probes (see module docstring)."""
    if group_size is None:
        settled = getattr(A, "default_group_sizes", None)
        # settled per budget too: a lowered memory budget must not keep a larger group
        key = (m, getattr(A, "memory_budget", None))
        if settled is not None and key in settled:
            return settled[key]
        group = 1
        if getattr(A, "collapses_quadratic_forms", False):
            most = min(MAX_DEFAULT_GROUP, getattr(A, "max_collapsed_group", MAX_DEFAULT_GROUP))
            fits = [g for g in range(1, most + 1) if m % g == 0 and m // g >= MIN_GROUPS]
            group = max(fits, default=1)
        if settled is not None:
            settled[key] = group
        return group
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    if m % group_size:
        raise ValueError(f"group_size {group_size} does not divide num_matvecs {m}; pick a divisor")
    return group_size


@register_trace_method("hutchinson")
def hutchinson_trace(
    A: LinearOperator,
    num_matvecs: int | None,
    generator: torch.Generator | None,
    *,
    distribution: str = "rademacher",
    replicates: int | None = None,
    group_size: int | None = None,
) -> Estimate:
    """Girard–Hutchinson trace estimate from ``num_matvecs`` probes (see module docstring)."""
    m = check_budget(num_matvecs)
    R = check_replicates(replicates)
    dist = canonical_distribution(distribution)
    g, seed = resolve_generator(generator)
    group = hutchinson_group_size(A, m, group_size)
    D = A.shape[0]
    V = sample_probes((R, D, m), dist, g, A.dtype, A.device)
    # v^T A v only: curvature operators never hold the (D, m) products
    samples = batched_quadratic_form(A, V, group) / group  # (R, m // group) group means
    value, stderr = mean_stderr(samples)
    info = {"distribution": dist, "stderr": "sample standard error (i.i.d. probes)"}
    if group > 1:
        info["group_size"] = group
        info["stderr"] = f"sample standard error of {m // group} i.i.d. group means"
    dof = m // group - 1 if m // group > 1 else None
    return finish_estimate(value, stderr, m, "hutchinson", dof, replicates, info, seed)


# ---------------------------------------------------------------------------- hutch++
@register_trace_method("hutch++")
def hutchpp_trace(
    A: LinearOperator,
    num_matvecs: int | None,
    generator: torch.Generator | None,
    *,
    distribution: str = "rademacher",
    replicates: int | None = None,
) -> Estimate:
    """Hutch++: ``m // 3`` sketch, ``m // 3`` for ``A Q``, the rest Hutchinson on the deflated
    operator (see module docstring)."""
    m = check_budget(num_matvecs)
    need_budget("hutch++", m, 4, "1 sketch, 1 deflation and 2 Hutchinson probes")
    R = check_replicates(replicates)
    dist = canonical_distribution(distribution)
    g, seed = resolve_generator(generator)
    D = A.shape[0]
    k = min(m // 3, D)
    n_h = m - 2 * k
    info: dict = {"distribution": dist, "sketch_size": k, "hutchinson_probes": n_h}
    S = sample_probes((R, D, k), dist, g, A.dtype, A.device)
    G = sample_probes((R, D, n_h), dist, g, A.dtype, A.device)
    Q = torch.linalg.qr(batched_matmat(A, S)).Q
    AQ = batched_matmat(A, Q)
    low_rank = (Q * AQ).sum((-2, -1))  # tr(Q^T A Q), (R,)
    Gp = G - Q @ (Q.mT @ G)
    samples = batched_quadratic_form(A, Gp)  # (R, n_h): g'^T A g', Taylor mode where faster
    mean, stderr = mean_stderr(samples)
    info["stderr"] = "sample standard error of the deflated Hutchinson part (conditionally exact)"
    return finish_estimate(low_rank + mean, stderr, m, "hutch++", n_h - 1, replicates, info, seed)


# ---------------------------------------------------------------------------- xtrace
@register_trace_method("xtrace")
def xtrace(
    A: LinearOperator,
    num_matvecs: int | None,
    generator: torch.Generator | None,
    *,
    distribution: str = "gaussian",
    replicates: int | None = None,
) -> Estimate:
    """XTrace of Epperly, Tropp & Webber (2024): exchangeable leave-one-out Hutch++.

    Uses ``m // 2`` probes and as many products for ``A Q`` (an odd budget leaves one
    product unused, reported in ``info``). The standard error is the leave-one-out
    heuristic described in the module docstring.
    """
    m = check_budget(num_matvecs)
    need_budget("xtrace", m, 4, "two probes and their deflation products")
    R = check_replicates(replicates)
    dist = canonical_distribution(distribution)
    g, seed = resolve_generator(generator)
    D = A.shape[0]
    k = min(m // 2, D)
    info: dict = {"distribution": dist, "num_probes": k}
    if 2 * k < m:
        info["unused_matvecs"] = m - 2 * k
    W = sample_independent_probes((R, D, k), dist, g, A.dtype, A.device, "xtrace")
    Y = batched_matmat(A, W)
    shift = _ill_conditioning_shift(Y, W)
    if shift is not None:
        Y = Y + shift[:, None, None] * W
        info["shift"] = shift.tolist()
    Q, Rm = torch.linalg.qr(Y)
    Z = batched_matmat(A, Q)
    if shift is not None:
        Z = Z + shift[:, None, None] * Q
    # leave-one-out directions: Q_i Q_i^T = Q (I - s_i s_i^T) Q^T, s_i = R^{-T} e_i normalised
    X = solve_upper_transposed_identity(Rm)
    Sn = X / X.norm(dim=-2, keepdim=True)
    H = Q.mT @ Z  # Q^T A Q, (R, k, k)
    tr_low = H.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True) - (Sn * (H @ Sn)).sum(-2)
    C = Q.mT @ W  # (R, k, k)
    alpha = (Sn * C).sum(-2, keepdim=True)  # s_i^T Q^T w_i
    M = C - Sn * alpha  # columns: (I - s_i s_i^T) Q^T w_i
    U = W - Q @ M  # (I - Q_i Q_i^T) w_i
    AU = Y - Z @ M
    hutch = (U * AU).sum(-2)
    if dist in ("gaussian", "sphere"):
        # improved XTrace: the direction of U_i is uniform on the sphere of the
        # (D - k + 1)-dimensional complement of Q_i; scale it to radius sqrt(D - k + 1).
        hutch = hutch * (D - k + 1) / (U * U).sum(-2)
        info["normalisation"] = "improved (Epperly-Tropp-Webber)"
    t = tr_low + hutch  # (R, k)
    if shift is not None:
        t = t - shift[:, None] * D
    value, stderr = mean_stderr(t)
    info["stderr"] = "heuristic: leave-one-out spread, inflated by XTRACE_STDERR_INFLATION"
    info["loo_estimates"] = t if replicates is not None else t[0]
    stderr = stderr * XTRACE_STDERR_INFLATION
    return finish_estimate(value, stderr, 2 * k, "xtrace", k - 1, replicates, info, seed)


def _ill_conditioning_shift(Y: Tensor, W: Tensor) -> Tensor | None:
    """A shift ``nu`` per replicate when ``A W`` is numerically rank deficient.

    The leave-one-out formulas invert the triangular factor of ``A W``; when ``A`` has
    (numerical) rank below the number of probes it is singular. Then ``A + nu I`` is used
    (with ``nu`` a ``sqrt(eps)`` fraction of the scale of ``A W``) and ``nu D`` subtracted:
    the estimate stays unbiased up to the ``O(nu)`` dependence of the basis on the probes.
    """
    diag = torch.linalg.qr(Y, mode="r").R.diagonal(dim1=-2, dim2=-1).abs()
    eps = torch.finfo(Y.dtype).eps
    bad = diag.min(-1).values <= eps**0.5 * diag.max(-1).values
    if not bool(bad.any()):
        return None
    scale = Y.norm(dim=(-2, -1)) / (W.norm(dim=(-2, -1)).clamp_min(1e-300))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(bad, eps**0.5 * scale, torch.zeros_like(scale))


# ---------------------------------------------------------------------------- xnystrace
@register_trace_method("xnystrace", "nystrom++")
def xnystrace(
    A: LinearOperator,
    num_matvecs: int | None,
    generator: torch.Generator | None,
    *,
    distribution: str = "gaussian",
    assume_psd: bool = False,
    replicates: int | None = None,
) -> Estimate:
    """XNysTrace (Epperly, Tropp & Webber 2024) for PSD operators.

    With ``W`` the ``m`` probes, ``Y = (A + nu I) W`` (``nu`` a tiny stabilising shift),
    ``W^T Y = C^T C`` and ``x_i = C^{-T} e_i``, the leave-one-out Nyström estimates are
    ``t_i = ||B||_F^2 - ||B x_i||^2 / ||x_i||^2 + 1 / ||x_i||^2 - nu D`` with
    ``B = R C^{-1}`` (``Y = QR``). Each is unbiased; the estimate is their mean.

    Args:
        assume_psd: run on an operator not declared PSD (the estimate is wrong if it is
            not PSD; an indefinite ``W^T A W`` raises).
    """
    if not (A.is_psd or assume_psd):
        raise ValueError(
            "xnystrace needs a positive semi-definite operator, and this one is not declared "
            "PSD (A.is_psd is False). Use method='xtrace' for indefinite operators such as "
            "Hessians, or pass assume_psd=True if you know it is PSD."
        )
    m = check_budget(num_matvecs)
    need_budget("xnystrace", m, 2, "a leave-one-out estimate needs two probes")
    R = check_replicates(replicates)
    dist = canonical_distribution(distribution)
    g, seed = resolve_generator(generator)
    D = A.shape[0]
    k = min(m, D)
    info: dict = {"distribution": dist, "num_probes": k}
    if k < m:
        info["unused_matvecs"] = m - k
    W = sample_independent_probes((R, D, k), dist, g, A.dtype, A.device, "xnystrace")
    Y = batched_matmat(A, W)
    eps = torch.finfo(A.dtype).eps
    nu = eps * Y.norm(dim=(-2, -1)) / D**0.5
    for _ in range(8):
        Yn = Y + nu[:, None, None] * W
        G = W.mT @ Yn
        C, err = torch.linalg.cholesky_ex((G + G.mT) / 2, upper=True)
        if not bool((err > 0).any()):
            break
        nu = torch.where(err > 0, nu * 100 + eps, nu)
    else:
        raise ValueError(
            "xnystrace: W^T A W is not positive definite even after a stabilising shift; the "
            "operator is not PSD. Use method='xtrace'."
        )
    Q, Rm = torch.linalg.qr(Yn)
    B = torch.linalg.solve_triangular(C, Rm, upper=True, left=False)  # R C^{-1}
    eye = torch.eye(k, dtype=A.dtype, device=A.device).expand_as(C)
    X = torch.linalg.solve_triangular(C.mT, eye, upper=False)  # columns x_i = C^{-T} e_i
    BX = B @ X
    N = X.mT @ X  # x_i^T x_j
    M = BX.mT @ BX  # x_i^T B^T B x_j
    b2 = (B * B).sum((-2, -1))
    nd = N.diagonal(dim1=-2, dim2=-1)
    md = M.diagonal(dim1=-2, dim2=-1)
    shift = nu[:, None] * D
    t = b2[:, None] - md / nd + 1 / nd - shift  # (R, k) leave-one-out estimates
    value, se_loo = mean_stderr(t)
    se_jack = _xnystrace_jackknife(b2, N, M, shift)
    # heuristic (see module docstring): geometric mean of the optimistic leave-one-out
    # spread and the conservative (Efron-Stein) jackknife
    stderr = (se_loo * se_jack).sqrt() * XNYSTRACE_STDERR_INFLATION
    info["shift"] = nu.tolist() if replicates is not None else nu[0].item()
    info["stderr"] = "heuristic: geometric mean of the leave-one-out spread and the jackknife error"
    info["stderr_loo"] = squeeze_replicates(se_loo, replicates)
    info["stderr_jackknife"] = squeeze_replicates(se_jack, replicates)
    return finish_estimate(value, stderr, k, "xnystrace", k - 1, replicates, info, seed)


def _xnystrace_jackknife(b2: Tensor, N: Tensor, M: Tensor, shift: Tensor) -> Tensor:
    """Jackknife standard error of XNysTrace from closed-form leave-two-out estimates.

    Leaving out probes ``i`` and ``j`` downdates the Nyström approximation by the rank-two
    term built from ``x_i, x_j``; with ``N = X^T X`` and ``M = X^T B^T B X`` the estimate
    ``t_i^{(-j)}`` needs only the 2x2 blocks ``N[{i,j}]``, ``M[{i,j}]``. ``T^{(-j)}`` is the
    XNysTrace estimate without probe ``j``, and the jackknife variance is
    ``(k-1)/k sum_j (T^{(-j)} - mean)^2``.
    """
    k = N.shape[-1]
    nd = N.diagonal(dim1=-2, dim2=-1)
    md = M.diagonal(dim1=-2, dim2=-1)
    Nii, Njj = nd[:, :, None], nd[:, None, :]
    Mii, Mjj = md[:, :, None], md[:, None, :]
    det = Nii * Njj - N * N
    eye = torch.eye(k, dtype=torch.bool, device=N.device)
    det = det.masked_fill(eye, 1.0)
    tr_pair = (Njj * Mii - 2 * N * M + Nii * Mjj) / det
    t2 = (b2[:, None, None] - tr_pair + Njj / det - shift[:, :, None]).masked_fill(eye, 0.0)
    T_minus = t2.sum(-2) / (k - 1)  # (R, k): estimate without probe j
    var = (k - 1) / k * ((T_minus - T_minus.mean(-1, keepdim=True)) ** 2).sum(-1)
    return var.sqrt()


# ---------------------------------------------------------------------------- exact
@register_trace_method("exact")
def exact_trace(
    A: LinearOperator,
    num_matvecs: int | None,
    generator: torch.Generator | None,
    *,
    block_size: int = 256,
) -> Estimate:
    """``tr(A)`` from ``D`` unit probes in blocks of ``block_size`` (``num_matvecs`` and
    ``generator`` are ignored; the cost is always ``D``)."""
    D = A.shape[0]
    total = torch.zeros((), dtype=A.dtype, device=A.device)
    for start, stop, E in unit_blocks(D, block_size, A.dtype, A.device):
        AE = A.matmat(E)
        rows = torch.arange(start, stop, device=A.device)
        total = total + AE[rows, rows - start].sum()
    info = {}
    if num_matvecs is not None and num_matvecs != D:
        info["note"] = f"exact trace needs D = {D} products; num_matvecs={num_matvecs} ignored"
    return Estimate(total, torch.zeros_like(total), D, "exact", dof=0, info=info)


__all__ += ["DEFAULT_NUM_MATVECS"]
