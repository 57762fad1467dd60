"""Batches for curvature operators: one ``(X, y)`` pair or any re-iterable of pairs.

The operator over several batches must equal the one over their concatenation. For a
mean-reduced loss that means weighting batch ``b`` by its share of what the loss over all
the data divides by: ``N_b / N`` (``N_b`` its number of samples, the first dimension of
``y``) for a loss that divides by the number of samples (times a constant); for
``CrossEntropyLoss`` and ``NLLLoss`` on class indices, the batch's share of the targets they
count, where ignored targets (``ignore_index``, e.g. padding) or class weights make that
differ from sample to sample. For a sum-reduced loss every weight is 1.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Batches", "batch_size_of", "loss_reduction"]


def _is_single_batch(data: Any) -> bool:
    # (X, y) with X a tensor, tuple or dict; a list of batches has a batch, not a tensor, second
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)


def batch_size_of(y: Tensor) -> int:
    """Number of samples in a batch: the first dimension of the targets."""
    if not isinstance(y, Tensor) or y.ndim == 0:
        raise ValueError(
            "targets y must be a tensor whose first dimension counts the samples; "
            f"got {type(y).__name__} with shape {getattr(y, 'shape', None)}"
        )
    return int(y.shape[0])


def loss_reduction(loss_fn: Any, reduction: str | None) -> str:
    """The loss's reduction, ``"mean"`` or ``"sum"``: ``loss_fn.reduction``, else the
    argument (which must agree with the loss where the loss has one)."""
    own = getattr(loss_fn, "reduction", None)
    if own == "batchmean":  # KLDivLoss: the sum over a batch divided by its samples
        own = "mean"
    if reduction is not None and own is not None and reduction != own:
        raise ValueError(
            f"reduction={reduction!r} contradicts loss_fn.reduction={own!r}; the operator "
            "differentiates the loss as it is: drop the reduction argument, or build the loss "
            f"with reduction={reduction!r}"
        )
    found = reduction if reduction is not None else own
    if found is None:
        raise ValueError(
            "cannot tell how the loss reduces over samples: loss_fn has no `reduction` "
            "attribute. Pass reduction='mean' or reduction='sum' to the operator."
        )
    if found not in ("mean", "sum"):
        raise ValueError(
            f"loss reduction {found!r} is not supported: the loss must be a scalar averaged "
            "('mean') or summed ('sum') over samples"
        )
    return found


def counted_targets(loss_fn: Any, y: Tensor) -> Tensor | None:
    """What a mean-reduced ``CrossEntropyLoss``/``NLLLoss`` on class indices ``y`` divides
    by, per sample ``(N,)``: its targets that are not ``ignore_index``, each counted with its
    class weight. ``None`` for other losses and targets (they divide by the number of
    samples times a constant)."""
    if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) or y.is_floating_point():
        return None
    kept = y != loss_fn.ignore_index
    if loss_fn.weight is None:
        counts = kept.to(torch.float64)
    else:
        w = loss_fn.weight.to(device=y.device, dtype=torch.float64)
        counts = torch.where(kept, w[torch.where(kept, y, 0)], 0.0)
    return counts.reshape(y.shape[0], -1).sum(1)


@dataclass
class Batches:
    """A re-iterable view of the data, with each batch's weight in the total loss.

    Args:
        data: one ``(X, y)`` batch, or an iterable of batches that can be iterated more than
            once (a list, a ``DataLoader``). A one-shot iterator (a generator) is rejected:
            every product has to see the same data again.
        reduction: ``"mean"`` or ``"sum"``.
        loss_fn: the loss, to tell what its mean divides by (see the module docstring).
    """

    data: Any
    reduction: str
    loss_fn: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.data, (tuple, list)) and len(self.data) == 2 and self.data[1] is None:
            raise ValueError(
                "the batch's targets y are None: curvature operators differentiate "
                "loss_fn(model(X), y) and need a tensor of targets"
            )
        if _is_single_batch(self.data):
            self._source: Iterable = [tuple(self.data)]
        elif isinstance(self.data, Iterator):
            raise TypeError(
                "data is a one-shot iterator (e.g. a generator); curvature products pass "
                "over the data many times. Pass a list of (X, y) batches or a DataLoader."
            )
        elif isinstance(self.data, Iterable):
            self._source = self.data
        else:
            raise TypeError(
                "data must be one (X, y) batch or an iterable of (X, y) batches, "
                f"got {type(self.data).__name__}"
            )
        with torch.random.fork_rng(devices=[]):  # a shuffling DataLoader draws from it
            targets = [self._unpack(b)[1] for b in self._source]
        self.sizes = [batch_size_of(y) for y in targets]
        if not self.sizes:
            raise ValueError("data is empty: the operator needs at least one (X, y) batch")
        self.num_samples = sum(self.sizes)
        if self.num_samples == 0:
            raise ValueError("data holds no samples (all batches have size 0)")
        # weights by counted targets only where samples count differently (a sync per batch)
        self.total_count: float | None = None
        self._counts: dict[int, tuple] = {}  # id(y) -> (weak ref, version, count)
        if self.reduction == "mean" and len(self.sizes) > 1:
            counts = [counted_targets(self.loss_fn, y) for y in targets]
            if all(c is not None for c in counts):
                per_sample = torch.cat([c.cpu() for c in counts])
                if bool((per_sample != per_sample[0]).any()):
                    self.total_count = float(per_sample.sum())
        if self.total_count == 0:
            raise ValueError("every target is ignored (ignore_index): the loss is undefined")

    @staticmethod
    def _unpack(batch: Any) -> tuple[Any, Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                f"each batch must be an (X, y) pair, got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        return batch[0], batch[1]

    def first(self) -> tuple[Any, Tensor]:
        """The first batch; the global RNG (which a shuffling DataLoader draws from) is left
        as it was."""
        with torch.random.fork_rng(devices=[]):
            return self._unpack(next(iter(self._source)))

    def __iter__(self) -> Iterator[tuple[Any, Tensor, float]]:
        """Yield ``(X, y, weight)``; weights sum to 1 for ``mean`` reduction."""
        count = 0
        for batch in self._source:
            X, y = self._unpack(batch)
            n = batch_size_of(y)
            count += n
            if self.total_count is not None:
                share = self._counted(y)
                if share == 0:
                    continue  # all its targets ignored: the batch adds nothing (its loss is 0/0)
                weight = share / self.total_count
            else:
                weight = n / self.num_samples if self.reduction == "mean" else 1.0
            yield X, y, weight
        if count != self.num_samples:
            raise RuntimeError(
                f"the data changed between passes ({count} samples now, {self.num_samples} "
                "at construction); a DataLoader with drop_last and shuffling can do this"
            )

    def _counted(self, y: Tensor) -> float:
        """The targets ``y`` counts, read back once per targets tensor: a list of batches
        passes the same tensors every product (a DataLoader makes new ones each pass)."""
        cache = self._counts
        hit = cache.get(id(y))
        if hit is not None and hit[0]() is y and hit[1] == y._version:
            return hit[2]
        share = float(counted_targets(self.loss_fn, y).sum())  # a host sync on CUDA
        cache[id(y)] = (weakref.ref(y), y._version, share)
        return share

    def __len__(self) -> int:
        return len(self.sizes)


def move_to(x: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move a tensor (or a tuple/list/dict of them) to ``device``; floats cast to ``dtype``."""
    if isinstance(x, Tensor):
        if dtype is not None and x.is_floating_point():
            return x.to(device=device, dtype=dtype)
        return x.to(device=device)
    if isinstance(x, (tuple, list)):
        return type(x)(move_to(t, device, dtype) for t in x)
    if isinstance(x, dict):
        return {k: move_to(v, device, dtype) for k, v in x.items()}
    return x
