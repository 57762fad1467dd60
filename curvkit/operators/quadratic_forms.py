"""Quadratic forms ``v^T A v`` of curvature operators: Taylor mode or ``v^T (A v)``.

:class:`TaylorQuadraticForms` gives a ``CurvatureOperator`` subclass a ``quadratic_form``
that runs either through the operator's products (``"hvp"``: ``v^T (A v)``, the base
class's chunked reduction) or by second-order forward propagation (``"taylor"``,
:mod:`curvkit.taylor`: no backward pass, and the probes of a group collapse), chosen by a
checked, timed trial at the first call (``"auto"``). ``HessianOperator`` propagates the
model to second order; ``GGNOperator`` sets ``_taylor_gauss_newton`` and propagates it to
first order (the linearised model), which gives ``(J v)^T (d^2 loss / d out^2) (J v)``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from curvkit.autodiff import check_finite, chunk_size_for, differentiable_attention, gradient
from curvkit.cpu_memory import reuse_freed_memory
from curvkit.live_memory import peak_allocated_bytes
from curvkit.operators.base import preserved_state
from curvkit.operators.trials import agreement_tolerance, disagreement, failure_reason
from curvkit.taylor import TaylorUnsupportedError, taylor_quadratic_forms

__all__ = [
    "QUADRATIC_FORM_METHODS",
    "TaylorQuadraticForms",
    "check_quadratic_form_method",
]

#: quadratic-form methods: second-order forward propagation, or v^T (A v)
QUADRATIC_FORM_METHODS = ("auto", "taylor", "hvp")
#: most probes the ``"auto"`` trial runs per method (rounded to whole groups)
TRIAL_PROBES = 8
#: default Taylor-mode memory budget, in multiples of one gradient's peak memory as
#: ``curvkit.live_memory`` measures it: the target is 4x the gradient's resident-set growth,
#: and 3.5 here gave 4.4-5.3x that growth on the benchmark CNN and ResNet (their measured
#: gradient peak is above the resident one), 2.5 gives 1.7-3.4x
TAYLOR_BUDGET_FACTOR = 2.5
#: most probes per Taylor-mode pass unless the operator says otherwise
TAYLOR_MAX_PROBES = 16


def check_quadratic_form_method(method: str) -> None:
    if method not in QUADRATIC_FORM_METHODS:
        raise ValueError(
            f"unknown quadratic_form_method {method!r}; choose one of {QUADRATIC_FORM_METHODS}"
        )


class TaylorQuadraticForms:
    """Mixin for ``CurvatureOperator`` subclasses (listed before it); call
    ``_init_quadratic_forms(method)`` in ``__init__``.

    Attributes:
        quadratic_form_method: ``"auto"``, ``"taylor"`` or ``"hvp"`` as requested.
        quadratic_form_choice: the method in use (``None`` before ``"auto"``'s trial).
        quadratic_form_trial: the trial's seconds per method, or why Taylor mode was
            dropped.
        default_group_sizes: Hutchinson's default probe group per number of probes and
            memory budget, as first settled on this operator (``curvkit.estimators.trace``).
    """

    #: propagate the model to first order only (the GGN's linearised model)
    _taylor_gauss_newton = False

    def _init_quadratic_forms(self, method: str) -> None:
        check_quadratic_form_method(method)
        self.quadratic_form_method = method
        self.quadratic_form_choice: str | None = None if method == "auto" else method
        self.quadratic_form_trial: dict[str, float | str] = {}
        self.default_group_sizes: dict[tuple, int] = {}
        self._taylor_memory: dict[str, int] | None = None
        self._gradient_peak: int | None = None

    def _taylor_max_probes(self) -> int:
        return TAYLOR_MAX_PROBES

    def _taylor_memory_budget(self) -> int | None:
        return None

    @property
    def collapses_quadratic_forms(self) -> bool:
        """Whether ``quadratic_form(V, group_size)`` may run in Taylor mode, where summing
        the forms of a group of probes costs less than computing them one by one."""
        return self.quadratic_form_choice in (None, "taylor")

    @property
    def max_collapsed_group(self) -> int:
        """Largest probe group that one Taylor-mode pass holds within the memory budget
        (estimators choose their default ``group_size`` up to it). Sizing runs Taylor mode
        on the first batch: under ``"auto"`` a model it fails on gets ``"hvp"`` and 1."""
        if self.quadratic_form_choice == "hvp":
            return 1
        try:
            return self.taylor_chunk_size
        except Exception as err:  # as the trial: any failure of Taylor mode leaves v^T (A v)
            if self.quadratic_form_method == "taylor":
                raise
            self._drop_taylor(err)
            return 1

    @property
    def taylor_chunk_size(self) -> int:
        """Probes per Taylor-mode pass: at most ``_taylor_max_probes()``, and what fits in
        the operator's memory budget or, without one, in ``TAYLOR_BUDGET_FACTOR`` times one
        gradient's peak memory. Sized from the measured peaks of one gradient and of passes
        with one and two probes (``taylor_memory``). A group of collapsed probes is
        propagated in one pass, so a larger group overrides this."""
        memory = self.taylor_memory
        budget = self._taylor_memory_budget()
        if budget is None:
            budget = int(TAYLOR_BUDGET_FACTOR * memory["gradient"])
        return chunk_size_for(
            memory["per_probe"], budget - memory["base"], self._taylor_max_probes()
        )

    @property
    def taylor_memory(self) -> dict[str, int]:
        """Measured peak bytes (``curvkit.live_memory``) on the first batch: ``gradient``
        (one eager gradient), ``per_probe`` (what each probe of a Taylor-mode pass adds)
        and ``base`` (a pass's fixed part). Measured at the first use."""
        if self._taylor_memory is None:
            X, y = self._prepare(*self.batches.first())
            with preserved_state(self.model, self.device):
                one, two = (self._taylor_pass_peak(X, y, k) for k in (1, 2))
            per_probe = max(two - one, 1)
            self._taylor_memory = {
                "gradient": self.gradient_peak_bytes,
                "per_probe": per_probe,
                "base": max(one - per_probe, 0),
            }
        return self._taylor_memory

    @property
    def gradient_peak_bytes(self) -> int:
        """Peak bytes (``curvkit.live_memory``) of one eager gradient on the first batch, the
        unit of the memory budgets; measured at the first use."""
        if self._gradient_peak is None:
            X, y = self._prepare(*self.batches.first())
            with preserved_state(self.model, self.device), differentiable_attention():
                self._gradient_peak = peak_allocated_bytes(
                    lambda: gradient(self.loss_fn(self.model(X), y), self.params, False)
                )
        return self._gradient_peak

    def _taylor_pass_peak(self, X: Any, y: Tensor, K: int) -> int:
        probes = [p.detach().expand(K, *p.shape).clone() for p in self.params]
        return peak_allocated_bytes(
            lambda: taylor_quadratic_forms(
                self.model,
                self.loss_fn,
                X,
                y,
                1.0,
                self.params,
                probes,
                gauss_newton=self._taylor_gauss_newton,
            )
        )

    def _taylor_forms(self, V: Tensor, group_size: int) -> Tensor:
        """Group sums of ``v_k^T A v_k`` by Taylor mode, ``(K // group_size,)``."""
        K = V.shape[1]
        step = min(K, max(1, self.taylor_chunk_size // group_size) * group_size)
        stage = self._staging_buffer(V, step)
        sums = torch.zeros(K // group_size, dtype=self.dtype, device=self.device)
        reuse_freed_memory(self.device)
        with preserved_state(self.model, self.device):
            for X, y, weight in self._iter_batches():
                self._check_taylor_loss(X, y)
                for s, e, rows in self._probe_rows(V, step, stage):
                    sums[s // group_size : e // group_size] += taylor_quadratic_forms(
                        self.model,
                        self.loss_fn,
                        X,
                        y,
                        weight,
                        self.params,
                        self._split_rows(rows),
                        group_size,
                        gauss_newton=self._taylor_gauss_newton,
                    )
        check_finite(sums, f"the {type(self).__name__} quadratic form")
        return sums

    def _check_taylor_loss(self, X: Any, y: Tensor) -> None:
        """Raise if Taylor mode cannot give this operator's forms on this loss (subclasses
        that can tell)."""

    def _quadratic_form(self, V: Tensor, group_size: int = 1) -> Tensor:
        if self.quadratic_form_choice is None:
            return self._quadratic_form_trial(V, group_size)
        if self.quadratic_form_choice == "hvp":
            return super()._quadratic_form(V, group_size)
        try:
            return self._taylor_forms(V, group_size)
        except TaylorUnsupportedError as err:
            if self.quadratic_form_method == "taylor":
                raise
            warnings.warn(
                f"Taylor mode failed on this model; using v^T (A v) instead ({err})",
                RuntimeWarning,
                stacklevel=4,
            )
            self._drop_taylor(err)
            return super()._quadratic_form(V, group_size)

    def _drop_taylor(self, err: Exception) -> None:
        """Use ``v^T (A v)`` from now on, recording why Taylor mode was dropped."""
        self.quadratic_form_trial["taylor"] = failure_reason(err)
        self.quadratic_form_choice = "hvp"

    def _quadratic_form_trial(self, V: Tensor, group_size: int) -> Tensor:
        """Time Taylor mode against ``v^T (A v)`` on the first probes; keep the faster.

        ``v^T (A v)`` runs twice (the first, untimed, warms up and builds what a kept graph
        keeps) and Taylor mode once: the trial costs about three calls on at most
        ``TRIAL_PROBES`` probes, and its results are used.
        """
        K = V.shape[1]
        first = min(K, max(1, TRIAL_PROBES // group_size) * group_size)
        head = V[:, :first]
        products = super()._quadratic_form
        products(head, group_size)  # warm-up; builds (and may keep) the graph
        timings: dict[str, float | str] = {}
        results = {}
        results["hvp"], timings["hvp"] = self._timed(lambda: products(head, group_size))
        try:
            self.taylor_chunk_size  # noqa: B018 (sized outside the timing)
            results["taylor"], timings["taylor"] = self._timed(
                lambda: self._taylor_forms(head, group_size)
            )
        except Exception as err:  # any failure of Taylor mode leaves v^T (A v), recorded
            timings["taylor"] = failure_reason(err)
        else:
            tol = agreement_tolerance(self.model, self.dtype, self.device)
            why = disagreement([results["taylor"]], [results["hvp"]], tol, "v^T (A v)")
            if why is not None:
                timings["taylor"] = why
        timed = {n: t for n, t in timings.items() if isinstance(t, float)}
        choice = min(timed, key=timed.get)
        self.quadratic_form_trial = timings
        self.quadratic_form_choice = choice
        if first == K:
            return results[choice]
        return torch.cat([results[choice], self._quadratic_form(V[:, first:], group_size)])

    def _timed(self, run: Callable[[], Any]) -> tuple[Any, float]:
        """``run()`` and its wall-clock seconds, the device synchronised around it."""
        self._sync_device()
        start = time.perf_counter()
        out = run()
        self._sync_device()
        return out, time.perf_counter() - start

    def _sync_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
