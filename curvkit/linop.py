"""The matrix-free ``LinearOperator`` every curvature object in curvkit is.

A subclass implements one method, the batched product ``_matmat(V)`` on a ``(D_in, K)``
block. Everything else derives from it: products with ``(D,)`` vectors and with lists of
parameter-shaped tensors, the adjoint, sums/differences/scalar multiples/compositions,
identity shifts, ``to_dense()`` and ``to_scipy()``.

Structure (symmetric, positive semi-definite) is *declared* by the operator, as in lineax,
and estimators may use it (e.g. Nyström-type trace estimators need PSD).
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Number

import numpy as np
import scipy.sparse.linalg
import torch
from torch import Tensor

__all__ = [
    "LinearOperator",
    "DenseOperator",
    "IdentityOperator",
    "as_operator",
    "flatten_tensors",
    "unflatten_vector",
]


def flatten_tensors(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat ``(D,)`` vector, in the order given."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_vector(vector: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Split a ``(D,)`` vector (or ``(D, K)`` block) into tensors of the given shapes.

    For a ``(D, K)`` block each piece gets shape ``(*shape, K)``.
    """
    sizes = [int(np.prod(s)) for s in shapes]
    if vector.shape[0] != sum(sizes):
        raise ValueError(f"vector has {vector.shape[0]} entries but the shapes hold {sum(sizes)}")
    trailing = tuple(vector.shape[1:])
    return [piece.reshape(*shape, *trailing) for piece, shape in zip(vector.split(sizes), shapes)]


def group_sums(values: Tensor, group_size: int) -> Tensor:
    """``(K,)`` -> ``(K // group_size,)``: the sum of each group of consecutive entries."""
    if group_size == 1:
        return values
    return values.reshape(-1, group_size).sum(1)


