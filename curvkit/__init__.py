"""curvkit: matrix-free curvature of neural-network losses."""

from curvkit.estimators import (
    Estimate,
    SpectralDensity,
    diagonal,
    eigenvalues,
    frobenius_norm,
    row_sum,
    spectral_density,
    trace,
)
from curvkit.functional import hessian_block_row_sums, hessian_row_sum, hvp
from curvkit.linop import DenseOperator, IdentityOperator, LinearOperator, as_operator
from curvkit.operators import CurvatureOperator, GGNOperator, HessianOperator, ResidualOperator

__version__ = "0.1.0"

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "Estimate",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "LinearOperator",
    "ResidualOperator",
    "SpectralDensity",
    "as_operator",
    "diagonal",
    "eigenvalues",
    "frobenius_norm",
    "hessian_block_row_sums",
    "hessian_row_sum",
    "hvp",
    "row_sum",
    "spectral_density",
    "trace",
]
