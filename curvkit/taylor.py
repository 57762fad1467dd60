"""Quadratic forms ``v^T H v`` by second-order forward (Taylor-mode) propagation.

A trace estimate needs ``v^T H v``, not ``H v``. Along the line ``theta(t) = theta + t v``
the loss is ``L(t)`` and ``v^T H v = L''(0)``; pushing the truncated Taylor polynomial
``x(t) = x0 + t x1 + t^2/2 x2`` of every intermediate through the network gives ``L''(0)``
in one forward pass, with no backward pass and no graph. For a linear layer ``z = W x``
with ``W(t) = W + t V`` the rules are

    z0 = W x0,   z1 = W x1 + V x0,   z2 = W x2 + 2 V x1,

three matrix products per probe against the gradient's three (forward, and two in the
backward pass) and the second backward's six; the first layer, whose input is data
(``x1 = x2 = 0``), needs one. Elementwise ``y = f(x)`` gives ``y1 = f' x1`` and
``y2 = f' x2 + f'' x1^2``.

The ``x0`` part is shared by all probes of a chunk: ``x1`` carries one slice per probe,
``(K, *shape)``. The second-order part enters every rule linearly, so it can be *collapsed*:
summed over a group of probes before it is propagated (Dangel, Siebert, Zeinhofer and
Walther, "Collapsing Taylor Mode Automatic Differentiation", NeurIPS 2025). ``x2`` then
carries one slice per group of ``group_size`` probes, ``(K // group_size, *shape)``, and the
result is the sum of the forms in each group. ``group_size = 1`` gives every probe's form.

How it runs: the differentiated parameters are swapped for :class:`Jet` objects, which
implement ``__torch_function__``, so the model's own ``forward`` (``nn.Linear``, ``F.conv2d``,
``F.layer_norm``, attention, the losses, ``x.view(...)`` ...) dispatches to the rules below.
An operation without a rule raises :class:`TaylorUnsupportedError`; callers fall back to
Hessian-vector products. Every rule is checked against the dense float64 oracle on the
test case matrix (``tests/test_taylor.py``), including LayerNorm and train-mode BatchNorm,
where PyTorch's nested forward-mode AD is wrong (DESIGN.md): here their second-order rules
are built from means, products and ``rsqrt``, not from PyTorch's forward-mode formulas.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

__all__ = [
    "Jet",
    "TaylorUnsupportedError",
    "loss_directional_derivatives",
    "output_tangents",
    "taylor_quadratic_forms",
]


class TaylorUnsupportedError(NotImplementedError):
    """The model uses an operation that Taylor-mode propagation has no rule for."""


class Jet:
    """A second-order Taylor polynomial ``x0 + t x1 + t^2/2 x2`` of a tensor.

    ``x0`` has the tensor's shape ``S``; ``x1`` is ``(K, *S)`` (one slice per probe) and
    ``x2`` is ``(G, *S)`` (one per group of ``m = K // G`` probes), or ``None`` for zero.
    """

    __slots__ = ("x0", "x1", "x2", "K", "m", "shared")

    def __init__(self, x0: Tensor, x1: Tensor | None, x2: Tensor | None, K: int, m: int):
        self.x0, self.x1, self.x2, self.K, self.m = x0, x1, x2, K, m
        # a view of another jet, or viewed by one (or a parameter): an in-place operation
        # on it would have to reach the others, which jets cannot do
        self.shared = False

    # -------------------------------------------------------------- tensor-like surface
    @property
    def shape(self) -> torch.Size:
        return self.x0.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.x0.dtype

    @property
    def device(self) -> torch.device:
        return self.x0.device

    @property
    def ndim(self) -> int:
        return self.x0.ndim

    @property
    def requires_grad(self) -> bool:
        return False

    @property
    def is_nested(self) -> bool:
        return False

    @property
    def layout(self) -> torch.layout:
        return self.x0.layout

    def dim(self) -> int:
        return self.x0.dim()

    def size(self, dim: int | None = None):
        return self.x0.size() if dim is None else self.x0.size(dim)

    def numel(self) -> int:
        return self.x0.numel()

    def is_floating_point(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self.x0)

    def __iter__(self):
        return iter(_dispatch(torch.Tensor.unbind, (self,), {}))

    def __repr__(self) -> str:
        return f"Jet(shape={tuple(self.shape)}, K={self.K}, group_size={self.m})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})

    @property
    def mT(self) -> Jet:  # noqa: N802 (torch's name)
        return _linear(torch.transpose, (self, -2, -1), {})

    @property
    def T(self) -> Jet:  # noqa: N802 (torch's name)
        return _linear(torch.permute, (self, tuple(reversed(range(self.ndim)))), {})

    def __getattr__(self, name: str):
        method = getattr(torch.Tensor, name, None)
        if method is None:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        if not callable(method):
            raise TaylorUnsupportedError(f"no Taylor-mode rule for the tensor attribute {name!r}")
        return functools.partial(_dispatch_method, method, self)

    def __add__(self, other):
        return _add(self, other)

    def __radd__(self, other):
        return _add(other, self)

    def __sub__(self, other):
        return _add(self, other, -1.0)

    def __rsub__(self, other):
        return _add(other, self, -1.0)

    def __neg__(self):
        return _mul(self, -1.0)

    def __mul__(self, other):
        return _mul(self, other)

    def __rmul__(self, other):
        return _mul(other, self)

    def __truediv__(self, other):
        return _div(self, other)

    def __rtruediv__(self, other):
        return _div(other, self)

    def __matmul__(self, other):
        return _bilinear(torch.matmul, self, other)

    def __rmatmul__(self, other):
        return _bilinear(torch.matmul, other, self)

    def __pow__(self, exponent):
        return _pow(self, exponent)

    def __setitem__(self, index, value):
        raise TaylorUnsupportedError(
            "in-place item assignment on a Taylor-mode jet (x[i] = ...); write the model "
            "out of place (torch.where, torch.cat) or use Hessian-vector products"
        )

    def __float__(self):
        raise TaylorUnsupportedError("a Taylor-mode jet converted to a Python number")

    __int__ = __index__ = __float__

    def __getitem__(self, index):
        return _linear(torch.Tensor.__getitem__, (self, index), {})

    def __iadd__(self, other):
        return _write_back(self, _add(self, other), "+=")

    def __isub__(self, other):
        return _write_back(self, _add(self, other, -1.0), "-=")

    def __imul__(self, other):
        return _write_back(self, _mul(self, other), "*=")

    def __itruediv__(self, other):
        return _write_back(self, _div(self, other), "/=")


def _dispatch_method(method, self, *args, **kwargs):
    return _dispatch(method, (self, *args), kwargs)


def _name(func) -> str:
    name = getattr(func, "__name__", str(func))
    return name[:-1] if name.endswith("_") and not name.startswith("__") else name


def _dispatch(func, args, kwargs):
    rule = _RULES.get(_name(func))
    if rule is None:
        raise TaylorUnsupportedError(
            f"no Taylor-mode rule for {_name(func)!r}; use Hessian-vector products "
            "(quadratic_form_method='hvp') for this model"
        )
    if not torch.is_grad_enabled():
        # every Taylor pass runs with grad mode on: off here means the model turned it off,
        # in a torch.no_grad() block or a custom autograd.Function's forward, whose values
        # autograd treats as constants or differentiates by the user's own backward
        raise TaylorUnsupportedError(
            f"{_name(func)!r} ran with autograd off (torch.no_grad() in the model, or a "
            "custom autograd.Function), which Taylor-mode rules cannot follow"
        )
    name = getattr(func, "__name__", "")
    in_place = (name.endswith("_") and not name.startswith("__")) or kwargs.get("inplace")
    result = rule(func, args, kwargs)
    if not in_place:
        return result
    if not (args and isinstance(args[0], Jet)):
        raise TaylorUnsupportedError(f"in-place {name!r} writing a Taylor-mode jet into a tensor")
    return _write_back(args[0], result, name)


def _write_back(target: Jet, result: Any, what: str) -> Jet:
    """An in-place operation on ``target``: its Taylor terms become ``result``'s, seen by
    every holder of the jet (a view of it, or one it is a view of, cannot be reached)."""
    if target.shared or not isinstance(result, Jet) or result.shape != target.shape:
        raise TaylorUnsupportedError(
            f"in-place {what!r} on a Taylor-mode jet that shares memory with another (a view "
            "or a parameter); write the model out of place"
        )
    target.x0, target.x1, target.x2 = result.x0, result.x1, result.x2
    return target


# ---------------------------------------------------------------------- helpers
#: ``False`` while a Gauss-Newton pass propagates the model linearised: the rules then
#: drop every second-order term made from first-order ones, so ``x2`` stays zero
_SECOND_ORDER = [True]


def _second_order() -> bool:
    return _SECOND_ORDER[0]


#: ``True`` while first-order jets run on the live parameters under autograd
#: (:func:`_first_order_jets`): rules may then use PyTorch's backward kernels for ``x1``
_RECORDING = [False]


def _recording() -> bool:
    return _RECORDING[0]


#: ``False`` while :func:`output_tangents` runs: the tangents' own autograd graph is cut at
#: every rule's output, so it never holds more than one operation's saved tensors
_RECORD_TANGENTS = [True]


@contextlib.contextmanager
def _switched(flag: list[bool], value: bool) -> Iterator[None]:
    """``flag[0]`` is ``value`` inside, and what it was before afterwards."""
    previous, flag[0] = flag[0], value
    try:
        yield
    finally:
        flag[0] = previous


@contextlib.contextmanager
def _unsupported_as_taylor_error(what: str) -> Iterator[None]:
    """Any failure of the model under jets (``x[i] = ...`` on a jet, ``float(jet)``, an op a
    rule cannot batch) becomes :class:`TaylorUnsupportedError`, which callers answer with
    a product that needs no rules."""
    try:
        yield
    except TaylorUnsupportedError:
        raise
    except Exception as err:
        raise TaylorUnsupportedError(
            f"{what} failed under Taylor-mode jets ({type(err).__name__}: {err})"
        ) from err


def _jets(*xs) -> list[Jet]:
    return [x for x in xs if isinstance(x, Jet)]


def _meta(*xs) -> tuple[int, int]:
    j = _jets(*xs)[0]
    return j.K, j.m


def _p0(x):
    return x.x0 if isinstance(x, Jet) else x


def _full(t: Tensor, shape: torch.Size) -> Tensor:
    """``(n, *S')`` broadcastable to ``S`` -> ``(n, *S)`` (a view)."""
    n = t.shape[0]
    extra = len(shape) - (t.ndim - 1)
    if extra > 0:
        t = t.reshape(n, *([1] * extra), *t.shape[1:])
    return t if t.shape[1:] == shape else t.expand(n, *shape)


def _group_sum(t: Tensor, m: int) -> Tensor:
    """``(K, *S)`` -> ``(K // m, *S)``: sums over each group of ``m`` consecutive probes."""
    if m == 1:
        return t
    return t.reshape(t.shape[0] // m, m, *t.shape[1:]).sum(1)


def _plus(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _make(y0: Tensor, y1, y2, K: int, m: int) -> Jet:
    if not _RECORD_TANGENTS[0] and y1 is not None:
        y1 = y1.detach()
    return Jet(y0, y1, y2, K, m)


def _bind(names: Sequence[str], args: tuple, kwargs: dict) -> dict:
    """A rule's arguments by name: positional ones named by ``names``, then keywords."""
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _reject_deprecated_reduction(bound: dict, what: str) -> None:
    if bound.get("size_average") is not None or bound.get("reduce") is not None:
        raise TaylorUnsupportedError(f"{what} with the deprecated size_average/reduce")


def _shift(dim: int) -> int:
    """A dimension of ``S`` as a dimension of ``(n, *S)``."""
    return dim + 1 if dim >= 0 else dim


# ---------------------------------------------------------------------- linear maps
def _linear(func, args, kwargs):
    """``func`` linear in its (single) jet argument, the others held fixed."""
    args = list(args)
    pos = [i for i, a in enumerate(args) if isinstance(a, Jet)]
    kpos = [k for k, a in kwargs.items() if isinstance(a, Jet)]
    if len(pos) + len(kpos) != 1:
        raise TaylorUnsupportedError(f"{_name(func)!r} with several Taylor-mode arguments")
    jet = args[pos[0]] if pos else kwargs[kpos[0]]

    def call(x):
        if pos:
            a = list(args)
            a[pos[0]] = x
            return func(*a, **kwargs)
        return func(*args, **{**kwargs, kpos[0]: x})

    y0 = call(jet.x0)
    y1 = None if jet.x1 is None else vmap(call)(jet.x1)
    y2 = None if jet.x2 is None else vmap(call)(jet.x2)
    if isinstance(y0, (tuple, list)):
        return type(y0)(
            _viewed(
                jet,
                _make(
                    a0,
                    None if y1 is None else y1[i],
                    None if y2 is None else y2[i],
                    jet.K,
                    jet.m,
                ),
            )
            for i, a0 in enumerate(y0)
        )
    return _viewed(jet, _make(y0, y1, y2, jet.K, jet.m))


def _viewed(source: Jet, out: Jet) -> Jet:
    """``out``, marked (with ``source``) as sharing memory where its value is a view."""
    x0, y0 = source.x0, out.x0
    if (
        isinstance(y0, Tensor)
        and y0.untyped_storage().data_ptr() == x0.untyped_storage().data_ptr()
    ):
        source.shared = out.shared = True
    return out


def _joint_linear(func, args, kwargs):
    """``cat``/``stack`` of a sequence mixing jets and constants (constants are zero in
    the higher orders)."""
    seq, rest = args[0], args[1:]
    jets = _jets(*seq)
    K, m = jets[0].K, jets[0].m
    y0 = func([_p0(x) for x in seq], *rest, **kwargs)

    def order(i: int):
        parts = [getattr(x, f"x{i}") if isinstance(x, Jet) else None for x in seq]
        if all(p is None for p in parts):
            return None
        n = next(p.shape[0] for p in parts if p is not None)
        parts = [
            p if p is not None else _p0(x).new_zeros(()).expand(n, *_p0(x).shape)
            for p, x in zip(parts, seq)
        ]
        return vmap(lambda *ps: func(list(ps), *rest, **kwargs))(*parts)

    return _make(y0, order(1), order(2), K, m)


# ---------------------------------------------------------------------- arithmetic
def _add(a, b, alpha: float = 1.0):
    """``a + alpha * b`` for jets, tensors and numbers (affine: constants only in order 0)."""
    if isinstance(alpha, Jet):
        raise TaylorUnsupportedError("add with a Taylor-mode alpha")
    y0 = torch.add(_p0(a), _p0(b), alpha=alpha)
    S = y0.shape
    K, m = _meta(a, b)

    def order(i: int):
        ta = getattr(a, f"x{i}") if isinstance(a, Jet) else None
        tb = getattr(b, f"x{i}") if isinstance(b, Jet) else None
        if tb is not None and alpha != 1.0:
            tb = tb * alpha
        if ta is None and tb is None:
            return None
        if ta is None:
            return _full(tb, S)
        if tb is None:
            return _full(ta, S)
        return _full(_full(ta, S) + _full(tb, S), S)

    return _make(y0, order(1), order(2), K, m)


def _mul(a, b):
    if not isinstance(a, Jet):
        a, b = b, a
    if not isinstance(b, Jet):  # jet * constant
        y0 = a.x0 * b
        S = y0.shape
        c = b

        def lin(t):
            return None if t is None else _full(_full(t, S) * c, S)

        return _make(y0, lin(a.x1), lin(a.x2), a.K, a.m)
    y0 = a.x0 * b.x0
    S = y0.shape
    K, m = a.K, a.m

    def f(t):
        return None if t is None else _full(t, S)

    a1, a2, b1, b2 = f(a.x1), f(a.x2), f(b.x1), f(b.x2)
    y1 = _plus(None if a1 is None else a1 * b.x0, None if b1 is None else a.x0 * b1)
    y2 = _plus(None if a2 is None else a2 * b.x0, None if b2 is None else a.x0 * b2)
    if a1 is not None and b1 is not None and _second_order():
        y2 = _plus(y2, 2 * _group_sum(a1 * b1, m))
    return _make(y0, None if y1 is None else _full(y1, S), y2, K, m)


def _div(a, b):
    if not isinstance(b, Jet):
        return _mul(a, 1 / b) if not isinstance(b, Tensor) else _mul(a, torch.reciprocal(b))
    return _mul(a, _unary_apply(b, *_reciprocal(b.x0)))


def _pow(x: Jet, p):
    if isinstance(p, Jet):
        raise TaylorUnsupportedError("a Taylor-mode exponent")
    if isinstance(p, Tensor):
        if p.numel() != 1:
            raise TaylorUnsupportedError("pow with a tensor exponent")
        p = p.item()
    if p == 2:
        return _mul(x, x)
    x0 = x.x0
    y0 = x0**p
    return _unary_apply(x, y0, p * x0 ** (p - 1), p * (p - 1) * x0 ** (p - 2))


def _bilinear(B: Callable, a, b, cross: Callable | None = None) -> Jet:
    """``B(a, b)`` for ``B`` bilinear (matmul, linear, convolution, ...); ``cross`` computes
    the group sums of ``B(a1_k, b1_k)`` where a layer has a faster way than ``vmap``."""
    if not isinstance(a, Jet) and not isinstance(b, Jet):
        return B(a, b)
    y0 = B(_p0(a), _p0(b))
    K, m = _meta(a, b)
    a0, b0 = _p0(a), _p0(b)
    a1, a2 = (a.x1, a.x2) if isinstance(a, Jet) else (None, None)
    b1, b2 = (b.x1, b.x2) if isinstance(b, Jet) else (None, None)

    def left(t):  # B(t_k, b0) for every slice k
        return None if t is None else vmap(B, in_dims=(0, None))(t, b0)

    def right(t):  # B(a0, t_k)
        return None if t is None else vmap(B, in_dims=(None, 0))(a0, t)

    # the terms are fresh tensors of one shape, so they are summed in place
    y1 = _accumulate(left(a1), right(b1))
    y2 = _accumulate(left(a2), right(b2))
    if a1 is not None and b1 is not None and _second_order():
        y2 = _accumulate(y2, (cross or functools.partial(_cross, B))(a1, b1, m), 2.0)
    return _make(y0, y1, y2, K, m)


def _accumulate(a: Tensor | None, b: Tensor | None, alpha: float = 1.0) -> Tensor | None:
    """``a + alpha * b``, written into ``a`` (a fresh product term) when both exist."""
    if b is None:
        return a
    if a is None:
        return b if alpha == 1.0 else b * alpha
    return a.add_(b, alpha=alpha)


def _cross(B, a1: Tensor, b1: Tensor, m: int) -> Tensor:
    """``sum_{k in group} B(a1_k, b1_k)``: ``(K // m, *S)``."""
    return _group_sum(vmap(B)(a1, b1), m)


# ---------------------------------------------------------------------- elementwise
def _unary_apply(x: Jet, y0: Tensor, d1: Tensor, d2: Tensor | None) -> Jet:
    y1 = None if x.x1 is None else d1 * x.x1
    y2 = None if x.x2 is None else d1 * x.x2
    if x.x1 is not None and d2 is not None and _second_order():
        y2 = _plus(y2, d2 * _group_sum(x.x1 * x.x1, x.m))
    return _make(y0, y1, y2, x.K, x.m)


def _reciprocal(x0):
    r = torch.reciprocal(x0)
    return r, -r * r, 2 * r * r * r


def _derivatives(name: str, x0: Tensor, options: dict) -> tuple[Tensor, Tensor, Tensor | None]:
    """``f(x0), f'(x0), f''(x0)`` (``None`` for a second derivative that is zero a.e.)."""
    if name == "relu":
        return torch.relu(x0), (x0 > 0).to(x0.dtype), None
    if name == "tanh":
        t = torch.tanh(x0)
        d1 = 1 - t * t
        return t, d1, -2 * t * d1
    if name == "sigmoid":
        s = torch.sigmoid(x0)
        d1 = s * (1 - s)
        return s, d1, d1 * (1 - 2 * s)
    if name == "exp":
        e = torch.exp(x0)
        return e, e, e
    if name == "log":
        r = torch.reciprocal(x0)
        return torch.log(x0), r, -r * r
    if name == "reciprocal":
        return _reciprocal(x0)
    if name == "sqrt":
        s = torch.sqrt(x0)
        return s, 0.5 / s, -0.25 / (s * x0)
    if name == "rsqrt":
        r = torch.rsqrt(x0)
        return r, -0.5 * r / x0, 0.75 * r / (x0 * x0)
    if name == "gelu" and options.get("approximate", "none") == "none":
        pdf = torch.exp(-0.5 * x0 * x0) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + torch.erf(x0 / math.sqrt(2)))
        return x0 * cdf, cdf + x0 * pdf, pdf * (2 - x0 * x0)
    if name == "silu":
        s = torch.sigmoid(x0)
        return x0 * s, s * (1 + x0 * (1 - s)), s * (1 - s) * (2 + x0 * (1 - 2 * s))
    if name == "softplus" and options.get("beta", 1.0) == 1.0 and "threshold" not in options:
        s = torch.sigmoid(x0)
        return F.softplus(x0), s, s * (1 - s)
    return _generic_derivatives(name, x0, options)


_ELEMENTWISE_GENERIC = {
    "gelu": F.gelu,
    "softplus": F.softplus,
    "silu": F.silu,
    "elu": F.elu,
    "leaky_relu": F.leaky_relu,
    "mish": F.mish,
    "hardtanh": F.hardtanh,
    "logsigmoid": F.logsigmoid,
    "sin": torch.sin,
    "cos": torch.cos,
    "abs": torch.abs,
    "square": torch.square,
}


def _generic_derivatives(name: str, x0: Tensor, options: dict):
    """First and second derivatives of an elementwise function by double backward (its
    Jacobian is diagonal, so the gradient of the sum is the derivative)."""
    f = _ELEMENTWISE_GENERIC[name]
    with torch.enable_grad():
        x = x0.detach().requires_grad_()
        y = f(x, **options)
        (d1,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        d2 = torch.autograd.grad(d1.sum(), x, allow_unused=True)[0] if d1.requires_grad else None
    return y.detach(), d1.detach(), None if d2 is None else d2.detach()


#: the arguments after the input of the elementwise functions that take any
_ELEMENTWISE_ARGS = {
    "relu": ("inplace",),
    "silu": ("inplace",),
    "mish": ("inplace",),
    "leaky_relu": ("negative_slope", "inplace"),
    "elu": ("alpha", "inplace"),
    "hardtanh": ("min_val", "max_val", "inplace"),
    "softplus": ("beta", "threshold"),
    "gelu": ("approximate",),
}


def _elementwise(func, args, kwargs):
    x, name = args[0], _name(func)
    options = _bind(_ELEMENTWISE_ARGS.get(name, ()), args[1:], kwargs)
    options.pop("inplace", None)
    if (
        not isinstance(x, Jet)
        or _jets(*options.values())
        or len(args) - 1 > len(_ELEMENTWISE_ARGS.get(name, ()))
    ):
        raise TaylorUnsupportedError(f"{name!r} with Taylor-mode or unexpected arguments")
    if x.x2 is None and not _second_order() and _recording():
        recorded = _recorded_tangent(name, x, options)
        if recorded is not None:
            return recorded
    y0, d1, d2 = _derivatives(name, x.x0, options)
    return _unary_apply(x, y0, d1, d2)


def _recorded_tangent(name: str, x: Jet, options: dict) -> Jet | None:
    """``y1 = f'(x0) x1`` through PyTorch's own backward kernel of ``f`` (e.g.
    ``threshold_backward(x1, y0)`` for ReLU), for first-order jets under autograd
    (:func:`loss_directional_derivatives`): the kernel's derivative saves ``x1`` and ``x0``
    (or ``y0``, which the next layer saves anyway), where ``f'(x0) * x1`` would also save
    ``f'(x0)`` and the intermediates that built it. ``None``: no such kernel."""
    aten = torch.ops.aten
    x0, x1 = x.x0, x.x1

    def per_probe(t: Tensor) -> Tensor:  # the kernels take operands of one shape (oneDNN's
        return t.unsqueeze(0).expand_as(x1)  # GELU fails on broadcast ones)

    if name == "relu":
        y0 = torch.relu(x0)
        y1 = None if x1 is None else aten.threshold_backward(x1, per_probe(y0), 0)
    elif name == "gelu":
        approximate = options.get("approximate", "none")
        y0 = F.gelu(x0, approximate=approximate)
        y1 = None if x1 is None else aten.gelu_backward(x1, per_probe(x0), approximate=approximate)
    elif name == "tanh":
        y0 = torch.tanh(x0)
        y1 = None if x1 is None else aten.tanh_backward(x1, per_probe(y0))
    elif name == "sigmoid":
        y0 = torch.sigmoid(x0)
        y1 = None if x1 is None else aten.sigmoid_backward(x1, per_probe(y0))
    elif name in _ELEMENTWISE_GENERIC and x0.requires_grad:
        # _generic_derivatives detaches f'(x0), which would drop f'' from H v here; the
        # Jacobian is diagonal, so f'(x0) is the gradient of the sum, kept differentiable
        y0 = _ELEMENTWISE_GENERIC[name](x0, **options)
        y1 = None
        if x1 is not None:
            (d1,) = torch.autograd.grad(y0.sum(), x0, create_graph=True)
            y1 = d1 * x1
    else:
        return None
    return _make(y0, y1, None, x.K, x.m)


# ---------------------------------------------------------------------- layers
def _linear_layer(func, args, kwargs):
    x, W = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    b = args[2] if len(args) > 2 else kwargs.get("bias")
    if not any(isinstance(t, Jet) for t in (x, W, b)):
        return F.linear(x, W, b)
    if _p0(W).ndim != 2:
        out = _bilinear(F.linear, x, W)
        return out if b is None else _add(out, b)
    return _linear_jet(x, W, b)


class _Accumulator:
    """A sum of batched matrix products ``(n, M, out)`` built with ``baddbmm``: the first
    term allocates (broadcasting a bias into it), the others accumulate in place, so no
    product is materialised and then added (transformer linear layers, 4 probes: 8.0 ms
    against 14.1 ms for products, ``add_`` and a bias add)."""

    def __init__(self, base: Tensor | None = None) -> None:
        self.sum, self.owned = base, False

    def add(self, a: Tensor, b: Tensor, alpha: float = 1.0) -> None:
        if self.sum is None:
            self.sum = torch.bmm(a, b) if alpha == 1.0 else torch.bmm(a, b).mul_(alpha)
        elif self.owned:
            self.sum.baddbmm_(a, b, alpha=alpha)
        else:  # a broadcast bias: the product is written into a fresh tensor
            self.sum = torch.baddbmm(self.sum, a, b, alpha=alpha)
        self.owned = True

    def result(self, n: int, M: int, out: int) -> Tensor | None:
        if self.sum is None or self.owned:
            return self.sum
        return self.sum.expand(n, M, out)


def _linear_jet(x, W, b) -> Jet:
    """``F.linear`` with jets anywhere: per probe ``x1 W^T + x0 V^T + b1`` and, per group,
    ``x2 W^T + x0 V2^T + b2 + 2 sum_k x1_k V_k^T``, all as (accumulating) batched
    products; ``x0`` and ``W`` enter them as stride-0 batches, never copied (except that
    under autograd ``x1 W^T`` is ``F.linear``, see below)."""
    K, m = _meta(x, W, b)
    G = K // m
    x0, W0, b0 = _p0(x), _p0(W), _p0(b)
    y0 = F.linear(x0, W0, b0)
    lead, inp, out = x0.shape[:-1], x0.shape[-1], W0.shape[0]
    M = y0.numel() // out
    flat0 = x0.reshape(M, inp)
    Wt = W0.t()
    x1, x2 = (x.x1, x.x2) if isinstance(x, Jet) else (None, None)
    V1, V2 = (W.x1, W.x2) if isinstance(W, Jet) else (None, None)
    b1, b2 = (b.x1, b.x2) if isinstance(b, Jet) else (None, None)
    x1 = None if x1 is None else x1.reshape(K, M, inp)
    x2 = None if x2 is None else x2.reshape(G, M, inp)

    recorded = torch.is_grad_enabled() and isinstance(W, Jet) and W.x0.requires_grad

    def order(n, xt, Vt, bt) -> _Accumulator:
        acc = _Accumulator(None if bt is None else bt.reshape(n, 1, out))
        if xt is not None and recorded:
            # under autograd: the stride-0 batch of W^T below would give W's gradient
            # transposed, which the backward then adds to and copies strided (MLP: 0.5
            # gradients); F.linear's backward returns it in W's own layout
            base = F.linear(xt, W0)
            acc = _Accumulator(base if bt is None else base.add_(bt.reshape(n, 1, out)))
            acc.owned = True
            xt = None
        if Vt is not None:
            acc.add(flat0.expand(n, M, inp), Vt.transpose(1, 2))
        if xt is not None:
            acc.add(xt, Wt.expand(n, inp, out))
        return acc

    y1 = order(K, x1, V1, b1).result(K, M, out)
    acc2 = order(G, x2, V2, b2)
    if x1 is not None and V1 is not None and _second_order():
        for j in range(m):  # the group sums as m accumulating products over the groups
            acc2.add(x1[j::m], V1[j::m].transpose(1, 2), 2.0)
    y2 = acc2.result(G, M, out)
    return _make(
        y0,
        None if y1 is None else y1.reshape(K, *lead, out),
        None if y2 is None else y2.reshape(G, *lead, out),
        K,
        m,
    )


def _conv(func, args, kwargs):
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = _bind(names, args, kwargs)
    x, W, b = bound.pop("input"), bound.pop("weight"), bound.pop("bias", None)
    conv = functools.partial(func, **bound)
    cross = None
    # one grouped convolution for the cross term; not for an unbatched input (C, *spatial)
    if bound.get("groups", 1) == 1 and _p0(x).ndim == _p0(W).ndim:
        cross = functools.partial(_conv_cross, conv)
    out = _bilinear(conv, x, W, cross)
    if b is None:
        return out
    view = (-1,) + (1,) * (_p0(W).ndim - 2)  # (C_out, 1, ...): batched or not
    b = b.reshape(view)  # a jet's reshape is its rule
    return _add(out, b)


def _conv_cross(conv: Callable, a1: Tensor, b1: Tensor, m: int) -> Tensor:
    """``sum_{k in group} conv(a1_k, b1_k)`` as one convolution with ``K // m`` groups of
    ``m * C`` input channels: a group's sum over probes is a sum over stacked channels.
    (``vmap`` runs ``K`` groups of ``C`` channels, slower on CPU: measured 35 ms against
    21 ms for the same flops on the ResNet's first stage.)"""
    K, N, C = a1.shape[:3]
    G = K // m
    O = b1.shape[1]
    x = a1.reshape(G, m, N, C, *a1.shape[3:]).movedim(2, 0).reshape(N, G * m * C, *a1.shape[3:])
    w = b1.reshape(G, m, O, C, *b1.shape[3:]).transpose(1, 2).reshape(G * O, m * C, *b1.shape[3:])
    out = conv(x, w, groups=G)  # (N, G * O, *spatial)
    return out.reshape(N, G, O, *out.shape[2:]).movedim(1, 0)


def _embedding(func, args, kwargs):
    names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq")
    bound = _bind(names, args, kwargs)
    idx, W = bound["input"], bound["weight"]
    if isinstance(idx, Jet):
        raise TaylorUnsupportedError("embedding indices cannot carry Taylor terms")
    if bound.get("max_norm") is not None:
        raise TaylorUnsupportedError(
            "embedding with max_norm (it renormalises the weight in place)"
        )
    if bound.get("scale_grad_by_freq"):
        raise TaylorUnsupportedError(
            "embedding with scale_grad_by_freq (its gradient is not the derivative)"
        )
    pad = bound.get("padding_idx")
    if not isinstance(W, Jet):
        return F.embedding(idx, W, padding_idx=pad)
    # the padding row gets no gradient: it is a constant of the model
    padding = None if pad is None else (idx == (pad if pad >= 0 else W.shape[0] + pad))

    def take(t):  # (n, V, d) -> (n, *idx.shape, d)
        if t is None:
            return None
        rows = t[:, idx]
        return rows if padding is None else rows.masked_fill(padding[..., None], 0.0)

    # x0 with padding_idx too: under autograd its padding row then gets no gradient
    return _make(F.embedding(idx, W.x0, padding_idx=pad), take(W.x1), take(W.x2), W.K, W.m)


_POOL_ARGS = {
    "max_pool1d": ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "max_pool2d": ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "max_pool3d": ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "adaptive_max_pool1d": ("output_size", "return_indices"),
    "adaptive_max_pool2d": ("output_size", "return_indices"),
}


class _Gather(torch.autograd.Function):
    """``src.gather(-1, index)`` whose backward keeps only ``index`` and ``src``'s shape:
    ``Tensor.gather`` saves all of ``src``, a probe's whole pre-pooling tangent, when a
    reverse-over-forward product records it."""

    @staticmethod
    def forward(ctx, src: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.shape = src.shape
        return src.gather(-1, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).scatter_add(-1, index, grad), None


def _max_pool(func, args, kwargs):
    """Max pooling selects inputs: every order takes the entries ``x0`` selects."""
    x = args[0]
    base = _name(func).lstrip("_").replace("_with_indices", "")
    kwargs = _bind(_POOL_ARGS[base], args[1:], kwargs)
    want_indices = bool(kwargs.pop("return_indices", False))
    pool = getattr(F, base)
    y0, idx = pool(x.x0, **kwargs, return_indices=True)
    nd = int(base[-2])
    flat_idx = idx.flatten(-nd)

    def pick(t):
        if t is None:
            return None
        index = flat_idx.expand(t.shape[0], *flat_idx.shape)
        return _Gather.apply(t.flatten(-nd), index).reshape(t.shape[0], *y0.shape)

    out = _make(y0, pick(x.x1), pick(x.x2), x.K, x.m)
    return (out, idx) if want_indices else out


def _log_softmax_jet(x: Jet, dim: int) -> Jet:
    """``log_softmax``: ``x - logsumexp(x)``, whose second-order term is the variance of the
    first-order term under the softmax distribution."""
    p = torch.softmax(x.x0, dim)
    y0 = torch.log_softmax(x.x0, dim)
    d = _shift(dim)
    y1 = y2 = None
    if x.x1 is not None:
        s1 = (p * x.x1).sum(d, keepdim=True)
        y1 = x.x1 - s1
        if _second_order():
            var = (p * x.x1 * x.x1).sum(d, keepdim=True) - s1 * s1
            y2 = -_group_sum(var, x.m)
    if x.x2 is not None:
        y2 = _plus(y2, x.x2 - (p * x.x2).sum(d, keepdim=True))
    elif y2 is not None:
        y2 = y2.expand(y2.shape[0], *y0.shape)
    return _make(y0, y1, y2, x.K, x.m)


def _softmax_dim(args, kwargs) -> int:
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dim is None:
        raise TaylorUnsupportedError("softmax without an explicit dim")
    if kwargs.get("dtype", args[3] if len(args) > 3 else None) is not None:
        raise TaylorUnsupportedError("softmax with a dtype")
    return dim


def _log_softmax(func, args, kwargs):
    return _log_softmax_jet(args[0], _softmax_dim(args, kwargs))


def _softmax(func, args, kwargs):
    return _softmax_jet(args[0], _softmax_dim(args, kwargs))


def _softmax_jet(x: Jet, dim: int) -> Jet:
    """``softmax = exp(log_softmax)``: with ``l1 = x1 - <p, x1>``, ``y1 = p l1`` and
    ``y2 = p (l2 + sum_k l1_k^2)`` where ``l2 = x2 - <p, x2> - sum_k <p, l1_k^2>``; about
    six passes per probe (composing the two rules took twelve)."""
    p = torch.softmax(x.x0, dim)
    d = _shift(dim)
    y1 = y2 = None
    if x.x1 is not None:
        l1 = x.x1 - (p * x.x1).sum(d, keepdim=True)
        if _second_order():
            q = _group_sum(l1 * l1, x.m)
            y2 = q - (p * q).sum(d, keepdim=True)
        y1 = l1.mul_(p)
    if x.x2 is not None:
        l2 = x.x2 - (p * x.x2).sum(d, keepdim=True)
        y2 = l2 if y2 is None else y2.add_(l2)
    if y2 is not None:
        y2 = y2.mul_(p) if y2.shape[1:] == p.shape else y2 * p
    return _make(p, y1, y2, x.K, x.m)


def _cross_entropy(func, args, kwargs):
    names = ("input", "target", "weight", "size_average", "ignore_index", "reduce")
    bound = _bind(names, args, kwargs)
    x, target = bound.pop("input"), bound.pop("target")
    if bound.get("label_smoothing", 0.0) != 0.0:
        raise TaylorUnsupportedError("cross_entropy with label smoothing")
    if target.is_floating_point():
        raise TaylorUnsupportedError("cross_entropy with class-probability targets")
    _reject_deprecated_reduction(bound, "cross_entropy")
    if isinstance(bound.get("weight"), Jet):
        raise TaylorUnsupportedError("cross_entropy with Taylor-mode class weights")
    return _cross_entropy_jet(
        x,
        target,
        bound.get("weight"),
        bound.get("ignore_index", -100),
        bound.get("reduction", "mean"),
    )


def _cross_entropy_jet(x: Jet, target: Tensor, weight, ignore_index: int, reduction: str):
    """Cross-entropy with class targets from per-sample reductions only: with
    ``s_i = <p, x_i>`` and ``c`` the per-sample coefficients of the reduction,
    ``L1 = sum c (s1 - x1[y])`` and ``L2 = sum c (s2 - x2[y] + sum_k Var_p(x1_k))``; no
    ``(K, N, classes)`` log-softmax is formed (two passes per probe over the logits)."""
    x0 = x.x0
    dim = 1 if x0.ndim > 1 else 0
    d = _shift(dim)
    y0 = F.cross_entropy(x0, target, weight, ignore_index=ignore_index, reduction=reduction)
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target))
    c = keep.to(x0.dtype)
    if weight is not None:
        c = c * weight[safe]
    if reduction == "mean":
        c = c / c.sum()
    elif reduction not in ("sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}")
    p = torch.softmax(x0, dim)
    index = safe.unsqueeze(dim)  # (N, 1, ...): the target's logit of every sample

    def per_sample(t: Tensor, s: Tensor) -> Tensor:  # (n, *S), (n, N, 1, ...) -> (n, N, ...)
        picked = t.gather(d, index.expand(t.shape[0], *index.shape))
        loss = (s - picked).squeeze(d) * c
        return loss if reduction == "none" else loss.reshape(loss.shape[0], -1).sum(1)

    y1 = y2 = None
    if x.x1 is not None:
        px = p * x.x1
        s1 = px.sum(d, keepdim=True)
        y1 = per_sample(x.x1, s1)
        if _second_order():
            var = _group_sum(px.mul_(x.x1).sum(d, keepdim=True) - s1 * s1, x.m)
            y2 = var.squeeze(d) * c
            y2 = y2 if reduction == "none" else y2.reshape(y2.shape[0], -1).sum(1)
    if x.x2 is not None:
        t = per_sample(x.x2, (p * x.x2).sum(d, keepdim=True))
        y2 = t if y2 is None else y2 + t
    return _make(y0, y1, y2, x.K, x.m)


def _reduce(x: Jet, reduction: str):
    if reduction == "mean":
        return _linear(torch.mean, (x,), {})
    if reduction == "sum":
        return _linear(torch.sum, (x,), {})
    if reduction == "none":
        return x
    raise ValueError(f"unknown reduction {reduction!r}")


def _mse_loss(func, args, kwargs):
    names = ("input", "target", "size_average", "reduce", "reduction")
    bound = _bind(names, args, kwargs)
    _reject_deprecated_reduction(bound, "mse_loss")
    if bound.get("weight") is not None:
        raise TaylorUnsupportedError("mse_loss with weights")
    d = _add(bound["input"], bound["target"], -1.0)
    return _reduce(_mul(d, d), bound.get("reduction", "mean"))


def _bce_with_logits(func, args, kwargs):
    names = ("input", "target", "weight", "size_average", "reduce", "reduction", "pos_weight")
    bound = _bind(names, args, kwargs)
    _reject_deprecated_reduction(bound, "BCE")
    if bound.get("pos_weight") is not None:
        raise TaylorUnsupportedError("BCE with pos_weight")
    x, y = bound["input"], bound["target"]
    if isinstance(y, Jet):
        raise TaylorUnsupportedError("BCE with a Taylor-mode target")
    # softplus(x) - y x, elementwise
    loss = _add(_unary_apply(x, *_derivatives("softplus", x.x0, {})), _mul(x, y), -1.0)
    if bound.get("weight") is not None:
        loss = _mul(loss, bound["weight"])
    return _reduce(loss, bound.get("reduction", "mean"))


def _normalise(x: Jet, dims: tuple[int, ...], eps: float) -> Jet:
    """``(x - mean) / sqrt(var + eps)`` over ``dims`` (biased variance), from means,
    products and ``rsqrt``: exact to second order (unlike PyTorch's nested forward mode)."""
    mean = _linear(torch.mean, (x,), {"dim": dims, "keepdim": True})
    c = _add(x, mean, -1.0)
    var = _linear(torch.mean, (_mul(c, c),), {"dim": dims, "keepdim": True})
    v = _add(var, eps)
    r = _unary_apply(v, *_derivatives("rsqrt", v.x0, {}))
    return _mul(c, r)


def _layer_norm(func, args, kwargs):
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    bound = _bind(names, args, kwargs)
    x, shape = bound["input"], bound["normalized_shape"]
    w, b, eps = bound.get("weight"), bound.get("bias"), bound.get("eps", 1e-5)
    if not isinstance(x, Jet):
        x = _as_constant_jet(x, w, b)
    if x.x2 is None and not _second_order() and _recording():
        return _recorded_layer_norm(x, list(shape), w, b, eps)
    dims = tuple(range(-len(shape), 0))
    out = _normalise(x, dims, eps)
    if w is not None:
        out = _mul(out, w)
    if b is not None:
        out = _add(out, b)
    return out


def _recorded_layer_norm(x: Jet, shape: list[int], w, b, eps: float) -> Jet:
    """First-order LayerNorm for reverse over forward: ``y1 = w0 (J x1) + xhat0 w1 + b1``
    with ``J``, the normalisation's Jacobian, applied by ``native_layer_norm_backward``
    (``J`` is symmetric, so its vector-Jacobian product is the Jacobian-vector product).
    Its recorded derivative is PyTorch's LayerNorm double backward, which holds ``x0`` and
    ``x1``; the generic rules hold about six activations' worth."""
    aten = torch.ops.aten
    x0, x1 = x.x0, x.x1
    w0, b0 = _p0(w), _p0(b)
    w1 = w.x1 if isinstance(w, Jet) else None
    b1 = b.x1 if isinstance(b, Jet) else None
    y0 = F.layer_norm(x0, shape, w0, b0, eps)
    S = y0.shape
    y1 = None
    if x1 is not None:
        with torch.no_grad():  # the double backward below accounts for their dependence on x0
            _, mean, rstd = aten.native_layer_norm(x0, shape, None, None, eps)
        K = x1.shape[0]
        # the kernel reads its operands as contiguous: a stride-0 batch of K > 1 probes
        # gave wrong results (a copy; K = 1, a reverse-over-forward product's, copies nothing)
        per_probe = [t.unsqueeze(0).expand(K, *t.shape).contiguous() for t in (x0, mean, rstd)]
        y1 = aten.native_layer_norm_backward(
            x1, *per_probe[:1], shape, *per_probe[1:], None, None, [True, False, False]
        )[0]
        if w0 is not None:
            y1 = y1 * w0
    if w1 is not None:
        y1 = _plus(y1, F.layer_norm(x0, shape, None, None, eps) * _full(w1, S))
    if b1 is not None:
        y1 = _plus(y1, _full(b1, S))
    return _make(y0, y1, None, x.K, x.m)


def _as_constant_jet(x: Tensor, *others) -> Jet:
    K, m = _meta(*others)
    return Jet(x, None, None, K, m)


def _batch_norm(func, args, kwargs):
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum")
    bound = _bind(names, args, kwargs)
    x = bound["input"]
    w, b = bound.get("weight"), bound.get("bias")
    eps = bound.get("eps", args[7] if len(args) > 7 else 1e-5)
    rm, rv = bound.get("running_mean"), bound.get("running_var")
    training = bound.get("training", False)
    if not isinstance(x, Jet):
        x = _as_constant_jet(x, w, b)
    C = x.shape[1]
    view = (1, C) + (1,) * (x.ndim - 2)
    if training or rm is None:
        # batch statistics: what the training loss sees; running statistics are not updated
        out = _normalise(x, tuple(d for d in range(x.ndim) if d != 1), eps)
    else:
        return _batch_norm_eval(x, rm, rv, w, b, eps)
    if w is not None:
        out = _mul(out, w.reshape(view))
    if b is not None:
        out = _add(out, b.reshape(view))
    return out


def _batch_norm_eval(x: Jet, rm: Tensor, rv: Tensor, w, b, eps: float) -> Jet:
    """Eval-mode BatchNorm, an affine map of ``x`` per channel whose scale and shift are
    jets when ``w`` and ``b`` are: ``y1 = x1 s + xhat0 w1 + b1`` in two passes over a
    probe's activations, and the cross terms ``2 sum_k x1_k w1_k / std`` in one (the
    generic products and sums took seven)."""
    K, m = x.K, x.m
    G = K // m
    C = x.shape[1]
    view = (1, C) + (1,) * (x.ndim - 2)

    def channels(t: Tensor | None, n: int) -> Tensor | None:  # (n, C) -> (n, 1, C, 1, ...)
        return None if t is None else t.reshape(n, *view)

    inv = torch.rsqrt(rv + eps)
    w0, b0 = _p0(w), _p0(b)
    y0 = F.batch_norm(x.x0, rm, rv, w0, b0, False, 0.0, eps)
    scale = inv if w0 is None else inv * w0
    needs_xhat = isinstance(w, Jet) and (w.x1 is not None or w.x2 is not None)
    xhat0 = (x.x0 - rm.reshape(view)) * inv.reshape(view) if needs_xhat else None
    w1, w2 = (w.x1, w.x2) if isinstance(w, Jet) else (None, None)
    b1, b2 = (b.x1, b.x2) if isinstance(b, Jet) else (None, None)

    def order(n: int, xt: Tensor | None, wt: Tensor | None, bt: Tensor | None):
        y = None
        if xt is not None:
            sv = scale.reshape(view)
            y = xt * sv if bt is None else torch.addcmul(channels(bt, n), xt, sv)
        elif bt is not None:
            y = channels(bt, n).expand(n, *y0.shape).clone()
        if wt is not None:
            term = channels(wt, n)
            y = xhat0 * term if y is None else y.addcmul_(xhat0, term)
        return y

    y1 = order(K, x.x1, w1, b1)
    y2 = order(G, x.x2, w2, b2)
    if x.x1 is not None and w1 is not None and _second_order():
        c = channels(2 * w1 * inv, K)
        if y2 is None:
            y2 = x.x1[0::m] * c[0::m]
            start = 1
        else:
            start = 0
        for j in range(start, m):  # the group sums, one probe of every group at a time
            y2.addcmul_(x.x1[j::m], c[j::m])
    return _make(y0, y1, y2, K, m)


def _attention_scores_mask(L: int, S: int, attn_mask, is_causal: bool, like: Tensor):
    mask = None
    if is_causal:
        mask = torch.ones(L, S, dtype=torch.bool, device=like.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            mask = attn_mask if mask is None else mask & attn_mask
        else:
            additive = attn_mask.to(like.dtype)
            if mask is not None:
                additive = additive.masked_fill(~mask, float("-inf"))
            return additive
    if mask is None:
        return None
    return torch.zeros(L, S, dtype=like.dtype, device=like.device).masked_fill(~mask, float("-inf"))


def _attention(q, k, v, mask: Tensor | None, scale: float):
    scores = _bilinear(torch.matmul, q, _transpose_last(k))
    scores = _mul(scores, scale) if isinstance(scores, Jet) else scores * scale
    if mask is not None:
        scores = _add(scores, mask)
    if isinstance(scores, Jet):
        probs = _softmax(torch.softmax, (scores,), {"dim": -1})
    else:
        probs = torch.softmax(scores, -1)
    return _bilinear(torch.matmul, probs, v)


def _transpose_last(x):
    if isinstance(x, Jet):
        return _linear(torch.transpose, (x, -2, -1), {})
    return x.transpose(-2, -1)


def _sdpa(func, args, kwargs):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    bound = _bind(names, args, kwargs)
    if bound.get("dropout_p", 0.0) != 0.0:
        raise TaylorUnsupportedError("attention dropout")
    if bound.get("enable_gqa", False):
        raise TaylorUnsupportedError("grouped-query attention")
    q, k, v = bound["query"], bound["key"], bound["value"]
    L, S, E = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = bound.get("scale") or 1 / math.sqrt(E)
    mask = _attention_scores_mask(L, S, bound.get("attn_mask"), bound.get("is_causal"), _p0(q))
    return _attention(q, k, v, mask, scale)


def _multi_head_attention(func, args, kwargs):
    names = (
        "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight",
        "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight",
        "out_proj_bias", "training", "key_padding_mask", "need_weights", "attn_mask",
    )  # fmt: skip
    bound = _bind(names, args, kwargs)
    unsupported = (
        bound.get("need_weights", True)
        or bound.get("bias_k") is not None
        or bound.get("bias_v") is not None
        or bound.get("add_zero_attn")
        or bound.get("key_padding_mask") is not None
        or bound.get("attn_mask") is not None
        or bound.get("use_separate_proj_weight", False)
        or (bound.get("training", True) and bound.get("dropout_p", 0.0) != 0.0)
    )
    if unsupported:
        raise TaylorUnsupportedError(
            "multi_head_attention_forward beyond need_weights=False without masks, "
            "bias_k/bias_v, zero attention or separate projection weights"
        )
    query, key, value = bound["query"], bound["key"], bound["value"]
    H, E = bound["num_heads"], bound["embed_dim_to_check"]
    Wi, bi = bound["in_proj_weight"], bound.get("in_proj_bias")
    L, N = query.shape[0], query.shape[1]
    S = key.shape[0]
    hd = E // H

    def project(x, j):
        W = Wi[j * E : (j + 1) * E]
        b = None if bi is None else bi[j * E : (j + 1) * E]
        return _linear_layer(F.linear, (x, W, b), {})

    def heads(x, length):  # (length, N, E) -> (N * H, length, hd)
        return x.reshape(length, N * H, hd).transpose(0, 1)

    q = heads(project(query, 0), L)
    k = heads(project(key, 1), S)
    v = heads(project(value, 2), S)
    mask = _attention_scores_mask(L, S, None, bool(bound.get("is_causal", False)), _p0(query))
    a = _attention(q, k, v, mask, 1 / math.sqrt(hd))  # (N * H, L, hd)
    a = a.transpose(0, 1).reshape(L * N, E)
    out = _linear_layer(F.linear, (a, bound["out_proj_weight"], bound["out_proj_bias"]), {})
    return out.reshape(L, N, E), None


def _dropout(func, args, kwargs):
    names = ("input", "p", "training", "inplace")
    bound = _bind(names, args, kwargs)
    if bound.get("training", True) and bound.get("p", 0.5) != 0.0:
        raise TaylorUnsupportedError("dropout in training mode")
    return bound["input"]


def _identity(func, args, kwargs):
    return args[0]


def _binary_method(op):
    def rule(func, args, kwargs):
        if kwargs:
            if op is _add and set(kwargs) == {"alpha"}:
                return _add(args[0], args[1], kwargs["alpha"])
            raise TaylorUnsupportedError(f"{_name(func)!r} with keyword arguments {sorted(kwargs)}")
        return op(*args)

    return rule


def _sub(func, args, kwargs):
    return _add(args[0], args[1], -kwargs.get("alpha", 1.0))


def _rsub(func, args, kwargs):
    return _add(args[1], args[0], -kwargs.get("alpha", 1.0))


def _rbinary(op):
    return lambda func, args, kwargs: op(args[1], args[0])


def _matmul(func, args, kwargs):
    return _bilinear(torch.matmul, args[0], args[1])


_LINEAR_OPS = (
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "swapaxes",
    "movedim", "unsqueeze", "squeeze", "expand", "expand_as", "contiguous", "clone",
    "chunk", "split", "unbind", "narrow", "select", "sum", "mean", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "nll_loss", "__getitem__", "repeat", "flip", "roll", "tril", "triu", "diagonal",
    "view_as", "reshape_as", "trace",
)  # fmt: skip
_ELEMENTWISE_OPS = (
    "relu", "tanh", "sigmoid", "exp", "log", "reciprocal", "sqrt", "rsqrt", *_ELEMENTWISE_GENERIC,
)  # fmt: skip

_RULES: dict[str, Callable[[Any, tuple, dict], Any]] = {
    **{name: _linear for name in _LINEAR_OPS},
    **{name: _elementwise for name in _ELEMENTWISE_OPS},
    "cat": _joint_linear,
    "concat": _joint_linear,
    "concatenate": _joint_linear,
    "stack": _joint_linear,
    "add": _binary_method(_add),
    "__add__": _binary_method(_add),
    "__radd__": _rbinary(_add),
    "__iadd__": _binary_method(_add),
    "sub": _sub,
    "__sub__": _sub,
    "__isub__": _sub,
    "__rsub__": _rsub,
    "rsub": _rsub,
    "neg": lambda func, args, kwargs: _mul(args[0], -1.0),
    "__neg__": lambda func, args, kwargs: _mul(args[0], -1.0),
    "mul": _binary_method(_mul),
    "__mul__": _binary_method(_mul),
    "__rmul__": _rbinary(_mul),
    "__imul__": _binary_method(_mul),
    "div": _binary_method(_div),
    "true_divide": _binary_method(_div),
    "__truediv__": _binary_method(_div),
    "__rtruediv__": _rbinary(_div),
    "__itruediv__": _binary_method(_div),
    "pow": _binary_method(_pow),
    "__pow__": _binary_method(_pow),
    "matmul": _matmul,
    "__matmul__": _matmul,
    "__rmatmul__": _rbinary(lambda a, b: _bilinear(torch.matmul, a, b)),
    "bmm": _matmul,
    "mm": _matmul,
    "linear": _linear_layer,
    "conv1d": _conv,
    "conv2d": _conv,
    "conv3d": _conv,
    "embedding": _embedding,
    "max_pool1d": _max_pool,
    "max_pool2d": _max_pool,
    "max_pool3d": _max_pool,
    "_max_pool1d": _max_pool,
    "_max_pool2d": _max_pool,
    "_max_pool3d": _max_pool,
    "max_pool1d_with_indices": _max_pool,
    "max_pool2d_with_indices": _max_pool,
    "max_pool3d_with_indices": _max_pool,
    "adaptive_max_pool1d": _max_pool,
    "adaptive_max_pool2d": _max_pool,
    "_adaptive_max_pool1d": _max_pool,
    "_adaptive_max_pool2d": _max_pool,
    "adaptive_max_pool1d_with_indices": _max_pool,
    "adaptive_max_pool2d_with_indices": _max_pool,
    "softmax": _softmax,
    "log_softmax": _log_softmax,
    "cross_entropy": _cross_entropy,
    "mse_loss": _mse_loss,
    "binary_cross_entropy_with_logits": _bce_with_logits,
    "layer_norm": _layer_norm,
    "batch_norm": _batch_norm,
    "scaled_dot_product_attention": _sdpa,
    "multi_head_attention_forward": _multi_head_attention,
    "dropout": _dropout,
    "identity": _identity,
}


# ---------------------------------------------------------------------- driver
@contextlib.contextmanager
def _jet_parameters(
    model: nn.Module, params: Sequence[Tensor], jets: Sequence[Jet], detach_others: bool = False
) -> Iterator[None]:
    """Swap ``params`` for jets in every module slot that holds them (a tied weight sits in
    several modules), restored on exit; with ``detach_others``, the model's other trainable
    parameters for detached tensors (a pass under grad mode then records no graph)."""
    from curvkit.autodiff import refuse_cached_parametrizations

    # the parametrized weights of jets would be cached as the weights of later passes
    refuse_cached_parametrizations(model, "Taylor mode", TaylorUnsupportedError)
    by_id = {id(p): jet for p, jet in zip(params, jets)}
    for jet in jets:
        jet.shared = True  # in place on a parameter: PyTorch refuses it too
    swapped = []
    try:
        for module in model.modules():
            for attr, p in module._parameters.items():
                if p is not None and (id(p) in by_id or (detach_others and p.requires_grad)):
                    swapped.append((module, attr, p))
        for module, attr, p in swapped:
            # bypasses __setattr__'s type check
            module._parameters[attr] = by_id[id(p)] if id(p) in by_id else p.detach()
        yield
    finally:
        for module, attr, original in swapped:
            module._parameters[attr] = original


@contextlib.contextmanager
def _first_order_jets(
    model: nn.Module,
    params: Sequence[Tensor],
    probes: Sequence[Tensor],
    what: str,
    record_tangents: bool,
) -> Iterator[None]:
    """The live ``params`` as first-order jets carrying ``probes`` (no second order, autograd
    recording ``x0``; ``x1`` too only with ``record_tangents``); failures of the model under
    jets become :class:`TaylorUnsupportedError` naming ``what``."""
    K = probes[0].shape[0]
    jets = [Jet(p, v.detach(), None, K, 1) for p, v in zip(params, probes)]
    with (
        _unsupported_as_taylor_error(what),
        torch.enable_grad(),
        _jet_parameters(model, params, jets),
        _switched(_SECOND_ORDER, False),
        _switched(_RECORDING, True),
        contextlib.nullcontext() if record_tangents else _switched(_RECORD_TANGENTS, False),
    ):
        yield


def loss_directional_derivatives(
    model: nn.Module,
    loss_fn: Callable[[Any, Tensor], Tensor],
    X: Any,
    y: Tensor,
    weight: float,
    params: Sequence[Tensor],
    probes: Sequence[Tensor],
) -> Tensor:
    """``g(theta)^T v_k`` (``g`` the gradient of ``weight * loss_fn(model(X), y)``) for every
    probe, by first-order forward propagation, *differentiable in the parameters*.

    The first-order rules run on the parameters themselves (not detached) under autograd,
    so the backward pass of the result is a reverse-over-forward Hessian-vector product,
    ``d (g^T v) / d theta = H v``. Its graph holds each layer's input and its tangent,
    about twice what the gradient saves, and no gradient-sized tensors: double backward
    holds the first backward's graph on top of the forward's.

    Args:
        probes: per parameter, ``(K, *param.shape)``; constants (not differentiated).

    Returns:
        ``(K,)``, differentiable in ``params``.

    Raises:
        TaylorUnsupportedError: the model or loss uses an operation without a rule.
    """
    K = probes[0].shape[0]
    with _first_order_jets(model, params, probes, "the model or loss", record_tangents=True):
        loss = loss_fn(model(X), y)
    if not isinstance(loss, Jet) or loss.ndim != 0:
        raise TaylorUnsupportedError(
            "the loss did not depend on the parameters through known rules, or is not a scalar"
        )
    if loss.x1 is None:
        return loss.x0.new_zeros(K)
    return weight * loss.x1


def output_tangents(
    model: nn.Module, X: Any, params: Sequence[Tensor], probes: Sequence[Tensor]
) -> tuple[Tensor, Tensor | None]:
    """The model's output with its autograd graph, and its Jacobian-vector products.

    One forward pass of first-order jets on the live parameters: ``x0`` records the graph
    that a vector-Jacobian product ``J^T u`` runs back through, ``x1`` carries ``J v_k``,
    detached at every rule's output (its own graph would hold ``K`` activations per layer
    for nothing).

    Args:
        probes: per parameter, ``(K, *param.shape)``.

    Returns:
        ``(out, JV)``: ``out`` ``(N, *O)`` with its graph, ``JV`` ``(K, N, *O)`` detached
        (``None``: the output does not depend on the parameters).

    Raises:
        TaylorUnsupportedError: the model uses an operation without a rule, or does not
            return one tensor.
    """
    with _first_order_jets(model, params, probes, "the model", record_tangents=False):
        out = model(X)
    if not isinstance(out, Jet):
        raise TaylorUnsupportedError(
            f"the model returned {type(out).__name__}, not one tensor computed through known rules"
        )
    return out.x0, out.x1


def taylor_quadratic_forms(
    model: nn.Module,
    loss_fn: Callable[[Any, Tensor], Tensor],
    X: Any,
    y: Tensor,
    weight: float,
    params: Sequence[Tensor],
    probes: Sequence[Tensor],
    group_size: int = 1,
    gauss_newton: bool = False,
) -> Tensor:
    """``v_k^T H_b v_k`` for the loss ``weight * loss_fn(model(X), y)`` of one batch.

    Args:
        params: the differentiated parameters of ``model`` (tied ones once).
        probes: per parameter, ``(K, *param.shape)``; the ``K`` probes ``v_k``.
        group_size: probes whose forms are summed (collapsed) before they are returned;
            must divide ``K``.
        gauss_newton: ``v_k^T G_b v_k`` of the generalised Gauss-Newton matrix instead:
            the model is propagated to first order only (``x2 = 0``: the model
            linearised), the loss to second order, so the result is
            ``(J v)^T (d^2 loss / d out^2) (J v)``.

    Returns:
        ``(K // group_size,)``: the sum of the forms of each group of consecutive probes.

    Raises:
        TaylorUnsupportedError: the model or loss uses an operation without a rule.
    """
    K = probes[0].shape[0]
    if group_size < 1 or K % group_size:
        raise ValueError(f"group_size must divide the number of probes {K}, got {group_size}")
    jets = [Jet(p.detach(), v, None, K, group_size) for p, v in zip(params, probes)]
    # grad mode on, so that the model turning it off is noticed (see _dispatch); nothing
    # the pass computes requires grad, so no graph is recorded
    with (
        _unsupported_as_taylor_error("the model or loss"),
        torch.enable_grad(),
        _jet_parameters(model, params, jets, detach_others=True),
    ):
        if gauss_newton:
            with _switched(_SECOND_ORDER, False):  # the linearised model
                out = model(X)
        else:
            out = model(X)
        loss = loss_fn(out, y)
    if not isinstance(loss, Jet):
        raise TaylorUnsupportedError(
            "the loss did not depend on the parameters through known rules"
        )
    if loss.ndim != 0:
        raise TaylorUnsupportedError(f"the loss has shape {tuple(loss.shape)}, not a scalar")
    if loss.x2 is None:
        return loss.x0.new_zeros(K // group_size)
    return weight * loss.x2
