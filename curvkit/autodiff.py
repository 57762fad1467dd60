"""Second-order autodiff: Hessian-vector products on one batch, with interchangeable backends.

Every backend computes ``H_b @ V`` for the loss ``weight * loss_fn(model(X), y)`` of one
batch and a block of ``K`` probes given as a list of tensors shaped ``(K, *param.shape)``:

``"double-backward"``
    Reverse over reverse. Forward and first backward once per batch (``create_graph=True``),
    then one second backward per probe through that reused graph: after the first probe,
    each further one costs only a second backward.
``"batched"``
    Forward and first backward once per batch, then the probes of a chunk in one second
    backward with ``is_grads_batched=True`` (vmap over the backward graph). Falls back to
    the loop of ``"double-backward"`` where an op has no batching rule.
``"forward-over-reverse"``
    ``torch.func.jvp`` of ``torch.func.grad``, vmapped over the probes of a chunk.
``"forward-ad"``
    Forward over reverse without functorch: the parameters become dual tensors
    (``torch.autograd.forward_ad``) carrying one probe as tangent, and one ordinary
    ``torch.autograd.grad`` pass returns the gradient whose tangent is ``H v``. No graph is
    kept, so one product costs one forward and one backward, each with its tangent. Probes
    are processed one at a time (forward and backward are re-run per probe).
``"reverse-over-forward"``
    The gradient's directional derivative ``g^T v`` by curvkit's first-order forward rules
    (:func:`curvkit.taylor.loss_directional_derivatives`, run on the live parameters under
    autograd), then one backward of it: ``H v``. No graph is kept; one probe at a time.
    Its graph holds each layer's input and tangent and no gradient-sized tensors, so its
    peak memory is below double backward's (which holds the first backward's graph on top
    of the forward's). A model with an operation the rules lack raises
    :class:`~curvkit.taylor.TaylorUnsupportedError` (``"auto"`` then drops it).
``"compiled"``
    ``"forward-over-reverse"`` under ``torch.compile`` (:class:`CompiledHVP`): the vmapped
    ``jvp(grad)`` of a chunk of probes is compiled once per input signature (chunk length,
    shapes and dtypes of ``X`` and ``y``) and reused; parameters, buffers, data, weight and
    probes are arguments of the compiled function, so changed values are never stale.
    Compiling costs seconds (``"aot_eager"``) to minutes (``"inductor"`` on a big model).

Forward over reverse of the *gradient* (``jvp(grad)``) is exact on layer_norm and
batch_norm, unlike ``jvp(jacrev)`` (see DESIGN.md); every backend is tested against the
dense float64 oracle on the case matrix, including affine LayerNorm and train-mode
BatchNorm. Floating-point targets ``y`` get an explicit zero tangent: without it, PyTorch's
forward-mode rule of ``mse_loss``'s backward writes into an immutable ZeroTensor.

All backends agree to rounding; ``"auto"`` (see :class:`curvkit.HessianOperator`) picks one
by a short timed trial without changing results.
"""

from __future__ import annotations

import contextlib
import math
import time
import types
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

__all__ = [
    "BACKENDS",
    "EAGER_BACKENDS",
    "FORWARD_MODE_BACKENDS",
    "CompiledHVP",
    "affine_batchnorm",
    "batch_hvp",
    "batched_grad",
    "check_finite",
    "check_compile_backend",
    "chunk_size_for",
    "chunked_into",
    "flag_final",
    "differentiable_attention",
    "first_backward",
    "GradientGraph",
    "ParametersReachedError",
    "built_since",
    "graph_mark",
    "parametrizations_cached",
    "reaches",
    "graph_hvp",
    "grad_into",
    "gradient",
    "functional_model",
    "write_into",
    "second_backward",
]

#: the backends that run without compilation
EAGER_BACKENDS = (
    "double-backward",
    "batched",
    "forward-over-reverse",
    "forward-ad",
    "reverse-over-forward",
)
BACKENDS = (*EAGER_BACKENDS, "compiled")
#: the backends that keep no first-backward graph (and may fail where double backward works)
FORWARD_MODE_BACKENDS = ("forward-over-reverse", "forward-ad", "reverse-over-forward", "compiled")


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Route ``scaled_dot_product_attention`` through its math kernel.

    The fused kernels (flash, memory-efficient, cuDNN) have neither a second derivative nor
    a forward-mode rule, so a Hessian product through them fails; the math kernel is built
    of ordinary ops.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3 has no selector; nothing to do
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


