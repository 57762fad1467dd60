"""Extreme eigenvalues of symmetric operators: ``curvkit.eigenvalues(A, k, which=...)``.

``method="lanczos"`` (default) is a torch-native thick-restart Lanczos with full
reorthogonalisation (two Gram–Schmidt passes per step) that runs on the operator's device:
it builds a Krylov basis of ``ncv`` vectors, takes the Ritz pairs of the projected matrix,
and, until the ``k`` wanted Ritz pairs have residual ``||A y - theta y|| <= tol * |theta|_max``,
restarts from the wanted (plus half of the remaining) Ritz vectors and the residual
direction (Wu & Simon 2000). Invariant subspaces are continued with a fresh random direction.
A single starting vector sees one direction of a repeated eigenvalue's eigenspace, so a
Krylov space misses its other copies (bar rounding): with ``verify=True`` (default) the
``k`` converged pairs are then locked and Lanczos is run again from a random vector in their
orthogonal complement; a better eigenvalue found there replaces the least wanted one, and
this repeats until the complement holds none. Where nothing was missed that ``k = 1`` solve
stops as soon as its Ritz pair, within its residual, cannot beat the ``k``-th eigenvalue
(from the tenth step; about 10-25 products on the benchmark networks). Lanczos products
are one vector each and sequential; it is SLQ (:func:`curvkit.spectral_density`) that
batches across starting vectors.

``method="scipy"`` runs ``scipy.sparse.linalg.eigsh`` (ARPACK) on ``A.to_scipy()``, float64
on the CPU.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse.linalg
import torch
from torch import Tensor

from curvkit.estimators.probes import resolve_generator, sample_probes
from curvkit.linop import LinearOperator, as_operator

__all__ = ["eigenvalues", "lanczos_tridiag"]

_WHICH = ("LA", "SA", "LM")


def eigenvalues(
    A: LinearOperator | Tensor,
    k: int = 1,
    which: str = "LA",
    generator: torch.Generator | None = None,
    method: str = "lanczos",
    return_eigenvectors: bool = False,
    *,
    ncv: int | None = None,
    tol: float | None = None,
    max_restarts: int = 200,
    verify: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """The ``k`` extreme eigenvalues of a symmetric operator, in ascending order.

    Args:
        A: a symmetric :class:`curvkit.LinearOperator` or dense symmetric ``(D, D)`` tensor.
        k: how many eigenvalues, ``1 <= k <= D`` (``k < D`` for ``"scipy"``).
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic (the most negative
            curvature of a Hessian), ``"LM"`` largest magnitude.
        generator: source of the random starting vector(s) (``None``: a fresh one).
        method: ``"lanczos"`` (torch, on ``A``'s device) or ``"scipy"`` (ARPACK ``eigsh``).
        return_eigenvectors: also return the ``(D, k)`` orthonormal eigenvectors.
        ncv: Lanczos basis size before a restart (default ``min(D, max(2k + 1, k + 20))``).
        tol: relative residual tolerance (default ``eps ** 0.75`` of the dtype for Lanczos,
            machine precision for ARPACK).
        max_restarts: Lanczos restarts before giving up with a warning.
        verify: Lanczos only: search the orthogonal complement of the converged pairs for
            a better eigenvalue (the other copies of a repeated one, which a Krylov space
            from one vector misses); ``False`` saves that solve.

    Returns:
        ``(k,)`` eigenvalues ascending, or ``(eigenvalues, eigenvectors)`` with eigenvectors
        ``(D, k)`` in matching column order.
    """
    op = as_operator(A)
    if op.shape[0] != op.shape[1] or not op.is_symmetric:
        raise ValueError(
            "eigenvalues needs a symmetric operator (declared symmetric=True, or a symmetric "
            f"dense tensor); got {op!r}"
        )
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    D = op.shape[0]
    if not isinstance(k, int) or not 1 <= k <= D:
        raise ValueError(f"k must be an int in [1, D={D}], got {k!r}")
    if method == "lanczos":
        g, _ = resolve_generator(generator)
        vals, vecs = _thick_restart_lanczos(op, k, which, g, ncv, tol, max_restarts)
        if verify:
            vals, vecs = _search_complement(op, k, which, g, ncv, tol, max_restarts, vals, vecs)
    elif method == "scipy":
        vals, vecs = _scipy_eigsh(op, k, which, generator, ncv, tol)
    else:
        raise ValueError(f"unknown method {method!r}; choose 'lanczos' or 'scipy'")
    order = torch.argsort(vals)
    vals, vecs = vals[order], vecs[:, order]
    return (vals, vecs) if return_eigenvectors else vals


def _preference(theta: Tensor, which: str) -> Tensor:
    """Indices of ``theta`` from most to least wanted."""
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def _orthogonalise(w: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Two passes of classical Gram–Schmidt of ``w`` against the columns of ``V``."""
    h = V.T @ w
    w = w - V @ h
    h2 = V.T @ w
    return w - V @ h2, h + h2


def _random_unit(
    D: int, g: torch.Generator, op: LinearOperator, V: Tensor | None, locked: Tensor | None
) -> Tensor:
    v = sample_probes((D, 1), "gaussian", g, op.dtype, op.device)[:, 0]
    if locked is not None:
        v, _ = _orthogonalise(v, locked)
    if V is not None and V.shape[1] > 0:
        v, _ = _orthogonalise(v, V)
    return v / v.norm()


def _search_complement(op, k, which, g, ncv, tol, max_restarts, vals, vecs):
    """The ``k`` wanted pairs, with any better eigenvalue in the orthogonal complement of
    ``vecs`` taken in (see the module docstring); the locked vectors stay orthonormal, as
    each new one is found in their complement."""
    D = op.shape[0]
    margin = (torch.finfo(op.dtype).eps ** 0.75 if tol is None else float(tol)) * float(
        vals.abs().max()
    )
    floor = vals.abs().max()  # the complement's Ritz values are judged on A's scale
    while vecs.shape[1] < D:
        worst = int(_preference(vals, which)[-1])
        bar = (float(vals[worst]), margin)  # the solve may stop once it cannot pass this
        val, vec = _thick_restart_lanczos(op, 1, which, g, ncv, tol, max_restarts, vecs, floor, bar)
        if not _better(float(val[0]), float(vals[worst]), which, margin):
            break  # (by more than the tolerance: a tie would only swap equal eigenvalues)
        vals = torch.cat([vals[:worst], vals[worst + 1 :], val])
        vecs = torch.cat([vecs[:, :worst], vecs[:, worst + 1 :], vec], dim=1)
    return vals, vecs


def _cannot_pass(theta: float, residual: float, which: str, bar: tuple[float, float]) -> bool:
    """Whether the eigenvalue a Ritz pair ``(theta, residual)`` stands for, somewhere within
    ``residual`` of ``theta``, cannot be more wanted than ``bar[0]`` by ``bar[1]``."""
    best_case = {"LA": theta + residual, "SA": theta - residual}.get(which)
    if best_case is None:  # "LM"
        best_case = abs(theta) + residual
    return not _better(best_case, bar[0], which, bar[1])


def _better(a: float, b: float, which: str, margin: float) -> bool:
    """Whether eigenvalue ``a`` is more wanted than ``b`` by more than ``margin``."""
    if which == "LA":
        return a > b + margin
    if which == "SA":
        return a < b - margin
    return abs(a) > abs(b) + margin


def _thick_restart_lanczos(
    op, k, which, g, ncv, tol, max_restarts, locked=None, floor=None, bar=None
):
    """Thick-restart Lanczos for the ``k`` wanted pairs; with ``locked`` (``(D, L)``
    orthonormal), in their orthogonal complement. ``floor``: the scale of ``A`` below which
    its residuals and breakdowns are measured (the complement of a low-rank operator's
    locked pairs is nearly zero, and relative to its own rounding it never converges).
    ``bar = (value, margin)`` (``k = 1``): stop as soon as the eigenvalue the Ritz pair
    stands for (within its residual of the Ritz value) cannot beat ``value`` by ``margin``:
    a search of the complement needs only that answer, not the converged pair."""
    D = op.shape[0] - (0 if locked is None else locked.shape[1])
    eps = torch.finfo(op.dtype).eps
    tiny = torch.finfo(op.dtype).tiny
    tol = eps**0.75 if tol is None else float(tol)
    m = min(D, max(2 * k + 1, k + 20) if ncv is None else max(int(ncv), k + 1))
    n = op.shape[0]
    V = torch.zeros(n, m + 1, dtype=op.dtype, device=op.device)
    T = torch.zeros(m, m, dtype=op.dtype, device=op.device)
    V[:, 0] = _random_unit(n, g, op, None, locked)
    p = 0  # number of locked-in (restart) vectors whose rows of T are set
    anorm = torch.zeros((), dtype=op.dtype, device=op.device)
    if floor is not None:
        anorm = torch.maximum(anorm, torch.as_tensor(floor, dtype=op.dtype, device=op.device))
    for restart in range(max_restarts + 1):
        beta = torch.zeros((), dtype=op.dtype, device=op.device)
        for j in range(p, m):
            w = op.matmat(V[:, j])
            if locked is not None:  # the operator restricted to the complement
                w, _ = _orthogonalise(w, locked)
            w, h = _orthogonalise(w, V[:, : j + 1])
            T[: j + 1, j] = h
            T[j, : j + 1] = h
            beta = w.norm()
            anorm = torch.maximum(anorm, h.abs().max())
            if j + 1 == D:
                beta = beta.new_zeros(())
                V[:, j + 1] = 0
            elif beta <= D * eps * anorm.clamp_min(tiny):  # relative: any scale of A
                beta = beta.new_zeros(())  # invariant subspace: continue with a new direction
                V[:, j + 1] = _random_unit(n, g, op, V[:, : j + 1], locked)
            else:
                V[:, j + 1] = w / beta
            if bar is not None and j >= 9 and j + 1 < m:  # cheap: a (j+1)-square eigh
                th, Uj = torch.linalg.eigh(T[: j + 1, : j + 1])
                i = int(_preference(th, which)[0])
                if _cannot_pass(float(th[i]), float((beta * Uj[-1, i]).abs()), which, bar):
                    return th[i : i + 1], V[:, : j + 1] @ Uj[:, i : i + 1]
        theta, U = torch.linalg.eigh((T + T.T) / 2)
        order = _preference(theta, which)
        wanted = order[:k]
        residual = (beta * U[-1, wanted]).abs()
        scale = torch.maximum(theta.abs().max(), anorm).clamp_min(torch.finfo(op.dtype).tiny)
        if m == D or bool((residual <= tol * scale).all()):
            break
        if bar is not None and _cannot_pass(
            float(theta[wanted[0]]), float(residual[0]), which, bar
        ):
            break
        if restart == max_restarts:
            warnings.warn(
                f"Lanczos did not converge in {max_restarts} restarts: largest relative residual "
                f"{float(residual.max() / scale):.2e} > tol {tol:.1e}; raise max_restarts or ncv",
                RuntimeWarning,
                stacklevel=3,
            )
            break
        p = min(m - 1, k + (m - k) // 2)
        keep = order[:p]
        Vk = V[:, :m] @ U[:, keep]
        V[:, :p] = Vk
        V[:, p] = V[:, m]
        V[:, p + 1 :] = 0
        T.zero_()
        T[:p, :p] = torch.diag(theta[keep])
    vecs = V[:, :m] @ U[:, wanted]
    return theta[wanted], vecs


def _scipy_eigsh(op, k, which, generator, ncv, tol):
    D = op.shape[0]
    if k >= D:
        raise ValueError(f"method='scipy' (ARPACK) needs k < D = {D}; use method='lanczos'")
    g, _ = resolve_generator(generator)
    v0 = sample_probes((D, 1), "gaussian", g, torch.float64, "cpu")[:, 0].numpy()
    vals, vecs = scipy.sparse.linalg.eigsh(
        op.to_scipy(), k=k, which=which, v0=v0, ncv=ncv, tol=0 if tol is None else tol
    )
    vals_t = torch.as_tensor(np.asarray(vals), dtype=op.dtype, device=op.device)
    vecs_t = torch.as_tensor(np.asarray(vecs), dtype=op.dtype, device=op.device)
    return vals_t, vecs_t


def lanczos_tridiag(
    op: LinearOperator, V0: Tensor, num_steps: int, reorthogonalize: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Lanczos on ``P`` starting vectors at once: one ``(D, P)`` product per step.

    Args:
        op: a symmetric operator.
        V0: ``(D, P)`` starting vectors (normalised here).
        num_steps: Lanczos steps (at most ``D``).
        reorthogonalize: full reorthogonalisation of each run against its own basis (costs
            ``num_steps * D * P`` memory).

    Returns:
        ``(alpha, beta, steps)``: ``alpha`` ``(P, num_steps)`` diagonals, ``beta``
        ``(P, num_steps - 1)`` off-diagonals of each run's tridiagonal matrix, and ``steps``
        ``(P,)`` the number of valid steps per run (a run stops early at an invariant
        subspace; its later entries are zero). ``steps.sum()`` is the number of columns
        multiplied by ``op``: a stopped run costs nothing.
    """
    D, P = V0.shape
    num_steps = min(num_steps, D)
    eps = torch.finfo(op.dtype).eps
    v = V0 / V0.norm(dim=0, keepdim=True)
    basis = (
        torch.zeros(num_steps, D, P, dtype=op.dtype, device=op.device) if reorthogonalize else None
    )
    alpha = torch.zeros(P, num_steps, dtype=op.dtype, device=op.device)
    beta = torch.zeros(P, max(num_steps - 1, 0), dtype=op.dtype, device=op.device)
    active = torch.ones(P, dtype=torch.bool, device=op.device)
    steps = torch.zeros(P, dtype=torch.long, device=op.device)
    v_prev = torch.zeros_like(v)
    b_prev = torch.zeros(P, dtype=op.dtype, device=op.device)
    scale = torch.zeros(P, dtype=op.dtype, device=op.device)
    for j in range(num_steps):
        if basis is not None:
            basis[j] = v
        if bool(active.all()):
            w = op.matmat(v)
        else:  # runs that stopped hold zero vectors: multiply only the others
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            w = torch.zeros_like(v).index_copy_(1, idx, op.matmat(v[:, idx]))
        a = (v * w).sum(0)
        alpha[:, j] = torch.where(active, a, torch.zeros_like(a))
        steps += active.long()
        w = w - a * v - b_prev * v_prev
        if basis is not None:
            for _ in range(2):
                coeff = torch.einsum("jdp,dp->jp", basis[: j + 1], w)
                w = w - torch.einsum("jdp,jp->dp", basis[: j + 1], coeff)
        b = w.norm(dim=0)
        scale = torch.maximum(scale, a.abs() + b)
        if j + 1 == num_steps:
            break
        active = active & (b > D * eps * scale.clamp_min(torch.finfo(op.dtype).tiny))
        b = torch.where(active, b, torch.zeros_like(b))
        beta[:, j] = b
        v_prev = v
        v = torch.where(active, w / b.clamp_min(torch.finfo(op.dtype).tiny), torch.zeros_like(w))
        b_prev = b
    return alpha, beta, steps
