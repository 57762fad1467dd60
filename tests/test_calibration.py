"""Calibration of the stochastic estimators on dense matrices with known spectra.

Many independent runs are batched into one product (``replicates=R``), so each case is one
big matmat. Checks: the 95% confidence interval covers the truth at a rate between 85% and
99% (budgets >= 30), and the mean over runs is within a few standard errors of the truth.
"""

import math

import pytest
import torch

import curvkit as ck
from curvkit.linop import DenseOperator
from tests.spectra import FAMILIES, PSD_FAMILIES, family_matrix

R = 400  # independent runs per case
D = 120
BUDGETS = [30, 48]


def _operator(family: str) -> tuple[DenseOperator, torch.Tensor]:
    A, lam = family_matrix(family, D)
    return DenseOperator(A, psd=family in PSD_FAMILIES), lam


def _coverage(est: ck.Estimate, truth: torch.Tensor) -> float:
    lo, hi = est.confidence_interval(0.95)
    return float(((lo <= truth) & (truth <= hi)).double().mean())


TRACE_CASES = [
    (family, method)
    for family in FAMILIES
    for method in ("hutchinson", "hutch++", "xtrace", "xnystrace")
    if method != "xnystrace" or family in PSD_FAMILIES
]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("family,method", TRACE_CASES, ids=[f"{f}-{m}" for f, m in TRACE_CASES])
def test_trace_coverage_and_bias(family, method, budget):
    op, lam = _operator(family)
    truth = lam.sum()
    g = torch.Generator().manual_seed(100 + budget)
    est = ck.trace(op, method, budget, g, replicates=R)
    assert est.value.shape == (R,) and est.stderr.shape == (R,)
    assert est.dof is not None and est.dof >= 1
    cov = _coverage(est, truth)
    assert 0.85 <= cov <= 0.99, f"{method} on {family} at {budget}: coverage {cov:.3f}"
    spread = est.value.std()
    assert abs(est.value.mean() - truth) <= 4 * spread / math.sqrt(R), "biased"


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
@pytest.mark.parametrize("family", FAMILIES)
def test_diagonal_coverage_and_bias(family, method, budget):
    op, _ = _operator(family)
    truth = op.matrix.diagonal()
    g = torch.Generator().manual_seed(200 + budget)
    est = ck.diagonal(op, method, budget, g, replicates=R)
    assert est.value.shape == (R, D)
    cov = _coverage(est, truth)  # averaged over entries and runs
    assert 0.85 <= cov <= 0.99, f"{method} on {family} at {budget}: coverage {cov:.3f}"
    z = (est.value.mean(0) - truth) / (est.value.std(0) / math.sqrt(R))
    assert float((z**2).mean()) < 1.5 and float(z.abs().max()) < 5, "biased"


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_frobenius_coverage(family, budget):
    op, lam = _operator(family)
    truth = lam.norm()
    g = torch.Generator().manual_seed(300 + budget)
    est = ck.frobenius_norm(op, "hutchinson", budget, g, replicates=R)
    cov = _coverage(est, truth)
    assert 0.85 <= cov <= 0.99, f"frobenius on {family} at {budget}: coverage {cov:.3f}"
    # the squared norm is unbiased
    sq = est.info["squared"]
    assert abs(sq.mean() - truth**2) <= 4 * sq.std() / math.sqrt(R)


def test_coverage_check_can_fail():
    """The calibration check rejects an estimator whose error bars are too small."""
    op, lam = _operator("poly1")
    est = ck.trace(op, "hutchinson", 30, torch.Generator().manual_seed(0), replicates=R)
    est.stderr = est.stderr / 3
    assert _coverage(est, lam.sum()) < 0.85