#: the BatchNorm classes whose eval-mode forward :func:`affine_batchnorm` may replace
_AFFINE_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _affine_forward(self: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """Eval-mode BatchNorm as ``x * scale + shift`` per channel (dimension 1)."""
    scale = torch.rsqrt(self.running_var + self.eps)
    if self.weight is not None:
        scale = self.weight * scale
    shift = -self.running_mean * scale
    if self.bias is not None:
        shift = shift + self.bias
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * scale.view(shape) + shift.view(shape)


@contextlib.contextmanager
def affine_batchnorm(model: nn.Module) -> Iterator[None]:
    """Run eval-mode BatchNorm layers (running statistics) as the per-channel affine map
    they are, ``x * scale + shift``, instead of ``batch_norm``.

    The same numbers to rounding, but a graph built through them is cheaper to
    differentiate twice: PyTorch's double backward of ``batch_norm`` is the general
    train-mode formula even in eval mode (a kept-graph Hessian product of the benchmark's
    CPU ResNet-18, batch 32: 2.28 gradients against 2.36 with ``batch_norm``, paired
    medians of 9). Train-mode layers, layers without running statistics and subclasses
    are left alone.
    """
    swapped = [
        m
        for m in model.modules()
        if type(m) in _AFFINE_BATCHNORMS
        and not m.training
        and m.running_mean is not None
        and m.running_var is not None
        and "forward" not in m.__dict__
    ]
    for m in swapped:
        m.forward = types.MethodType(_affine_forward, m)
    try:
        yield
    finally:
        for m in swapped:
            del m.forward


def check_finite(value: Tensor, what: str) -> None:
    """Raise if ``value`` holds NaN or inf (one device sync).

    A sum is finite only if every entry is; only when it is not (or overflowed) is the
    exact, much slower, elementwise test run.
    """
    if value.is_floating_point() and math.isfinite(value.sum().item()):
        return
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


class _SlotHooks:
    """Temporary hooks on ``params`` that write each gradient of a backward pass into its
    slot as the backward produces it, and hand the slot back to autograd.

    Each gradient is then freed as soon as it is written: the backward never holds a second
    parameter-sized result beside the slots (which ``torch.autograd.grad`` followed by a
    copy does: on the MLP of the benchmark, parameters dominate and that was one gradient's
    worth of peak memory). Registered once for any number of backward passes (registering
    costs a few microseconds per parameter, which a loop over probes would pay per probe).
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = params
        self.slots: Sequence[Tensor] = ()
        self.accumulate = False
        self.written = [False] * len(params)
        self.handles = [p.register_hook(self._hook(i)) for i, p in enumerate(params)]

    def _hook(self, i: int) -> Callable[[Tensor], Tensor]:
        def hook(g: Tensor) -> Tensor:
            slot = self.slots[i]
            if self.accumulate:
                slot.add_(g)
            else:
                slot.copy_(g)
            self.written[i] = True
            return slot

        return hook

    def grad(
        self,
        outputs: Sequence[Tensor | GradientEdge],
        grad_outputs: Sequence[Tensor] | None,
        slots: Sequence[Tensor],
        accumulate: bool,
        retain_graph: bool,
    ) -> None:
        """``torch.autograd.grad(outputs, params, grad_outputs)`` into ``slots``."""
        self.slots, self.accumulate = slots, accumulate
        self.written = [False] * len(self.params)
        torch.autograd.grad(
            outputs,
            self.params,
            grad_outputs=grad_outputs,
            retain_graph=retain_graph,
            allow_unused=True,
        )
        self.slots = ()
        if not accumulate:
            for slot, done in zip(slots, self.written):
                if not done:
                    slot.zero_()

    def __enter__(self) -> _SlotHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


def grad_into(
    outputs: Sequence[Tensor],
    params: Sequence[Tensor],
    grad_outputs: Sequence[Tensor] | None,
    out: Sequence[Tensor],
    accumulate: bool,
    retain_graph: bool = False,
) -> Sequence[Tensor]:
    """``torch.autograd.grad(outputs, params, grad_outputs)`` written (or, with
    ``accumulate``, added) into ``out`` (tensors shaped like ``params``) as the backward
    produces each parameter's gradient (:class:`_SlotHooks`: no second parameter-sized
    result is held). Parameters the outputs do not depend on get zeros (or are left as they
    are when accumulating).
    """
    with _SlotHooks(params) as hooks:
        hooks.grad(outputs, grad_outputs, out, accumulate, retain_graph)
    return out


def second_backward(
    grads: Sequence[Tensor | GradientEdge | None],
    params: Sequence[Tensor],
    probes: Sequence[Tensor],
    batched: bool = False,
    retain_graph: bool = True,
) -> list[Tensor]:
    """Differentiate ``sum_i <grads_i, probes_i>`` w.r.t. ``params`` through a kept graph.

    ``grads`` are tensors or, as from :func:`first_backward`, their gradient edges (``None``
    for a gradient that is constant in the parameters). ``probes`` are shaped like
    ``params`` or, with ``batched=True``, ``(K, *param.shape)``. Gradient entries that carry
    no graph contribute zero. ``retain_graph=False`` for the graph's last use: see
    :func:`graph_hvp`.
    """
    live = [
        i
        for i, g in enumerate(grads)
        if g is not None and (not isinstance(g, Tensor) or g.requires_grad)
    ]
    shape_of = (lambda p: (probes[0].shape[0], *p.shape)) if batched else (lambda p: p.shape)
    if not live:
        return [torch.zeros(shape_of(p), dtype=p.dtype, device=p.device) for p in params]
    out = torch.autograd.grad(
        [grads[i] for i in live],
        params,
        grad_outputs=[probes[i] for i in live],
        retain_graph=retain_graph,
        allow_unused=True,
        is_grads_batched=batched,
    )
    return [
        torch.zeros(shape_of(p), dtype=p.dtype, device=p.device) if h is None else h
        for p, h in zip(params, out)
    ]


def _double_backward(
    grads,
    params,
    probes: list[Tensor],
    out=None,
    accumulate: bool = True,
    retain_graph: bool = True,
) -> list[Tensor]:
    """One second backward per probe, each written (or added) straight into ``out``; the
    last one frees the graph unless ``retain_graph``."""
    K = probes[0].shape[0]
    if out is None:
        out = [torch.empty((K, *p.shape), dtype=p.dtype, device=p.device) for p in params]
        accumulate = False
    live = [
        i
        for i, g in enumerate(grads)
        if g is not None and (not isinstance(g, Tensor) or g.requires_grad)
    ]
    if not live:
        if not accumulate:
            for o in out:
                o.zero_()
        return out
    outputs = [grads[i] for i in live]
    with _SlotHooks(params) as hooks:
        for k in range(K):
            hooks.grad(
                outputs,
                [probes[i][k] for i in live],
                [o[k] for o in out],
                accumulate,
                retain_graph=retain_graph or k < K - 1,
            )
    return out


def _batched(grads, params, probes: list[Tensor], retain_graph: bool = True) -> list[Tensor]:
    if probes[0].shape[0] == 1:  # nothing to batch; skip vmap's overhead
        one = [v[0] for v in probes]
        return [h.unsqueeze(0) for h in second_backward(grads, params, one, False, retain_graph)]
    # a vmapped chunk always keeps the graph: where an op has no batching rule, the chunk
    # is run again probe by probe through it
    try:
        return second_backward(grads, params, probes, batched=True)
    except RuntimeError as err:  # an op without a batching rule for its backward
        if "vmap" not in str(err) and "batch" not in str(err).lower():
            raise
        return _double_backward(grads, params, probes)


def _chunks(probes: list[Tensor], chunk_size: int) -> Iterator[list[Tensor]]:
    K = probes[0].shape[0]
    for s in range(0, K, chunk_size):
        yield [v[s : s + chunk_size] for v in probes]


def _cat(pieces: list[list[Tensor]]) -> list[Tensor]:
    if len(pieces) == 1:
        return pieces[0]
    return [torch.cat(column) for column in zip(*pieces)]


def batched_grad(
    outputs: Sequence[Tensor | GradientEdge | None],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor],
    chunk_size: int,
    out: list[Tensor] | None = None,
    accumulate: bool = False,
    retain_graph: bool = True,
) -> list[Tensor]:
    """``sum_i <outputs_i, grad_outputs_i[k]>`` differentiated w.r.t. ``inputs``, for each ``k``.

    ``grad_outputs[i]`` has shape ``(K, *outputs[i].shape)``; returns ``(K, *input.shape)``
    per input (zeros where an input is unused). Chunks of ``chunk_size`` probes go through
    one ``is_grads_batched`` backward each, with a loop where an op has no batching rule.
    With ``out``, each chunk is written (``accumulate``: added) into it as it is made. The
    graph is retained, unless ``retain_graph=False`` and the last chunk holds one probe: its
    backward then frees the graph as it goes (see :func:`graph_hvp`).
    """
    K = grad_outputs[0].shape[0]
    if K == 0:
        res = [torch.zeros((0, *x.shape), dtype=x.dtype, device=x.device) for x in inputs]
        return write_into(res, out, accumulate)

    def chunk_product(chunk: list[Tensor], final: bool) -> list[Tensor]:
        return _batched(outputs, inputs, chunk, retain_graph or not final)

    probes = list(grad_outputs)
    return chunked_into(flag_final(chunk_product, K), probes, chunk_size, out, accumulate)


def flag_final(
    compute: Callable[[list[Tensor], bool], list[Tensor]], K: int
) -> Callable[[list[Tensor]], list[Tensor]]:
    """``compute(chunk, final)`` as the one-argument function :func:`chunked_into` calls,
    ``final`` being true for the chunk that holds the last of ``K`` probes (the pass that
    may free a graph as it runs)."""
    left = [K]

    def one_chunk(chunk: list[Tensor]) -> list[Tensor]:
        left[0] -= chunk[0].shape[0]
        return compute(chunk, left[0] == 0)

    return one_chunk


def graph_hvp(
    grads: Sequence[Tensor | GradientEdge | None],
    params: Sequence[Tensor],
    probes: list[Tensor],
    backend: str,
    chunk_size: int,
    out: list[Tensor] | None = None,
    accumulate: bool = True,
    retain_graph: bool = True,
) -> list[Tensor]:
    """``H_b @ V`` through a kept first-backward graph: ``grads`` from :func:`first_backward`
    (or :func:`gradient` with ``create_graph=True``), ``backend`` ``"double-backward"`` or
    ``"batched"``.

    Shapes and ``out``/``accumulate`` as in :func:`batch_hvp`. The graph is retained, so
    the caller may push further probes through the same ``grads``. ``retain_graph=False``
    is for the graph's last use: the last probe's backward (with ``"batched"``, where its
    chunk holds one probe) then frees each node's saved tensors as it runs them, instead of
    holding all of them to the end. That lowers the peak of a product through a graph built
    for it alone (the benchmark's ResNet-18 and transformer at batch 32 on a CPU: from 3.1
    to 2.3 and 2.5 times the gradient's live memory). The graph cannot be used again.
    """
    if backend == "double-backward":
        return _double_backward(grads, params, probes, out, accumulate, retain_graph)
    if backend != "batched":
        raise ValueError(f"{backend!r} does not run through a kept graph")
    return batched_grad(grads, params, probes, chunk_size, out, accumulate, retain_graph)


def chunked_into(
    compute: Callable[[list[Tensor]], list[Tensor]],
    probes: list[Tensor],
    chunk_size: int,
    out: list[Tensor] | None,
    accumulate: bool,
) -> list[Tensor]:
    """``compute`` on chunks of probes, each chunk's results written into ``out`` at once
    (so only one chunk's results are ever held), or concatenated without ``out``."""
    if out is None:
        return _cat([compute(chunk) for chunk in _chunks(probes, chunk_size)])
    K = probes[0].shape[0]
    for s in range(0, K, chunk_size):
        res = compute([v[s : s + chunk_size] for v in probes])
        write_into(res, [o[s : s + chunk_size] for o in out], accumulate)
        del res  # else it lives on while the next chunk is computed
    return out


def write_into(res: list[Tensor], out: list[Tensor] | None, accumulate: bool) -> list[Tensor]:
    """Copy (or, with ``accumulate``, add) ``res`` into ``out``; ``res`` when ``out`` is None.

    One ``torch._foreach_*`` call where PyTorch has it: one call from Python instead of one
    per parameter, and on CUDA a few fused kernel launches instead of one per parameter
    (what a launch-bound product pays: ResNet-18 has 62 parameter tensors).
    """
    if out is None:
        return res
    if hasattr(torch, "_foreach_copy_"):
        (torch._foreach_add_ if accumulate else torch._foreach_copy_)(list(out), list(res))
        return out
    for o, r in zip(out, res):
        if accumulate:
            o.add_(r)
        else:
            o.copy_(r)
    return out


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
    out: list[Tensor] | None = None,
    accumulate: bool = True,
    *,
    compiled: CompiledHVP | None = None,
) -> list[Tensor]:
    """``H_b @ V`` for one batch; ``probes[i]`` has shape ``(K, *params[i].shape)``.

    Returns tensors of the same shapes. ``chunk_size`` bounds how many probes a batched
    backend (``"batched"``, ``"forward-over-reverse"``, ``"compiled"``) pushes through at
    once: their memory grows with it. The others hold one probe at a time. With ``out``
    (tensors shaped like the result, e.g. views into one ``(K, D)`` buffer), the product is
    *added* into it (``accumulate=True``) or written over it (``False``) and ``out``
    returned: accumulating over batches without stacking or concatenating copies.

    ``compiled``: the :class:`CompiledHVP` of this model and loss that ``"compiled"`` uses
    and keeps its compiled functions in (pass the same one to every call to compile once);
    ``None`` builds a throwaway one, which compiles on every call.
    """
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown autodiff backend {backend!r}; choose one of {BACKENDS} or 'auto'"
        )
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    if backend in FORWARD_MODE_BACKENDS:
        refuse_cached_parametrizations(model, backend)
    if backend == "forward-over-reverse":
        compute = _forward_over_reverse(model, loss_fn, X, y, weight, params, param_names)
    elif backend == "compiled":
        if compiled is None:
            compiled = CompiledHVP(model, loss_fn, param_names)
        compute = compiled.chunk_function(X, y, weight, params)
    elif backend == "forward-ad":
        compute, chunk_size = _forward_ad(model, loss_fn, X, y, weight, params, param_names), 1
    elif backend == "reverse-over-forward":
        return _reverse_over_forward(model, loss_fn, X, y, weight, params, probes, out, accumulate)
    else:
        graph = first_backward(model, loss_fn, X, y, weight, params)
        return graph_hvp(
            graph.edges,
            params,
            probes,
            backend,
            chunk_size,
            out,
            accumulate,
            retain_graph=not graph.own,  # its last use
        )
    return chunked_into(compute, probes, chunk_size, out, accumulate)


