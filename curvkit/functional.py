"""Hessian products of an already-computed scalar: the seed's ``hvp`` and row-sum utilities."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from curvkit.autodiff import check_finite, gradient, second_backward
from curvkit.linop import flatten_tensors

__all__ = ["hvp", "hessian_row_sum", "hessian_block_row_sums"]


def _check_f_and_params(f: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    if not isinstance(f, Tensor):
        raise TypeError(f"f must be a scalar torch.Tensor, got {type(f).__name__}")
    if f.numel() != 1:
        raise ValueError(
            f"f must be a scalar (one element), got shape {tuple(f.shape)}; reduce it first, "
            "e.g. f.sum() or f.mean()"
        )
    if not f.requires_grad:
        raise ValueError(
            "f carries no autograd graph (requires_grad=False); compute it from params "
            "that require grad, outside torch.no_grad()"
        )
    check_finite(f.detach(), "f")
    params = list(params)
    if not params:
        raise ValueError("params is empty")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, not a tensor")
        if not p.requires_grad:
            raise ValueError(
                f"params[{i}] (shape {tuple(p.shape)}) does not require grad; call "
                "p.requires_grad_(True) before computing f"
            )
    return params


def hvp(f: Tensor, params: Sequence[Tensor], v: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Hessian-vector product ``H v`` of the scalar ``f`` w.r.t. ``params``.

    Args:
        f: scalar tensor with a graph to ``params``.
        params: tensors that require grad (leaves or ``nn.Parameter``s).
        v: tensors shaped like ``params``.

    Returns:
        A tuple of tensors shaped like ``params``. ``f``'s graph stays usable, so several
        products on the same ``f`` work.
    """
    params = _check_f_and_params(f, params)
    v = list(v)
    if len(v) != len(params) or any(
        not isinstance(vi, Tensor) or vi.shape != p.shape for vi, p in zip(v, params)
    ):
        raise ValueError(
            "v must be a list of tensors shaped like params: expected "
            f"{[tuple(p.shape) for p in params]}, got "
            f"{[tuple(getattr(vi, 'shape', ())) for vi in v]}"
        )
    with torch.enable_grad():
        grads = gradient(f, params, create_graph=True)
        out = second_backward(grads, params, [vi.to(p) for vi, p in zip(v, params)])
    return tuple(o.detach() for o in out)


def hessian_row_sum(f: Tensor, params: Sequence[Tensor]) -> Tensor:
    """``H @ 1``: the 1-D tensor of Hessian row sums over the flattened ``params`` (in order)."""
    params = _check_f_and_params(f, params)
    return flatten_tensors(hvp(f, params, [torch.ones_like(p) for p in params]))


def hessian_block_row_sums(f: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Row sums of each diagonal block, ``H_ii @ 1``, shaped like ``params``.

    One second backward per parameter tensor through one shared gradient graph.
    """
    params = _check_f_and_params(f, params)
    with torch.enable_grad():
        grads = gradient(f, params, create_graph=True)
        out = []
        for i in range(len(params)):
            probe = [
                torch.ones_like(q) if j == i else torch.zeros_like(q) for j, q in enumerate(params)
            ]
            out.append(second_backward(grads, params, probe)[i].detach())
    return tuple(out)
