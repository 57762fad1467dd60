"""The generalised Gauss-Newton matrix, its exact diagonal and trace, and the residual ``H - G``.

For a loss ``L(theta) = sum_b w_b * loss_fn(f(X_b; theta), y_b)`` the GGN is

    G = sum_b J_b^T Lambda_b J_b,

with ``J_b = d f(X_b) / d theta`` (shape ``(N_b * M, D)``, ``M`` outputs per sample) and
``Lambda_b = d^2 (w_b * loss_fn) / d f^2`` the loss Hessian with respect to the network
outputs. ``G`` is positive semi-definite whenever the loss is convex in the outputs (MSE,
cross-entropy, BCE with logits). The Hessian splits as ``H = G + R`` with the residual

    R = sum_b sum_{n,c} g_{b,n,c} * d^2 f_{n,c} / d theta^2,   g = d (w_b loss_fn) / d f,

the Hessian of the scalar ``<stop_grad(g), f(theta)>``; :class:`ResidualOperator` multiplies
by it at the cost of one Hessian-vector product.

Exact diagonal and trace of ``G`` use the symmetric factorisation of the output-space Hessian
per sample, ``Lambda_n = Q_n diag(lambda_n) Q_n^T``:

    diag(G) = sum_n sum_k lambda_{n,k} * (J_n^T q_{n,k})^2,

one vector-Jacobian product per non-zero eigenvalue (at most ``M``, ``C - 1`` for
cross-entropy) per sample. Per-sample VJPs run through ``torch.func.vmap`` in chunks sized
to a memory budget; where samples are coupled (train-mode BatchNorm) or vmap cannot trace the
model, the VJPs run through ordinary batched autograd on the whole batch instead (slower,
same result). The Monte-Carlo variant replaces the ``r`` eigen-directions by
``mc_samples`` random combinations ``S_n z`` with ``E[z z^T] = I``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_map

from curvkit.autodiff import (
    affine_batchnorm,
    batch_hvp,
    batched_grad,
    built_since,
    check_finite,
    chunked_into,
    differentiable_attention,
    flag_final,
    functional_model,
    graph_mark,
    reaches,
    write_into,
)
from curvkit.estimators.estimate import Estimate, exact_estimate
from curvkit.estimators.probes import resolve_generator
from curvkit.linop import flatten_tensors
from curvkit.operators.base import BLOCK_MEMORY_FACTOR, CurvatureOperator, preserved_state
from curvkit.operators.graphed import GRAPHED_MARGIN, GraphedProducts
from curvkit.operators.quadratic_forms import (
    TRIAL_PROBES,
    TaylorQuadraticForms,
    check_quadratic_form_method,
)
from curvkit.operators.trials import (
    agreement_tolerance,
    disagreement,
    failure_reason,
    fall_back,
    timed_rounds,
    warm_up,
)
from curvkit.taylor import TaylorUnsupportedError, output_tangents

__all__ = [
    "GGN_BACKENDS",
    "GGNOperator",
    "ResidualOperator",
    "output_hessian_factors",
]

GGN_BACKENDS = ("auto", "double-vjp", "forward", "taylor-jvp", "graphed")

#: default memory budget (bytes) for the per-sample VJP chunks of the exact diagonal
DEFAULT_MEMORY_BUDGET = 256 * 2**20

#: eigenvalues of the output Hessian below this times ``M * eps * max|lambda|`` are zero
_CUTOFF_FACTOR = 100.0

#: with a kept graph, ``"auto"`` takes ``"taylor-jvp"`` only if its trial time is below this
#: fraction of double VJP's through the kept graph (a tie is not worth re-running forward)
TAYLOR_MARGIN = 0.95
#: interleaved timing rounds of the trial (the best time of each candidate counts)
TRIAL_ROUNDS = 2
#: most probes per pass of a backend whose chunk is sized to the memory budget
MAX_MEASURED_CHUNK = 16
#: probes per Taylor-mode (or ``torch.func``) forward pass on a CPU
CPU_FORWARD_CHUNK = 2


# ---------------------------------------------------------------------- small helpers
def _as_output_tensor(out: Any) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(
            "the GGN needs the model to return one tensor of shape (N, *output_shape); got "
            f"{type(out).__name__}. Wrap the model so that it returns the tensor the loss sees."
        )
    if out.ndim == 0:
        raise ValueError("the model output must have a leading sample dimension, got a scalar")
    return out


def output_hessian_factors(
    out: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor], weight: float
) -> tuple[Tensor, Tensor]:
    """Per-sample eigen-factorisation of the output-space loss Hessian.

    Args:
        out: network outputs of one batch, shape ``(N, *O)`` (``M = prod(O)``).
        y: targets of the batch.
        loss_fn: the loss, reducing over samples by mean or sum.
        weight: the batch's weight in the total loss.

    Returns:
        ``(factors, signs)``: ``factors`` of shape ``(N, r, *O)`` with rows
        ``sqrt(|lambda_k|) q_k`` and ``signs`` of shape ``(N, r)`` (``+1``/``-1``), so that the
        Hessian block of sample ``n`` is ``sum_k signs[n,k] factors[n,k] factors[n,k]^T``.
        Eigenvalues below ``100 * M * eps * max|lambda|`` (max over the batch) are dropped
        (``r <= M``; ``C - 1`` for cross-entropy).

    Raises:
        ValueError: if the loss couples samples (its Hessian is not block-diagonal over the
            samples), which the per-sample factorisation cannot represent.
    """
    out = out.detach()
    N, O_shape = out.shape[0], out.shape[1:]
    M = math.prod(O_shape)
    out_d = out.clone().requires_grad_(True)
    with torch.enable_grad():
        loss = weight * loss_fn(out_d, y)
        check_finite(loss.detach(), "the loss")
        (g,) = torch.autograd.grad(loss, out_d, create_graph=True)
        if not g.requires_grad:  # loss linear in the outputs: Lambda = 0
            empty = out.new_zeros(N, 0, *O_shape)
            return empty, out.new_zeros(N, 0)
        E = torch.eye(M, dtype=out.dtype, device=out.device)
        E = E.reshape(M, 1, *O_shape).expand(M, N, *O_shape)
        (cols,) = batched_grad([g], [out_d], [E], chunk_size=max(M, 1))
        # cols[j, n, i] = sum_n' Lambda[(n, i), (n', j)]: the per-sample block if separable
        blocks = cols.reshape(M, N, M).permute(1, 2, 0)
        blocks = 0.5 * (blocks + blocks.transpose(1, 2))
        # separability check: one full product with a random direction on a random half of
        # the samples (a fixed private generator: deterministic, the global RNG left alone)
        check_gen = torch.Generator(device=out.device).manual_seed(0)
        z = torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=check_gen)
        probed = torch.rand(N, device=out.device, generator=check_gen) < 0.5
        if N > 1 and bool(probed.all() == probed.any()):  # both halves non-empty
            probed[0] = ~probed[0]
        z = z * probed.reshape(N, *([1] * len(O_shape))).to(z.dtype)
        (full,) = torch.autograd.grad(g, out_d, grad_outputs=z, retain_graph=False)
    full = full.reshape(N, M)
    block_prod = torch.einsum("nij,nj->ni", blocks, z.reshape(N, M))
    scale = full.abs().max().clamp_min(torch.finfo(out.dtype).tiny)
    # A per-sample loss gives exact zeros on the samples z leaves out (every term there is
    # multiplied by their zero direction), whatever the rounding elsewhere: a coupling of the
    # samples shows there at its own size (a 1e-5 one had passed the comparison below alone
    # in float32, whose tolerance must allow for cancellation in a peaked softmax).
    leak = full[~probed].abs().max() if bool((~probed).any()) else full.new_zeros(())
    tol = 1e-8 if out.dtype == torch.float64 else 1e-3
    if leak > 1e-6 * torch.finfo(out.dtype).eps * scale or (
        (block_prod - full).abs().max() > tol * scale
    ):
        raise ValueError(
            "the loss couples the samples of a batch (its Hessian w.r.t. the outputs is not "
            "block-diagonal over samples), so the per-sample GGN factorisation does not apply; "
            "use a per-sample loss reduced by mean or sum, or a stochastic diagonal estimator"
        )
    evals, evecs = torch.linalg.eigh(blocks)  # (N, M), (N, M, M) columns = eigenvectors
    mag = evals.abs()
    # rounding in the loss Hessian itself (e.g. softmax's probabilities not summing to
    # exactly 1) leaves null directions at ~eps * |Lambda|; drop them with a safety factor
    cutoff = (
        _CUTOFF_FACTOR * M * torch.finfo(out.dtype).eps
        * mag.max().clamp_min(torch.finfo(out.dtype).tiny)
    )  # fmt: skip
    keep = mag > cutoff
    r = int(keep.sum(1).max().item()) if keep.numel() else 0
    order = torch.argsort(mag, dim=1, descending=True)[:, :r]
    evals = torch.gather(evals, 1, order)
    evecs = torch.gather(evecs, 2, order.unsqueeze(1).expand(N, M, r))
    evals = torch.where(evals.abs() > cutoff, evals, torch.zeros_like(evals))
    factors = (evecs * evals.abs().sqrt().unsqueeze(1)).transpose(1, 2)  # (N, r, M)
    signs = torch.where(evals < 0, -torch.ones_like(evals), torch.ones_like(evals))
    return factors.reshape(N, r, *O_shape), signs


# ---------------------------------------------------------------------- the operator
def choose_ggn_backend(timings: dict[str, float | str]) -> str:
    """The GGN trial's choice: ``"graphed"`` if it takes under ``GRAPHED_MARGIN`` of the
    faster of the others, else ``"taylor-jvp"`` if it takes under ``TAYLOR_MARGIN`` of double
    VJP's time, else ``"double-vjp"`` (strings are reasons a candidate was dropped; double
    VJP untimed: the only candidate left)."""
    timed = {n: t for n, t in timings.items() if isinstance(t, float)}
    if "double-vjp" not in timed:
        return "double-vjp"
    eager = min(t for n, t in timed.items() if n != "graphed")
    if "graphed" in timed and timed["graphed"] < GRAPHED_MARGIN * eager:
        return "graphed"
    taylor = timed.get("taylor-jvp")
    faster = taylor is not None and taylor < TAYLOR_MARGIN * timed["double-vjp"]
    return "taylor-jvp" if faster else "double-vjp"


@dataclass
class _GGNGraph:
    """What a GGN product on one batch needs that does not depend on the probes."""

    out: Tensor  # model output, with the forward graph
    out_d: Tensor  # detached output the loss is differentiated at
    g: Tensor | None  # d loss / d out with its graph (None: loss linear in the outputs)
    u: Tensor | None = None  # the dummy cotangent of the double-VJP J V
    vjp_edges: list | None = None  # J^T u (gradient edges), differentiated w.r.t. u
    inputs: list[Tensor] | None = None  # what out is differentiated against (None: params)
    own: bool = False  # built entirely by this operator: its last pass may free it


class GGNOperator(GraphedProducts, TaylorQuadraticForms, CurvatureOperator):
    """``G = sum_b J_b^T Lambda_b J_b``, the generalised Gauss-Newton matrix over all of ``data``.

    Same data semantics as :class:`curvkit.HessianOperator`: the GGN of the loss of the
    concatenated data (batches weighted by size for mean-reduced losses); with train-mode
    BatchNorm the weighted sum of per-batch GGNs. Declared PSD (true for losses convex in the
    outputs: MSE, cross-entropy, BCE with logits).

    ``G @ V`` for a ``(D, K)`` block runs one forward pass per batch and pushes all ``K``
    columns through it: ``J V`` by a Jacobian-vector product, ``Lambda (J V)`` through the
    loss's output-space Hessian, and ``J^T (...)`` by a batched vector-Jacobian product.

    Args:
        model, loss_fn, data, params, reduction, check_deterministic: see
            :class:`curvkit.operators.base.CurvatureOperator`. The model must return one
            tensor ``(N, *O)``; the loss must be a sum or mean of per-sample terms.
        backend: how ``J V`` is computed. ``"double-vjp"``: reverse mode twice, the VJP
            ``J^T u`` differentiated w.r.t. ``u``; works on every model, including
            train-mode BatchNorm, and its graph serves every later product while it is
            kept. ``"forward"``: ``torch.func.jvp`` vmapped over the probes. ``"taylor-jvp"``:
            curvkit's first-order rules (:func:`curvkit.taylor.output_tangents`) give ``J V``
            in the same forward pass that records the graph for ``J^T``, per chunk of probes:
            no ``J^T u`` graph to build (an isolated product costs about one forward and
            one backward fewer). ``"auto"`` (default): ``"taylor-jvp"`` for products whose
            graph is not kept (``cache_graph=False``, several batches, train-mode
            BatchNorm); where the graph is kept, a timed trial at the first product of each
            kind (one vector, a block) runs both on the first batch (at most 8 probes, best
            of two interleaved runs after an untimed double-VJP product that builds the
            graph), checks Taylor mode against double VJP (agreement as for
            :class:`curvkit.HessianOperator`'s backends) and keeps ``"taylor-jvp"`` if it
            takes under ``TAYLOR_MARGIN`` (95%) of double VJP's time through the kept graph
            (``backend_choices``, ``backend_trials``: seconds or why a candidate was
            dropped). Re-running the forward pass can beat the kept graph: double
            VJP differentiates the backward pass, and PyTorch's double-backward formulas of
            some layers (BatchNorm, convolutions on a CPU) cost more than curvkit's forward
            rules (ResNet-18 on a CPU: 1.8 against 2.4 gradients per product). A
            forward-mode backend that fails (an op without a rule or a torch.func
            transform) falls back to ``"double-vjp"``, with a warning unless it was
            ``"auto"``'s choice; ``backend_fallback_reason`` says why, and ``backend`` is
            the backend of the latest product. ``"graphed"`` (CUDA, kept graph): double
            VJP's three passes through the kept graph captured once as a CUDA graph and
            replayed per probe, as :class:`curvkit.HessianOperator`'s ``"graphed"`` (same
            rules: captured at the graph's second product, dropped with it); ``"auto"``
            also times it where it can run (``cuda_graphs``) and keeps it only if it takes
            under ``GRAPHED_MARGIN`` (90%) of the faster of the other two.
        max_probes_per_chunk: most probes pushed through one pass (a vmapped backward,
            a Taylor-mode or ``torch.func`` forward). ``None`` (default): on CUDA, per
            backend, as many as fit in ``BLOCK_MEMORY_FACTOR`` (4) times one gradient's peak
            memory beyond the ``(D, K)`` result (measured like
            :class:`curvkit.HessianOperator`'s chunks at the backend's first block product,
            at most 16; ``chunk_sizes``, ``chunk_memory``). On a CPU double VJP takes one
            probe at a time (a vmapped backward was 0-25% slower per probe than a loop on
            the benchmark models) and a forward pass two (``CPU_FORWARD_CHUNK``): larger
            Taylor-mode chunks amortise the forward further (ResNet-18: 1.58, 1.48, 1.36
            gradients per probe with 2, 4, 12 probes) but their resident memory, oneDNN's
            scratch space outside PyTorch's allocator included, is 2.5-3 times their live
            tensors (3.9, 6.3, 9.8 times the gradient's resident set), so sizing to live
            memory overshoots the budget there. A chunk's backward ``J^T`` runs vmapped on
            CUDA or with an explicit ``max_probes_per_chunk``, else probe by probe.
        memory_budget: bytes the per-sample VJP chunks of the exact diagonal may use.
        cache_graph: keep the forward graph, ``d loss / d out`` and (``"double-vjp"``) the
            ``J^T u`` graph of a one-batch operator between products, as
            :class:`curvkit.HessianOperator` does with its gradient graph (same rules).
        quadratic_form_method: how :meth:`quadratic_form` computes ``v^T G v``:
            ``"taylor"`` propagates ``theta + t v`` through the model to first order (one
            Jacobian-vector product, no backward pass) and through the loss to second order,
            which gives ``(J v)^T Lambda (J v)``; ``"hvp"`` takes ``v^T (G v)``; ``"auto"``
            (default) keeps the faster after a checked trial, as ``HessianOperator`` does.
        cuda_graphs: let ``"auto"`` try ``"graphed"`` on a CUDA device.
    """

    _taylor_gauss_newton = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Tensor], Tensor],
        data: Any,
        params: Sequence[Tensor] | None = None,
        *,
        backend: str = "auto",
        max_probes_per_chunk: int | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        reduction: str | None = None,
        check_deterministic: bool = True,
        cache_graph: bool = True,
        quadratic_form_method: str = "auto",
        cuda_graphs: bool = True,
    ) -> None:
        check_quadratic_form_method(quadratic_form_method)
        if backend not in GGN_BACKENDS:
            raise ValueError(f"unknown GGN backend {backend!r}; choose one of {GGN_BACKENDS}")
        if max_probes_per_chunk is not None and max_probes_per_chunk < 1:
            raise ValueError("max_probes_per_chunk must be at least 1 (or None)")
        if memory_budget < 1:
            raise ValueError("memory_budget must be a positive number of bytes")
        super().__init__(
            model,
            loss_fn,
            data,
            params,
            reduction=reduction,
            check_deterministic=check_deterministic,
            psd=True,
        )
        self.requested_backend = backend
        self.backend = backend
        self.max_probes_per_chunk = max_probes_per_chunk
        #: probes per pass of each backend (``max_probes_per_chunk``, or sized to the memory
        #: budget at its first block product), and the measured bytes they were sized from
        self.chunk_sizes: dict[str, int] = {}
        self.chunk_memory: dict[str, dict[str, int]] = {}
        self.memory_budget = int(memory_budget)
        self.backend_fallback_reason: str | None = None
        self._taylor_failure: str | None = None  # why "taylor-jvp" cannot run this model
        self._taylor_checked = False  # "auto" without a kept graph: Taylor mode checked once
        #: ``"auto"``'s choice per kind of product (``"single"``, ``"block"``) where the graph
        #: is kept, and its trial's seconds (or why a candidate was dropped)
        self.backend_choices: dict[str, str] = {}
        self.backend_trials: dict[str, dict[str, float | str]] = {}
        self._init_quadratic_forms(quadratic_form_method)
        self._keep_graphs(cache_graph)
        self._init_graphed(cuda_graphs)

    # ------------------------------------------------------------------ products
    @property
    def block_chunk(self) -> int:
        """Probes per pass of the block products' backend."""
        return self._chunk_for(self._product_backend("block"))

    def _chunk_for(self, name: str) -> int:
        """Probes per pass of backend ``name`` (see ``max_probes_per_chunk``)."""
        if name == "graphed":  # one probe per replay
            return 1
        if self.max_probes_per_chunk is not None:
            return self.max_probes_per_chunk
        if name not in self.chunk_sizes:
            if not self._measures_chunks():  # fixed chunks on a CPU (see the docstring)
                self.chunk_sizes[name] = 1 if name == "double-vjp" else CPU_FORWARD_CHUNK
                return self.chunk_sizes[name]
            most = MAX_MEASURED_CHUNK
            self.chunk_sizes[name] = most  # the measured runs push their probes at once
            X, y = self._prepare(*self.batches.first())

            def run(probes: list[Tensor]) -> None:
                self._batch_product(X, y, 1.0, probes, name=name)

            latest = self.backend
            try:
                budget = BLOCK_MEMORY_FACTOR * self.gradient_peak_bytes
                self.chunk_sizes[name], self.chunk_memory[name] = self._fit_chunk(run, most, budget)
            except BaseException:
                del self.chunk_sizes[name]  # sized again at the next product
                raise
            fell_back = self.backend != name  # the runs were double VJP's: not this backend's
            self.backend = latest  # the latest *product's* backend
            if fell_back:
                del self.chunk_sizes[name], self.chunk_memory[name]
                return self._chunk_for("double-vjp")
        return self.chunk_sizes[name]

    def _measures_chunks(self) -> bool:
        """Whether default chunks are sized to the memory budget (on CUDA; fixed on a CPU)."""
        return self.device.type == "cuda"

    def _probe_chunk(self) -> int:
        # a row-major block is staged this many probes at a time (enough for a trial)
        return max(self.block_chunk, TRIAL_PROBES)

    def _batched_backward(self, K: int) -> int:
        """Probes per ``J^T`` backward of a pass of ``K``: all of them (vmapped) on CUDA or
        with an explicit ``max_probes_per_chunk``, else one at a time."""
        return K if self.device.type == "cuda" or self.max_probes_per_chunk else 1

    def _chunked_product(
        self,
        name: str,
        X,
        y,
        weight: float,
        probes: list[Tensor],
        batch: int,
        out: list[Tensor] | None = None,
        accumulate: bool = False,
        last: bool = False,
    ) -> list[Tensor]:
        """``G_b @ V`` by backend ``name``, one chunk of its size at a time, each chunk's
        products written into ``out`` before the next are made (``None``: returned).
        ``last``: the batch's graph serves no probes after these (see ``_batch_product``)."""
        kind = "single" if probes[0].shape[0] == 1 else "block"
        chunk = 1 if kind == "single" else self._chunk_for(name)  # sizing may find a fallback

        def effective() -> str:
            # after a fallback (Taylor mode or torch.func cannot run the model, a capture
            # failed) double VJP
            failed = self._taylor_failure is not None or self.backend_fallback_reason is not None
            if name == "graphed":
                failed = self.graphed_failure is not None
            return self._product_backend(kind) if failed and name != "double-vjp" else name

        if kind == "block" and effective() != name:
            chunk = self._chunk_for(effective())

        copy = out is None and name == "graphed"  # a replay overwrites its outputs

        def one_chunk(chunk_probes: list[Tensor], final: bool) -> list[Tensor]:
            backend = effective()
            res = self._batch_product(X, y, weight, chunk_probes, batch, backend, last and final)
            return [r.clone() for r in res] if copy else res

        K = probes[0].shape[0]
        return chunked_into(flag_final(one_chunk, K), probes, chunk, out, accumulate)

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
        done = 0
        head = None
        if self._needs_trial(kind):
            head = self._trial(kind, X, y, weight, probes, batch)
        elif self._product_backend(kind) == "taylor-jvp" and not self._taylor_checked:
            head = self._check_taylor(X, y, weight, probes, batch)
        if head is not None:
            done = head[0].shape[0]
            write_into(head, [o[:done] for o in out], accumulate)
            del head
        if done < probes[0].shape[0]:
            rest, slots = [v[done:] for v in probes], [o[done:] for o in out]
            name = self._product_backend(kind)
            self._chunked_product(name, X, y, weight, rest, batch, slots, accumulate, last)

    def _check_taylor(self, X, y, weight: float, probes: list[Tensor], batch: int) -> list[Tensor]:
        """``"auto"`` without a kept graph takes Taylor mode untimed (a graph built for every
        product is what it saves); its first products (at most ``TRIAL_PROBES``) are
        checked once against double VJP's, as the timed trial checks them. Returns double
        VJP's products of those probes."""
        self._taylor_checked = True
        head = [v[: min(probes[0].shape[0], TRIAL_PROBES)] for v in probes]
        reference = self._chunked_product("double-vjp", X, y, weight, head, batch)
        if not all(bool(torch.isfinite(r).all()) for r in reference):
            return reference  # nothing to compare against: the finiteness check reports it
        try:
            result = self._chunked_product("taylor-jvp", X, y, weight, head, batch)
        except RuntimeError as err:  # a forward-mode op PyTorch rejects
            self._taylor_failure = self.backend_fallback_reason = failure_reason(err)
            return reference
        tol = agreement_tolerance(self.model, self.dtype, self.device)
        why = disagreement(result, reference, tol, "double-vjp")
        if why is not None and self._taylor_failure is None:
            self._taylor_failure = self.backend_fallback_reason = f"taylor-jvp {why}"
        return reference

    def _needs_trial(self, kind: str) -> bool:
        return (
            self.requested_backend == "auto"
            and kind not in self.backend_choices
            and (self._taylor_failure is None or self._offers_graphed())
            and self._keeps_graph()
        )

    def _trial(
        self, kind: str, X, y, weight: float, probes: list[Tensor], batch: int
    ) -> list[Tensor]:
        """Time double VJP through the kept graph against ``"taylor-jvp"`` (and, where it can
        run, ``"graphed"``, captured first, untimed) on this batch (at most ``TRIAL_PROBES``
        probes, each backend in its own chunks), keep the fastest that agrees (see
        ``backend``), and return the products of those first probes."""
        K = probes[0].shape[0]
        head = [v[: min(K, TRIAL_PROBES)] for v in probes]
        if kind == "block":  # sized first: measuring builds (and drops) graphs of its own
            self._chunk_for("double-vjp")
            try:
                self._chunk_for("taylor-jvp")  # an op without a rule: falls back, recorded
            except RuntimeError as err:  # a forward-mode op PyTorch rejects
                self._taylor_failure = failure_reason(err)
        # builds the graph the operator keeps, warms up, and is the reference
        reference = self._chunked_product("double-vjp", X, y, weight, head, batch)
        timings: dict[str, float | str] = {}
        if self._taylor_failure is not None:
            timings["taylor-jvp"] = self._taylor_failure
        finite = all(bool(torch.isfinite(r).all()) for r in reference)
        tol = agreement_tolerance(self.model, self.dtype, self.device)
        alive = ["double-vjp", "taylor-jvp"] if self._taylor_failure is None else ["double-vjp"]
        if finite and self._offers_graphed():

            def capture(name: str) -> list[Tensor]:  # untimed, and checked once
                if self.replay is None:
                    self._capture(self._batch_graph(X, y, weight, batch))
                res = self._chunked_product(name, X, y, weight, head, batch)
                self._sync_device()
                return res

            alive += warm_up(["graphed"], capture, reference, tol, "double-vjp", timings)

        def may_drop(name: str, err: Exception) -> bool:
            if name == "taylor-jvp" and isinstance(err, RuntimeError):  # PyTorch rejects
                self._taylor_failure = failure_reason(err)  # a forward-mode rule
                return True
            return name == "graphed"

        def fell_back(name: str) -> str | None:  # no Taylor rule for an op of the model
            return self._taylor_failure if name == "taylor-jvp" else None

        if finite and len(alive) > 1:
            timed_rounds(
                alive,
                lambda name: self._timed(
                    lambda: self._chunked_product(name, X, y, weight, head, batch)
                ),
                reference,
                tol,
                "double-vjp",
                timings,
                rounds=TRIAL_ROUNDS,
                may_drop=may_drop,
                dropped=fell_back,
            )
        elif not finite:  # NaN/inf: nothing to compare against, no choice is kept (but
            # double VJP's where it is the only backend that runs), and the caller's
            # finiteness check reports the problem
            if self._taylor_failure is not None:
                self.backend_choices[kind] = "double-vjp"
                self.backend_trials[kind] = timings
            self.backend = "double-vjp"
            return reference
        choice = choose_ggn_backend(timings)
        self.backend_choices[kind] = choice
        self.backend_trials[kind] = timings
        if "graphed" not in self.backend_choices.values():
            self._drop_replay()  # not chosen: its memory is not held
        if choice in ("double-vjp", "graphed"):  # the reference is their product
            self.backend = choice
            return reference
        del reference
        if all(c == "taylor-jvp" for c in self.backend_choices.values()):
            self.clear_cache()  # the trial's J^T u graph would be held for nothing
        return self._chunked_product(choice, X, y, weight, head, batch)

    def _loss_graph(self, out: Tensor, y, weight: float, mark: int) -> _GGNGraph:
        """The model's output ``out`` (with its graph) and ``d loss / d out`` with its own;
        ``mark``: :func:`~curvkit.autodiff.graph_mark` before the forward pass."""
        out_d = out.detach().requires_grad_(True)
        loss = weight * self.loss_fn(out_d, y)
        check_finite(loss.detach(), "the loss")
        (g,) = torch.autograd.grad(loss, out_d, create_graph=True)
        g = g if g.requires_grad else None
        # the loss, not g: g's nodes are numbered by the thread that ran the backward (a
        # device thread on CUDA), the loss's by this one, and g's graph uses only its tensors
        return _GGNGraph(out, out_d, g, own=built_since(mark, out, loss))

    def _build_graph(self, X, y, weight: float) -> _GGNGraph:
        inputs, forward = self._graph_leaves()
        mark = graph_mark()
        with self._graph_stream():
            with affine_batchnorm(self.model):  # its J^T u is differentiated again
                out = forward(X)
                if forward is not self.model and reaches(_as_output_tensor(out), self.params):
                    del out  # freed before the forward pass is run again
                    inputs, forward = self._stop_aliasing()
                    out = forward(X)
            graph = self._loss_graph(_as_output_tensor(out), y, weight, mark)
            graph.inputs = inputs
            if self.backend in ("double-vjp", "graphed"):
                # J^T u with its graph: differentiated w.r.t. u, it gives J V
                graph.u = torch.zeros_like(graph.out, requires_grad=True)
                vjps = torch.autograd.grad(
                    graph.out,
                    inputs,
                    grad_outputs=graph.u,
                    create_graph=True,
                    allow_unused=True,
                )
                graph.vjp_edges = [
                    get_gradient_edge(v) if v is not None and v.requires_grad else None
                    for v in vjps
                ]
        return graph

    def _product_of_one(self, graph: _GGNGraph, probes: list[Tensor]) -> list[Tensor]:
        return self._apply_lambda_and_vjp(graph, self._jvp_double_vjp(graph, probes))

    def _product_backend(self, kind: str) -> str:
        """The backend of a product of this kind (``"single"`` or ``"block"``)."""
        if self.requested_backend != "auto":
            fell_back = self.backend == "double-vjp" and self.backend_fallback_reason
            return "double-vjp" if fell_back else self.requested_backend
        if self._taylor_failure is not None:
            return "graphed" if self.backend_choices.get(kind) == "graphed" else "double-vjp"
        if not self._keeps_graph():
            return "taylor-jvp"
        return self.backend_choices.get(kind, "double-vjp")

    def _batch_product(
        self,
        X,
        y,
        weight: float,
        probes: list[Tensor],
        batch: int = 0,
        name: str = "double-vjp",
        last: bool = False,
    ) -> list[Tensor]:
        """``G_b @ V`` on one batch by backend ``name`` (falling back to double VJP where
        a forward-mode backend cannot run the model). ``last``: no further probes of this
        product go through the batch's graph; one that is not kept is then freed by these
        probes' backward passes as they run (a lower peak: ``autodiff.graph_hvp``)."""
        self.backend = name
        with torch.enable_grad(), differentiable_attention():
            if name == "taylor-jvp":
                try:
                    return self._taylor_jvp_product(X, y, weight, probes)
                except TaylorUnsupportedError as err:
                    self._taylor_failure = self.backend_fallback_reason = (
                        f"{type(err).__name__}: {err}"
                    )
                    if self.requested_backend == "taylor-jvp":
                        warnings.warn(
                            "the Taylor-mode GGN product has no rule for an operation of this "
                            f"model; using double-vjp instead ({str(err)[:200]})",
                            RuntimeWarning,
                            stacklevel=5,
                        )
                    self.backend = "double-vjp"
            graph = self._batch_graph(X, y, weight, batch)
            JV = None
            if self.backend == "forward":
                try:
                    JV = self._forward_jvp(X, probes)
                except RuntimeError as err:
                    self.backend_fallback_reason = f"{type(err).__name__}: {err}"
                    warnings.warn(
                        "the forward-mode GGN product failed on this model; using "
                        f"double-vjp instead ({str(err)[:200]})",
                        RuntimeWarning,
                        stacklevel=5,
                    )
                    self.backend = "double-vjp"
            if JV is None:
                if graph.u is None:  # built for the forward backend
                    self.clear_cache()
                    graph = self._batch_graph(X, y, weight, batch)
                if self.backend == "graphed":
                    replay = self._graphed_or_fall_back(graph)
                    if replay is not None:
                        return replay(probes)  # one probe (views: the caller copies them)
            frees = self._frees(graph, last)  # of the graph the product runs through
            if JV is None:
                JV = self._jvp_double_vjp(graph, probes, retain_graph=not frees)
            res = self._apply_lambda_and_vjp(graph, JV, retain_graph=not frees)
            if frees:
                self._release_graph()
            return res

    def _graphed_or_fall_back(self, graph: _GGNGraph):
        """The kept graph's replay (``None``: this product runs uncaptured); a capture that
        fails makes this and every later product double VJP's, with a warning."""
        try:
            return self._graphed_replay(graph)
        except RuntimeError as err:  # what a failed capture raises
            fall_back(self, "graphed", "double-vjp", err, stacklevel=6)
            return None

    def _taylor_jvp_product(self, X, y, weight: float, probes: list[Tensor]) -> list[Tensor]:
        """``J^T Lambda J V`` with ``J V`` from the forward pass that records ``J^T``'s graph,
        one pass for all of ``probes`` (:func:`curvkit.taylor.output_tangents`)."""
        mark = graph_mark()
        out, JV = output_tangents(self.model, X, self.params, probes)
        graph = self._loss_graph(_as_output_tensor(out), y, weight, mark)
        if JV is None:  # the output does not depend on the parameters
            JV = graph.out.new_zeros(probes[0].shape[0], *graph.out.shape)
        # its only use: freed as the backward runs, unless it shares nodes with older graphs
        return self._apply_lambda_and_vjp(graph, JV, retain_graph=not graph.own)

    def _jvp_double_vjp(
        self, graph: _GGNGraph, probes: list[Tensor], retain_graph: bool = True
    ) -> Tensor:
        """``J V`` as ``d (J^T u) / d u`` applied to the probes; returns ``(K, *out.shape)``.
        ``retain_graph=False``: the ``J^T u`` graph's last use (``batched_grad``)."""
        pairs = [(e, v) for e, v in zip(graph.vjp_edges, probes) if e is not None]
        if not pairs:
            return graph.out.new_zeros(probes[0].shape[0], *graph.out.shape)
        (JV,) = batched_grad(
            [e for e, _ in pairs],
            [graph.u],
            [v for _, v in pairs],
            probes[0].shape[0],
            retain_graph=retain_graph,
        )
        return JV

    def _apply_lambda_and_vjp(
        self, graph: _GGNGraph, JV: Tensor, retain_graph: bool = True
    ) -> list[Tensor]:
        """``J^T Lambda (J V)`` given ``JV`` of shape ``(K, *out.shape)``.
        ``retain_graph=False``: the forward graph's last use, freed as ``J^T`` runs where
        its last chunk holds one probe (``batched_grad``)."""
        K = JV.shape[0]
        if graph.g is None:  # loss linear in the outputs
            return [torch.zeros(K, *p.shape, dtype=p.dtype, device=p.device) for p in self.params]
        (LJV,) = batched_grad([graph.g], [graph.out_d], [JV], K, retain_graph=retain_graph)
        inputs = self.params if graph.inputs is None else graph.inputs
        chunk = self._batched_backward(K)
        res = batched_grad([graph.out], inputs, [LJV], chunk, retain_graph=retain_graph)
        return [r.detach() for r in res]

    def _forward_jvp(self, X, probes: list[Tensor]) -> Tensor:
        """``J V`` by ``torch.func.jvp`` vmapped over the probes."""
        from torch.func import jvp, vmap

        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        primals = tuple(p.detach() for p in self.params)
        call = functional_model(self.model)

        def f(*ps):
            return call({**dict(zip(self.param_names, ps)), **buffers}, (X,))

        def jvp_one(*tangents):
            return jvp(f, primals, tangents)[1]

        return vmap(jvp_one)(*probes)

    # ------------------------------------------------------------------ exact diagonal
    def _samples_coupled(self) -> bool:
        return self.couples_samples

    def _diag_from_factors(
        self, X, factors: Tensor, signs: Tensor, path: str
    ) -> tuple[list[Tensor], str, float]:
        """``sum_{n,k} signs[n,k] * (J_n^T factors[n,k])^2`` per parameter.

        Returns the per-parameter sums, the path used (``"vmap"`` or ``"autograd"``) and the
        cost in backward passes over the batch (per-sample VJPs count ``1/N`` each).
        """
        N, r = factors.shape[0], factors.shape[1]
        if r == 0:
            return [torch.zeros_like(p) for p in self.params], path, 0.0
        if path == "vmap":
            try:
                with differentiable_attention():
                    diag = self._diag_vmap(X, factors, signs)
                return diag, "vmap", float(r)
            except (RuntimeError, TypeError, ValueError) as err:
                if "vmap" not in str(err).lower() and "functorch" not in str(err).lower():
                    raise
                warnings.warn(
                    "per-sample VJPs through torch.func.vmap failed on this model; using "
                    f"batched autograd on the whole batch ({str(err)[:200]})",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return self._diag_autograd(X, factors, signs), "autograd", float(N * r)

    def _per_sample_chunk(self, r: int) -> int:
        per = r * self.shape[0] * torch.finfo(self.dtype).bits // 8 * 3
        return max(1, self.memory_budget // max(per, 1))

    def _diag_vmap(self, X, factors: Tensor, signs: Tensor) -> list[Tensor]:
        from torch.func import vjp, vmap

        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        primals = tuple(p.detach() for p in self.params)
        names = self.param_names
        call = functional_model(self.model)

        def one_sample(x_n, S_n, s_n):
            def f(*ps):
                x1 = tree_map(lambda t: t.unsqueeze(0), x_n)
                out = call({**dict(zip(names, ps)), **buffers}, (x1,))
                return out.squeeze(0)

            _, vjp_fn = vjp(f, *primals)
            grads = vmap(vjp_fn)(S_n)  # tuple of (r, *p.shape)
            return tuple(
                (s_n.reshape(-1, *([1] * (g.ndim - 1))) * g.square()).sum(0) for g in grads
            )

        N = factors.shape[0]
        chunk = self._per_sample_chunk(factors.shape[1])
        total = [torch.zeros_like(p) for p in self.params]
        for s in range(0, N, chunk):
            Xc = tree_map(lambda t, s=s: t[s : s + chunk], X)
            res = vmap(one_sample)(Xc, factors[s : s + chunk], signs[s : s + chunk])
            for t, piece in zip(total, res):
                t.add_(piece.sum(0))
        return total

    def _diag_autograd(self, X, factors: Tensor, signs: Tensor) -> list[Tensor]:
        N, r = factors.shape[0], factors.shape[1]
        O_shape = factors.shape[2:]
        with torch.enable_grad(), differentiable_attention():
            out = _as_output_tensor(self.model(X))
            per = (N * math.prod(O_shape) + self.shape[0]) * torch.finfo(self.dtype).bits // 8 * 2
            chunk = max(1, self.memory_budget // max(per, 1))
            total = [torch.zeros_like(p) for p in self.params]
            pairs = [(n, k) for n in range(N) for k in range(r)]
            for s in range(0, len(pairs), chunk):
                sel = pairs[s : s + chunk]
                cot = out.new_zeros(len(sel), N, *O_shape)
                for i, (n, k) in enumerate(sel):
                    cot[i, n] = factors[n, k]
                sg = torch.stack([signs[n, k] for n, k in sel])
                grads = batched_grad([out], self.params, [cot], chunk)
                for t, g in zip(total, grads):
                    t.add_((sg.reshape(-1, *([1] * (g.ndim - 1))) * g.square()).sum(0))
        return total

    def _mc_factors(
        self, factors: Tensor, signs: Tensor, mc_samples: int, generator: torch.Generator
    ) -> Tensor:
        if bool((signs < 0).any()):
            raise ValueError(
                "the Monte-Carlo GGN diagonal needs a loss that is convex in the outputs "
                "(positive semi-definite output Hessian); use the exact diagonal instead"
            )
        N, r = factors.shape[0], factors.shape[1]
        z = torch.randint(0, 2, (N, mc_samples, r), generator=generator, device=generator.device)
        z = (2 * z - 1).to(dtype=factors.dtype, device=factors.device)
        return torch.einsum("nsr,nr...->ns...", z, factors)  # (N, S, *O)

    def _diagonal_pass(
        self, mc_samples: int | None, generator: torch.Generator | None, path: str
    ) -> tuple[list[list[Tensor]], str, float, int]:
        """Sum of per-sample contributions over all batches.

        Exact (``mc_samples=None``): one list of per-parameter tensors. Monte-Carlo: one list
        per replicate ``s`` (each replicate an unbiased estimate). Returns the lists, the VJP
        path used, the cost in gradient-equivalents and the largest factor rank.
        """
        if path == "auto":
            path = "autograd" if self._samples_coupled() else "vmap"
        n_rep = 1 if mc_samples is None else mc_samples
        totals = [[torch.zeros_like(p) for p in self.params] for _ in range(n_rep)]
        cost, max_rank = 0.0, 0
        N_total = self.batches.num_samples
        with preserved_state(self.model, self.device):
            for X, y, weight in self._iter_batches():
                with torch.no_grad(), differentiable_attention():
                    out = _as_output_tensor(self.model(X))
                factors, signs = output_hessian_factors(out, y, self.loss_fn, weight)
                max_rank = max(max_rank, factors.shape[1])
                N_b = factors.shape[0]
                if mc_samples is None:
                    diag, path, backs = self._diag_from_factors(X, factors, signs, path)
                    for t, d in zip(totals[0], diag):
                        t.add_(d.detach())
                else:
                    mc = self._mc_factors(factors, signs, mc_samples, generator)
                    ones = torch.ones(N_b, 1, dtype=self.dtype, device=self.device)
                    backs = 0.0
                    for s in range(mc_samples):
                        diag, path, b = self._diag_from_factors(X, mc[:, s : s + 1], ones, path)
                        backs += b
                        for t, d in zip(totals[s], diag):
                            t.add_(d.detach())
                # a per-sample VJP is 1/N_total of a gradient; a whole-batch one N_b/N_total
                per_backward = (1.0 / N_total) if path == "vmap" else (N_b / N_total)
                cost += backs * (N_b if path == "vmap" else 1) * per_backward
        return totals, path, cost, max_rank

    def diagonal(
        self,
        method: str = "exact",
        *,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        path: str = "auto",
    ) -> Estimate:
        """The diagonal of ``G`` as a ``(D,)`` :class:`~curvkit.Estimate`.

        Args:
            method: ``"exact"`` (symmetric factorisation, one VJP per output direction and
                sample), ``"mc"`` (Monte-Carlo factorisation, ``mc_samples`` VJPs per sample,
                unbiased, with a standard error over the replicates when ``mc_samples >= 2``)
                or ``"backpack"`` (BackPACK ``DiagGGNExact``/``DiagGGNMC`` on a deep copy of
                the model; supported layers only).
            mc_samples: Monte-Carlo samples per data point (``"mc"``).
            generator: random source of the Monte-Carlo probes (``None``: a fresh one,
                its seed in ``info["seed"]``).
            path: ``"auto"``, ``"vmap"`` (per-sample VJPs) or ``"autograd"`` (batched VJPs on
                the whole batch; used automatically for train-mode BatchNorm).

        ``num_backward`` of the result counts the VJPs in gradient-equivalents (one gradient
        over all of ``data`` = 1); ``num_matvecs`` is 0.
        """
        if path not in ("auto", "vmap", "autograd"):
            raise ValueError(f"unknown path {path!r}; choose 'auto', 'vmap' or 'autograd'")
        if path == "vmap" and self._samples_coupled():
            raise ValueError(
                "per-sample VJPs do not apply to train-mode BatchNorm (it couples the samples "
                "of a batch); use path='autograd' or 'auto'"
            )
        if method == "exact":
            totals, used, cost, rank = self._diagonal_pass(None, None, path)
            value = flatten_tensors(totals[0])
            check_finite(value, "the GGN diagonal")
            return exact_estimate(
                value,
                0,
                method="ggn-exact",
                num_backward=cost,
                info={"vjp_path": used, "factor_rank": rank},
            )
        if method == "mc":
            if mc_samples < 1:
                raise ValueError("mc_samples must be at least 1")
            g, seed = resolve_generator(generator)
            totals, used, cost, rank = self._diagonal_pass(mc_samples, g, path)
            reps = torch.stack([flatten_tensors(t) for t in totals])  # (S, D)
            value = reps.mean(0)
            check_finite(value, "the Monte-Carlo GGN diagonal")
            if mc_samples >= 2:
                stderr = reps.std(0, unbiased=True) / math.sqrt(mc_samples)
                dof: int | None = mc_samples - 1
            else:
                stderr = torch.full_like(value, float("nan"))
                dof = None
            return Estimate(
                value,
                stderr,
                0,
                "ggn-mc",
                dof=dof,
                num_backward=cost,
                info={
                    "vjp_path": used,
                    "mc_samples": mc_samples,
                    "factor_rank": rank,
                    "replicate_traces": reps.sum(1),
                    **({} if seed is None else {"seed": seed}),
                },
            )
        if method == "backpack":
            from curvkit.operators.backpack import backpack_diagonal

            return backpack_diagonal(self, "ggn")
        raise ValueError(
            f"unknown GGN diagonal method {method!r}; choose 'exact', 'mc', 'backpack'"
        )

    def trace(
        self,
        method: str = "exact",
        *,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        path: str = "auto",
    ) -> Estimate:
        """``tr(G)`` as a 0-d :class:`~curvkit.Estimate`: the sum of :meth:`diagonal`.

        Same arguments as :meth:`diagonal`; the Monte-Carlo standard error is that of the sum
        over replicates.
        """
        d = self.diagonal(method, mc_samples=mc_samples, generator=generator, path=path)
        return _trace_of_diagonal(d)


def _trace_of_diagonal(d: Estimate) -> Estimate:
    """The trace from a diagonal estimate: exact, or from i.i.d. replicate traces."""
    info = {k: v for k, v in d.info.items() if k != "replicate_traces"}
    value = d.value.sum()
    if d.dof == 0:
        stderr = torch.zeros_like(value)
    elif "replicate_traces" in d.info and d.dof is not None:
        reps = d.info["replicate_traces"]
        stderr = reps.std(unbiased=True) / math.sqrt(reps.numel())
    else:
        stderr = torch.full_like(value, float("nan"))
    return Estimate(value, stderr, d.num_matvecs, d.method, d.dof, d.num_backward, info)


# ---------------------------------------------------------------------- residual
class ResidualOperator(CurvatureOperator):
    """``R = H - G``: the Hessian minus the generalised Gauss-Newton matrix.

    ``R`` is the Hessian of the scalar ``sum_b w_b <stop_grad(g_b), f(X_b; theta)>`` with
    ``g_b`` the gradient of the loss w.r.t. the outputs, so one product costs one
    Hessian-vector product (double backward), not two. Symmetric, indefinite in general.
    For piecewise-linear networks (ReLU/max-pool with linear and convolution layers) every
    diagonal block belonging to one layer's parameters is exactly zero.

    Args: as :class:`GGNOperator` (``max_probes_per_chunk`` bounds a batched backward).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Tensor], Tensor],
        data: Any,
        params: Sequence[Tensor] | None = None,
        *,
        max_probes_per_chunk: int = 16,
        reduction: str | None = None,
        check_deterministic: bool = True,
    ) -> None:
        super().__init__(
            model,
            loss_fn,
            data,
            params,
            reduction=reduction,
            check_deterministic=check_deterministic,
        )
        self.max_probes_per_chunk = max_probes_per_chunk

    def _residual_loss(self, out: Tensor, y: Tensor) -> Tensor:
        out = _as_output_tensor(out)
        out_d = out.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.loss_fn(out_d, y), out_d)
        return (g.detach() * out).sum()

    def _probe_chunk(self) -> int:
        return self.max_probes_per_chunk

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
        with torch.enable_grad(), differentiable_attention():  # a graph of its own each call
            batch_hvp(
                self.model,
                self._residual_loss,
                X,
                y,
                weight,
                self.params,
                self.param_names,
                probes,
                "batched",
                self.max_probes_per_chunk,
                out,
                accumulate,
            )