class LinearOperator:
    """A matrix-free linear map ``R^{D_in} -> R^{D_out}`` on torch tensors.

    Args:
        shape: ``(D_out, D_in)``.
        dtype: dtype of inputs and outputs.
        device: device of inputs and outputs.
        symmetric: declared symmetry; lets the adjoint reuse the forward product.
        psd: declared positive semi-definiteness (implies symmetric).
        param_shapes: optional shapes that split a ``(D_in,)`` vector into a list of
            parameter-shaped tensors (set by curvature operators).

    Subclasses implement ``_matmat(V)`` mapping ``(D_in, K)`` to ``(D_out, K)``, and
    ``_rmatmat`` if they are not symmetric and need an adjoint.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        symmetric: bool = False,
        psd: bool = False,
        param_shapes: Sequence[torch.Size] | None = None,
    ) -> None:
        if len(shape) != 2 or min(shape) < 0:
            raise ValueError(f"shape must be (D_out, D_in) with D >= 0, got {shape}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        self.device = torch.device(device)
        self.is_psd = bool(psd)
        self.is_symmetric = bool(symmetric) or self.is_psd
        if self.is_symmetric and self.shape[0] != self.shape[1]:
            raise ValueError(f"a symmetric operator must be square, got {self.shape}")
        self.param_shapes = None if param_shapes is None else [torch.Size(s) for s in param_shapes]
        if self.param_shapes is not None:
            total = sum(int(np.prod(s)) for s in self.param_shapes)
            if total != self.shape[1]:
                raise ValueError(
                    f"param_shapes hold {total} entries, operator has {self.shape[1]} columns"
                )

    # ------------------------------------------------------------------ to implement
    def _matmat(self, V: Tensor) -> Tensor:
        """Product with a ``(D_in, K)`` block; returns ``(D_out, K)``."""
        raise NotImplementedError

    def _rmatmat(self, V: Tensor) -> Tensor:
        """Adjoint product with a ``(D_out, K)`` block; returns ``(D_in, K)``."""
        if self.is_symmetric:
            return self._matmat(V)
        raise NotImplementedError(
            f"{type(self).__name__} does not implement the adjoint product (_rmatmat)"
        )

    # ------------------------------------------------------------------ products
    def _check_block(self, V: Tensor, expected_rows: int) -> None:
        if not isinstance(V, Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(V).__name__}")
        if V.ndim not in (1, 2):
            raise ValueError(
                f"expected a vector of shape ({expected_rows},) or a block ({expected_rows}, K); "
                f"got shape {tuple(V.shape)}"
            )
        if V.shape[0] != expected_rows:
            raise ValueError(
                f"shape mismatch: operator of shape {self.shape} cannot multiply "
                f"input of shape {tuple(V.shape)} (first dimension must be {expected_rows})"
            )
        if V.dtype != self.dtype:
            raise TypeError(
                f"dtype mismatch: operator is {self.dtype}, input is {V.dtype}; "
                f"convert the input with .to({self.dtype})"
            )
        if V.device != self.device:
            raise ValueError(
                f"device mismatch: operator is on {self.device}, input on {V.device}; "
                f"move the input with .to('{self.device}')"
            )

    def matmat(self, V: Tensor) -> Tensor:
        """``A @ V`` for ``V`` of shape ``(D_in,)`` or ``(D_in, K)``."""
        self._check_block(V, self.shape[1])
        if V.ndim == 1:
            return self._matmat(V.unsqueeze(1)).squeeze(1)
        return self._matmat(V)

    def rmatmat(self, V: Tensor) -> Tensor:
        """``A^T @ V`` for ``V`` of shape ``(D_out,)`` or ``(D_out, K)``."""
        self._check_block(V, self.shape[0])
        if V.ndim == 1:
            return self._rmatmat(V.unsqueeze(1)).squeeze(1)
        return self._rmatmat(V)

    def matvec_params(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        """Product with a list of parameter-shaped tensors; returns a list shaped alike."""
        if self.param_shapes is None:
            raise TypeError(
                f"{type(self).__name__} has no parameter shapes; multiply a flat vector instead"
            )
        vectors = list(vectors)
        if len(vectors) != len(self.param_shapes) or any(
            v.shape != s for v, s in zip(vectors, self.param_shapes)
        ):
            raise ValueError(
                "shape mismatch: expected tensors of shapes "
                f"{[tuple(s) for s in self.param_shapes]}, got {[tuple(v.shape) for v in vectors]}"
            )
        return self.unflatten(self.matmat(flatten_tensors(vectors)))

    def unflatten(self, vector: Tensor) -> list[Tensor]:
        """Split a ``(D,)`` vector or ``(D, K)`` block into parameter-shaped pieces."""
        if self.param_shapes is None:
            raise TypeError(f"{type(self).__name__} has no parameter shapes")
        return unflatten_vector(vector, self.param_shapes)

    @staticmethod
    def flatten(tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate parameter-shaped tensors into a flat ``(D,)`` vector."""
        return flatten_tensors(tensors)

    def __matmul__(self, other):
        if isinstance(other, LinearOperator):
            return _ProductOperator(self, other)
        if isinstance(other, (list, tuple)):
            return self.matvec_params(other)
        return self.matmat(other)

    def __rmatmul__(self, other):
        if isinstance(other, Tensor):
            if other.ndim == 1:
                return self.rmatmat(other)
            return self.rmatmat(other.T).T
        return NotImplemented

    # ------------------------------------------------------------------ algebra
    @property
    def T(self) -> LinearOperator:  # noqa: N802 - mirrors torch/numpy
        return self.adjoint()

    def adjoint(self) -> LinearOperator:
        """The adjoint (transpose) operator; the operator itself when symmetric."""
        if self.is_symmetric:
            return self
        return _AdjointOperator(self)

    def __add__(self, other):
        if isinstance(other, LinearOperator):
            return _SumOperator([self, other], [1.0, 1.0])
        return NotImplemented

    def __sub__(self, other):
        if isinstance(other, LinearOperator):
            return _SumOperator([self, other], [1.0, -1.0])
        return NotImplemented

    def __mul__(self, scalar):
        if isinstance(scalar, Tensor) and scalar.numel() == 1:
            scalar = scalar.item()
        if isinstance(scalar, Number):
            return _SumOperator([self], [float(scalar)])
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, scalar):
        if isinstance(scalar, Number):
            return self * (1.0 / scalar)
        return NotImplemented

    def __neg__(self):
        return self * -1.0

    def shift(self, sigma: float) -> LinearOperator:
        """``A + sigma * I`` (square operators only)."""
        return self + sigma * IdentityOperator(self.shape[0], self.dtype, self.device)

    # ------------------------------------------------------------------ conversions
    def to_dense(self, block_size: int = 256) -> Tensor:
        """The ``(D_out, D_in)`` matrix, built by products with identity blocks."""
        columns = []
        D = self.shape[1]
        for start in range(0, D, block_size):
            stop = min(start + block_size, D)
            E = torch.zeros(D, stop - start, dtype=self.dtype, device=self.device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            columns.append(self._matmat(E))
        if not columns:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return torch.cat(columns, dim=1)

    def quadratic_form(self, V: Tensor, group_size: int = 1) -> Tensor:
        """``v^T A v`` for ``V`` of shape ``(D,)`` (a scalar) or each column of ``(D, K)``
        (shape ``(K,)``): what Hutchinson-type trace estimators need. Curvature operators
        compute it chunk by chunk without holding the ``(D, K)`` product.

        ``group_size``: return instead the sum of the forms of each group of ``group_size``
        consecutive columns, shape ``(K // group_size,)`` (it must divide ``K``). Operators
        that can collapse the probes of a group (``HessianOperator``'s Taylor mode) compute
        these sums more cheaply than the forms one by one.
        """
        if self.shape[0] != self.shape[1]:
            raise ValueError(f"a quadratic form needs a square operator, got shape {self.shape}")
        self._check_block(V, self.shape[1])
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if V.ndim == 1:
            if group_size != 1:
                raise ValueError("a single vector (D,) has group_size 1")
            return self._quadratic_form(V.unsqueeze(1), 1)[0]
        if V.shape[1] % group_size:
            raise ValueError(
                f"group_size {group_size} does not divide the number of columns {V.shape[1]}"
            )
        return self._quadratic_form(V, group_size)

    def _quadratic_form(self, V: Tensor, group_size: int = 1) -> Tensor:
        return group_sums(torch.linalg.vecdot(V, self._matmat(V), dim=0), group_size)

    def row_sum(self) -> Tensor:
        """``A @ 1``: the ``(D_out,)`` vector of row sums."""
        return self.matmat(torch.ones(self.shape[1], dtype=self.dtype, device=self.device))

    def to_scipy(self) -> scipy.sparse.linalg.LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out)."""
        return _ScipyAdapter(self)

    def __repr__(self) -> str:
        flags = [f for f, on in (("symmetric", self.is_symmetric), ("psd", self.is_psd)) if on]
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, "
            f"device={self.device}{', ' if flags else ''}{', '.join(flags)})"
        )


class DenseOperator(LinearOperator):
    """A dense matrix seen as a ``LinearOperator``.

    Symmetry is checked (to a relative 1e-12 for float64, 1e-5 otherwise) unless declared.
    """

    def __init__(self, matrix: Tensor, *, symmetric: bool | None = None, psd: bool = False) -> None:
        if not isinstance(matrix, Tensor) or matrix.ndim != 2:
            raise ValueError("DenseOperator needs a 2-D torch.Tensor")
        if symmetric is None:
            symmetric = matrix.shape[0] == matrix.shape[1] and _is_symmetric(matrix)
        super().__init__(
            tuple(matrix.shape), matrix.dtype, matrix.device, symmetric=symmetric, psd=psd
        )
        self.matrix = matrix

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.matrix.T @ V

    def to_dense(self, block_size: int = 256) -> Tensor:
        return self.matrix.clone()


def _is_symmetric(matrix: Tensor) -> bool:
    if matrix.numel() == 0:
        return matrix.shape[0] == matrix.shape[1]
    tol = 1e-12 if matrix.dtype == torch.float64 else 1e-5
    scale = matrix.abs().max().clamp_min(torch.finfo(matrix.dtype).tiny)
    return bool(((matrix - matrix.T).abs().max() <= tol * scale).item())


class IdentityOperator(LinearOperator):
    """The ``D x D`` identity."""

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, device="cpu") -> None:
        super().__init__((dim, dim), dtype, device, psd=True)

    def _matmat(self, V: Tensor) -> Tensor:
        return V.clone()


class _SumOperator(LinearOperator):
    """``sum_i c_i A_i`` (also used for a scalar multiple, with one term)."""

    def __init__(self, operators: list[LinearOperator], coefficients: list[float]) -> None:
        first = operators[0]
        for op in operators[1:]:
            if op.shape != first.shape:
                raise ValueError(f"cannot add operators of shapes {first.shape} and {op.shape}")
            if op.dtype != first.dtype or op.device != first.device:
                raise ValueError(
                    f"cannot add operators on {first.dtype}/{first.device} and "
                    f"{op.dtype}/{op.device}"
                )
        symmetric = all(op.is_symmetric for op in operators)
        psd = all(op.is_psd for op in operators) and all(c >= 0 for c in coefficients)
        param_shapes = (
            first.param_shapes
            if all(op.param_shapes == first.param_shapes for op in operators)
            else None
        )
        super().__init__(
            first.shape,
            first.dtype,
            first.device,
            symmetric=symmetric,
            psd=psd,
            param_shapes=param_shapes,
        )
        self.operators = operators
        self.coefficients = coefficients

    def _matmat(self, V: Tensor) -> Tensor:
        return sum(c * op._matmat(V) for op, c in zip(self.operators, self.coefficients))

    def _rmatmat(self, V: Tensor) -> Tensor:
        return sum(c * op._rmatmat(V) for op, c in zip(self.operators, self.coefficients))


class _ProductOperator(LinearOperator):
    """``A @ B``, applied right to left."""

    def __init__(self, left: LinearOperator, right: LinearOperator) -> None:
        if left.shape[1] != right.shape[0]:
            raise ValueError(f"cannot compose operators of shapes {left.shape} and {right.shape}")
        if left.dtype != right.dtype or left.device != right.device:
            raise ValueError(
                f"cannot compose operators on {left.dtype}/{left.device} and "
                f"{right.dtype}/{right.device}"
            )
        super().__init__(
            (left.shape[0], right.shape[1]),
            left.dtype,
            left.device,
            param_shapes=right.param_shapes,
        )
        self.left, self.right = left, right

    def _matmat(self, V: Tensor) -> Tensor:
        return self.left._matmat(self.right._matmat(V))

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.right._rmatmat(self.left._rmatmat(V))


class _AdjointOperator(LinearOperator):
    def __init__(self, operator: LinearOperator) -> None:
        super().__init__((operator.shape[1], operator.shape[0]), operator.dtype, operator.device)
        self.operator = operator

    def _matmat(self, V: Tensor) -> Tensor:
        return self.operator._rmatmat(V)

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.operator._matmat(V)

    def adjoint(self) -> LinearOperator:
        return self.operator


class _ScipyAdapter(scipy.sparse.linalg.LinearOperator):
    """SciPy view of a curvkit operator: float64 numpy in and out, 1-D and 2-D inputs."""

    def __init__(self, operator: LinearOperator) -> None:
        self.operator = operator
        super().__init__(dtype=np.float64, shape=operator.shape)

    def _to_torch(self, x: np.ndarray) -> Tensor:
        return torch.as_tensor(np.asarray(x, dtype=np.float64)).to(
            device=self.operator.device, dtype=self.operator.dtype
        )

    @staticmethod
    def _to_numpy(x: Tensor) -> np.ndarray:
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()

    def _matvec(self, x):
        return self._to_numpy(self.operator.matmat(self._to_torch(x).reshape(-1)))

    def _matmat(self, X):
        return self._to_numpy(self.operator.matmat(self._to_torch(X)))

    def _rmatvec(self, x):
        return self._to_numpy(self.operator.rmatmat(self._to_torch(x).reshape(-1)))

    def _rmatmat(self, X):
        return self._to_numpy(self.operator.rmatmat(self._to_torch(X)))

    def _adjoint(self):
        return _ScipyAdapter(self.operator.adjoint())


def as_operator(A: LinearOperator | Tensor) -> LinearOperator:
    """Accept a ``LinearOperator`` or a dense square tensor; return an operator."""
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, Tensor):
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"expected a square 2-D tensor, got shape {tuple(A.shape)}")
        return DenseOperator(A)
    raise TypeError(
        f"expected a curvkit.LinearOperator or a dense square torch.Tensor, got {type(A).__name__}"
    )
