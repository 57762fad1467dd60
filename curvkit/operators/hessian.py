"""The Hessian of a model's loss over a dataset, as a matrix-free operator."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from curvkit.autodiff import (
    BACKENDS,
    FORWARD_MODE_BACKENDS,
    CompiledHVP,
    GradientGraph,
    ParametersReachedError,
    batch_hvp,
    check_compile_backend,
    chunked_into,
    differentiable_attention,
    first_backward,
    graph_hvp,
    parametrizations_cached,
    reaches,
    second_backward,
    write_into,
)
from curvkit.operators.base import BLOCK_MEMORY_FACTOR, CurvatureOperator
from curvkit.operators.graphed import GRAPHED_MARGIN, GraphedProducts
from curvkit.operators.quadratic_forms import TaylorQuadraticForms, check_quadratic_form_method
from curvkit.operators.trials import (
    agreement_tolerance,
    failure_reason,
    fall_back,
    timed_rounds,
    warm_up,
)

__all__ = ["HESSIAN_BACKENDS", "HessianOperator"]

#: the backends of :class:`HessianOperator`: :mod:`curvkit.autodiff`'s and ``"graphed"``
HESSIAN_BACKENDS = (*BACKENDS, "graphed")

#: most probes a block trial of backend="auto" runs per candidate
TRIAL_PROBES = 8
#: interleaved timing rounds of the trial (the best time of each candidate counts)
TRIAL_ROUNDS = 2
#: the backends that push a chunk of probes through one pass (memory grows with the chunk)
BATCHED_BACKENDS = ("batched", "forward-over-reverse")


class HessianOperator(GraphedProducts, TaylorQuadraticForms, CurvatureOperator):
    """``H = d^2 L / d theta^2`` of the loss ``L`` over all of ``data``.

    Over several batches the operator equals the Hessian of the concatenated batch, for
    mean- and sum-reduced losses and uneven batch sizes. ``H @ V`` with ``K`` columns builds
    each batch's gradient graph once and pushes all ``K`` columns through it (except with
    ``"forward-ad"`` and ``"reverse-over-forward"``, which re-run forward and backward per
    probe).

    Train-mode BatchNorm couples the samples of a batch: there the operator is the weighted
    sum of per-batch Hessians, each with its own batch statistics (what the training loss
    sees), not the Hessian of one concatenated batch. Running statistics are never changed.

    Backend choice (``backend="auto"``): at the first product of each kind, a single vector
    (``K = 1``) or a block (``K > 1``), every candidate backend runs on the first batch, is
    checked against double backward (agreement to ``sqrt(eps)`` relative, of TF32's eps
    where CUDA runs float32 convolutions or matrix products in TF32; a candidate that
    errs or disagrees is dropped) and timed, best of two interleaved runs on at most 8
    probes after a warm-up product; the choice is cached and used from then on.
    ``self.backend`` is the backend of the latest product (``"auto"`` before the first),
    ``self.backend_choices`` the cached choice per kind, and ``self.backend_trials`` the
    trial's seconds (or the reason a candidate was dropped). A vectorised backend, whose
    memory grows with the probe chunk, is chosen over the one-graph loop only if it is at
    least 10% faster, and ``"reverse-over-forward"``, the leanest, whenever it is within 10%
    of the fastest (:func:`choose_backend`). Results never depend on the choice beyond
    rounding. Pass a backend name to skip the trial.

    Compiled product (``compile=True``): ``"auto"`` also tries ``"compiled"``, the
    forward-over-reverse product under ``torch.compile`` (``backend=compile_backend``). Its
    trial first compiles it on the trial's probes (an untimed warm-up that is also the
    agreement check), then times it like the others; it is kept only if it takes less than
    ``COMPILED_MARGIN`` (90%) of the fastest eager candidate's time. Compiling costs seconds
    to minutes, once per probe-chunk length and batch shape (the compiled functions are
    kept on the operator and reused); ``self.compile_seconds`` is the total spent. Any error
    while compiling or running drops the candidate with its reason in
    ``self.backend_trials``. ``backend="compiled"`` uses it without a trial; if it fails, the
    operator warns and falls back to double backward (as for the other forward-mode
    backends), recording ``self.backend_fallback_reason``. Without ``compile=True`` nothing
    is compiled.

    CUDA graphs (``cuda_graphs=True``, the default; CUDA devices only): where the operator
    keeps its graph (see below), ``"auto"`` also tries ``"graphed"``: the second backward
    through the kept graph, captured once as a CUDA graph (:mod:`curvkit.cuda_graphs`) and
    replayed for each probe. A replay launches all of a product's kernels with one call,
    which removes the host's per-kernel cost that bounds a small model's product on a GPU.
    Its trial captures it (untimed; the agreement check), then times replays; it is kept
    only if it takes less than ``GRAPHED_MARGIN`` (90%) of the fastest eager candidate's
    time. A capture belongs to one kept graph: after the graph is rebuilt, the next product
    runs as double backward and the one after captures again, so an operator whose graph
    changes before every product never pays for a capture. The capture holds its second
    backward's working memory (a private memory pool) and one parameter-sized result for
    as long as the graph is kept. ``backend="graphed"`` asks for it without a trial (where
    no graph is kept, its products run as double backward).

    Graph reuse (``cache_graph=True``, the default): over one in-memory ``(X, y)`` batch,
    the forward pass and first backward (the gradient with its graph) are kept after a
    product and reused by the next, so repeated products (Lanczos, CG, estimators calling
    ``H @ V`` block after block) each cost one second backward per probe. The kept graph
    holds what autograd saved for the gradient (about one gradient computation's
    activations; the gradient's own values are freed); it is
    rebuilt when anything it depends on changes -- a parameter, buffer or data tensor
    updated in place (version counters) or replaced (storage), a module switched between
    train and eval, or a change of values through ``.data`` (caught by comparing a strided
    sample of every parameter, buffer and data tensor) -- and released by :meth:`clear_cache`. It is
    not kept for train-mode BatchNorm, whose graph holds the running statistics that every
    product restores. ``cache_graph=False`` builds it afresh for every product (as always
    happens with several batches, whose graphs are built one at a time in each product);
    such a graph is freed by its last backward as that runs, so an isolated product peaks
    where plain double backward does.

    Args:
        model, loss_fn, data, params, reduction, check_deterministic: see
            :class:`curvkit.operators.base.CurvatureOperator`.
        backend: ``"auto"`` or one of ``"double-backward"``, ``"batched"``,
            ``"forward-over-reverse"``, ``"forward-ad"``, ``"reverse-over-forward"``,
            ``"compiled"`` (see :mod:`curvkit.autodiff`), ``"graphed"`` (see above; CUDA).
            The forward-mode backends (and Taylor-mode quadratic forms) differentiate what
            the model's forward pass computes from the parameters. A ``loss_fn`` that also
            uses parameter tensors it holds itself (a penalty) gets that term's curvature
            only from the reverse-mode backends: asked for by name, a forward-mode backend
            (or ``quadratic_form_method="taylor"``) then raises at its first use, and
            ``"auto"`` leaves them out (one extra forward pass at its first trial tells).
            Under ``torch.nn.utils.parametrize.cached()`` they cannot run (the cached
            weights do not follow their stand-ins for the parameters): they fall back to
            double backward there.
        max_probes_per_chunk: most probes a batched backend (``"batched"``,
            ``"forward-over-reverse"``, ``"compiled"``) pushes through at once.
        memory_budget: bytes a product of ``K`` probes may hold beyond its ``(D, K)``
            result. ``None`` (default): ``BLOCK_MEMORY_FACTOR`` (4) times one gradient's
            peak (``gradient_peak_bytes``); ``float("inf")``: no cap. The batched backends'
            chunks are sized to it from the measured peaks of chunks of one and two probes
            on the first batch (``chunk_sizes``, ``chunk_memory``); the loop backends hold
            one probe at a time, and a batched backend that needs more than the budget for
            one probe is no candidate of ``"auto"`` for blocks (chosen explicitly, it runs
            one probe at a time, with a warning). ``"compiled"`` pushes
            ``max_probes_per_chunk`` probes regardless. A row-major ``V`` adds one chunk of
            staged probes (estimators draw column-major blocks). Taylor-mode
            quadratic forms size their passes to it too (default there: 2.5 gradients,
            ``taylor_chunk_size``).
        cache_graph: keep the first-backward graph of a one-batch operator between
            products (see above).
        quadratic_form_method: how :meth:`quadratic_form` computes ``v^T H v``:
            ``"taylor"`` (second-order forward propagation, :mod:`curvkit.taylor`: no
            backward pass, and the probes of a group can be collapsed), ``"hvp"``
            (``v^T (H v)`` through the backend above) or ``"auto"`` (default): at the first
            call both run on the first probes, Taylor mode is checked against ``v^T (H v)``
            (agreement as for the backends) and the faster is kept
            (``quadratic_form_choice``, trial seconds or the reason Taylor mode was dropped in
            ``quadratic_form_trial``). A model with an operation Taylor mode has no rule for
            uses ``"hvp"``.
        compile: let ``"auto"`` try the compiled product (see above); off by default, since
            compiling takes seconds to minutes.
        compile_backend: ``torch.compile``'s ``backend=`` for ``"compiled"``: a registered
            name (``"inductor"``, the default; ``"aot_eager"`` compiles without code
            generation) or a callable.
        cuda_graphs: let ``"auto"`` try ``"graphed"`` on a CUDA device (see above).
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
        memory_budget: int | None = None,
        reduction: str | None = None,
        check_deterministic: bool = True,
        cache_graph: bool = True,
        quadratic_form_method: str = "auto",
        compile: bool = False,
        compile_backend: str | Callable = "inductor",
        cuda_graphs: bool = True,
    ) -> None:
        check_quadratic_form_method(quadratic_form_method)
        if backend != "auto" and backend not in HESSIAN_BACKENDS:
            raise ValueError(
                f"unknown backend {backend!r}; choose 'auto' or one of {HESSIAN_BACKENDS}"
            )
        if compile or backend == "compiled":
            check_compile_backend(compile_backend)
        if max_probes_per_chunk < 1:
            raise ValueError("max_probes_per_chunk must be at least 1")
        if memory_budget is not None and not memory_budget > 0:
            raise ValueError(
                "memory_budget must be a positive number of bytes, float('inf') for no cap, "
                "or None for 4 gradients' peak"
            )
        super().__init__(
            model,
            loss_fn,
            data,
            params,
            reduction=reduction,
            check_deterministic=check_deterministic,
        )
        self.requested_backend = backend
        # whether loss_fn uses the parameters beyond the model's output (checked before a
        # forward-mode backend or Taylor mode first runs; None: not yet)
        self._loss_holds_params: bool | None = None
        self.backend = backend
        self.backend_choices: dict[str, str] = (
            {} if backend == "auto" else {"single": backend, "block": backend}
        )
        self.backend_trials: dict[str, dict[str, float | str]] = {}
        self.max_probes_per_chunk = max_probes_per_chunk
        self.memory_budget = memory_budget
        #: probes per chunk of each batched backend, within the memory budget, and the
        #: measured bytes they were sized from (per probe, fixed part, budget)
        self.chunk_sizes: dict[str, int] = {}
        self.chunk_memory: dict[str, dict[str, int]] = {}
        self.backend_fallback_reason: str | None = None
        self._init_quadratic_forms(quadratic_form_method)
        self.compile = bool(compile)
        self.compile_backend = compile_backend
        #: the compiled functions of ``"compiled"`` (built at its first use)
        self.compiled_product: CompiledHVP | None = None
        # probes of the current product already written by the compiled backend (a
        # fallback after a failing chunk computes only the rest)
        self._compiled_done = 0
        self._keep_graphs(cache_graph)
        self._init_graphed(cuda_graphs)

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling the ``"compiled"`` product so far (each compiled
        function's first call: tracing, compilation and one product); 0 if never used."""
        if self.compiled_product is None:
            return 0.0
        return float(sum(self.compiled_product.compile_seconds.values()))

    def _build_graph(self, X, y, weight: float) -> GradientGraph:
        """The gradient's graph, against the parameters or leaves aliasing them
        (:meth:`~curvkit.operators.graphed.GraphedProducts._graph_leaves`)."""
        inputs, forward = self._graph_leaves()
        aliased = () if forward is self.model else self.params
        with differentiable_attention(), self._graph_stream():
            try:
                graph = first_backward(
                    self.model, self.loss_fn, X, y, weight, inputs, forward, aliased
                )
            except ParametersReachedError:
                graph = None  # built again below, once the failed graph is freed
            if graph is None:
                inputs, forward = self._stop_aliasing()
                graph = first_backward(self.model, self.loss_fn, X, y, weight, inputs)
        return graph

    def _product_of_one(self, graph: GradientGraph, probes: list[Tensor]) -> list[Tensor]:
        hv = second_backward(graph.edges, graph.inputs, [v[0] for v in probes])
        return [h.unsqueeze(0) for h in hv]

    def _run_graphed(
        self,
        X,
        y,
        weight: float,
        probes: list[Tensor],
        out: list[Tensor] | None,
        batch: int,
        accumulate: bool,
    ) -> list[Tensor]:
        """``"graphed"``: replays of the kept graph's captured second backward, one probe
        each. The first product on a graph runs uncaptured (double backward); the second
        captures. Where no graph is kept, double backward."""
        graph = self._batch_graph(X, y, weight, batch)
        replay = self._graphed_replay(graph)
        if replay is None:
            return graph_hvp(
                graph.edges, graph.inputs, probes, "double-backward", 1, out, accumulate
            )
        return self._replay_into(replay, probes, out, accumulate)

    # ------------------------------------------------------------------ backend choice
    @property
    def chunk_size(self) -> int:
        """Probes per chunk of the block products' backend (the chosen one, else
        ``"batched"``), within the memory budget."""
        return self._chunk_for(self.backend_choices.get("block", "batched"))

    def _chunk_for(self, name: str) -> int:
        """Probes per chunk of backend ``name``: ``max_probes_per_chunk``, or for a batched
        backend what fits in the memory budget (:meth:`_measured_chunk`, once per backend)."""
        budget = self.memory_budget
        if name not in BATCHED_BACKENDS or self.max_probes_per_chunk == 1:
            return self.max_probes_per_chunk
        if budget is not None and math.isinf(budget):
            return self.max_probes_per_chunk
        if name not in self.chunk_sizes:
            # the measured runs push their probes at once (and size nothing themselves)
            self.chunk_sizes[name] = self.max_probes_per_chunk
            try:
                self.chunk_sizes[name] = self._measured_chunk(name)
            except BaseException:
                del self.chunk_sizes[name]  # sized again at the next product
                raise
            over = self._over_budget(name)
            if over is not None and self.requested_backend == name:
                warnings.warn(
                    f"backend {name!r} runs one probe at a time and still exceeds the memory "
                    f"budget ({over}); pass a larger memory_budget, or backend='auto'",
                    RuntimeWarning,
                    stacklevel=5,
                )
        return self.chunk_sizes[name]

    def _measured_chunk(self, name: str) -> int:
        """The largest chunk of backend ``name`` within the budget (:meth:`_fit_chunk`)."""
        budget = self.memory_budget
        if budget is None:
            budget = BLOCK_MEMORY_FACTOR * self.gradient_peak_bytes
        X, y = self._prepare(*self.batches.first())
        most = self.max_probes_per_chunk

        def run(probes: list[Tensor]) -> None:
            self._run(name, X, y, 1.0, probes)

        with differentiable_attention():
            chunk, self.chunk_memory[name] = self._fit_chunk(run, most, budget)
        return chunk

    def _over_budget(self, name: str) -> str | None:
        """Why a batched backend cannot run within the memory budget even one probe at a
        time (the trial then drops it); ``None`` where it can."""
        if self._chunk_for(name) > 1 or name not in self.chunk_memory:
            return None
        m = self.chunk_memory[name]
        one = m["fixed"] + m["per_probe"]
        if one <= m["budget"]:
            return None
        budget = m["budget"] / 2**20
        return f"one probe needs {one / 2**20:.0f} MiB, over the budget of {budget:.0f} MiB"

    def _candidates(self, kind: str) -> list[str]:
        if kind == "single":
            # "batched" is "double-backward" for one probe
            names = [
                "double-backward",
                "forward-ad",
                "reverse-over-forward",
                "forward-over-reverse",
            ]
        else:
            # "forward-ad" and "reverse-over-forward" re-run forward and backward per probe:
            # never faster than the loop over one reused graph for several probes
            names = ["double-backward", "batched", "forward-over-reverse"]
        if self.compile:
            names.append("compiled")
        if self._offers_graphed():
            names.append("graphed")
        return names

    def _trial(
        self,
        kind: str,
        X,
        y,
        weight: float,
        probes: list[Tensor],
        out: list[Tensor],
        batch: int,
        accumulate: bool,
    ) -> None:
        """Run every candidate on this batch, keep the fastest that agrees; write its result.

        Double backward runs first, untimed: it warms the process up and is the reference.
        Then every candidate (double backward again) runs once, timed, on at most
        ``TRIAL_PROBES`` probes (a block trial on a few probes predicts the per-probe cost).
        The backends that run through a kept graph are charged the graph's build time once
        per product (``K`` probes), unless the graph is kept between products. The compiled
        candidate is first compiled by an untimed run on the trial probes, which is also its
        agreement check; any exception from it drops it.
        """
        K = probes[0].shape[0]
        chunk = min(K, TRIAL_PROBES)
        trial_probes = [v[:chunk] for v in probes]
        tol = agreement_tolerance(self.model, self.dtype, self.device)
        timings: dict[str, float | str] = {}
        candidates = self._candidates(kind)
        forward_mode = [n for n in candidates if n in FORWARD_MODE_BACKENDS]
        if forward_mode and self._loss_holds_parameters(X, y):
            for name in forward_mode:
                timings[name] = "loss_fn uses the parameters beyond the model's output"
        for name in candidates if kind == "block" else ():
            if name in BATCHED_BACKENDS and name not in timings:  # sized first: measuring
                # builds graphs of its own
                try:
                    over = self._over_budget(name)
                except Exception as err:  # measuring ran the backend: a failure drops it
                    over = failure_reason(err)
                if over is not None:
                    timings[name] = over
        # built here (or reused) so it can be timed
        _, build_s = self._timed(lambda: self._batch_graph(X, y, weight, batch))
        reference = self._run("double-backward", X, y, weight, trial_probes, batch=batch)
        kept = self._keeps_graph()
        if not kept:  # the first build may be the process's first pass: time a warm one
            self._release_graph()
            _, warm_s = self._timed(lambda: self._batch_graph(X, y, weight, batch))
            build_s = min(build_s, warm_s)
        graph_charge = 0.0 if kept else build_s * chunk / K
        # every candidate writes into a result block, as a product does (a backend that
        # returned its autograd results as they are would be spared a copy the others pay)
        written = [torch.empty_like(r) for r in reference]
        if not all(bool(torch.isfinite(r).all()) for r in reference):
            # NaN/inf probes or products leave nothing to compare against: no choice is
            # cached, and the caller's finiteness check reports the problem
            self.backend = "double-backward"
            self._run("double-backward", X, y, weight, probes, out, batch, accumulate)
            return
        alive = [n for n in candidates if n not in timings]

        def warm(name: str) -> list[Tensor]:  # compile or capture
            if name == "graphed" and self.replay is None:
                self._capture(self._batch_graph(X, y, weight, batch))
            res = self._run(name, X, y, weight, trial_probes, batch=batch)
            self._sync_device()
            return res

        special = [n for n in _ANY_ERROR_DROPS if n in alive]
        warmed = warm_up(special, warm, reference, tol, "double-backward", timings)
        alive = [n for n in alive if n not in special or n in warmed]
        timed_rounds(
            alive,
            lambda name: self._timed(
                lambda: self._run(name, X, y, weight, trial_probes, written, batch=batch)
            ),
            reference,
            tol,
            "double-backward",
            timings,
            rounds=TRIAL_ROUNDS,
            may_drop=lambda name, err: (
                name != "double-backward"
                and (name in _ANY_ERROR_DROPS or isinstance(err, RuntimeError))
            ),
            charge=lambda name: 0.0 if name in FORWARD_MODE_BACKENDS else graph_charge,
        )
        choice = choose_backend(timings)
        if choice != "graphed" and "graphed" not in self.backend_choices.values():
            self._drop_replay()  # not chosen: its memory is not held
        self.backend_trials[kind] = timings
        self.backend_choices[kind] = choice
        self.backend = choice
        if chunk == K and choice == "double-backward":
            write_into(reference, out, accumulate)
            return
        self._run_or_fall_back(choice, X, y, weight, probes, out, batch, accumulate)

    def _run(
        self,
        name: str,
        X,
        y,
        weight: float,
        probes: list[Tensor],
        out: list[Tensor] | None = None,
        batch: int = 0,
        accumulate: bool = False,
        last: bool = False,
    ) -> list[Tensor]:
        """``H_b @ V`` by backend ``name``; ``last``: the batch's graph serves no further
        probes of this product (where it is not kept, its last pass frees it)."""
        if name == "compiled":
            return self._run_compiled(X, y, weight, probes, out, accumulate)
        if name == "graphed":
            return self._run_graphed(X, y, weight, probes, out, batch, accumulate)
        # a single probe needs no chunk (and no sizing, which would run inside a timed trial)
        chunk = self._chunk_for(name) if probes[0].shape[0] > 1 else 1
        if name in FORWARD_MODE_BACKENDS:
            with differentiable_attention():  # a forward pass runs (a kept graph's does not)
                return batch_hvp(
                    self.model,
                    self.loss_fn,
                    X,
                    y,
                    weight,
                    self.params,
                    self.param_names,
                    probes,
                    name,
                    chunk,
                    out,
                    accumulate,
                )
        graph = self._batch_graph(X, y, weight, batch)  # after sizing, which builds its own
        if not self._frees(graph, last):
            return graph_hvp(graph.edges, graph.inputs, probes, name, chunk, out, accumulate)
        # its last use: freed as the last probe runs through it (a lower peak), then dropped
        res = graph_hvp(
            graph.edges, graph.inputs, probes, name, chunk, out, accumulate, retain_graph=False
        )
        self._release_graph()
        return res

    def _run_compiled(
        self,
        X,
        y,
        weight: float,
        probes: list[Tensor],
        out: list[Tensor] | None,
        accumulate: bool,
    ) -> list[Tensor]:
        """The compiled product, chunk by chunk, counting in ``self._compiled_done`` the
        probes whose products are already written to ``out``."""
        if self.compiled_product is None:
            self.compiled_product = CompiledHVP(
                self.model, self.loss_fn, self.param_names, self.compile_backend
            )
        self._compiled_done = 0

        def counted(chunk: list[Tensor]) -> list[Tensor]:
            res = compute(chunk)
            self._compiled_done += chunk[0].shape[0]  # written into ``out`` right after
            return res

        with differentiable_attention():
            compute = self.compiled_product.chunk_function(X, y, weight, self.params)
            return chunked_into(counted, probes, self.max_probes_per_chunk, out, accumulate)

    def _run_or_fall_back(
        self,
        name: str,
        X,
        y,
        weight: float,
        probes: list[Tensor],
        out: list[Tensor],
        batch: int,
        accumulate: bool,
        last: bool = False,
    ) -> None:
        """``_run``; a forward-mode backend that fails is replaced by double backward for
        this and every later product, with a warning (the compiled one on any exception;
        the others, ``"graphed"`` included, on a ``RuntimeError``)."""
        self._compiled_done = 0
        try:
            self._run(name, X, y, weight, probes, out, batch, accumulate, last)
        except Exception as err:
            if name not in (*FORWARD_MODE_BACKENDS, "graphed") or not (
                name == "compiled" or isinstance(err, RuntimeError)
            ):
                raise
            self._drop_replay()
            # torch.func transforms and forward-mode AD reject some models (in-place
            # buffer updates of train-mode BatchNorm under vmap, ops without forward-mode
            # rules, curvkit's TaylorUnsupportedError), compilation and capture may fail;
            # double backward computes the same product.
            fall_back(self, name, "double-backward", err, stacklevel=6)
            # the compiled backend may have written its first chunks: only the rest remain
            done = self._compiled_done if name == "compiled" else 0
            self._run(
                "double-backward",
                X,
                y,
                weight,
                [v[done:] for v in probes],
                [o[done:] for o in out],
                batch,
                accumulate,
                last,
            )

    def _probe_chunk(self) -> int:
        # probes staged per data-pass step; each step is chunked again by its backend
        return self.chunk_sizes.get(self.backend_choices.get("block"), self.max_probes_per_chunk)

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
        kind = "single" if probes[0].shape[0] == 1 else "block"
        if self.requested_backend in FORWARD_MODE_BACKENDS:
            self._refuse_a_loss_holding_parameters(X, y, f"backend {self.requested_backend!r}")
        # attention's math kernel is selected where a forward pass runs (graph builds,
        # forward-mode backends): a product through a kept graph runs none
        with torch.enable_grad():
            if kind not in self.backend_choices:
                self._trial(kind, X, y, weight, probes, out, batch, accumulate)
                return
            name = self.backend_choices[kind]
            self.backend = name
            self._run_or_fall_back(name, X, y, weight, probes, out, batch, accumulate, last)

    def _check_taylor_loss(self, X, y) -> None:
        self._refuse_a_loss_holding_parameters(X, y, "Taylor mode")

    def _refuse_a_loss_holding_parameters(self, X, y, what: str) -> None:
        """Raise if ``loss_fn`` uses the parameters other than through ``model(X)`` (a
        penalty it holds): ``what``, a forward-mode backend or Taylor mode, differentiates
        only the model's forward pass and would miss that curvature. Asked for by name they
        raise; ``"auto"`` leaves them out (its trials record why)."""
        if not self._loss_holds_parameters(X, y):
            return
        raise ValueError(
            f"loss_fn uses the parameters directly, not only through the model's output, and "
            f"{what} differentiates only the model's forward pass, so it would miss that part "
            "of the Hessian. Use backend='double-backward' or 'batched' and "
            "quadratic_form_method='hvp' (or 'auto', which leaves the others out), or move "
            "the term into the model."
        )

    def _loss_holds_parameters(self, X, y) -> bool:
        """Whether ``loss_fn`` uses the parameters beyond ``model(X)``: one forward pass,
        once per operator (its random numbers are not drawn from the product's stream).
        Under ``parametrize.cached()`` it is not run (a pass would fill the cache), and the
        forward-mode backends refuse to run there anyway."""
        if self._loss_holds_params is None:
            if parametrizations_cached(self.model):
                return False
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices), torch.enable_grad(), differentiable_attention():
                out = self.model(X)  # with grad mode on: a forward may differentiate itself
                outside = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, out)
                loss = self.loss_fn(outside, y)
            self._loss_holds_params = isinstance(loss, Tensor) and reaches(loss, self.params)
        return self._loss_holds_params

    def _taylor_max_probes(self) -> int:
        return self.max_probes_per_chunk

    def _taylor_memory_budget(self) -> int | None:
        return self.memory_budget

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


