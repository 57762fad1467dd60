"""Dense symmetric test matrices with known spectra for the estimator tests.

Families (as in Epperly, Tropp & Webber 2024 and Meyer et al. 2021): ``flat``
(``lambda_i = 3 - 2 (i - 1) / (D - 1)``), ``poly1`` (``i^-1``), ``poly2`` (``i^-2``), ``exp``
(``0.9^i``) and ``indefinite`` (``i^-1`` with every third eigenvalue negated), all with a
Haar-random eigenbasis from a fixed seed.
"""

from __future__ import annotations

import torch
from torch import Tensor

FAMILIES = ("flat", "poly1", "poly2", "exp", "indefinite")
PSD_FAMILIES = ("flat", "poly1", "poly2", "exp")


def spectrum(name: str, D: int) -> Tensor:
    i = torch.arange(1, D + 1, dtype=torch.float64)
    if name == "flat":
        return 3 - 2 * (i - 1) / (D - 1)
    if name == "poly1":
        return 1 / i
    if name == "poly2":
        return i**-2
    if name == "exp":
        return 0.9**i
    if name == "indefinite":
        return torch.where(i % 3 == 0, -1 / i, 1 / i)
    raise ValueError(name)


def family_matrix(name: str, D: int = 120, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(A, eigenvalues)``: ``A = U diag(lambda) U^T`` in float64, exactly symmetric."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    lam = spectrum(name, D)
    A = (U * lam) @ U.T
    return (A + A.T) / 2, lam
