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
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.utils._pytree import tree_flatten

from curvkit.autodiff import check_finite, chunk_size_for
from curvkit.cpu_memory import reuse_freed_memory
from curvkit.data import Batches, loss_reduction, move_to
from curvkit.linop import LinearOperator, group_sums
from curvkit.live_memory import peak_allocated_bytes

__all__ = ["CurvatureOperator", "module_tensors", "preserved_state", "resolve_params"]

#: without a memory budget of their own, K products hold at most this many times one
#: gradient's peak memory beyond their (D, K) result
BLOCK_MEMORY_FACTOR = 4.0

#: most bytes the reused product buffer of ``quadratic_form`` holds: small enough that the
#: allocator recycles it instead of mapping (and zero-filling) fresh pages for every chunk
QUADRATIC_FORM_BUFFER_BYTES = 32 * 2**20


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


def module_tensors(model: nn.Module) -> tuple[list[nn.Module], list[Tensor], list[Tensor]]:
    """``(modules, parameters, buffers)`` of ``model`` in one traversal of its modules.

    ``model.parameters()``, ``.buffers()`` and ``.modules()`` each walk the module tree
    again, which a product's staleness check paid three times (hundreds of microseconds
    on a ResNet-18). A parameter shared by two modules is listed twice.
    """
    modules = list(model.modules())
    params = [p for m in modules for p in m._parameters.values() if p is not None]
    buffers = [b for m in modules for b in m._buffers.values() if b is not None]
    return modules, params, buffers


def flat_by_dtype(tensors: Sequence[Tensor]) -> dict[tuple, Tensor]:
    """One flat copy of ``tensors`` per (dtype, device), concatenated in order.

    Comparing these costs one kernel and one host synchronisation per group, where a
    comparison per tensor costs one each: on a GPU a ResNet-18's 124 parameters, buffers
    and data tensors had made every product wait for the device 184 times.
    """
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    with torch.no_grad():
        # flattened and concatenated in one call (the per-tensor views cost no Python); of a
        # single tensor it returns a view, which has to be copied to be a snapshot
        return {
            key: _flatten_dense_tensors(group) if len(group) > 1 else group[0].reshape(-1).clone()
            for key, group in groups.items()
        }


def _equal_groups(a: dict[tuple, Tensor], b: dict[tuple, Tensor]) -> bool:
    """Whether two ``flat_by_dtype`` results are equal, read back once per device."""
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return False
    if len(a) == 1:
        key = next(iter(a))
        return torch.equal(a[key], b[key])
    same: dict[torch.device, list[Tensor]] = {}
    for key in a:
        same.setdefault(a[key].device, []).append((a[key] == b[key]).all())
    return all(bool(torch.stack(flags).all()) for flags in same.values())


