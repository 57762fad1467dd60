"""Speed regression guard for curvature products (issue 4). Not run by default.

Run with ``pytest -m benchmark tests/test_bench_guard.py``. It runs ``scripts/bench.py
--quick`` in a subprocess (about a minute on 2 CPU cores) and fails

* on a GPU, when an issue-4 target (one product <= 2x an eager gradient, K products <= 1x
  per probe at <= 4x the gradient's memory, never slower than the fastest peer) is missed
  by more than 10% (``--check``);
* on a CPU, where those targets are out of reach (see docs/performance.md), when curvkit's
  geometric-mean ratios regress by more than 50% against the committed quick baseline
  ``docs/benchmarks/cpu-quick.json`` (a shared 2-core machine is noisy, hence the margin).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench.py"
CPU_BASELINE = ROOT / "docs" / "benchmarks" / "cpu-quick.json"


@pytest.mark.benchmark
def test_curvature_products_stay_fast(tmp_path):
    cmd = [sys.executable, str(BENCH), "--quick", "--out", str(tmp_path / "quick.json")]
    if torch.cuda.is_available():
        cmd += ["--check", "--margin", "0.10"]
    else:
        if not CPU_BASELINE.exists():
            pytest.skip("no committed CPU baseline")
        cmd += ["--threads", "1", "--baseline", str(CPU_BASELINE), "--margin", "0.5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
