"""Curvature operators built from ``(model, loss_fn, data)``."""

from curvkit.operators.base import CurvatureOperator
from curvkit.operators.ggn import GGNOperator, ResidualOperator
from curvkit.operators.hessian import HessianOperator

__all__ = ["CurvatureOperator", "GGNOperator", "HessianOperator", "ResidualOperator"]