#: a backend whose memory grows with the probe chunk must beat the one-graph loop by this
#: factor to be chosen: a tie in time is not worth chunk-size times the memory
VECTORISED_MARGIN = 0.9
#: the backend with the least memory, ``"reverse-over-forward"`` (no gradient-sized tensors
#: in its graph), is chosen when it is within this factor of the fastest
LEAN_MARGIN = 1.1
#: the compiled product must beat the fastest eager candidate by this factor to be chosen:
#: compiled code is kept only where it measurably helps
COMPILED_MARGIN = 0.9
#: the candidates that beat the eager ones only by these margins
_MARGINS = {"compiled": COMPILED_MARGIN, "graphed": GRAPHED_MARGIN}
#: the candidates any exception drops (others: a RuntimeError, such as a missing rule)
_ANY_ERROR_DROPS = ("compiled", "graphed")


def choose_backend(timings: dict[str, float | str]) -> str:
    """The fastest timed candidate (strings are reasons a candidate was dropped), except
    that ``"double-backward"`` (one graph, one probe at a time) wins over the vectorised
    backends (``"batched"``, ``"forward-over-reverse"``: memory grows with the chunk)
    unless they take less than ``VECTORISED_MARGIN`` of its time, ``"compiled"`` and
    ``"graphed"`` are chosen only if they take less than ``COMPILED_MARGIN`` /
    ``GRAPHED_MARGIN`` of the fastest eager candidate's time (the faster of the two if
    both do), and ``"reverse-over-forward"``, the leanest, wins when within
    ``LEAN_MARGIN`` of the fastest eager time."""
    timed = {n: t for n, t in timings.items() if isinstance(t, float)}
    special = {n: timed.pop(n) for n in _MARGINS if n in timed}
    if not timed:
        if not special:
            raise ValueError("no candidate backend was timed")
        return min(special, key=special.get)
    fastest = min(timed.values())
    winners = {n: t for n, t in special.items() if t < _MARGINS[n] * fastest}
    if winners:
        return min(winners, key=winners.get)
    return _choose_eager(timed)


def _choose_eager(timed: dict[str, float]) -> str:
    """The fastest of the eager ``timed`` candidates, with ``VECTORISED_MARGIN`` and
    ``LEAN_MARGIN``."""
    choice = min(timed, key=timed.get)
    lean = timed.get("reverse-over-forward")
    if lean is not None and lean <= LEAN_MARGIN * timed[choice]:
        return "reverse-over-forward"
    if (
        choice in ("batched", "forward-over-reverse")
        and "double-backward" in timed
        and timed[choice] >= VECTORISED_MARGIN * timed["double-backward"]
    ):
        return "double-backward"
    return choice