def _graph_nodes(*outputs: Tensor | None) -> Iterator[Any]:
    """Every node of the autograd graphs of ``outputs``, once each (the leaves' gradient
    accumulators included)."""
    seen: set = set()
    stack = [t.grad_fn for t in outputs if t is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(next_node for next_node, _ in node.next_functions)


def reaches(output: Tensor, leaves: Sequence[Tensor]) -> bool:
    """Whether ``output``'s autograd graph uses any of the leaf tensors ``leaves`` (walks the
    graph once, to their gradient accumulators)."""
    targets = {id(t) for t in leaves}
    return any(id(getattr(node, "variable", None)) in targets for node in _graph_nodes(output))


def refuse_cached_parametrizations(
    model: nn.Module, what: str, error: type[RuntimeError] = RuntimeError
) -> None:
    """Raise ``error`` (a ``RuntimeError``: the operators then fall back to double backward)
    where ``what``, a forward-mode backend or Taylor mode, would differentiate a stale weight:
    it runs the model on stand-ins for the parameters, while ``parametrize.cached()`` hands
    every pass the weight the first computed (or caches the stand-in's as the weight)."""
    if parametrizations_cached(model):
        raise error(
            f"{what} cannot run under torch.nn.utils.parametrize.cached() (the cached weights "
            "do not follow its stand-ins for the parameters); call the operator outside that "
            "context to use it"
        )


def graph_mark() -> int:
    """A mark for :func:`built_since`: autograd numbers the nodes each thread creates in
    order, and every node this thread creates after this call is numbered at least this."""
    with torch.enable_grad():
        return (torch.zeros((), requires_grad=True) * 1).grad_fn._sequence_nr() + 1


def parametrizations_cached(model: nn.Module | None = None) -> bool:
    """Whether ``torch.nn.utils.parametrize.cached()`` is active (and ``model``, if given,
    has parametrized modules): a parametrized weight computed in one forward pass is then
    reused by the later ones until the context ends."""
    from torch.nn.utils import parametrize

    if not getattr(parametrize, "_cache_enabled", 0):
        return False
    return model is None or any(parametrize.is_parametrized(m) for m in model.modules())


def built_since(mark: int, *outputs: Tensor | None) -> bool:
    """Whether the graphs of ``outputs`` are the caller's alone: this thread created every
    node between :func:`graph_mark` giving ``mark`` and this call (the leaves' gradient
    accumulators aside), and no parametrization cache could keep one of them for later
    forward passes (:func:`parametrizations_cached`).

    Only such a graph may be freed by the last backward through it (``retain_graph=False``).
    A graph that also runs through older nodes shares them with graphs the user may still
    need: a tensor computed from the parameters once and used by every forward pass (a penalty
    that ``loss_fn`` closes over, a weight cached before), or inputs with a graph of their
    own. Autograd numbers nodes per thread, so a node another thread made (in its own
    numbering) is taken as shared unless its number falls in this thread's window. A module
    that caches such a tensor itself, in its first forward pass, is not seen. One walk of the
    graph: 15-80 us on the benchmark models (CPU sizes).
    """
    if parametrizations_cached():
        return False
    end = graph_mark()
    return all(
        mark <= node._sequence_nr() < end
        for node in _graph_nodes(*outputs)
        if not hasattr(node, "variable")  # a leaf's accumulator: numbered apart, holds nothing
    )


class GradientGraph(NamedTuple):
    """The gradient's graph on one batch (:func:`first_backward`): the gradient's edges
    (``None`` where it is constant in the parameters), the tensors it is differentiated
    against (``inputs``: the parameters, or leaves aliasing them), and whether it is the
    builder's alone (``own``, :func:`built_since`): only then may its last pass free it."""

    edges: list[GradientEdge | None]
    inputs: list[Tensor]
    own: bool


class ParametersReachedError(RuntimeError):
    """A forward pass through stand-ins for the parameters used the parameters themselves."""


def first_backward(
    model: nn.Module,
    loss_fn,
    X,
    y,
    weight: float,
    params,
    forward: Callable[[Any], Any] | None = None,
    stood_in_for: Sequence[Tensor] = (),
) -> GradientGraph:
    """The graph of the gradient of ``weight * loss_fn(model(X), y)`` w.r.t. ``params``, for
    a second pass.

    Returned as the gradient's edges, not as tensors: the second backward needs only the
    graph, so the gradient's values (one parameter-sized vector) are freed at once instead of
    being held with it. ``forward`` replaces ``model`` for the forward pass (e.g. a
    ``functional_call`` through tensors ``params`` that stand in for the parameters
    ``stood_in_for``); it raises :class:`ParametersReachedError` if the loss still uses any
    of those.
    """
    mark = graph_mark()
    with affine_batchnorm(model):  # cheaper to differentiate twice (same values)
        loss = weight * loss_fn((forward or model)(X), y)
    if stood_in_for and reaches(loss, stood_in_for):
        del loss  # not held by the exception's traceback while the caller builds again
        raise ParametersReachedError("the forward pass used the parameters it should not")
    check_finite(loss.detach(), "the loss")
    own = built_since(mark, loss)
    grads = gradient(loss, params, create_graph=True)
    edges = [get_gradient_edge(g) if g.requires_grad else None for g in grads]
    return GradientGraph(edges, list(params), own)


def functional_model(model: nn.Module) -> Callable[[dict[str, Tensor], tuple], Any]:
    """``call(tensors, args)``: ``torch.func.functional_call(model, tensors, args)``, the
    model's own tensors back in place afterwards.

    Where a module object is registered under two names (``self.b = self.a``, weight
    sharing by module reuse), PyTorch swaps and restores each name in turn: the second
    restore puts back the swapped-in tensor, and the model is left without its parameters
    (torch 2.14). There every module's parameter and buffer entries are saved and put back.
    Decided once, here, so that a compiled caller traces a plain ``functional_call``.
    """
    from torch.func import functional_call

    named = sum(1 for _ in model.named_modules(remove_duplicate=False))
    if named == sum(1 for _ in model.modules()):
        return lambda tensors, args: functional_call(model, tensors, args)

    def call(tensors: dict[str, Tensor], args: tuple) -> Any:
        saved = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
        try:
            return functional_call(model, tensors, args)
        finally:
            for m, params, buffers in saved:
                for entries, kept in ((m._parameters, params), (m._buffers, buffers)):
                    entries.clear()
                    entries.update(kept)

    return call


def _detached_state(model: nn.Module, params: Sequence[Tensor], param_names: Sequence[str]):
    # Buffers are passed as copies so train-mode BatchNorm's in-place running-stat update
    # touches neither the model nor a tensor captured by a transform.
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    primals = tuple(p.detach() for p in params)
    return buffers, primals


def _jvp_grad_chunk(
    model: nn.Module, loss_fn, param_names: Sequence[str], float_y: bool
) -> Callable[..., tuple[Tensor, ...]]:
    """``f(primals, state, X, y, weight, tangents)``: ``jvp(grad)`` vmapped over the probes.

    ``primals`` are the differentiated parameters (detached, shapes ``param.shape``),
    ``state`` the model's other named tensors (buffers, further parameters; may be empty),
    ``weight`` the batch weight of the loss (a float or a 0-d tensor) and ``tangents`` one
    ``(c, *param.shape)`` block of ``c`` probes per parameter; returns the ``c`` products in
    the same shapes. ``float_y``: give ``y`` an explicit zero tangent (see the module
    docstring). Only ``model``, ``loss_fn`` and the names are captured, so under
    ``torch.compile`` every tensor is an input of the compiled graph.
    """
    from torch.func import grad, jvp, vmap

    names = tuple(param_names)
    call = functional_model(model)

    def hvp_chunk(primals, state, X, y, weight, tangents):
        def loss_of(ps, target):
            out = call({**dict(zip(names, ps)), **state}, (X,))
            return weight * loss_fn(out, target)

        grad_fn = grad(loss_of)

        def hvp_one(*probe):
            if float_y:  # an explicit zero tangent for y, see the module docstring
                return jvp(grad_fn, (primals, y), (probe, torch.zeros_like(y)))[1]
            return jvp(lambda ps: grad_fn(ps, y), (primals,), (probe,))[1]

        return vmap(hvp_one, randomness="same")(*tangents)

    return hvp_chunk


def _forward_over_reverse(model, loss_fn, X, y, weight, params, param_names):
    """A function of a chunk of probes ``(c, *param.shape)`` returning their products."""
    buffers, primals = _detached_state(model, params, param_names)
    float_y = isinstance(y, Tensor) and y.is_floating_point()
    hvp_chunk = _jvp_grad_chunk(model, loss_fn, param_names, float_y)
    return lambda chunk: list(hvp_chunk(primals, buffers, X, y, weight, tuple(chunk)))


# ---------------------------------------------------------------------- compiled product
def check_compile_backend(compile_backend: str | Callable) -> None:
    """Raise ``ValueError`` unless ``compile_backend`` is a callable or a backend name that
    ``torch.compile`` knows (``torch.compiler.list_backends(exclude_tags=())``)."""
    if callable(compile_backend):
        return
    known = torch.compiler.list_backends(exclude_tags=())
    if compile_backend not in known:
        raise ValueError(
            f"unknown torch.compile backend {compile_backend!r}; choose one of {known} "
            "(e.g. 'inductor', or 'aot_eager' to compile without code generation)"
        )


def _signature(obj: Any) -> Hashable:
    """Shapes, dtypes and devices of the tensors in ``obj`` (nested tuples, lists, dicts);
    the type of anything else."""
    if isinstance(obj, Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype, obj.device)
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, *(_signature(o) for o in obj))
    if isinstance(obj, dict):
        return ("dict", *((k, _signature(v)) for k, v in obj.items()))
    return type(obj).__qualname__


