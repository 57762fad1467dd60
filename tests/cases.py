"""The model x loss x data case matrix shared by the tests, and the dense float64 oracles.

Oracles are built by double backward: ``torch.autograd.functional.hessian`` on the
flattened parameters (not ``torch.func.hessian``, which is wrong on affine LayerNorm and
train-mode BatchNorm, see DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

from curvkit.autodiff import differentiable_attention
from curvkit.linop import unflatten_vector

DTYPE = torch.float64


class SequenceCrossEntropy(nn.Module):
    """Cross-entropy over a sequence dimension: outputs ``(N, T, C)``, targets ``(N, T)``."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, out: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(out.flatten(0, 1), y.flatten(), reduction=self.reduction)


class TinyTransformer(nn.Module):
    """Embedding, one pre-norm attention block and MLP with GELU, per-token logits."""

    def __init__(self, vocab: int = 5, dim: int = 6, heads: int = 2, seq: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.1 * torch.randn(seq, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.pos
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.head(h)


def _classification(n: int, d_in: int, classes: int, g: torch.Generator):
    return torch.randn(n, d_in, generator=g, dtype=DTYPE), torch.randint(
        0, classes, (n,), generator=g
    )


def _regression(n: int, d_in: int, d_out: int, g: torch.Generator):
    return torch.randn(n, d_in, generator=g, dtype=DTYPE), torch.randn(
        n, d_out, generator=g, dtype=DTYPE
    )


@dataclass
class Case:
    """One model/loss/data combination with everything a test needs."""

    name: str
    model: nn.Module
    loss_fn: nn.Module
    batches: list[tuple[Tensor, Tensor]]
    couples_samples: bool = False  # train-mode BatchNorm
    forward_mode_exact: bool = True  # False where jvp(jacrev)-based peers are wrong
    extra: dict = field(default_factory=dict)

    @property
    def params(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def subset(self) -> list[Tensor]:
        """A strict subset of the parameters: the last two tensors."""
        return self.params[-2:]

    @property
    def data(self):
        return self.batches[0] if len(self.batches) == 1 else self.batches


def _make_model(kind: str, g_seed: int) -> tuple[nn.Module, str]:
    torch.manual_seed(g_seed)
    if kind == "mlp-tanh":
        return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), "vector"
    if kind == "mlp-relu":
        return nn.Sequential(
            nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)
        ), "vector"
    if kind == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)
        ), "image"
    if kind in ("bn-eval", "bn-train"):
        m = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
        # non-trivial running statistics, so eval mode differs from train mode
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2.0)
        m.train(kind == "bn-train")
        return m, "vector"
    if kind == "layernorm-gelu":
        return nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.GELU(), nn.Linear(5, 3)), "vector"
    if kind == "transformer":
        return TinyTransformer(), "tokens"
    raise ValueError(kind)


def _make_data(kind: str, loss: str, sizes: list[int], g: torch.Generator):
    batches = []
    for n in sizes:
        if kind == "image":
            X = torch.randn(n, 1, 6, 6, generator=g, dtype=DTYPE)
        elif kind == "tokens":
            X = torch.randint(0, 5, (n, 3), generator=g)
        else:
            X = torch.randn(n, 4, generator=g, dtype=DTYPE)
        if loss.startswith("ce-seq"):
            y = torch.randint(0, 5, (n, 3), generator=g)
        elif loss.startswith("ce"):
            y = torch.randint(0, 3, (n,), generator=g)
        elif loss == "bce":
            y = torch.randint(0, 2, (n, 3), generator=g).to(DTYPE)
        else:
            y = torch.randn(n, 3, generator=g, dtype=DTYPE)
        batches.append((X, y))
    return batches


LOSSES: dict[str, Callable[[], nn.Module]] = {
    "mse-mean": lambda: nn.MSELoss(reduction="mean"),
    "mse-sum": lambda: nn.MSELoss(reduction="sum"),
    "ce-mean": lambda: nn.CrossEntropyLoss(reduction="mean"),
    "ce-sum": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "ce-seq-mean": lambda: SequenceCrossEntropy("mean"),
    "ce-seq-sum": lambda: SequenceCrossEntropy("sum"),
    "bce": lambda: nn.BCEWithLogitsLoss(reduction="mean"),
}