def _strided_sample(t: Tensor) -> Tensor:
    """About 16 evenly spaced entries of ``t``: a view of ``t``'s own memory (never a copy,
    which would not follow later changes), flat where ``t`` is contiguous. Call under
    ``no_grad``."""
    n = t.numel()
    if t.is_contiguous():  # one call where reshape-and-slice is two
        step = max(1, n // 16)
        return t.as_strided(((n + step - 1) // step,), (step,))
    # a strided tensor (transposed, channels-last, expanded): reshape would copy it, so
    # slice each dimension instead, about 16 ** (1 / ndim) entries along each
    per_dim = max(1, round(16 ** (1 / t.ndim)))
    return t[tuple(slice(None, None, max(1, d // per_dim)) for d in t.shape)]


@contextlib.contextmanager
def preserved_state(
    model: nn.Module, device: torch.device, buffers: Sequence[Tensor] | None = None
) -> Iterator[None]:
    """Restore the model's buffers and the global RNG state on exit.

    Train-mode BatchNorm updates its running statistics in every forward pass, and dropout
    draws from the global generator; a curvature product must change neither. ``buffers``:
    the model's buffers when the caller has them already (:func:`module_tensors`).
    """
    if buffers is None:
        buffers = list(model.buffers())
    buffers = [b for b in buffers if b.numel()]
    saved = flat_by_dtype(buffers)
    # each buffer's place in its group's copy, fixed now (the body may resize a buffer)
    offsets: dict[tuple, int] = {}
    places = []
    for b in buffers:
        key = (b.dtype, b.device)
        start = offsets.get(key, 0)
        offsets[key] = start + b.numel()
        places.append((key, start, b.shape))
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        # compared by value because BatchNorm updates its statistics in place without
        # bumping their version; all at once, and buffer by buffer only if something changed
        if buffers and not _equal_groups(flat_by_dtype(buffers), saved):
            with torch.no_grad():
                for b, (key, start, shape) in zip(buffers, places):
                    old = saved[key][start : start + shape.numel()].view(shape)
                    # only what changed: a copy bumps the version counter, which would void
                    # a kept graph that saved the buffer (eval BatchNorm saves its statistics)
                    if not torch.equal(b, old):
                        b.copy_(old)
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
        self.batches = Batches(data, self.reduction, loss_fn)
        dim = sum(p.numel() for p in self.params)
        super().__init__(
            (dim, dim),
            self.params[0].dtype,
            self.params[0].device,
            symmetric=True,
            psd=psd,
            param_shapes=[p.shape for p in self.params],
        )
        # looked up once: ``_keeps_graph`` reads their mode at every product
        self._batchnorms = [
            m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        self.couples_samples = _contains_train_batchnorm(model)
        # the (1, *param.shape) views of one probe's row, as shapes (``_split_rows``)
        # (unflattening gives a zero-size parameter a fresh (0,) tensor, not a view: no
        # shortcut then)
        self._row_shapes = (
            [torch.empty((1, *p.shape), device="meta") for p in self.params]
            if all(p.numel() for p in self.params)
            else None
        )
        self._keep_graphs(False)
        if check_deterministic:
            self._check_deterministic()

    # ------------------------------------------------------------------ graph reuse
    def _one_tensor_batch(self) -> tuple[Tensor, Tensor] | None:
        """The data's tensors when it is one in-memory ``(X, y)`` batch of tensors."""
        source = self.batches._source
        if not isinstance(source, (list, tuple)) or len(source) != 1:
            return None
        X, y = self.batches.first()
        if isinstance(X, Tensor) and isinstance(y, Tensor):
            return X, y
        return None

    def _state_meta(self) -> tuple[tuple, list[Tensor], list[Tensor]]:
        """``(meta, tensors, buffers)``: what a kept graph depends on -- every parameter (not
        only those differentiated: a block's curvature depends on the rest of the network
        too), buffer and data tensor -- with their identities, versions and shapes and the
        modules' train/eval modes (``meta``), and the model's buffers."""
        modules, params, buffers = module_tensors(self.model)
        tensors = [*params, *buffers, *self._one_tensor_batch()]
        meta = tuple((t.data_ptr(), t._version, t.shape, t.dtype) for t in tensors)
        meta += tuple(m.training for m in modules)
        return meta, tensors, buffers

    def _state(self) -> tuple[tuple, list[Tensor], dict[tuple, Tensor]]:
        """``(meta, views, samples)``: ``meta`` of :meth:`_state_meta`, strided views of
        about 16 entries of each tensor, and a copy of their values (which catch in-place
        changes that bump no version, such as ``p.data -= ...``).

        While ``meta`` is unchanged the views still show the same memory, so a later check
        gathers the current values through them in one call per dtype instead of building
        a view per tensor again (on a ResNet-18, 124 tensors, that was most of its cost).
        """
        meta, tensors, _ = self._state_meta()
        with torch.no_grad():
            views = [_strided_sample(t) for t in tensors]
        return meta, views, flat_by_dtype(views)

    def _state_unchanged(self) -> tuple[bool, list[Tensor]]:
        """Whether the recorded state still holds, and the model's buffers."""
        meta, _, buffers = self._state_meta()
        if self._graph_state is None:
            return False, buffers
        old_meta, views, old_samples = self._graph_state
        return meta == old_meta and _equal_groups(flat_by_dtype(views), old_samples), buffers

    def clear_cache(self) -> None:
        """Release the kept first-backward graph (the next product builds a new one)."""
        self._release_graph()

    def _release_graph(self) -> None:
        """Drop the graph (and, in subclasses, what they hold with it)."""
        self._graph = None
        self._graph_state = None

    def _keep_graphs(self, cache_graph: bool) -> None:
        """Turn on graph reuse (subclasses that implement ``_build_graph`` call this)."""
        self.cache_graph = bool(cache_graph) and self._one_tensor_batch() is not None
        # (batch index, X, y, graph) of the batch being multiplied; kept between products
        # when cache_graph, with the state it was built from (None while not yet recorded)
        self._graph: tuple[int, Any, Any, Any] | None = None
        self._graph_state: tuple[tuple, list[Tensor], dict[tuple, Tensor]] | None = None

    def _product_start(self) -> list[Tensor] | None:
        """Called before every product: drop a kept graph that has gone stale. Returns the
        model's buffers where it looked them up (``None`` where not)."""
        if self._graph is None:
            return None
        unchanged, buffers = self._state_unchanged()
        if not unchanged:
            self.clear_cache()
        return buffers

    def _keeps_graph(self) -> bool:
        """Whether a product's graph stays for the next: ``cache_graph`` (one batch), and no
        train-mode BatchNorm, whose graph holds the running statistics every product
        restores."""
        return self.cache_graph and not any(m.training for m in self._batchnorms)

    def _frees(self, graph: Any, last: bool) -> bool:
        """Whether the pass through ``graph`` (which has ``own``) may free it as it runs: no
        further probes of this product go through it (``last``), it is not kept, and the
        operator built all of it (``autodiff.built_since``)."""
        return last and not self._keeps_graph() and graph.own

    def _product_done(self) -> None:
        """Called after every product: keep the graph for the next, or release it."""
        if self._graph is not None and self._keeps_graph():
            # recorded after the product restored the buffers, so the restore itself
            # does not count as a change (train-mode BatchNorm's graph holds the running
            # statistics that the restore overwrites: not kept); a graph reused from an
            # earlier product keeps the state validated at this product's start
            if self._graph_state is None:
                self._graph_state = self._state()
        else:
            self.clear_cache()

    def _build_graph(self, X, y, weight: float) -> Any:
        """What a product on this batch needs that does not depend on the probes (e.g. the
        gradient's graph); subclasses that reuse graphs implement it."""
        raise NotImplementedError

    def _batch_graph(self, X, y, weight: float, batch: int) -> Any:
        """``_build_graph`` of the batch: reused within a product, and between products
        when ``cache_graph`` and nothing changed."""
        if self._graph is not None:
            b, X0, y0, graph = self._graph
            if b == batch and X0 is X and y0 is y:
                return graph
            if self.cache_graph and b == batch and self._graph_state is not None:
                return graph  # validated at the start of this product
        self._release_graph()  # free the previous batch's graph before building this one
        graph = self._build_graph(X, y, weight)
        self._graph = (batch, X, y, graph)
        return graph

    def _fit_chunk(
        self, run: Callable[[list[Tensor]], Any], most: int, budget: float
    ) -> tuple[int, dict[str, int]]:
        """The largest chunk of probes (at most ``most``) whose product fits ``budget`` bytes
        beyond its ``(D, K)`` result, and the measurements it came from.

        ``run(probes)`` makes one chunk's products on the first batch; it is measured
        (``curvkit.live_memory``) with the graph built inside, as a product that keeps none
        does. Chunks of one and two probes give a probe's share and the fixed part; the
        chunk they predict is measured too and shrunk while it does not fit (the share is
        not quite linear in the chunk). A chunk's products exist once more beside the
        result block until written into it, hence one parameter-sized vector more.
        """
        result_bytes = sum(p.numel() for p in self.params) * self.params[0].element_size()
        needs: dict[int, int] = {}  # chunk -> measured bytes beyond the result block

        def need(c: int) -> int:
            if c not in needs:
                g = torch.Generator().manual_seed(c)
                probes = [
                    torch.randn((c, *p.shape), generator=g, dtype=p.dtype).to(self.device)
                    for p in self.params
                ]
                self.clear_cache()
                needs[c] = peak_allocated_bytes(lambda: run(probes)) + result_bytes
                del probes
            return needs[c]

        with preserved_state(self.model, self.device), torch.enable_grad():
            per_probe = max(need(2) - need(1), 1) if most > 1 else max(need(1), 1)
            fixed = max(need(1) - per_probe, 0)
            chunk = chunk_size_for(per_probe, budget - fixed, most)
            for _ in range(4):  # shrink a predicted chunk that does not fit
                if chunk == 1 or need(chunk) <= budget:
                    break
                chunk = max(1, chunk + int((budget - need(chunk)) // per_probe))  # rounded down
            if chunk not in needs or needs[chunk] > budget:  # the last shrink, unmeasured
                chunk = max((c for c, n in needs.items() if n <= budget), default=1)
        self.clear_cache()
        return chunk, {"per_probe": per_probe, "fixed": fixed, "budget": int(budget)}

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
        leaves, spec = tree_flatten(first)
        again, spec_again = tree_flatten(second)
        same = spec == spec_again and all(
            torch.equal(a, b) if isinstance(a, Tensor) else a == b for a, b in zip(leaves, again)
        )
        if not same:
            raise RuntimeError(
                "the model's output changed between two identical forward passes, so its "
                "curvature is not well defined (dropout or another random layer in training "
                "mode?). Call model.eval() before building the operator, or pass "
                "check_deterministic=False if the randomness is intended."
            )

    def _batch_matmat(
        self,
        X,
        y,
        weight: float,
        probes: list[Tensor],
        out: list[Tensor],
        *,
        batch: int,
        accumulate: bool,
        last: bool = True,
    ) -> None:
        """Product on one batch, written into ``out`` (added to it when ``accumulate``).

        ``probes[i]`` and ``out[i]`` have shape ``(K, *params[i].shape)``; ``batch`` is the
        batch's index in the data pass; ``last``: no further probes go through this batch
        in this product (a graph built for it alone may then be freed as it is used).
        """
        raise NotImplementedError

    def _probe_chunk(self) -> int:
        """Most probes staged at once when the input block has to be transposed."""
        return 16

    def _matmat_step(self, K: int, column_major: bool) -> int:
        """Probes per call of ``_batch_matmat`` in ``_matmat``: all of a column-major block
        (the subclass chunks it as its backend needs), else one staged chunk."""
        return K if column_major else max(1, min(K, self._probe_chunk()))

    def _split_rows(self, rows: Tensor) -> list[Tensor]:
        """``(n, D)`` rows -> per-parameter views ``(n, *param.shape)`` (no copies)."""
        n = rows.shape[0]
        if n == 1 and rows.is_contiguous() and self._row_shapes is not None:
            # all views in one call (a view per parameter from Python costs a call each)
            return list(_unflatten_dense_tensors(rows.view(-1), self._row_shapes))
        sizes = [p.numel() for p in self.params]
        return [piece.view(n, *p.shape) for piece, p in zip(rows.split(sizes, dim=1), self.params)]

    def _staging_buffer(self, V: Tensor, step: int) -> Tensor | None:
        """``(step, D)`` rows to transpose a row-major ``V`` into; ``None`` for column-major."""
        D, K = V.shape
        if V.T.is_contiguous():
            return None
        return torch.empty(min(step, K), D, dtype=self.dtype, device=self.device)

    def _probe_rows(
        self, V: Tensor, step: int, stage: Tensor | None
    ) -> Iterator[tuple[int, int, Tensor]]:
        """``(s, e, rows)``: the columns ``s:e`` of ``V`` ``(D, K)`` as ``(e - s, D)`` rows,
        views of a column-major ``V`` or copies into ``stage`` (``_staging_buffer``)."""
        K = V.shape[1]
        for s in range(0, K, step):
            e = min(K, s + step)
            if stage is None:
                yield s, e, V.T[s:e]
            else:
                rows = stage[: e - s]
                rows.copy_(V.T[s:e])
                yield s, e, rows

    def _data_pass(
        self,
        V: Tensor,
        step: int,
        target: Callable[[int, int], Tensor],
        accumulate: bool,
        after: Callable[[int, int, Tensor, Tensor], None] | None = None,
    ) -> None:
        """Push the columns of ``V`` ``(D, K)`` through every batch, ``step`` at a time.

        Chunk ``s:e`` is written to the ``(e - s, D)`` rows ``target(s, e)``: summed over the
        batches when ``accumulate``, else overwritten by each batch and handed to
        ``after(s, e, probe_rows, result_rows)``. A column-major ``V`` (``V.T`` contiguous)
        gives its probe rows as views; a row-major one is transposed chunk by chunk.
        """
        stage = self._staging_buffer(V, step)
        buffers = self._product_start()
        try:
            reuse_freed_memory(self.device)
            with preserved_state(self.model, self.device, buffers):
                for b, (X, y, weight) in enumerate(self._iter_batches()):
                    for s, e, rows in self._probe_rows(V, step, stage):
                        out = target(s, e)
                        self._batch_matmat(
                            X,
                            y,
                            weight,
                            self._split_rows(rows),
                            self._split_rows(out),
                            batch=b,
                            accumulate=accumulate and b > 0,
                            last=e == V.shape[1],
                        )
                        if after is not None:
                            after(s, e, rows, out)
        finally:
            self._product_done()

    def _matmat(self, V: Tensor) -> Tensor:
        """``A @ V`` for a ``(D, K)`` block, accumulated in one ``(K, D)`` buffer.

        Probes and results are per-parameter views into ``(K, D)`` row blocks, so the data
        pass stacks, concatenates and transposes nothing. The result is returned as the
        ``(D, K)`` transpose of that buffer (column-major). A column-major ``V`` (e.g.
        ``torch.randn(K, D).T``, which is how curvkit's estimators draw probes, or a previous
        result) is used without a copy; a row-major one is transposed in chunks of at most
        ``_probe_chunk()`` probes, so the staging copy stays small.
        """
        D, K = V.shape
        result = torch.empty(K, D, dtype=self.dtype, device=self.device)
        step = self._matmat_step(K, column_major=V.T.is_contiguous())
        self._data_pass(V, step, lambda s, e: result[s:e], accumulate=True)
        result = result.T
        check_finite(result, f"the {type(self).__name__} product")
        return result

    def _quadratic_form(self, V: Tensor, group_size: int = 1) -> Tensor:
        """``v_k^T A v_k`` chunk by chunk: no ``(D, K)`` result is ever held (summed over
        groups of ``group_size`` columns at the end).

        One reused ``(step, D)`` buffer of at most ``QUADRATIC_FORM_BUFFER_BYTES`` (one
        probe at least) takes each chunk's products, which are reduced against the probes
        at once; over several batches the per-batch forms add up.
        """
        D, K = V.shape
        per_probe = max(1, D * V.element_size())
        step = max(1, min(K, self._probe_chunk(), QUADRATIC_FORM_BUFFER_BYTES // per_probe))
        buffer = torch.empty(step, D, dtype=self.dtype, device=self.device)
        forms = torch.zeros(K, dtype=self.dtype, device=self.device)

        def reduce(s: int, e: int, rows: Tensor, out: Tensor) -> None:
            forms[s:e] += torch.linalg.vecdot(rows, out)

        self._data_pass(V, step, lambda s, e: buffer[: e - s], accumulate=False, after=reduce)
        check_finite(forms, f"the {type(self).__name__} quadratic form")
        return group_sums(forms, group_size)
