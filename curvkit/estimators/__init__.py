"""Estimators over any LinearOperator; stochastic ones return an Estimate with error bars."""

from curvkit.estimators import control_variates  # noqa: F401  registers the GGN methods
from curvkit.estimators.density import SpectralDensity, spectral_density
from curvkit.estimators.diagonal import (
    DIAGONAL_METHODS,
    diagonal,
    register_diagonal_method,
    row_sum,
)
from curvkit.estimators.eigen import eigenvalues
from curvkit.estimators.estimate import Estimate
from curvkit.estimators.frobenius import frobenius_norm
from curvkit.estimators.trace import TRACE_METHODS, register_trace_method, trace

__all__ = [
    "DIAGONAL_METHODS",
    "Estimate",
    "SpectralDensity",
    "TRACE_METHODS",
    "diagonal",
    "eigenvalues",
    "frobenius_norm",
    "register_diagonal_method",
    "register_trace_method",
    "row_sum",
    "spectral_density",
    "trace",
]
