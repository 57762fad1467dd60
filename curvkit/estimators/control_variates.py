"""GGN control variates for the Hessian's trace and diagonal, and the exact GGN methods.

``H = G + R`` with ``G`` the generalised Gauss-Newton matrix and ``R = H - G`` the residual.
``"ggn-cv"`` estimates

    tr(H)   = tr(G)   + sum_B tr(R_BB),
    diag(H) = diag(G) + concat_B diag(R_BB),

with ``tr(G)``/``diag(G)`` computed exactly (symmetric factorisation of the output-space
loss Hessian, :meth:`curvkit.GGNOperator.diagonal`) and the residual's diagonal blocks
``R_BB`` probed **one parameter block at a time**: each probe is supported on one layer's
parameter tensor(s) (Rademacher entries there, zero elsewhere), so the large cross-layer
blocks of ``R`` never enter. For piecewise-linear networks (ReLU/max-pool with linear and
convolution layers) every ``R_BB`` is zero and the estimate is exact; for smooth networks its
variance comes only from the within-block part of ``R``.

Cost. A product with ``R`` is one Hessian-vector product (the Hessian of
``<stop_grad(dL/df), f(theta)>``, :class:`curvkit.operators.ggn.ResidualOperator`) and counts
as one matvec. The exact GGN diagonal costs one vector-Jacobian product per output direction
and sample, ``M`` gradient-equivalents in total (``C - 1`` for ``C``-class cross-entropy),
reported in ``Estimate.num_backward``; ``Estimate.cost`` is the sum.

Budget. ``num_matvecs`` residual products are split across blocks by water-filling: every
block gets ``min(2, d_B)`` probes, the rest goes in proportion to the block size (trace,
``allocation="size"``) or evenly (diagonal, ``allocation="equal"``); a block whose share
reaches its dimension ``d_B`` is done exactly with ``d_B`` unit probes (zero variance) and
its surplus goes to the others. Integer rounding is by largest remainder; probes that
cannot be used (every block exact) are reported in ``info["unused_matvecs"]``. The split is
in ``info["blocks"]``.

Error bars. Per block the Hutchinson/BKS sample variance; the trace's standard error is the
root of the summed block variances with Welch-Satterthwaite degrees of freedom (rounded
down) for the t quantile; the diagonal's per-entry standard errors use the smallest block
``m_B - 1`` as ``dof`` (conservative). These are exact sampling-theory estimates (independent
probes), not heuristics.

Also registered here (all need a curvature operator, not a dense matrix):

``"ggn-exact"`` (trace, diagonal)
    Exact GGN diagonal/trace of a :class:`curvkit.GGNOperator` by the generic per-sample
    VJP path; any architecture.
``"ggn-mc"`` (trace, diagonal)
    Monte-Carlo factorisation of a :class:`curvkit.GGNOperator`: ``num_matvecs`` is read as
    the number of Rademacher combinations per sample (``mc_samples``, default 8), each an
    unbiased replicate; costs ``mc_samples`` gradient-equivalents (``num_backward``).
``"ggn-backpack"`` (trace, diagonal)
    BackPACK ``DiagGGNExact`` on a deep copy of the model (supported layers only).
``"hessian-backpack"`` (trace, diagonal)
    BackPACK ``DiagHessian`` of a :class:`curvkit.HessianOperator` on a deep copy of the
    model (supported layers only: no BatchNorm, LayerNorm or attention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from curvkit.estimators.estimate import Estimate
from curvkit.linop import LinearOperator
from curvkit.operators.ggn import GGNOperator, ResidualOperator, _trace_of_diagonal
from curvkit.operators.hessian import HessianOperator

__all__ = [
    "ggn_cv_diagonal",
    "ggn_cv_trace",
    "parameter_blocks",
    "register_ggn_methods",
]


# ---------------------------------------------------------------------- blocks
def parameter_blocks(
    param_names: Sequence[str], blocks: str | Sequence[Sequence[int]] = "layer"
) -> list[tuple[str, list[int]]]:
    """Partition parameter indices into probe blocks.

    Args:
        param_names: names of the parameters (as in ``model.named_parameters()``).
        blocks: ``"layer"`` (default: tensors of the same module, e.g. a layer's weight and
            bias, form one block), ``"param"`` (one block per tensor), ``"all"`` (one block:
            full-vector probes of ``R``) or an explicit partition as a sequence of index
            lists.

    Returns:
        ``(name, indices)`` per block, in parameter order.
    """
    n = len(param_names)
    if blocks == "all":
        return [("all", list(range(n)))]
    if blocks == "param":
        return [(name, [i]) for i, name in enumerate(param_names)]
    if blocks == "layer":
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(param_names):
            owner = name.rsplit(".", 1)[0] if "." in name else name
            groups.setdefault(owner, []).append(i)
        return list(groups.items())
    if isinstance(blocks, str):
        raise ValueError(
            f"unknown blocks {blocks!r}; choose 'layer', 'param', 'all' or index lists"
        )
    parts = [[int(i) for i in part] for part in blocks]
    flat = sorted(i for part in parts for i in part)
    if flat != list(range(n)) or any(not part for part in parts):
        raise ValueError(
            f"blocks must partition the parameter indices 0..{n - 1} into non-empty lists; "
            f"got {parts}"
        )
    return [("+".join(param_names[i] for i in part), part) for part in parts]


def _allocate(sizes: list[int], weights: list[float], budget: int) -> tuple[list[int], int]:
    """Water-filling: probes per block, capped at the block size; returns (probes, unused)."""
    probes = [min(2, d) for d in sizes]
    left = budget - sum(probes)
    while left > 0:
        open_ = [i for i, d in enumerate(sizes) if probes[i] < d]
        if not open_:
            break
        total_w = sum(weights[i] for i in open_)
        shares = {i: left * weights[i] / total_w for i in open_}
        add = {i: min(int(math.floor(shares[i])), sizes[i] - probes[i]) for i in open_}
        given = sum(add.values())
        if given == 0:  # hand out the remainder by largest fractional share
            for i in sorted(open_, key=lambda i: shares[i] - math.floor(shares[i]), reverse=True):
                if left == 0:
                    break
                if probes[i] < sizes[i]:
                    probes[i] += 1
                    left -= 1
            continue
        for i, a in add.items():
            probes[i] += a
        left -= given
    return probes, max(left, 0)


# ---------------------------------------------------------------------- core
def _check_hessian(A: LinearOperator, method: str) -> HessianOperator:
    if not isinstance(A, HessianOperator):
        raise TypeError(
            f"method {method!r} needs a curvkit.HessianOperator (it splits H = G + R with the "
            f"matching GGN), got {type(A).__name__}. Build ck.HessianOperator(model, loss_fn, "
            "data) or choose a generic method such as 'hutchinson' / 'xdiag'."
        )
    if A.couples_samples:
        raise ValueError(
            f"method {method!r} does not apply to models with BatchNorm in training mode: they "
            "couple the samples of a batch, so the per-layer blocks of R = H - G are not "
            "small. Use model.eval() if eval-mode curvature is what you want, or a generic "
            "method such as 'xtrace' / 'xdiag'."
        )
    return A


def _ggn_and_residual(H: HessianOperator) -> tuple[GGNOperator, ResidualOperator]:
    kw = {"reduction": H.reduction, "check_deterministic": False}
    G = GGNOperator(H.model, H.loss_fn, H.batches.data, H.params, **kw)
    R = ResidualOperator(H.model, H.loss_fn, H.batches.data, H.params, **kw)
    return G, R


def _ggn_diagonal(G: GGNOperator, ggn_method: str, given: Estimate | Tensor | None) -> Estimate:
    if given is not None:  # reuse a diagonal computed once (e.g. across seeds)
        if isinstance(given, Estimate) and (given.dof != 0 or bool((given.stderr != 0).any())):
            raise ValueError(
                f"ggn_diagonal must be the exact GGN diagonal, got a {given.method!r} estimate "
                "with a standard error, which the control-variate estimate would drop; pass "
                "G.diagonal('exact') (or ggn_method='exact')"
            )
        value = given.value if isinstance(given, Estimate) else given
        if value.shape != (G.shape[0],):
            raise ValueError(
                f"ggn_diagonal must have shape ({G.shape[0]},), got {tuple(value.shape)}"
            )
        cost = given.num_backward if isinstance(given, Estimate) else 0.0
        return Estimate(value.to(G.dtype), torch.zeros_like(value), 0, "given", 0, cost)
    if ggn_method not in ("exact", "backpack"):
        raise ValueError(f"unknown ggn_method {ggn_method!r}; choose 'exact' or 'backpack'")
    return G.diagonal(ggn_method)


def _residual_pass(
    H: HessianOperator,
    R: ResidualOperator,
    num_matvecs: int | None,
    generator: torch.Generator | None,
    blocks: str | Sequence[Sequence[int]],
    allocation: str,
    method: str,
) -> tuple[list[dict], Tensor, Tensor, dict]:
    """Probe ``R`` block by block; returns per-block records and the probes ``V``, ``R V``."""
    from curvkit.estimators.probes import resolve_generator

    if allocation not in ("size", "equal"):
        raise ValueError(f"unknown allocation {allocation!r}; choose 'size' or 'equal'")
    parts = parameter_blocks(H.param_names, blocks)
    offsets = [0]
    for p in H.params:
        offsets.append(offsets[-1] + p.numel())
    rows = [torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in idx]) for _, idx in parts]
    sizes = [int(r.numel()) for r in rows]
    minimum = sum(min(2, d) for d in sizes)
    if num_matvecs is None:
        num_matvecs = max(minimum, 100)
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, int):
        raise TypeError(f"num_matvecs must be an int or None, got {type(num_matvecs).__name__}")
    if num_matvecs < minimum:
        raise ValueError(
            f"method {method!r} needs num_matvecs >= {minimum} (two residual probes per "
            f"parameter block, {len(parts)} blocks); got {num_matvecs}. Raise the budget or "
            "pass blocks=[[...], ...] with fewer, larger blocks."
        )
    gen, seed = resolve_generator(generator)
    weights = [float(d) for d in sizes] if allocation == "size" else [1.0] * len(sizes)
    probes, unused = _allocate(sizes, weights, num_matvecs)
    used = sum(probes)
    D = H.shape[0]
    V = torch.zeros(D, used, dtype=H.dtype, device=H.device)
    records, col = [], 0
    for (name, _), r, d, m in zip(parts, rows, sizes, probes):
        exact = m >= d
        if exact:
            V[r, torch.arange(col, col + d)] = 1
        else:
            signs = torch.randint(0, 2, (d, m), generator=gen, device=gen.device)
            V[r, col : col + m] = (2 * signs - 1).to(device=H.device, dtype=H.dtype)
        records.append({"name": name, "size": d, "probes": m, "exact": exact, "cols": (col, m)})
        col += m
    RV = R.matmat(V) if used else V
    info = {
        "requested_matvecs": num_matvecs,
        "unused_matvecs": unused,
        "allocation": allocation,
    }
    if seed is not None:
        info["seed"] = seed
    for rec, r in zip(records, rows):
        rec["rows"] = r
    return records, V, RV, info


def _public_blocks(records: list[dict]) -> list[dict]:
    return [{k: rec[k] for k in ("name", "size", "probes", "exact")} for rec in records]


def ggn_cv_trace(
    A: LinearOperator,
    num_matvecs: int | None = None,
    generator: torch.Generator | None = None,
    *,
    blocks: str | Sequence[Sequence[int]] = "layer",
    allocation: str = "size",
    ggn_method: str = "exact",
    ggn_diagonal: Estimate | Tensor | None = None,
) -> Estimate:
    """``tr(H)`` as exact ``tr(G)`` plus block-probed ``tr(R)`` (see the module docstring).

    Args:
        A: a :class:`curvkit.HessianOperator` (no train-mode BatchNorm).
        num_matvecs: products with ``R`` (``None``: 100, at least two per block).
        generator: source of the Rademacher probes.
        blocks: ``"layer"``, ``"param"``, ``"all"`` or an explicit partition
            (:func:`parameter_blocks`).
        allocation: ``"size"`` (probes in proportion to block size) or ``"equal"``.
        ggn_method: ``"exact"`` (generic per-sample VJPs) or ``"backpack"``.
        ggn_diagonal: a precomputed exact ``diag(G)`` (``Estimate`` or ``(D,)`` tensor) to
            reuse, e.g. across seeds; its ``num_backward`` is reported again (the cost of one
            estimate), a plain tensor counts as free.

    Returns:
        A 0-d :class:`Estimate`: ``num_matvecs`` residual products, ``num_backward`` the exact
        GGN trace's cost; ``info`` holds ``ggn_trace``, ``residual_trace``, ``blocks``.
    """
    H = _check_hessian(A, "ggn-cv")
    G, R = _ggn_and_residual(H)
    records, V, RV, info = _residual_pass(
        H, R, num_matvecs, generator, blocks, allocation, "ggn-cv"
    )
    g = _ggn_diagonal(G, ggn_method, ggn_diagonal)
    res_value = torch.zeros((), dtype=H.dtype, device=H.device)
    var_terms: list[tuple[Tensor, int]] = []
    for rec in records:
        c0, m = rec["cols"]
        rows = rec["rows"]
        samples = (V[rows, c0 : c0 + m] * RV[rows, c0 : c0 + m]).sum(0)  # (m,)
        if rec["exact"]:
            res_value = res_value + samples.sum()
        else:
            res_value = res_value + samples.mean()
            var_terms.append((samples.var(unbiased=True) / m, m))
    var = sum((v for v, _ in var_terms), torch.zeros((), dtype=H.dtype, device=H.device))
    stderr = var.sqrt()
    if not var_terms:
        dof = 0
    elif float(var) == 0.0:
        dof = min(m for _, m in var_terms) - 1
    else:
        denom = sum(float(v) ** 2 / (m - 1) for v, m in var_terms)
        dof = max(1, int(math.floor(float(var) ** 2 / denom))) if denom > 0 else 1
    ggn_trace = g.value.sum()
    info.update(
        ggn_trace=float(ggn_trace),
        residual_trace=float(res_value),
        ggn_method=g.method,
        ggn_num_backward=g.num_backward,
        blocks=_public_blocks(records),
    )
    return Estimate(
        ggn_trace + res_value,
        stderr,
        sum(rec["probes"] for rec in records),
        "ggn-cv",
        dof=dof,
        num_backward=g.num_backward,
        info=info,
    )


def ggn_cv_diagonal(
    A: LinearOperator,
    num_matvecs: int | None = None,
    generator: torch.Generator | None = None,
    *,
    blocks: str | Sequence[Sequence[int]] = "layer",
    allocation: str = "equal",
    ggn_method: str = "exact",
    ggn_diagonal: Estimate | Tensor | None = None,
) -> Estimate:
    """``diag(H)`` as exact ``diag(G)`` plus block-probed ``diag(R)`` (BKS estimator per block).

    Arguments as :func:`ggn_cv_trace` (default ``allocation="equal"``: every entry's error
    depends only on its own block's probe count). Returns a ``(D,)`` :class:`Estimate` with
    per-entry standard errors (zero on blocks done exactly) and ``dof`` the smallest
    ``m_B - 1`` over stochastic blocks.
    """
    H = _check_hessian(A, "ggn-cv")
    G, R = _ggn_and_residual(H)
    records, V, RV, info = _residual_pass(
        H, R, num_matvecs, generator, blocks, allocation, "ggn-cv"
    )
    g = _ggn_diagonal(G, ggn_method, ggn_diagonal)
    res = torch.zeros(H.shape[0], dtype=H.dtype, device=H.device)
    stderr = torch.zeros_like(res)
    dofs = []
    for rec in records:
        c0, m = rec["cols"]
        rows = rec["rows"]
        samples = V[rows, c0 : c0 + m] * RV[rows, c0 : c0 + m]  # (d, m)
        if rec["exact"]:
            res[rows] = samples.sum(1)  # unit probes: one non-zero per row
        else:
            res[rows] = samples.mean(1)
            stderr[rows] = samples.std(1, unbiased=True) / math.sqrt(m)
            dofs.append(m - 1)
    info.update(
        ggn_method=g.method,
        ggn_num_backward=g.num_backward,
        blocks=_public_blocks(records),
    )
    return Estimate(
        g.value + res,
        stderr,
        sum(rec["probes"] for rec in records),
        "ggn-cv",
        dof=min(dofs) if dofs else 0,
        num_backward=g.num_backward,
        info=info,
    )


# ---------------------------------------------------------------------- GGN-only methods
def _check_ggn(A: LinearOperator, method: str) -> GGNOperator:
    if isinstance(A, GGNOperator):
        return A
    hint = (
        " A is a Hessian: build ck.GGNOperator(model, loss_fn, data) for the GGN, or use "
        "method='ggn-cv' / 'hessian-backpack' for the Hessian."
        if isinstance(A, HessianOperator)
        else ""
    )
    raise TypeError(f"method {method!r} needs a curvkit.GGNOperator, got {type(A).__name__}.{hint}")


def _mc_samples(num_matvecs: int | None, mc_samples: int | None) -> int:
    if mc_samples is not None:
        return int(mc_samples)
    return 8 if num_matvecs is None else int(num_matvecs)


def ggn_exact_diagonal(A, num_matvecs=None, generator=None, *, path: str = "auto") -> Estimate:
    """Exact ``diag(G)`` of a :class:`curvkit.GGNOperator` (``num_matvecs`` is not used)."""
    return _check_ggn(A, "ggn-exact").diagonal("exact", path=path)


def ggn_exact_trace(A, num_matvecs=None, generator=None, *, path: str = "auto") -> Estimate:
    """Exact ``tr(G)`` of a :class:`curvkit.GGNOperator` (``num_matvecs`` is not used)."""
    return _check_ggn(A, "ggn-exact").trace("exact", path=path)


def ggn_mc_diagonal(
    A, num_matvecs=None, generator=None, *, mc_samples: int | None = None, path: str = "auto"
) -> Estimate:
    """Monte-Carlo ``diag(G)``; ``num_matvecs`` (or ``mc_samples``) samples per data point."""
    G = _check_ggn(A, "ggn-mc")
    return G.diagonal(
        "mc", mc_samples=_mc_samples(num_matvecs, mc_samples), generator=generator, path=path
    )


def ggn_mc_trace(
    A, num_matvecs=None, generator=None, *, mc_samples: int | None = None, path: str = "auto"
) -> Estimate:
    """Monte-Carlo ``tr(G)``; ``num_matvecs`` (or ``mc_samples``) samples per data point."""
    G = _check_ggn(A, "ggn-mc")
    return G.trace(
        "mc", mc_samples=_mc_samples(num_matvecs, mc_samples), generator=generator, path=path
    )


def ggn_backpack_diagonal(A, num_matvecs=None, generator=None) -> Estimate:
    """BackPACK ``DiagGGNExact`` of a :class:`curvkit.GGNOperator`."""
    from curvkit.operators.backpack import backpack_diagonal

    return backpack_diagonal(_check_ggn(A, "ggn-backpack"), "ggn")


def ggn_backpack_trace(A, num_matvecs=None, generator=None) -> Estimate:
    """Sum of BackPACK ``DiagGGNExact`` of a :class:`curvkit.GGNOperator`."""
    return _trace_of_diagonal(ggn_backpack_diagonal(A))


def hessian_backpack_diagonal(A, num_matvecs=None, generator=None) -> Estimate:
    """BackPACK ``DiagHessian`` of a :class:`curvkit.HessianOperator`."""
    from curvkit.operators.backpack import backpack_diagonal

    if not isinstance(A, HessianOperator):
        raise TypeError(
            f"method 'hessian-backpack' needs a curvkit.HessianOperator, got {type(A).__name__}"
        )
    return backpack_diagonal(A, "hessian")


def hessian_backpack_trace(A, num_matvecs=None, generator=None) -> Estimate:
    """Sum of BackPACK ``DiagHessian`` of a :class:`curvkit.HessianOperator`."""
    return _trace_of_diagonal(hessian_backpack_diagonal(A))


# ---------------------------------------------------------------------- registration
def register_ggn_methods() -> None:
    """Add this module's methods to ``TRACE_METHODS`` and ``DIAGONAL_METHODS``."""
    from curvkit.estimators.trace import TRACE_METHODS

    TRACE_METHODS.update(
        {
            "ggn-cv": ggn_cv_trace,
            "ggn-exact": ggn_exact_trace,
            "ggn-mc": ggn_mc_trace,
            "ggn-backpack": ggn_backpack_trace,
            "hessian-backpack": hessian_backpack_trace,
        }
    )
    from curvkit.estimators.diagonal import DIAGONAL_METHODS

    DIAGONAL_METHODS.update(
        {
            "ggn-cv": ggn_cv_diagonal,
            "ggn-exact": ggn_exact_diagonal,
            "ggn-mc": ggn_mc_diagonal,
            "ggn-backpack": ggn_backpack_diagonal,
            "hessian-backpack": hessian_backpack_diagonal,
        }
    )


register_ggn_methods()
