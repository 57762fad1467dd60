"""Shared machinery of curvature operators built from ``(model, loss_fn, data)``.

A ``CurvatureOperator`` owns the data pass: it iterates over batches, weights each batch's
loss so the sum equals the loss of the concatenated data, leaves the model exactly as it
found it (buffers, RNG state, ``.grad``), and hands each batch to the subclass's
``_batch_matmat``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.autodiff import check_finite
from curvkit.data import Batches, loss_reduction, move_to
from curvkit.linop import LinearOperator

__all__ = ["CurvatureOperator", "preserved_state", "resolve_params"]


def resolve_params(
    model: nn.Module, params: Sequence[Tensor] | None
) -> tuple[list[Tensor], list[str]]:
    """The parameters to differentiate and their names in ``model``.

    ``None`` means every model parameter that requires grad. An explicit list must hold
    parameters of ``model`` that require grad (a subset gives that block of the curvature).
    """
    named = [(n, p) for n, p in model.named_parameters()]
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError(
                "the model has no parameters that require grad; enable them with "
                "p.requires_grad_(True) or pass params explicitly"
            )
        return [p for _, p in chosen], [n for n, _ in chosen]
    params = list(params)
    if not params:
        raise ValueError("params is empty; pass None for all model parameters")
    by_id = {id(p): n for n, p in named}
    names = []
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, not a tensor")
        if id(p) not in by_id:
            raise ValueError(
                f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of the model; pass "
                "tensors from model.parameters()"
            )
        if not p.requires_grad:
            raise ValueError(
                f"params[{i}] ({by_id[id(p)]}) does not require grad; call "
                "p.requires_grad_(True) or leave it out of params"
            )
        names.append(by_id[id(p)])
    if len(set(map(id, params))) != len(params):
        raise ValueError("params lists the same tensor twice")
    return params, names


@contextlib.contextmanager
def preserved_state(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Restore the model's buffers and the global RNG state on exit.

    Train-mode BatchNorm updates its running statistics in every forward pass, and dropout
    draws from the global generator; a curvature product must change neither.
    """
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)


def _contains_train_batchnorm(model: nn.Module) -> bool:
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()
    )


class CurvatureOperator(LinearOperator):
    """Base of ``HessianOperator`` and ``GGNOperator``.

    Args:
        model: the network; called as ``model(X)``.
        loss_fn: ``loss_fn(model(X), y)`` returning a scalar reduced by mean or sum.
        data: one ``(X, y)`` batch or a re-iterable of batches (list, ``DataLoader``).
        params: parameters to differentiate (default: all that require grad).
        reduction: ``"mean"``/``"sum"``; read from ``loss_fn.reduction`` when not given.
        check_deterministic: run the first batch through the model twice at construction
            and raise if the outputs differ (dropout in train mode); ``False`` skips it.
        psd: declared positive semi-definiteness.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Tensor], Tensor],
        data: Any,
        params: Sequence[Tensor] | None = None,
        *,
        reduction: str | None = None,
        check_deterministic: bool = True,
        psd: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self.params, self.param_names = resolve_params(model, params)
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                f"all params must share one dtype and device, got {dtypes} and {devices}"
            )
        self.reduction = loss_reduction(loss_fn, reduction)
        self.batches = Batches(data, self.reduction)
        dim = sum(p.numel() for p in self.params)
        super().__init__(
            (dim, dim),
            self.params[0].dtype,
            self.params[0].device,
            symmetric=True,
            psd=psd,
            param_shapes=[p.shape for p in self.params],
        )
        self.couples_samples = _contains_train_batchnorm(model)
        if check_deterministic:
            self._check_deterministic()

    # ------------------------------------------------------------------ data pass
    def _prepare(self, X, y):
        return move_to(X, self.device, self.dtype), move_to(y, self.device, self.dtype)

    def _iter_batches(self) -> Iterator[tuple[Any, Tensor, float]]:
        for X, y, weight in self.batches:
            X, y = self._prepare(X, y)
            yield X, y, weight

    def _check_deterministic(self) -> None:
        X, y = self._prepare(*self.batches.first())
        with preserved_state(self.model, self.device), torch.no_grad():
            first = self.model(X)
            second = self.model(X)
        same = (
            torch.equal(first, second)
            if isinstance(first, Tensor)
            else all(torch.equal(a, b) for a, b in zip(first, second))
        )
        if not same:
            raise RuntimeError(
                "the model's output changed between two identical forward passes, so its "
                "curvature is not well defined (dropout or another random layer in training "
                "mode?). Call model.eval() before building the operator, or pass "
                "check_deterministic=False if the randomness is intended."
            )

    def _batch_matmat(self, X, y, weight: float, probes: list[Tensor]) -> list[Tensor]:
        """Product on one batch; ``probes[i]`` has shape ``(K, *params[i].shape)``."""
        raise NotImplementedError

    def _matmat(self, V: Tensor) -> Tensor:
        K = V.shape[1]
        # (D, K) -> per-parameter (K, *shape), the layout autograd's batched mode wants
        probes = [piece.movedim(-1, 0).contiguous() for piece in self.unflatten(V)]
        total: list[Tensor] | None = None
        with preserved_state(self.model, self.device):
            for X, y, weight in self._iter_batches():
                out = self._batch_matmat(X, y, weight, probes)
                total = out if total is None else [t.add_(o) for t, o in zip(total, out)]
        result = torch.cat([t.reshape(K, -1) for t in total], dim=1).T.detach()
        check_finite(result, f"the {type(self).__name__} product")
        return result
