"""The timed, checked trials behind the operators' ``"auto"`` choices.

Candidates run on the same probes and are checked against a reference result (agreement to
:func:`agreement_tolerance`); those that raise or disagree are dropped, with the reason in
place of a time. Candidates that compile or capture first run once untimed
(:func:`warm_up`); then every candidate runs in interleaved rounds and its best time counts
(:func:`timed_rounds`). The operators choose from the timings by their own rules.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "agreement_tolerance",
    "disagreement",
    "failure_reason",
    "fall_back",
    "relative_difference",
    "timed_rounds",
    "warm_up",
]


def failure_reason(err: BaseException) -> str:
    """Why a trial candidate was dropped: the exception's type and the start of its
    message (what the trials record in place of a time)."""
    return f"{type(err).__name__}: {str(err)[:200]}"


def relative_difference(a: list[Tensor], b: list[Tensor]) -> float:
    """Relative Frobenius distance of two lists of tensors, over all entries."""
    with torch.no_grad():
        num = sum(float((x - z).double().pow(2).sum()) for x, z in zip(a, b))
        den = sum(float(z.double().pow(2).sum()) for z in b)
    return (num / den) ** 0.5 if den > 0 else num**0.5


def disagreement(
    result: list[Tensor], reference: list[Tensor], tol: float, reference_name: str
) -> str | None:
    """Why a trial candidate's ``result`` cannot stand for ``reference`` (computed by
    ``reference_name``), or ``None`` where they agree to ``tol`` (relative)."""
    err = relative_difference(result, reference)
    return None if err <= tol else f"disagrees with {reference_name} (rel. diff. {err:.1e})"


def _tf32_may_run(model: torch.nn.Module) -> bool:
    """Whether float32 products on CUDA may run in TF32 (10 mantissa bits): matrix products
    when ``torch.backends.cuda.matmul.allow_tf32`` (``set_float32_matmul_precision("high")``),
    convolutions when ``torch.backends.cudnn.allow_tf32`` (PyTorch's default)."""
    if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest":
        return True
    convolutions = (torch.nn.modules.conv._ConvNd, torch.nn.RNNBase)
    return bool(torch.backends.cudnn.allow_tf32) and any(
        isinstance(m, convolutions) for m in model.modules()
    )


def agreement_tolerance(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> float:
    """Relative difference up to which two backends' results count as the same result.

    ``sqrt(eps)`` of the precision the products run in. On CUDA that is TF32 for float32
    convolutions by default: two exact methods then differ by about 1e-3 (4.4e-4 between
    double backward and every forward-mode method on ResNet-18, H200), and ``sqrt(eps)`` of
    float32 (3.5e-4) had rejected every backend but double backward and Taylor mode with it.
    """
    eps = torch.finfo(dtype).eps
    if device.type == "cuda" and dtype == torch.float32 and _tf32_may_run(model):
        medium = torch.get_float32_matmul_precision() == "medium"  # bfloat16 products
        eps = max(eps, 2.0**-7 if medium else 2.0**-10)
    return eps**0.5


def fall_back(operator: Any, name: str, replacement: str, err: Exception, stacklevel: int) -> None:
    """Record on ``operator`` that backend ``name`` failed on its model and ``replacement``
    computes its products from now on: the reason (``backend_fallback_reason``), a warning
    (``stacklevel`` as seen from the caller), the cached choices and the latest backend."""
    operator.backend_fallback_reason = f"{type(err).__name__}: {err}"
    warnings.warn(
        f"{name} failed on this model; using {replacement} instead ({str(err)[:200]})",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )
    operator.backend_choices = {
        k: (replacement if v == name else v) for k, v in operator.backend_choices.items()
    }
    operator.backend = replacement


def warm_up(
    names: list[str],
    run: Callable[[str], list[Tensor]],
    reference: list[Tensor],
    tol: float,
    reference_name: str,
    timings: dict[str, float | str],
) -> list[str]:
    """Run each of ``names`` once, untimed (where it compiles or captures), and check it
    against ``reference``; returns those that ran and agree. Any exception drops a
    candidate; the reasons go into ``timings``."""
    kept = []
    for name in names:
        try:
            result = run(name)
        except Exception as err:
            timings[name] = failure_reason(err)
            continue
        why = disagreement(result, reference, tol, reference_name)
        if why is None:
            kept.append(name)
        else:
            timings[name] = why
    return kept


def timed_rounds(
    alive: list[str],
    run: Callable[[str], tuple[list[Tensor], float]],
    reference: list[Tensor],
    tol: float,
    reference_name: str,
    timings: dict[str, float | str],
    *,
    rounds: int,
    may_drop: Callable[[str, Exception], bool],
    dropped: Callable[[str], str | None] = lambda name: None,
    charge: Callable[[str], float] = lambda name: 0.0,
) -> None:
    """``rounds`` interleaved rounds over ``alive`` (each ``run(name)`` returns the result
    and its seconds); the best time plus ``charge(name)`` counts, in ``timings``.

    A candidate is dropped, its reason recorded, when it raises an exception ``may_drop``
    accepts (others propagate), when ``dropped(name)`` gives a reason after its run (it
    fell back to another backend inside), or when it disagrees with ``reference``.
    """
    for _ in range(rounds):
        for name in list(alive):
            try:
                result, elapsed = run(name)
            except Exception as err:
                if not may_drop(name, err):
                    raise
                timings[name] = failure_reason(err)
                alive.remove(name)
                continue
            why = dropped(name) or disagreement(result, reference, tol, reference_name)
            if why is not None:
                timings[name] = why
                alive.remove(name)
                continue
            timings[name] = min(elapsed + charge(name), timings.get(name, math.inf))
