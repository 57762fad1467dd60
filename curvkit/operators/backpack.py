"""Exact GGN and Hessian diagonals through BackPACK, for the layers BackPACK supports.

BackPACK's ``extend`` rewires a model's modules, so every computation here runs on a deep
copy of the model and the loss; the user's model is never touched. BackPACK handles
sequential models of ``Linear``, ``Conv``, activations (``ReLU``, ``Tanh``, ``Sigmoid``…),
pooling, ``Flatten`` and a few more, with ``MSELoss``, ``CrossEntropyLoss`` and
``BCEWithLogitsLoss``; anything else raises a clear error that names the generic method
(``"ggn-exact"``) that always works.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from curvkit.autodiff import check_finite
from curvkit.estimators.estimate import Estimate, exact_estimate
from curvkit.linop import flatten_tensors
from curvkit.operators.base import preserved_state

if TYPE_CHECKING:
    from curvkit.operators.base import CurvatureOperator

__all__ = ["backpack_diagonal"]

_KINDS = {
    # kind: (extension class name, attribute it writes, estimate method name)
    "ggn": ("DiagGGNExact", "diag_ggn_exact", "ggn-backpack"),
    "hessian": ("DiagHessian", "diag_h", "hessian-backpack"),
}


def backpack_diagonal(op: CurvatureOperator, kind: str) -> Estimate:
    """Exact diagonal of the GGN (``kind="ggn"``) or Hessian (``"hessian"``) via BackPACK.

    Args:
        op: the curvature operator whose model, loss, data and params are used (its own
            products are not called). The result refers to ``op.params`` in their order.
        kind: ``"ggn"`` (``DiagGGNExact``) or ``"hessian"`` (``DiagHessian``).

    Returns:
        An exact :class:`~curvkit.Estimate` with a ``(D,)`` value; ``num_backward`` is the
        nominal cost ``M`` (outputs per sample) in gradient-equivalents, since BackPACK
        propagates an ``M``-column square-root factor backwards.

    Raises:
        NotImplementedError: BackPACK does not support the model, the loss, or
            train-mode BatchNorm.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown BackPACK diagonal kind {kind!r}; choose 'ggn' or 'hessian'")
    ext_name, attr, method = _KINDS[kind]
    import backpack
    import backpack.extensions

    if op.couples_samples:
        raise NotImplementedError(
            f"BackPACK {ext_name} does not support train-mode BatchNorm; use "
            "method='ggn-exact' for the GGN diagonal, or put the model in eval mode"
        )
    model = copy.deepcopy(op.model)
    loss_fn = copy.deepcopy(op.loss_fn)
    if not isinstance(loss_fn, torch.nn.Module):
        other = "'ggn-exact'" if kind == "ggn" else "'exact' or 'xdiag'"
        raise NotImplementedError(
            "BackPACK needs the loss as a torch.nn.Module (MSELoss, CrossEntropyLoss, "
            f"BCEWithLogitsLoss); use method={other} for any loss"
        )
    params = [model.get_parameter(n) for n in op.param_names]
    totals = [torch.zeros_like(p) for p in params]
    outputs_per_sample = 0
    with preserved_state(op.model, op.device), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BackPACK warns about modules it passes through
        try:
            model = backpack.extend(model)
            loss_fn = backpack.extend(loss_fn)
            for X, y, weight in op._iter_batches():
                _refuse_ignored_targets(loss_fn, y, ext_name)
                out = model(X)
                outputs_per_sample = math.prod(out.shape[1:])
                loss = loss_fn(out, y)
                with backpack.backpack(getattr(backpack.extensions, ext_name)()):
                    loss.backward()
                for t, p in zip(totals, params):
                    d = getattr(p, attr, None)
                    if d is None:
                        raise NotImplementedError(
                            f"BackPACK computed no {attr} for a parameter (unsupported layer)"
                        )
                    t.add_(weight * d.detach())
        except _RefusedError:
            raise
        except NotImplementedError as err:
            raise NotImplementedError(
                f"BackPACK {ext_name} does not support this model or loss ({err}); use "
                "method='ggn-exact' for the GGN diagonal, or 'exact'/'xdiag' for the Hessian"
            ) from err
        except (RuntimeError, ValueError, KeyError, AttributeError, TypeError) as err:
            raise NotImplementedError(
                f"BackPACK {ext_name} failed on this model or loss ({type(err).__name__}: "
                f"{str(err)[:300]}); use method='ggn-exact' for the GGN diagonal, or "
                "'exact'/'xdiag' for the Hessian"
            ) from err
    value = flatten_tensors(totals)
    check_finite(value, f"the BackPACK {ext_name} diagonal")
    return exact_estimate(
        value,
        0,
        method=method,
        num_backward=float(outputs_per_sample),
        info={"backend": f"backpack.{ext_name}"},
    )


def backpack_trace(op: CurvatureOperator, kind: str) -> Estimate:
    """The trace from :func:`backpack_diagonal` (sum of the exact diagonal)."""
    d = backpack_diagonal(op, kind)
    value: Tensor = d.value.sum()
    return exact_estimate(value, 0, method=d.method, num_backward=d.num_backward, info=d.info)


class _RefusedError(NotImplementedError):
    """What curvkit refuses to hand to BackPACK (its message names the alternative)."""


def _refuse_ignored_targets(loss_fn, y, ext_name: str) -> None:
    """BackPACK (1.7.1) counts targets equal to ``ignore_index`` as real ones: its
    cross-entropy curvature uses every position's softmax and divides the mean by all of
    them (a diagonal 4-50% off, measured). Refused, naming what computes it."""
    if (
        isinstance(loss_fn, torch.nn.CrossEntropyLoss)
        and isinstance(y, torch.Tensor)
        and not y.is_floating_point()
        and bool((y == loss_fn.ignore_index).any())
    ):
        raise _RefusedError(
            f"BackPACK {ext_name} counts ignored targets (ignore_index="
            f"{loss_fn.ignore_index}) as real ones; use method='ggn-exact' for the GGN "
            "diagonal, or 'exact'/'xdiag' for the Hessian's"
        )