# (model, loss, batch sizes). Uneven loaders test the N_b / N weighting.
CASE_SPECS = [
    ("mlp-tanh", "mse-mean", [7]),
    ("mlp-tanh", "mse-sum", [3, 5, 2]),
    ("mlp-tanh", "bce", [4, 3]),
    ("mlp-relu", "ce-mean", [3, 5, 2]),
    ("mlp-relu", "ce-sum", [6]),
    ("cnn", "ce-mean", [4, 2]),
    ("cnn", "mse-sum", [5]),
    ("bn-eval", "ce-mean", [3, 5]),
    ("bn-train", "ce-mean", [6]),
    ("bn-train", "mse-sum", [4, 3]),
    ("layernorm-gelu", "mse-mean", [5]),
    ("layernorm-gelu", "ce-mean", [4, 3]),
    ("transformer", "ce-seq-mean", [4]),
    ("transformer", "ce-seq-sum", [2, 3]),
]


def make_case(model_kind: str, loss: str, sizes: list[int], seed: int = 0) -> Case:
    model, data_kind = _make_model(model_kind, seed)
    model = model.to(DTYPE)
    g = torch.Generator().manual_seed(seed + 1)
    batches = _make_data(data_kind, loss, sizes, g)
    name = f"{model_kind}/{loss}/{'-'.join(map(str, sizes))}"
    return Case(
        name=name,
        model=model,
        loss_fn=LOSSES[loss](),
        batches=batches,
        couples_samples=model_kind == "bn-train",
        forward_mode_exact=model_kind not in ("bn-train", "layernorm-gelu", "transformer"),
    )


def all_cases() -> list[Case]:
    return [make_case(*spec) for spec in CASE_SPECS]


def case_ids() -> list[str]:
    return [f"{m}/{loss}/{'-'.join(map(str, s))}" for m, loss, s in CASE_SPECS]


# ---------------------------------------------------------------------- oracles
def _batch_loss_fn(case: Case, params: list[Tensor], X, y, weight: float):
    names = {id(p): n for n, p in case.model.named_parameters()}
    param_names = [names[id(p)] for p in params]
    shapes = [p.shape for p in params]
    buffers = {n: b.clone() for n, b in case.model.named_buffers()}

    def f(theta: Tensor) -> Tensor:
        pieces = unflatten_vector(theta, shapes)
        out = functional_call(case.model, {**dict(zip(param_names, pieces)), **buffers}, (X,))
        return weight * case.loss_fn(out, y)

    return f


def _weights(case: Case) -> list[float]:
    sizes = [y.shape[0] for _, y in case.batches]
    mean = case.loss_fn.reduction == "mean"
    return [n / sum(sizes) if mean else 1.0 for n in sizes]


def dense_hessian(case: Case, params: list[Tensor] | None = None) -> Tensor:
    """Dense float64 Hessian by double backward over the concatenated data.

    For train-mode BatchNorm: the weighted sum of per-batch Hessians (the documented
    semantics, since such a model couples the samples of a batch).
    """
    params = case.params if params is None else params
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    if case.couples_samples:
        groups = [(X, y, w) for (X, y), w in zip(case.batches, _weights(case))]
    else:
        X = torch.cat([b[0] for b in case.batches])
        y = torch.cat([b[1] for b in case.batches])
        groups = [(X, y, 1.0)]
    H = torch.zeros(theta.numel(), theta.numel(), dtype=DTYPE)
    with differentiable_attention():
        for X, y, w in groups:
            H += torch.autograd.functional.hessian(_batch_loss_fn(case, params, X, y, w), theta)
    return H


def rel_err(a: Tensor, b: Tensor) -> float:
    """Frobenius norm of ``a - b`` over that of ``b``."""
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
