"""Datasets for experiments: embedded digits, synthetic teacher-student, on-disk MNIST/CIFAR-10.

```python
from curvkit.datasets import load_dataset
ds = load_dataset("digits", seed=0)          # no download: scikit-learn ships the data
X, y = ds.train ; Xt, yt = ds.test ; loss_fn = ds.loss_fn()
```

Names and options (defaults in brackets):

``digits``
    scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, shipped with
    scikit-learn, no download); shape ``(1, 8, 8)``. ``normalize="unit"`` scales the pixels
    to [0, 1] (as torchvision's ``ToTensor`` does for MNIST); ``"standardize"`` also
    removes the training split's per-pixel mean and divides by its standard deviation.
    Uncentred inputs keep the class-mean structure that produces the ``C - 1`` outlier
    eigenvalues of a trained classifier's Hessian (Papyan 2020); per-pixel centring
    weakens it. [test_fraction=0.25, normalize="unit"]
``teacher-student-classification`` / ``teacher-student-regression``
    Gaussian inputs ``x ~ N(0, I_dim)`` labelled by a random one-hidden-layer tanh teacher
    of width ``teacher_width`` (drawn from the dataset seed): classification takes the
    arg-max of ``num_classes`` teacher outputs, regression the ``num_outputs`` outputs plus
    Gaussian noise of standard deviation ``noise``. [num_samples=1024, dim=16,
    teacher_width=32, num_classes=4, num_outputs=1, noise=0.1, test_fraction=0.25]
``mnist`` / ``cifar10``
    Read with ``torchvision.datasets`` from ``root`` (default: ``$CURVKIT_DATA``, else
    ``./data``) with ``download=False``: they must already be there in torchvision's
    layout (``<root>/MNIST/raw/...``, ``<root>/cifar-10-batches-py/...``). Nothing is ever
    downloaded at run time; a missing dataset raises an error saying where to put it.
    ``num_train``/``num_test`` take a seeded subset. Inputs standardised per channel.
    [root=None, num_train=0 (all), num_test=0 (all)]

Every split is a deterministic function of the dataset options and ``seed``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["DATASETS", "Dataset", "available_datasets", "check_dataset_spec", "load_dataset"]


@dataclass
class Dataset:
    """A train/test split held in memory.

    Attributes:
        name: registry name.
        X_train, y_train, X_test, y_test: tensors; ``y`` holds class indices (int64) for
            classification and ``(N, num_outputs)`` floats for regression.
        task: ``"classification"`` or ``"regression"``.
        num_outputs: model outputs (classes for classification).
        input_shape: shape of one sample.
    """

    name: str
    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor
    task: str
    num_outputs: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.X_train.shape[1:])

    @property
    def train(self) -> tuple[Tensor, Tensor]:
        return self.X_train, self.y_train

    @property
    def test(self) -> tuple[Tensor, Tensor]:
        return self.X_test, self.y_test

    @property
    def num_train(self) -> int:
        return int(self.X_train.shape[0])

    def loss_fn(self) -> nn.Module:
        """Mean-reduced cross-entropy (classification) or mean squared error (regression)."""
        return nn.CrossEntropyLoss() if self.task == "classification" else nn.MSELoss()

    def to(self, dtype: torch.dtype) -> Dataset:
        """A copy with floating inputs (and regression targets) cast to ``dtype``."""
        cast_y = self.task == "regression"
        return Dataset(
            self.name,
            self.X_train.to(dtype),
            self.y_train.to(dtype) if cast_y else self.y_train,
            self.X_test.to(dtype),
            self.y_test.to(dtype) if cast_y else self.y_test,
            self.task,
            self.num_outputs,
        )


def _split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(test_fraction * n)))
    return perm[n_test:], perm[:n_test]


def _standardise(X_train: Tensor, X_test: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    mean = X_train.mean(dim=dims, keepdim=True)
    std = X_train.std(dim=dims, keepdim=True).clamp_min(1e-6)
    return (X_train - mean) / std, (X_test - mean) / std


def digits(*, seed: int = 0, test_fraction: float = 0.25, normalize: str = "unit") -> Dataset:
    """scikit-learn's bundled 8x8 digits, shape ``(1, 8, 8)``, pixels in [0, 1] or standardised."""
    from sklearn.datasets import load_digits

    if normalize not in ("unit", "standardize"):
        raise ValueError(f"normalize must be 'unit' or 'standardize', got {normalize!r}")
    bunch = load_digits()
    X = torch.as_tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    tr, te = _split(len(y), test_fraction, seed)
    X_train, X_test = X[tr], X[te]
    if normalize == "standardize":
        X_train, X_test = _standardise(X_train, X_test, dims=(0,))
    return Dataset("digits", X_train, y[tr], X_test, y[te], "classification", 10)


