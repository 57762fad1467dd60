"""Model zoo: small networks by name, with size knobs, built deterministically from a seed.

```python
from curvkit.zoo import build_model
model = build_model("mlp", input_shape=(1, 8, 8), num_outputs=10, seed=0, depth=2, width=32)
```

Names and knobs (defaults in brackets):

``mlp``
    Flatten, ``depth`` hidden ``Linear`` layers of ``width`` units with ``activation``
    (``relu`` | ``tanh`` | ``gelu`` | ``sigmoid`` | ``softplus`` | ``linear``), linear head.
    [depth=2, width=32, activation="relu"]
``cnn``
    ``depth`` 3x3 convolutions (the first keeps the resolution, the rest halve it with
    stride 2), channels doubling from ``channels``, average pooling of the last feature map
    to ``pool x pool`` (or its own size, if smaller; ``pool=1`` is global average pooling),
    flattened into a linear head, so the head keeps coarse spatial layout (on 8x8 digits
    with ``depth=2``: a 4x4 map pooled to its 2x2 quadrants). A plain ``nn.Sequential``.
    [depth=2, channels=8, activation="relu", pool=2]
``resnet``
    CIFAR-style ResNet (He et al. 2016, Sec. 4.2): a 3x3 stem and three stages of
    ``blocks_per_stage`` basic blocks with widths ``width, 2*width, 4*width`` (stages 2 and
    3 halve the resolution, 1x1 projection shortcuts), average pooling to ``pool x pool``
    as for ``cnn`` (on 8x8 digits the last map is already 2x2), linear head.
    ``norm="batch"`` puts BatchNorm after every convolution; ``norm="none"`` is the
    normalisation-free variant: He-initialised convolutions whose residual branches (the
    last convolution of each) are scaled by ``1/sqrt(number of blocks)`` at initialisation,
    so that the signal does not grow with depth (in the spirit of Fixup, Zhang et al. 2019,
    without zeroing the branches, which would make the curvature at initialisation
    degenerate). Without BatchNorm it needs a smaller learning rate at small batches (the
    configs use ``lr = 0.02``). [blocks_per_stage=1, width=8, norm="batch", pool=2]
``transformer``
    A small pre-norm transformer encoder: the input is cut into tokens (see below), each
    embedded by a ``Linear`` map plus a learned position embedding; ``depth`` blocks of
    ``x + Attn(LN(x))`` and ``x + MLP(LN(x))`` with GELU, a final LayerNorm, mean pooling
    over tokens and a linear head. Attention is written with plain matrix products so that
    second derivatives exist on every backend. [depth=2, d_model=32, heads=4, mlp_ratio=2,
    patch=0]
    *Tokens*: an image ``(C, H, W)`` becomes ``H`` tokens, one per pixel row, each with
    ``C*W`` features (the 8x8 digits become a sequence of 8 row-tokens of 8 pixels, read top
    to bottom). A vector ``(d,)`` becomes ``d / patch`` tokens of ``patch`` features
    (``patch=0`` picks the largest divisor of ``d`` not above ``sqrt(d)``).

*Initialisation*: convolutions feeding an activation (``cnn``, and ``resnet`` without
BatchNorm) are He-initialised, ``N(0, gain^2 / fan_in)`` with zero bias and the gain of
:data:`GAINS` (``sqrt(2)`` for ReLU). PyTorch's default, ``U`` with variance
``1 / (3 fan_in)``, shrinks the mean square of a ReLU network's signal about six-fold per
layer; with it (and, for the CNN, a head that saw only the 8 globally pooled channels of
the default sweep) both models stayed near chance on digits. Linear heads, the MLP, the
BatchNorm ResNet and the transformer keep PyTorch's default initialisation.

Every builder takes ``input_shape`` (per sample, without the batch dimension),
``num_outputs`` and ``seed``. Building uses a private RNG (``torch.random.fork_rng``), so
the global RNG state is untouched and the same seed gives the same weights. Models have no
dropout; ``resnet`` with ``norm="batch"`` is the only one with train/eval-mode differences.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "ACTIVATIONS",
    "GAINS",
    "MODELS",
    "available_models",
    "build_model",
    "check_model_spec",
    "num_parameters",
]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "linear": nn.Identity,
}


# Init gain per activation (as ``torch.nn.init.calculate_gain``; GELU and softplus are
# treated as ReLU): weights feeding the activation are drawn ``N(0, gain^2 / fan_in)``.
GAINS: dict[str, float] = {
    "relu": math.sqrt(2.0),
    "tanh": 5.0 / 3.0,
    "gelu": math.sqrt(2.0),
    "sigmoid": 1.0,
    "softplus": math.sqrt(2.0),
    "linear": 1.0,
}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _he_init_(layer: nn.Conv2d | nn.Linear, gain: float = math.sqrt(2.0)) -> None:
    """He (Kaiming) normal init, fan-in mode: weights ``N(0, gain^2 / fan_in)``, bias zero.

    With ``gain = sqrt(2)`` a layer followed by a ReLU keeps the mean square of the signal
    from layer to layer (He et al. 2015). PyTorch's default (uniform, variance
    ``1 / (3 fan_in)``) is six times smaller, so every conv+ReLU layer shrinks the signal by
    about ``sqrt(6)`` and the gradients of the early layers with it.
    """
    fan_in = layer.weight[0].numel()
    with torch.no_grad():
        layer.weight.normal_(0.0, gain / math.sqrt(fan_in))
        if layer.bias is not None:
            layer.bias.zero_()


def _pooled_size(size: int, pool: int) -> int:
    """Side of the average-pooled map: ``pool``, or the map's own side if that is smaller."""
    return min(size, pool)


