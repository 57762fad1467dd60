"""Second-order autodiff: Hessian-vector products on one batch, with interchangeable backends.

Every backend computes ``H_b @ V`` for the loss ``weight * loss_fn(model(X), y)`` of one
batch and a block of ``K`` probes given as a list of tensors shaped ``(K, *param.shape)``:

``"double-backward"``
    Forward and first backward once per batch (``create_graph=True``), then one second
    backward per probe through that reused graph.
``"batched"``
    Forward and first backward once per batch, then all probes of a chunk in one second
    backward with ``is_grads_batched=True`` (vmap over the backward graph). Falls back to
    ``"double-backward"`` where an op has no batching rule.
``"forward-over-reverse"``
    ``torch.func.jvp`` of ``torch.func.grad``, vmapped over the probes of a chunk.
    Nested *forward* over *reverse* of the gradient is exact on layer_norm and batch_norm
    (unlike ``jvp(jacrev)``, see DESIGN.md), and is tested against the dense oracle.

All backends agree to rounding; ``"auto"`` picks one without changing results.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "BACKENDS",
    "batch_hvp",
    "check_finite",
    "differentiable_attention",
    "gradient",
    "second_backward",
]

BACKENDS = ("double-backward", "batched", "forward-over-reverse")


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Route ``scaled_dot_product_attention`` through its math kernel.

    The fused kernels (flash, memory-efficient, cuDNN) have no second derivative, so a
    Hessian product through them fails; the math kernel is built of ordinary ops.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3 has no selector; nothing to do
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def check_finite(value: Tensor, what: str) -> None:
    """Raise if ``value`` holds NaN or inf (one device sync)."""
    if not bool(torch.isfinite(value).all()):
        raise FloatingPointError(
            f"{what} is not finite (NaN or inf). Check the model's inputs and parameters, "
            "lower the learning rate of the run that produced them, or use float64."
        )


def gradient(loss: Tensor, params: Sequence[Tensor], create_graph: bool) -> list[Tensor]:
    """``d loss / d params`` with zeros for parameters the loss does not depend on."""
    grads = torch.autograd.grad(
        loss, params, create_graph=create_graph, retain_graph=True, allow_unused=True
    )
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def second_backward(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    probes: Sequence[Tensor],
    batched: bool = False,
) -> list[Tensor]:
    """Differentiate ``sum_i <grads_i, probes_i>`` w.r.t. ``params`` through a kept graph.

    ``probes`` are shaped like ``params`` or, with ``batched=True``, ``(K, *param.shape)``.
    Gradient entries that carry no graph (constant in the parameters) contribute zero.
    """
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    shape_of = (lambda p: (probes[0].shape[0], *p.shape)) if batched else (lambda p: p.shape)
    if not live:
        return [torch.zeros(shape_of(p), dtype=p.dtype, device=p.device) for p in params]
    out = torch.autograd.grad(
        [grads[i] for i in live],
        params,
        grad_outputs=[probes[i] for i in live],
        retain_graph=True,
        allow_unused=True,
        is_grads_batched=batched,
    )
    return [
        torch.zeros(shape_of(p), dtype=p.dtype, device=p.device) if h is None else h
        for p, h in zip(params, out)
    ]


def _double_backward(grads, params, probes: list[Tensor]) -> list[Tensor]:
    K = probes[0].shape[0]
    columns = [second_backward(grads, params, [v[k] for v in probes]) for k in range(K)]
    return [torch.stack([col[i] for col in columns]) for i in range(len(params))]


def _batched(grads, params, probes: list[Tensor]) -> list[Tensor]:
    try:
        return second_backward(grads, params, probes, batched=True)
    except RuntimeError as err:  # an op without a batching rule for its backward
        if "vmap" not in str(err) and "batch" not in str(err).lower():
            raise
        return _double_backward(grads, params, probes)


def batch_hvp(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    X,
    y: Tensor,
    weight: float,
    params: Sequence[Tensor],
    param_names: Sequence[str],
    probes: list[Tensor],
    backend: str,
    chunk_size: int,
) -> list[Tensor]:
    """``H_b @ V`` for one batch; ``probes[i]`` has shape ``(K, *params[i].shape)``.

    Returns tensors of the same shapes. ``chunk_size`` bounds how many probes a batched
    backend pushes through at once (memory grows with it).
    """
    K = probes[0].shape[0]
    if backend == "forward-over-reverse":
        return _forward_over_reverse(
            model, loss_fn, X, y, weight, params, param_names, probes, chunk_size
        )
    loss = weight * loss_fn(model(X), y)
    check_finite(loss.detach(), "the loss")
    grads = gradient(loss, params, create_graph=True)
    if backend == "double-backward":
        return _double_backward(grads, params, probes)
    if backend == "batched":
        pieces = [
            _batched(grads, params, [v[s : s + chunk_size] for v in probes])
            for s in range(0, K, chunk_size)
        ]
        return [torch.cat([pc[i] for pc in pieces]) for i in range(len(params))]
    raise ValueError(f"unknown autodiff backend {backend!r}; choose one of {BACKENDS} or 'auto'")


def _forward_over_reverse(model, loss_fn, X, y, weight, params, param_names, probes, chunk_size):
    from torch.func import functional_call, grad, jvp, vmap

    # Buffers are passed as copies so train-mode BatchNorm's in-place running-stat update
    # touches neither the model nor a tensor captured by vmap.
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    primals = tuple(p.detach() for p in params)

    def loss_of(*ps):
        out = functional_call(model, ({**dict(zip(param_names, ps)), **buffers}), (X,))
        return weight * loss_fn(out, y)

    grad_fn = grad(lambda ps: loss_of(*ps))

    def hvp_one(*tangents):
        return jvp(grad_fn, (primals,), (tuple(tangents),))[1]

    K = probes[0].shape[0]
    pieces = []
    for s in range(0, K, chunk_size):
        chunk = [v[s : s + chunk_size] for v in probes]
        pieces.append(vmap(hvp_one, randomness="same")(*chunk))
    return [torch.cat([pc[i] for pc in pieces]) for i in range(len(params))]
