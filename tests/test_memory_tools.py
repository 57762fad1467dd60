"""The measured peak of a computation's tensors (curvkit/live_memory.py) and the CPU
allocator mode curvkit's passes switch on (curvkit/cpu_memory.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from curvkit import cpu_memory
from curvkit.live_memory import peak_allocated_bytes


def test_peak_counts_fresh_storages_while_they_live():
    x = torch.ones(1000)  # alive before the call: not counted

    def run():
        a = torch.empty(1000)  # 4000 bytes
        b = a.view(10, 100).t()  # views: no new memory
        c = x + 1  # 4000
        del a, b, c
        d = torch.empty(250)  # 1000, after 8000 were freed
        e = x.mul_(1.0)  # in place: nothing new
        return d, e

    assert peak_allocated_bytes(run) == 8000


def test_peak_follows_a_gradient():
    lin = torch.nn.Linear(100, 50)
    X = torch.randn(64, 100)

    def grad():
        return torch.autograd.grad(lin(X).square().sum(), list(lin.parameters()))

    peak = peak_allocated_bytes(grad)
    # the output and its square (64 x 50 floats each) and the two gradients at least
    assert peak >= 4 * (2 * 64 * 50 + 50 * 100 + 50)
    assert peak < 4 * 10 * (64 * 50 + 50 * 100)


_glibc = cpu_memory._glibc() is not None

_FAULTS = textwrap.dedent(
    """
    import resource, sys, torch
    import curvkit as ck
    from curvkit import cpu_memory
    from torch import nn
    model = nn.Sequential(nn.Linear(4, 3))
    H = ck.HessianOperator(model, nn.MSELoss(), (torch.randn(8, 4), torch.randn(8, 3)))
    H @ torch.ones(H.shape[0])  # curvkit's first CPU pass
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)  # 64 MiB, warm-up
    counts = []
    for _ in range(7):
        before = faults()
        torch.empty(16 << 20).fill_(1.0)
        counts.append(faults() - before)
    # the median: an allocation may now and then find the freed block split by others
    print(cpu_memory.reuse_freed_memory_active(), sorted(counts)[3])
    """
)


def _faults_per_64_mib(env: dict[str, str]) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not _glibc, reason="glibc's mallopt (Linux)")
def test_freed_memory_is_reused_after_a_pass_unless_switched_off():
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    active, faults = _faults_per_64_mib(env)
    assert active
    assert faults < 1000  # warm pages: no fault per 4 KiB page
    active, faults = _faults_per_64_mib({**env, "CURVKIT_REUSE_FREED_MEMORY": "0"})
    assert not active
    assert faults > 10_000  # glibc maps (and faults) 64 MiB afresh each time


def test_views_of_any_kind_are_not_new_memory():
    x = torch.ones(4, 6)

    def run():
        parts = x.split(2, dim=1)  # a list of views: one schema return, three tensors
        folded = torch.randn(3, 4, 6).matmul(torch.ones(6, 5))  # mm + _unsafe_view
        return parts, folded

    # the two factors (288 and 120 bytes) and the product (240 bytes), each once
    assert peak_allocated_bytes(run) == 4 * (3 * 4 * 6 + 6 * 5 + 3 * 4 * 5)


@pytest.mark.skipif(not _glibc, reason="glibc's mallopt (Linux)")
def test_switching_off_before_the_first_pass_keeps_glibc_defaults():
    code = (
        "from curvkit import cpu_memory as m; m.set_reuse_freed_memory(False); "
        "a = m.reuse_freed_memory(); m.set_reuse_freed_memory(True); "
        "print(a, m.reuse_freed_memory(), m.reuse_freed_memory_active(), "
        "m.reuse_freed_memory('meta'), m.release_freed_memory())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "True", "True", "True"]
