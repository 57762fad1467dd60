"""Estimators over any LinearOperator; stochastic ones return an Estimate with error bars."""

from curvkit.estimators.estimate import Estimate

__all__ = ["Estimate"]
