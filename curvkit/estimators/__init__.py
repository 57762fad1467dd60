"""Estimators over any LinearOperator; stochastic ones return an Estimate with error bars."""

from curvkit.estimators import control_variates  # noqa: F401  registers the GGN methods
from curvkit.estimators.estimate import Estimate

__all__ = ["Estimate"]