def _teacher(
    seed: int, num_samples: int, dim: int, teacher_width: int, outputs: int
) -> tuple[Tensor, Tensor, torch.Generator]:
    for name, value in (
        ("num_samples", num_samples),
        ("dim", dim),
        ("teacher_width", teacher_width),
        ("outputs", outputs),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    g = torch.Generator().manual_seed(int(seed))
    X = torch.randn(num_samples, dim, generator=g)
    W1 = torch.randn(dim, teacher_width, generator=g) / dim**0.5
    W2 = torch.randn(teacher_width, outputs, generator=g) / teacher_width**0.5
    return X, torch.tanh(X @ W1) @ W2, g


def teacher_student_classification(
    *,
    seed: int = 0,
    num_samples: int = 1024,
    dim: int = 16,
    teacher_width: int = 32,
    num_classes: int = 4,
    test_fraction: float = 0.25,
) -> Dataset:
    """Gaussian inputs labelled by the arg-max of a random tanh teacher's outputs."""
    X, out, _ = _teacher(seed, num_samples, dim, teacher_width, num_classes)
    y = out.argmax(dim=1)
    tr, te = _split(num_samples, test_fraction, seed)
    return Dataset(
        "teacher-student-classification", X[tr], y[tr], X[te], y[te], "classification", num_classes
    )


def teacher_student_regression(
    *,
    seed: int = 0,
    num_samples: int = 1024,
    dim: int = 16,
    teacher_width: int = 32,
    num_outputs: int = 1,
    noise: float = 0.1,
    test_fraction: float = 0.25,
) -> Dataset:
    """Gaussian inputs, targets from a random tanh teacher plus Gaussian noise."""
    X, out, g = _teacher(seed, num_samples, dim, teacher_width, num_outputs)
    y = out + noise * torch.randn(out.shape, generator=g)
    tr, te = _split(num_samples, test_fraction, seed)
    return Dataset(
        "teacher-student-regression", X[tr], y[tr], X[te], y[te], "regression", num_outputs
    )


def _data_root(root: str | None) -> Path:
    return Path(root or os.environ.get("CURVKIT_DATA") or "data").expanduser()


def _subset(X: Tensor, y: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
    if not n or n >= len(y):
        return X, y
    idx = torch.as_tensor(np.random.default_rng(seed).permutation(len(y))[:n])
    return X[idx], y[idx]


def _torchvision(kind: str, root: str | None, seed: int, num_train: int, num_test: int) -> Dataset:
    import torchvision

    path = _data_root(root)
    cls, layout = {
        "mnist": (
            torchvision.datasets.MNIST,
            "MNIST/raw/train-images-idx3-ubyte (and the other 3 files)",
        ),
        "cifar10": (
            torchvision.datasets.CIFAR10,
            "cifar-10-batches-py/data_batch_1 ... test_batch",
        ),
    }[kind]
    try:
        train = cls(str(path), train=True, download=False)
        test = cls(str(path), train=False, download=False)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"{kind} is not on disk under {path.resolve()}; curvkit never downloads data at run "
            f"time. Put torchvision's layout there ({path}/{layout}), e.g. once with "
            f"`torchvision.datasets.{cls.__name__}('{path}', download=True)` on a machine with "
            "network access, or point the dataset option `root` (or $CURVKIT_DATA) at the "
            f"folder that holds it. ({err})"
        ) from None

    def arrays(ds: Any) -> tuple[Tensor, Tensor]:
        X = torch.as_tensor(np.asarray(ds.data), dtype=torch.float32) / 255.0
        X = X.unsqueeze(1) if X.ndim == 3 else X.permute(0, 3, 1, 2)
        return X, torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)

    X_train, y_train = _subset(*arrays(train), num_train, seed)
    X_test, y_test = _subset(*arrays(test), num_test, seed + 1)
    X_train, X_test = _standardise(X_train, X_test, dims=(0, 2, 3))
    return Dataset(kind, X_train, y_train, X_test, y_test, "classification", 10)


def mnist(
    *, seed: int = 0, root: str | None = None, num_train: int = 0, num_test: int = 0
) -> Dataset:
    """MNIST from disk (torchvision layout), never downloaded."""
    return _torchvision("mnist", root, seed, num_train, num_test)


def cifar10(
    *, seed: int = 0, root: str | None = None, num_train: int = 0, num_test: int = 0
) -> Dataset:
    """CIFAR-10 from disk (torchvision layout), never downloaded."""
    return _torchvision("cifar10", root, seed, num_train, num_test)


DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": digits,
    "teacher-student-classification": teacher_student_classification,
    "teacher-student-regression": teacher_student_regression,
    "mnist": mnist,
    "cifar10": cifar10,
}


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(DATASETS)


def check_dataset_spec(name: str, options: dict[str, Any]) -> None:
    """Raise ``ValueError`` for an unknown dataset name or option (nothing is loaded)."""
    if name not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; available datasets: {', '.join(available_datasets())}"
        )
    allowed = set(inspect.signature(DATASETS[name]).parameters) - {"seed"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"dataset {name!r} has no option(s) {unknown}; its options are {sorted(allowed)}"
        )


def load_dataset(name: str, seed: int = 0, **options: Any) -> Dataset:
    """Load dataset ``name``; the split and any synthetic draw depend only on ``seed``."""
    check_dataset_spec(name, options)
    return DATASETS[name](seed=int(seed), **options)
