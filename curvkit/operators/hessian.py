"""The Hessian of a model's loss over a dataset, as a matrix-free operator."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.autodiff import BACKENDS, batch_hvp, differentiable_attention
from curvkit.operators.base import CurvatureOperator

__all__ = ["HessianOperator"]


class HessianOperator(CurvatureOperator):
    """``H = d^2 L / d theta^2`` of the loss ``L`` over all of ``data``.

    Over several batches the operator equals the Hessian of the concatenated batch, for
    mean- and sum-reduced losses and uneven batch sizes. ``H @ V`` with ``K`` columns builds
    each batch's gradient graph once and pushes all ``K`` columns through it.

    Train-mode BatchNorm couples the samples of a batch: there the operator is the weighted
    sum of per-batch Hessians, each with its own batch statistics (what the training loss
    sees), not the Hessian of one concatenated batch. Running statistics are never changed.

    Args:
        model, loss_fn, data, params, reduction, check_deterministic: see
            :class:`curvkit.operators.base.CurvatureOperator`.
        backend: ``"auto"`` or one of ``"double-backward"``, ``"batched"``,
            ``"forward-over-reverse"`` (see :mod:`curvkit.autodiff`). The resolved choice
            is ``self.backend``.
        max_probes_per_chunk: most probes a batched backend pushes through at once.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Tensor], Tensor],
        data: Any,
        params: Sequence[Tensor] | None = None,
        *,
        backend: str = "auto",
        max_probes_per_chunk: int = 16,
        reduction: str | None = None,
        check_deterministic: bool = True,
    ) -> None:
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {BACKENDS}")
        if max_probes_per_chunk < 1:
            raise ValueError("max_probes_per_chunk must be at least 1")
        super().__init__(
            model,
            loss_fn,
            data,
            params,
            reduction=reduction,
            check_deterministic=check_deterministic,
        )
        self.requested_backend = backend
        self.backend = "double-backward" if backend == "auto" else backend
        self.max_probes_per_chunk = max_probes_per_chunk
        self.backend_fallback_reason: str | None = None

    def _batch_matmat(self, X, y, weight: float, probes: list[Tensor]) -> list[Tensor]:
        with torch.enable_grad(), differentiable_attention():
            try:
                out = self._run_backend(X, y, weight, probes)
            except RuntimeError as err:
                if self.backend != "forward-over-reverse":
                    raise
                # torch.func transforms reject some models (in-place buffer updates of
                # train-mode BatchNorm, ops without forward-mode rules); double backward
                # computes the same product.
                self.backend_fallback_reason = f"{type(err).__name__}: {err}"
                warnings.warn(
                    "forward-over-reverse failed on this model; using double-backward "
                    f"instead ({str(err)[:200]})",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self.backend = "double-backward"
                out = self._run_backend(X, y, weight, probes)
        return [o.detach() for o in out]

    def _run_backend(self, X, y, weight: float, probes: list[Tensor]) -> list[Tensor]:
        return batch_hvp(
            self.model,
            self.loss_fn,
            X,
            y,
            weight,
            self.params,
            self.param_names,
            probes,
            self.backend,
            self.max_probes_per_chunk,
        )

    def block_row_sums(self) -> list[Tensor]:
        """Row sums of each parameter's diagonal block, ``H_ii @ 1``, shaped like the params.

        One product with ``len(params)`` columns (block indicator vectors).
        """
        E = torch.zeros(self.shape[1], len(self.params), dtype=self.dtype, device=self.device)
        start = 0
        for i, p in enumerate(self.params):
            E[start : start + p.numel(), i] = 1
            start += p.numel()
        HE = self.matmat(E)
        start, out = 0, []
        for i, p in enumerate(self.params):
            out.append(HE[start : start + p.numel(), i].reshape(p.shape))
            start += p.numel()
        return out
