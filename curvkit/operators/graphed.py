"""The ``"graphed"`` backend of operators that keep a graph: products through the kept graph
captured once as a CUDA graph (:mod:`curvkit.cuda_graphs`) and replayed, one probe each."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from torch import Tensor

from curvkit import cuda_graphs
from curvkit.autodiff import chunked_into, functional_model
from curvkit.operators.trials import failure_reason

#: ``"graphed"`` must beat the fastest eager candidate by this factor to be chosen by a
#: trial: its capture holds its working memory for as long as the graph is kept
GRAPHED_MARGIN = 0.9


class GraphedProducts:
    """Mixin of :class:`~curvkit.operators.base.CurvatureOperator` subclasses that keep a
    graph between products and can replay their product through it.

    A subclass implements :meth:`_product_of_one` (the product of one probe through a kept
    graph, with no hooks and no host synchronisation: it is captured), calls
    :meth:`_init_graphed` in its constructor and builds its graph inside
    :meth:`_graph_stream`. Then ``self.replay`` holds the capture of the kept graph, made at
    the graph's second product (:meth:`_graphed_replay`; an operator whose graph changes
    before every product never pays for a capture) and dropped with the graph.

    A graph that may be captured is built against leaves aliasing the parameters
    (:meth:`_graph_leaves`). Where a capture fails, the failure is recorded
    (``graphed_failure``) and products run uncaptured from then on.
    """

    def _init_graphed(self, cuda_graphs_on: bool) -> None:
        if self.requested_backend == "graphed" and not cuda_graphs.available(self.device):
            raise ValueError(
                f"backend 'graphed' replays CUDA graphs, but the operator runs on "
                f"{self.device}; use the same product uncaptured ('double-backward' for a "
                "Hessian, 'double-vjp' for a GGN) or move the model to a CUDA device"
            )
        self.cuda_graphs = bool(cuda_graphs_on)
        #: the kept graph's captured product (``"graphed"``), dropped with the graph
        self.replay: cuda_graphs.Replay | None = None
        #: products made through the kept graph so far (a capture waits for the second)
        self._graph_products = 0
        #: why a capture failed (then ``"graphed"`` is no longer offered)
        self.graphed_failure: str | None = None
        #: whether graphs to be captured are built against leaves aliasing the parameters
        #: (off once a forward pass through them used the parameters themselves)
        self.aliases_parameters = True

    def _product_of_one(self, graph, probes: list[Tensor]) -> list[Tensor]:
        """The products of one probe (blocks ``(1, *param.shape)``) through ``graph``."""
        raise NotImplementedError

    def _offers_graphed(self) -> bool:
        """Whether ``"graphed"`` can run: a CUDA device and a kept graph, and asked for
        (``backend="graphed"``, or ``"auto"`` with ``cuda_graphs``)."""
        asked = self.requested_backend == "graphed" or (
            self.requested_backend == "auto" and self.cuda_graphs
        )
        return (
            asked
            and self.graphed_failure is None
            and cuda_graphs.available(self.device)
            and self._keeps_graph()
        )

    def _may_capture(self) -> bool:
        """Whether a graph built now may be captured: ``"graphed"`` is offered and asked
        for, chosen, or not yet tried for every kind of product."""
        if not self._offers_graphed():
            return False
        choices = self.backend_choices
        return (
            self.requested_backend == "graphed"
            or "graphed" in choices.values()
            or not {"single", "block"} <= set(choices)
        )

    def _graph_leaves(self) -> tuple[list[Tensor], Callable[[Any], Any]]:
        """What a graph built now is differentiated against, and its forward pass: the
        parameters and the model; or, for a graph that may be captured, fresh leaves that
        alias the parameters and a forward pass through them (``functional_call``).

        Each parameter has one gradient accumulator while any graph holds it, and it keeps
        the stream it was made on: a loss graph the user keeps alive on the default stream
        would pin it there, and the end of a captured backward through it would wait on
        that stream, which invalidates the capture. The leaves' accumulators are made with
        the graph, on the capture stream. They share storage and version counter with the
        parameters, so the graph is found stale exactly as before. A model that reaches its
        parameters other than as module attributes (which ``functional_call`` swaps) would
        bypass the leaves: the build checks the forward pass's graph for the parameters
        themselves (:func:`~curvkit.autodiff.reaches`) and, where they occur, builds against
        the parameters from then on (:meth:`_stop_aliasing`).
        """
        if not (self.aliases_parameters and self._may_capture()):
            return list(self.params), self.model
        for name, p in zip(self.param_names, self.params):
            if self.model.get_parameter(name) is not p:
                raise ValueError(
                    f"the model's parameter {name!r} was replaced after the operator was "
                    "built (the operator differentiates the tensors it was given); build a "
                    "new operator for the changed model"
                )
        leaves = [p.detach().requires_grad_() for p in self.params]
        named = dict(zip(self.param_names, leaves))
        call = functional_model(self.model)
        return leaves, lambda X: call(named, (X,))

    def _stop_aliasing(self) -> tuple[list[Tensor], Callable[[Any], Any]]:
        """Build against the parameters from now on (the model bypassed the leaves)."""
        self.aliases_parameters = False
        return list(self.params), self.model

    def _graph_stream(self) -> AbstractContextManager[None]:
        """Where a graph is built: on the capture stream if it may be captured (autograd
        runs each backward op on its forward op's stream, and a capture records one), else
        on the current stream (a graph on the side stream costs every uncaptured product
        an event between the streams, and its memory is cached for that stream alone)."""
        if self._may_capture():
            return cuda_graphs.on_capture_stream(self.device)
        return contextlib.nullcontext()

    def _capture(self, graph) -> cuda_graphs.Replay:
        """Capture the product of one probe through ``graph`` (the kept graph)."""
        self._drop_replay()
        try:
            self.replay = cuda_graphs.Replay(
                lambda probes: self._product_of_one(graph, probes), self.params, chunk=1
            )
        except Exception as err:
            self.graphed_failure = failure_reason(err)
            raise
        return self.replay

    def _graphed_replay(self, graph) -> cuda_graphs.Replay | None:
        """The replay of ``graph``, captured now if this is the graph's second product or
        later; ``None`` while its products run uncaptured."""
        if self.replay is None and self._offers_graphed() and self._graph_products > 0:
            self._capture(graph)
        return self.replay

    @staticmethod
    def _replay_into(
        replay: cuda_graphs.Replay,
        probes: list[Tensor],
        out: list[Tensor] | None,
        accumulate: bool,
    ) -> list[Tensor]:
        """Replays for ``probes`` ``(K, *param.shape)``, written into ``out`` (or copied out
        of the replay's outputs, which the next replay overwrites)."""
        if out is None:
            return chunked_into(lambda v: [h.clone() for h in replay(v)], probes, 1, None, False)
        return chunked_into(replay, probes, 1, out, accumulate)

    def _drop_replay(self) -> None:
        if self.replay is not None:
            self.replay.release()
            self.replay = None

    def _release_graph(self) -> None:
        self._drop_replay()  # before the graph whose memory its kernels read
        self._graph_products = 0
        super()._release_graph()

    def _product_done(self) -> None:
        super()._product_done()
        if self._graph is not None:  # kept for the next product
            self._graph_products += 1
