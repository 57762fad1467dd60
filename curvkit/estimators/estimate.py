"""``Estimate``: a value with its standard error and the cost it took."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from scipy import stats
from torch import Tensor

__all__ = ["Estimate"]


@dataclass
class Estimate:
    """The result of an estimator.

    Attributes:
        value: the estimate (0-d for a trace or norm, ``(D,)`` for a diagonal).
        stderr: its standard error, same shape (zeros for exact methods).
        num_matvecs: operator products used.
        method: the method actually used (after ``"auto"`` resolves).
        dof: degrees of freedom for the t-quantile of the confidence interval
            (``None``: normal quantiles; ``0`` for exact results).
        num_backward: work that is not a matvec (backward passes for exact GGN
            quantities), in gradient-equivalents.
        info: method-specific extras (e.g. budget rounding notes).
    """

    value: Tensor
    stderr: Tensor
    num_matvecs: int
    method: str
    dof: int | None = None
    num_backward: float = 0.0
    info: dict = field(default_factory=dict)

    def confidence_interval(self, level: float = 0.95) -> tuple[Tensor, Tensor]:
        """Two-sided interval ``value -/+ q * stderr`` with t (or normal) quantile ``q``."""
        if not 0 < level < 1:
            raise ValueError(f"level must lie in (0, 1), got {level}")
        p = 0.5 + level / 2
        q = stats.t.ppf(p, self.dof) if self.dof else stats.norm.ppf(p)
        half = float(q) * self.stderr
        return self.value - half, self.value + half

    @property
    def ci(self) -> tuple[Tensor, Tensor]:
        """The 95% confidence interval."""
        return self.confidence_interval(0.95)

    @property
    def cost(self) -> float:
        """Total cost in gradient-equivalents: matvecs plus non-matvec backward passes."""
        return self.num_matvecs + self.num_backward

    def __float__(self) -> float:
        return float(self.value)

    def __repr__(self) -> str:
        if self.value.ndim == 0:
            shown = f"{self.value.item():.6g} ± {self.stderr.item():.2g}"
        else:
            shown = f"tensor of shape {tuple(self.value.shape)}"
        return f"Estimate({shown}, method={self.method!r}, num_matvecs={self.num_matvecs})"

    def to(self, *args, **kwargs) -> Estimate:
        return Estimate(
            self.value.to(*args, **kwargs),
            self.stderr.to(*args, **kwargs),
            self.num_matvecs,
            self.method,
            self.dof,
            self.num_backward,
            dict(self.info),
        )


def exact_estimate(value: Tensor, num_matvecs: int, method: str = "exact", **kw) -> Estimate:
    """An exact result: zero standard error."""
    return Estimate(value, torch.zeros_like(value), num_matvecs, method, dof=0, **kw)