def _own_code(fn: Callable, name: str) -> Callable:
    """A copy of the function ``fn`` with a code object of its own.

    torch.compile keeps compiled code, guards and recompilation counts per code object, so
    every closure of one ``def`` shares them: after a few operators the recompilation limit
    would be hit and later ones silently run eagerly. A copy compiles on its own.
    """
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


class CompiledHVP:
    """The ``"forward-over-reverse"`` product of one model and loss under ``torch.compile``.

    One compiled function per signature ``(probes per chunk, X's and y's shapes, dtypes and
    devices)``, built with ``torch.compile(fullgraph=False, dynamic=False,
    backend=compile_backend)`` at its first use and reused by every later chunk of that
    signature. Its arguments are the detached parameters, the model's other parameters and
    (copied) buffers, ``X``, ``y``, the batch weight (a 0-d tensor) and the probes, so values
    changed in place are read afresh by every call; what is captured (the model's structure
    and modes, the loss module) is guarded by ``torch.compile`` and recompiles when it changes.

    ``compile_seconds[signature]`` records the first call of each compiled function (tracing,
    compilation and one product). An error while compiling or running propagates; nothing is
    cached for a signature whose first call failed.

    Args:
        model, loss_fn: the network and the loss ``loss_fn(model(X), y)``.
        param_names: names (in ``model.named_parameters()``) of the differentiated parameters.
        compile_backend: the ``backend=`` of ``torch.compile``: a name (``"inductor"``,
            ``"aot_eager"``, ...) or a callable.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Tensor], Tensor],
        param_names: Sequence[str],
        compile_backend: str | Callable = "inductor",
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.param_names = tuple(param_names)
        self.compile_backend = compile_backend
        self.functions: dict[Hashable, Callable[..., tuple[Tensor, ...]]] = {}
        self.compile_seconds: dict[Hashable, float] = {}

    def _compile(self, float_y: bool) -> Callable[..., tuple[Tensor, ...]]:
        fn = _own_code(
            _jvp_grad_chunk(self.model, self.loss_fn, self.param_names, float_y),
            f"curvkit_compiled_hvp_{len(self.functions)}",
        )
        return torch.compile(fn, fullgraph=False, dynamic=False, backend=self.compile_backend)

    def _state(self) -> dict[str, Tensor]:
        """The model's named tensors other than the differentiated parameters, as inputs:
        further parameters detached, buffers copied (train-mode BatchNorm updates its
        running statistics in place)."""
        chosen = set(self.param_names)
        state = {n: p.detach() for n, p in self.model.named_parameters() if n not in chosen}
        state.update({n: b.clone() for n, b in self.model.named_buffers()})
        return state

    def chunk_function(
        self, X, y, weight: float, params: Sequence[Tensor]
    ) -> Callable[[list[Tensor]], list[Tensor]]:
        """A function of a chunk of probes ``(c, *param.shape)`` returning their products
        ``(c, *param.shape)`` on the batch ``(X, y)`` weighted by ``weight``."""
        refuse_cached_parametrizations(self.model, "the compiled product")
        primals = tuple(p.detach() for p in params)
        state = self._state()
        w = torch.tensor(weight, dtype=primals[0].dtype, device=primals[0].device)
        float_y = isinstance(y, Tensor) and y.is_floating_point()
        data_key = (_signature(X), _signature(y))

        def compute(chunk: list[Tensor]) -> list[Tensor]:
            key = (chunk[0].shape[0], *data_key)
            fn = self.functions.get(key)
            if fn is not None:
                return list(fn(primals, state, X, y, w, tuple(chunk)))
            fn = self._compile(float_y)
            start = time.perf_counter()
            res = list(fn(primals, state, X, y, w, tuple(chunk)))
            self.compile_seconds[key] = time.perf_counter() - start
            self.functions[key] = fn
            return res

        return compute


def _forward_ad(model, loss_fn, X, y, weight, params, param_names):
    """A function of one probe ``(1, *param.shape)`` returning its product."""
    call = functional_model(model)

    buffers, primals = _detached_state(model, params, param_names)
    checked = [False]

    def hvp_one(probe: list[Tensor]) -> list[Tensor]:
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, v[0]).requires_grad_() for p, v in zip(primals, probe)]
            target = y
            if isinstance(y, Tensor) and y.is_floating_point():
                target = fwAD.make_dual(y, torch.zeros_like(y))
            out = call({**dict(zip(param_names, duals)), **buffers}, (X,))
            loss = weight * loss_fn(out, target)
            if not checked[0]:
                check_finite(fwAD.unpack_dual(loss).primal.detach(), "the loss")
                checked[0] = True
            grads = torch.autograd.grad(loss, duals, allow_unused=True)
            col = []
            for p, g in zip(primals, grads):
                tangent = None if g is None else fwAD.unpack_dual(g).tangent
                col.append((torch.zeros_like(p) if tangent is None else tangent.clone())[None])
        return col

    return hvp_one


def _reverse_over_forward(model, loss_fn, X, y, weight, params, probes, out, accumulate):
    """One forward of first-order jets and one backward per probe, each product written
    straight into ``out`` (:class:`_SlotHooks`)."""
    from curvkit.taylor import loss_directional_derivatives

    K = probes[0].shape[0]
    if out is None and K == 1:  # autograd's results are the product: nothing to copy
        mark = graph_mark()
        (slope,) = loss_directional_derivatives(model, loss_fn, X, y, weight, params, probes)
        grads = (
            torch.autograd.grad(
                slope, params, allow_unused=True, retain_graph=not built_since(mark, slope)
            )
            if slope.requires_grad
            else [None] * len(params)
        )
        # checked once the backward is queued: a check before it would make the host wait
        # for the forward pass before queueing the backward's kernels
        check_finite(slope.detach(), "the loss's directional derivative")
        return [(torch.zeros_like(p) if g is None else g)[None] for p, g in zip(params, grads)]
    if out is None:
        out = [torch.empty((K, *p.shape), dtype=p.dtype, device=p.device) for p in params]
        accumulate = False
    retain: bool | None = None  # whether the probes' graphs share nodes with older ones
    with _SlotHooks(params) as hooks:  # registered once for all probes
        for k in range(K):
            probe = [v[k : k + 1] for v in probes]
            mark = graph_mark()
            (slope,) = loss_directional_derivatives(model, loss_fn, X, y, weight, params, probe)
            slots = [o[k] for o in out]
            if not slope.requires_grad:  # g^T v constant in the parameters: H v = 0
                write_into([torch.zeros_like(p) for p in params], slots, accumulate)
            else:  # a graph of its own is freed as the backward runs
                if retain is None:  # every probe's pass is built alike: walked once
                    retain = not built_since(mark, slope)
                hooks.grad([slope], None, slots, accumulate, retain_graph=retain)
            if k == 0:  # once the backward is queued (see above)
                check_finite(slope.detach(), "the loss's directional derivative")
    return out


# ---------------------------------------------------------------------- memory budget
def chunk_size_for(per_probe_bytes: int, memory_budget: float | None, max_probes: int) -> int:
    """Probes per chunk: at most ``max_probes`` and within ``memory_budget`` bytes (``None``
    or infinite: no cap)."""
    if memory_budget is None or math.isinf(memory_budget) or per_probe_bytes <= 0:
        return max_probes
    return max(1, min(max_probes, int(memory_budget // per_probe_bytes)))
