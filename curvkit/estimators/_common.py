"""Helpers shared by the estimators: replicate-batched products, budgets, exact sweeps.

The stochastic kernels work on probe blocks of shape ``(R, D, K)``: ``R`` independent
replicates of one estimator run, each with ``K`` probes. All replicates go through the
operator in *one* product with ``R * K`` columns, so many independent runs (for calibration
studies) cost one big matmat. A public call is the case ``R = 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from curvkit.estimators.estimate import Estimate
from curvkit.linop import LinearOperator, as_operator

DEFAULT_NUM_MATVECS = 100
"""Budget a stochastic estimator uses when ``num_matvecs`` is ``None``."""


def to_square_operator(A: LinearOperator | Tensor, what: str) -> LinearOperator:
    """``as_operator(A)``, checked to be square."""
    op = as_operator(A)
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"{what} needs a square operator, got shape {op.shape}")
    if op.shape[0] == 0:
        raise ValueError(f"{what} needs an operator with at least one row, got shape (0, 0)")
    return op


def _replicates_as_columns(V: Tensor) -> Tensor:
    """``(R, D, K)`` -> ``(D, R * K)``: every replicate's probes side by side (a view for
    the column-major blocks ``sample_probes`` draws)."""
    R, D, K = V.shape
    return V.permute(1, 0, 2).reshape(D, R * K)


def batched_matmat(op: LinearOperator, V: Tensor, adjoint: bool = False) -> Tensor:
    """``A @ V[r]`` for every replicate ``r`` of a ``(R, D, K)`` block, in one product."""
    R, _, K = V.shape
    flat = _replicates_as_columns(V)
    out = op.rmatmat(flat) if adjoint else op.matmat(flat)
    return out.reshape(out.shape[0], R, K).permute(1, 0, 2)


def batched_quadratic_form(op: LinearOperator, V: Tensor, group_size: int = 1) -> Tensor:
    """``v^T A v`` for every probe of every replicate of a ``(R, D, K)`` block: ``(R, K)``;
    with ``group_size`` (dividing ``K``), the sums over groups of consecutive probes:
    ``(R, K // group_size)``."""
    R, _, K = V.shape
    return op.quadratic_form(_replicates_as_columns(V), group_size).reshape(R, K // group_size)


def check_budget(num_matvecs: int | None, default: int = DEFAULT_NUM_MATVECS) -> int:
    """Validate ``num_matvecs`` (``None``: the default budget)."""
    if num_matvecs is None:
        return default
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, int):
        raise TypeError(f"num_matvecs must be an int or None, got {type(num_matvecs).__name__}")
    if num_matvecs < 1:
        raise ValueError(f"num_matvecs must be at least 1, got {num_matvecs}")
    return num_matvecs


def check_replicates(replicates: int | None) -> int:
    if replicates is None:
        return 1
    if not isinstance(replicates, int) or replicates < 1:
        raise ValueError(f"replicates must be a positive int, got {replicates!r}")
    return replicates


def need_budget(method: str, num_matvecs: int, minimum: int, why: str) -> None:
    if num_matvecs < minimum:
        raise ValueError(
            f"method {method!r} needs num_matvecs >= {minimum} ({why}); got {num_matvecs}. "
            "Raise the budget or use method='hutchinson'."
        )


def mean_stderr(samples: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """Sample mean and its standard error ``std / sqrt(n)`` along ``dim``.

    With a single sample the standard error is ``inf`` (no variance information).
    """
    n = samples.shape[dim]
    mean = samples.mean(dim)
    if n < 2:
        return mean, torch.full_like(mean, float("inf"))
    return mean, samples.std(dim, correction=1) / n**0.5


def unit_blocks(
    D: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> Iterator[tuple[int, int, Tensor]]:
    """Yield ``(start, stop, E)`` with ``E`` the ``(D, stop - start)`` unit-vector block."""
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    for start in range(0, D, block_size):
        stop = min(start + block_size, D)
        E = torch.zeros(D, stop - start, dtype=dtype, device=device)
        E[torch.arange(start, stop, device=device), torch.arange(stop - start, device=device)] = 1
        yield start, stop, E


def exact_diagonal_sweep(op: LinearOperator, block_size: int = 256) -> Tensor:
    """``diag(A)`` from ``D`` unit probes pushed through in blocks of ``block_size``."""
    D = op.shape[1]
    out = torch.empty(D, dtype=op.dtype, device=op.device)
    for start, stop, E in unit_blocks(D, block_size, op.dtype, op.device):
        AE = op.matmat(E)
        rows = torch.arange(start, stop, device=op.device)
        out[start:stop] = AE[rows, rows - start]
    return out


def squeeze_replicates(value: Tensor, replicates: int | None) -> Tensor:
    """Drop the replicate dimension for a plain (``replicates=None``) call."""
    return value[0] if replicates is None else value


def solve_upper_transposed_identity(Rm: Tensor) -> Tensor:
    """``R^{-T}`` for a batch of upper-triangular ``R``: columns ``x_i`` with
    ``R^T x_i = e_i``. Used for the leave-one-out directions of XTrace/XDiag/XNysTrace."""
    eye = torch.eye(Rm.shape[-1], dtype=Rm.dtype, device=Rm.device).expand_as(Rm)
    return torch.linalg.solve_triangular(Rm.mT, eye, upper=False)


def finish_estimate(
    value: Tensor,
    stderr: Tensor,
    num_matvecs: int,
    method: str,
    dof: int | None,
    replicates: int | None,
    info: dict,
    seed: int | None,
) -> Estimate:
    """An ``Estimate`` with replicate axes squeezed and the seed/replicates noted in info."""
    if seed is not None:
        info["seed"] = seed
    if replicates is not None:
        info["replicates"] = replicates
    return Estimate(
        squeeze_replicates(value, replicates),
        squeeze_replicates(stderr, replicates),
        num_matvecs,
        method,
        dof=dof,
        info=info,
    )


EstimatorMethod = Callable[..., Estimate]


def method_registrar(
    registry: dict[str, EstimatorMethod], what: str
) -> Callable[..., Callable[[EstimatorMethod], EstimatorMethod]]:
    """A decorator factory that registers ``fn`` in ``registry`` under a name and aliases."""

    def register(name: str, *aliases: str) -> Callable[[EstimatorMethod], EstimatorMethod]:
        def deco(fn: EstimatorMethod) -> EstimatorMethod:
            for key in (name, *aliases):
                if key == "auto":
                    raise ValueError(f"'auto' is reserved and cannot name a {what} method")
                registry[key] = fn
            return fn

        return deco

    register.__doc__ = f"Decorator: register ``fn`` as a {what} method under ``name`` and aliases."
    return register


def lookup_method(registry: dict[str, EstimatorMethod], method: str, what: str) -> EstimatorMethod:
    """The registered method ``method``, or a ``ValueError`` listing the known names."""
    fn = registry.get(method)
    if fn is None:
        raise ValueError(
            f"unknown {what} method {method!r}; known methods: 'auto', "
            + ", ".join(repr(k) for k in sorted(registry))
        )
    return fn