def _positive(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _image_shape(input_shape: Sequence[int], model: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3:
        raise ValueError(
            f"{model} needs image inputs of shape (C, H, W) or (H, W), got {tuple(input_shape)}; "
            "use a dataset with images (digits, mnist, cifar10) or the mlp/transformer models"
        )
    return shape  # type: ignore[return-value]


# ---------------------------------------------------------------------- MLP
def mlp(
    input_shape: Sequence[int],
    num_outputs: int,
    *,
    depth: int = 2,
    width: int = 32,
    activation: str = "relu",
) -> nn.Module:
    """Fully connected network with ``depth`` hidden layers of ``width`` units."""
    _positive("width", width)
    if not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be a non-negative integer, got {depth!r}")
    _activation(activation)
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = math.prod(int(s) for s in input_shape)
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), _activation(activation)]
        fan_in = width
    layers.append(nn.Linear(fan_in, num_outputs))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------- CNN
def cnn(
    input_shape: Sequence[int],
    num_outputs: int,
    *,
    depth: int = 2,
    channels: int = 8,
    activation: str = "relu",
    pool: int = 2,
) -> nn.Module:
    """Small convolutional network: 3x3 convolutions, average pooling to ``pool x pool``, head.

    A plain ``nn.Sequential`` of ``Conv2d``, activations, ``AdaptiveAvgPool2d``, ``Flatten``
    and ``Linear``, so BackPACK's diagonal extensions support it.
    """
    _positive("depth", depth)
    _positive("channels", channels)
    _positive("pool", pool)
    _activation(activation)
    c_in, h, w = _image_shape(input_shape, "cnn")
    layers: list[nn.Module] = []
    if len(tuple(input_shape)) == 2:
        layers.append(nn.Unflatten(1, (1, *tuple(input_shape))))
    c = channels
    for i in range(depth):
        stride = 1 if i == 0 else 2
        conv = nn.Conv2d(c_in, c, 3, stride=stride, padding=1)
        _he_init_(conv, GAINS[activation])
        layers += [conv, _activation(activation)]
        h, w = (h - 1) // stride + 1, (w - 1) // stride + 1
        c_in, c = c, 2 * c
    ph, pw = _pooled_size(h, pool), _pooled_size(w, pool)
    layers += [nn.AdaptiveAvgPool2d((ph, pw)), nn.Flatten(), nn.Linear(c_in * ph * pw, num_outputs)]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a (projection) shortcut; optional BatchNorm.

    Without BatchNorm the convolutions get He init (1x1 projections gain 1: they feed the
    sum, not a ReLU) and the residual branch's last convolution is scaled by
    ``branch_scale``; with BatchNorm they keep PyTorch's default init (BatchNorm sets the
    scale).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, norm: bool, branch_scale: float):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not norm)
        self.bn1 = nn.BatchNorm2d(c_out) if norm else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=not norm)
        self.bn2 = nn.BatchNorm2d(c_out) if norm else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=not norm),
                nn.BatchNorm2d(c_out) if norm else nn.Identity(),
            )
        if not norm:
            _he_init_(self.conv1)
            _he_init_(self.conv2, GAINS["relu"] * branch_scale)
            if isinstance(self.shortcut, nn.Sequential):
                _he_init_(self.shortcut[0], 1.0)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet with three stages (see the module docstring)."""

    def __init__(
        self,
        in_channels: int,
        num_outputs: int,
        blocks_per_stage: int,
        width: int,
        norm: bool,
        pooled: tuple[int, int] = (1, 1),
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=not norm)
        self.stem_bn = nn.BatchNorm2d(width) if norm else nn.Identity()
        if not norm:
            _he_init_(self.stem)
        scale = 1.0 / math.sqrt(3 * blocks_per_stage)
        blocks: list[nn.Module] = []
        c_in = width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks_per_stage):
                stride = 2 if (stage > 0 and b == 0) else 1
                blocks.append(BasicBlock(c_in, c_out, stride, norm, scale))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pooled = pooled
        self.head = nn.Linear(c_in * pooled[0] * pooled[1], num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 3:
            x = x.unsqueeze(1)
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.blocks(x)
        return self.head(F.adaptive_avg_pool2d(x, self.pooled).flatten(1))


def resnet(
    input_shape: Sequence[int],
    num_outputs: int,
    *,
    blocks_per_stage: int = 1,
    width: int = 8,
    norm: str = "batch",
    pool: int = 2,
) -> nn.Module:
    """CIFAR-style ResNet; ``norm`` is ``"batch"`` (BatchNorm) or ``"none"``."""
    _positive("blocks_per_stage", blocks_per_stage)
    _positive("width", width)
    _positive("pool", pool)
    if norm not in ("batch", "none"):
        raise ValueError(f"norm must be 'batch' or 'none', got {norm!r}")
    c_in, h, w = _image_shape(input_shape, "resnet")
    for _ in range(2):  # stages 2 and 3 halve the resolution (3x3, stride 2, padding 1)
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    pooled = (_pooled_size(h, pool), _pooled_size(w, pool))
    return ResNet(c_in, num_outputs, blocks_per_stage, width, norm == "batch", pooled)


# ---------------------------------------------------------------------- transformer
class SelfAttention(nn.Module):
    """Multi-head self-attention from plain matrix products (twice differentiable)."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d_head)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // self.heads), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))`` (GELU)."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model),
            nn.GELU(),
            nn.Linear(mlp_ratio * d_model, d_model),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Token embedding + position embedding, pre-norm blocks, mean pooling, linear head."""

    def __init__(
        self,
        num_tokens: int,
        token_dim: int,
        num_outputs: int,
        depth: int,
        d_model: int,
        heads: int,
        mlp_ratio: int,
    ) -> None:
        super().__init__()
        self.num_tokens, self.token_dim = num_tokens, token_dim
        self.embed = nn.Linear(token_dim, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(num_tokens, d_model))
        self.blocks = nn.Sequential(*[Block(d_model, heads, mlp_ratio) for _ in range(depth)])
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_outputs)

    def tokens(self, x: Tensor) -> Tensor:
        """``(B, *input_shape)`` -> ``(B, num_tokens, token_dim)``."""
        if x.ndim == 4:  # (B, C, H, W): one token per row, features C*W
            x = x.permute(0, 2, 1, 3)
        return x.reshape(x.shape[0], self.num_tokens, self.token_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(self.tokens(x)) + self.pos
        h = self.ln(self.blocks(h))
        return self.head(h.mean(dim=1))


def transformer(
    input_shape: Sequence[int],
    num_outputs: int,
    *,
    depth: int = 2,
    d_model: int = 32,
    heads: int = 4,
    mlp_ratio: int = 2,
    patch: int = 0,
) -> nn.Module:
    """Small pre-norm transformer over row tokens (images) or patches (vectors)."""
    for name, value in (("depth", depth), ("d_model", d_model), ("heads", heads)):
        _positive(name, value)
    _positive("mlp_ratio", mlp_ratio)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) in (2, 3):
        c, h, w = _image_shape(shape, "transformer")
        num_tokens, token_dim = h, c * w
    elif len(shape) == 1:
        d = shape[0]
        if patch == 0:
            patch = max(p for p in range(1, math.isqrt(d) + 1) if d % p == 0)
        if patch < 1 or d % patch:
            raise ValueError(f"patch ({patch}) must divide the input dimension ({d})")
        num_tokens, token_dim = d // patch, patch
    else:
        raise ValueError(f"transformer needs (d,), (H, W) or (C, H, W) inputs, got {shape}")
    return Transformer(num_tokens, token_dim, num_outputs, depth, d_model, heads, mlp_ratio)


# ---------------------------------------------------------------------- registry
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet": resnet,
    "transformer": transformer,
}


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(MODELS)


def model_knobs(name: str) -> dict[str, Any]:
    """The size knobs of model ``name`` and their defaults."""
    check_model_spec(name, {})
    sig = inspect.signature(MODELS[name])
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def check_model_spec(name: str, knobs: dict[str, Any]) -> None:
    """Raise ``ValueError`` for an unknown model name or knob (no model is built)."""
    if name not in MODELS:
        raise ValueError(
            f"unknown model {name!r}; available models: {', '.join(available_models())}"
        )
    sig = inspect.signature(MODELS[name])
    allowed = {p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(knobs) - allowed)
    if unknown:
        raise ValueError(
            f"model {name!r} has no knob(s) {unknown}; its knobs are {sorted(allowed)}"
        )
    if "activation" in knobs and knobs["activation"] not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {knobs['activation']!r}; choose one of {sorted(ACTIVATIONS)}"
        )


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_outputs: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **knobs: Any,
) -> nn.Module:
    """Build zoo model ``name`` with weights drawn from ``seed`` (global RNG untouched).

    Args:
        name: one of :func:`available_models`.
        input_shape: shape of one input sample (no batch dimension).
        num_outputs: number of outputs (classes, or regression targets).
        seed: initialisation seed; the same seed gives bit-identical weights.
        dtype: parameter dtype.
        **knobs: size knobs of the model (see the module docstring).

    Returns:
        The model, in training mode.
    """
    check_model_spec(name, knobs)
    _positive("num_outputs", num_outputs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = MODELS[name](tuple(input_shape), int(num_outputs), **knobs)
    return model.to(dtype=dtype).train()


def num_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
