"""Products through a kept graph, captured once as a CUDA graph and replayed.

On a GPU, an eager second backward through a small model is bound by the host: autograd and
PyTorch's dispatcher spend microseconds of CPU time on each of hundreds of kernels that run
for less. A CUDA graph records the kernels of one product once; a replay launches them all
with one call, so the product costs its kernels' time alone (the ``"graphed"`` backend of
:class:`curvkit.HessianOperator`).

What a capture records must stay where it is for every replay:

- The kept first-backward graph: the saved tensors the kernels read. A :class:`Replay`
  belongs to one kept graph and is dropped with it (the operator does that).
- The probes: each replay copies its probes into static buffers first.
- The results: every replay overwrites the same output tensors, so the caller copies them out
  before the next replay.

Autograd runs each backward op on the stream its forward op ran on, and a capture records
one stream (not the default one). So a graph that is to be captured is built on the capture
stream (:func:`on_capture_stream`). The parameters' gradient accumulators are the exception:
made once per parameter, they keep the stream of the graph that made them while any graph
holds them, so a training loss kept alive on the default stream pins them there, and the
end of a captured backward would wait on that stream, which invalidates the capture. The
operators therefore build a graph to be captured against fresh leaves aliasing the
parameters (:meth:`curvkit.operators.graphed.GraphedProducts._graph_leaves`), and where
PyTorch can redirect stale streams to the capturing one
(``torch.autograd.graph.set_override_stale_capture_stream``, newer than 2.11) that is
switched on for the capture too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from curvkit.autodiff import write_into

__all__ = ["Replay", "available", "capture", "on_capture_stream"]

#: one side stream per CUDA device, for building graphs that are captured and capturing
_STREAMS: dict[int, torch.cuda.Stream] = {}


def available(device: torch.device) -> bool:
    """Whether products on ``device`` can be captured (CUDA devices)."""
    return device.type == "cuda"


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(device=index)
    return _STREAMS[index]


@contextlib.contextmanager
def on_capture_stream(device: torch.device) -> Iterator[None]:
    """Run the block's CUDA work on ``device``'s capture stream, ordered after the current
    stream's earlier work, and the current stream's later work after it. A no-op off
    CUDA."""
    if device.type != "cuda":
        yield
        return
    stream = _capture_stream(device)
    current = torch.cuda.current_stream(device)
    stream.wait_stream(current)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        current.wait_stream(stream)


@contextlib.contextmanager
def _stale_streams_redirected() -> Iterator[None]:
    """PyTorch's redirection of stale non-capturing streams to the capturing stream, on for
    the block where this PyTorch has it (a process-wide flag, restored after)."""
    get = getattr(torch._C, "_override_stale_capture_stream", None)
    set_ = getattr(torch.autograd.graph, "set_override_stale_capture_stream", None)
    if get is None or set_ is None:
        yield
        return
    before = bool(get())
    set_(True)
    try:
        yield
    finally:
        set_(before)


def capture(
    run: Callable[[], list[Tensor]], device: torch.device
) -> tuple[list[Tensor], Callable[[], None]]:
    """Capture ``run()`` as a CUDA graph: ``(outputs, replay)``.

    ``run`` is called twice: once uncaptured on the capture stream (lazy initialisations,
    such as cuBLAS workspaces, must not happen inside a capture) and once captured.
    ``outputs`` are the captured call's results; each ``replay()`` (on the current stream)
    recomputes them in place from the current contents of the tensors ``run`` read.
    """
    stream = _capture_stream(device)
    with on_capture_stream(device):
        run()
    graph = torch.cuda.CUDAGraph()
    before = torch.cuda.current_stream(device)
    try:
        with _stale_streams_redirected(), torch.cuda.graph(graph, stream=stream):
            outputs = run()
    except BaseException:
        # torch.cuda.graph ends the capture before it leaves the stream: a capture that
        # fails to end would leave this thread's work (the fallback's, the user's) on the
        # capture stream
        torch.cuda.set_stream(before)
        torch.cuda.synchronize(device)
        raise
    return outputs, graph.replay


def _reserved_bytes(device: torch.device) -> int:
    """The CUDA allocator's reserved bytes once its unused cache is released (0 off CUDA)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved(device)


class Replay:
    """A product ``f(probes)`` captured for chunks of up to ``chunk`` probes.

    Args:
        product: maps a list of probe blocks ``(chunk, *shape_i)`` to a list of result
            blocks ``(chunk, *result_shape_j)``; it must read nothing that changes between
            replays but the probes (the caller drops the replay when something does).
        like: tensors whose shapes, dtypes and device the probe blocks take (one per block).
        chunk: probes per replay.
    """

    def __init__(
        self,
        product: Callable[[list[Tensor]], list[Tensor]],
        like: Sequence[Tensor],
        chunk: int,
    ) -> None:
        self.chunk = chunk
        self.device = like[0].device
        self.probes = [torch.zeros((chunk, *t.shape), dtype=t.dtype, device=t.device) for t in like]
        before = _reserved_bytes(self.device)
        self.outputs, self._replay = capture(lambda: product(self.probes), self.device)
        #: device memory the capture holds until it is dropped (its private memory pool,
        #: outputs included): the growth of the allocator's reserved memory, measured after
        #: releasing its cache (0 off CUDA)
        self.reserved_bytes = _reserved_bytes(self.device) - before
        #: replays so far
        self.replays = 0
        #: the stream of the latest replay (None off CUDA)
        self._stream = (
            torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        )

    def release(self) -> None:
        """Order the capture stream's later work after the replays already queued (on the
        stream of the latest): call it before dropping the replay and the graph it reads
        (their memory, allocated on the capture stream, is reused there, and a replay
        still in flight reads it)."""
        if self._stream is not None:
            _capture_stream(self.device).wait_stream(self._stream)

    def __call__(self, probes: Sequence[Tensor]) -> list[Tensor]:
        """The products of ``probes`` (blocks of ``n <= chunk`` probes), as views of the
        static outputs: valid until the next call."""
        n = probes[0].shape[0]
        if n > self.chunk:
            raise ValueError(f"a replay takes at most {self.chunk} probes, got {n}")
        if n == self.chunk:
            write_into(list(probes), self.probes, accumulate=False)
        else:
            for static, v in zip(self.probes, probes):
                static[:n].copy_(v)
                static[n:].zero_()
        if self._stream is not None:
            self._stream = torch.cuda.current_stream(self.device)
        self._replay()
        self.replays += 1
        return [o[:n] for o in self.outputs]
