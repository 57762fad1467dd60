"""``curvkit demo``: the row-sum examples and a curvature summary of a small trained network."""

from __future__ import annotations

import time

import scipy.sparse.linalg as sla
import torch
from torch import nn

import curvkit as ck


def _polynomial_example() -> torch.Tensor:
    x1 = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    x2 = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    f = x1**2 + 2 * x1**2 * x2 - 3 * x2**3
    return ck.hessian_row_sum(f, [x1, x2])


def _linear_relu_example(seed: int) -> tuple[torch.Tensor, float]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4, bias=False), nn.ReLU())
    X, y = torch.randn(3, 5), torch.randn(3, 4)
    params = list(model.parameters())
    row_sum = ck.hessian_row_sum(nn.MSELoss()(model(X), y), params)
    H = ck.HessianOperator(model, nn.MSELoss(), (X, y)).to_dense()
    return row_sum, float((row_sum - H.sum(1)).abs().max())


def _digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data[:n], dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target[:n], dtype=torch.long)
    return X, y


def run_demo(seed: int = 0, train_steps: int = 60) -> dict:
    """Print the two row-sum examples and a curvature summary; return the numbers."""
    print("curvkit demo\n")
    rs = _polynomial_example()
    print("1) f(x1, x2) = x1^2 + 2 x1^2 x2 - 3 x2^3 at (1, 2)")
    print(f"   H @ 1 = {rs.tolist()}   (expected [14.0, -32.0])\n")

    rs2, err = _linear_relu_example(seed)
    print("2) Sequential(Linear(5, 4, bias=False), ReLU()), MSELoss, random batch of 3")
    print(f"   H @ 1 has {rs2.numel()} entries: {[round(v, 4) for v in rs2.tolist()]}")
    print(f"   max |H @ 1 - row sums of the dense Hessian| = {err:.1e}\n")

    torch.manual_seed(seed)
    X, y = _digits(512)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(train_steps):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        loss = float(loss_fn(model(X), y))
        acc = float((model(X).argmax(1) == y).float().mean())
    H = ck.HessianOperator(model, loss_fn, (X, y))
    print(f"3) MLP 64-32(tanh)-10 on 512 sklearn digits, {train_steps} Adam steps")
    print(f"   loss {loss:.4f}, accuracy {acc:.3f}, D = {H.shape[0]} parameters")

    generator = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    top = ck.eigenvalues(H, k=3, which="LA", generator=generator)
    bottom = ck.eigenvalues(H, k=1, which="SA", generator=generator)
    t_eig = time.perf_counter() - t0
    shown = ", ".join(f"{v:.4g}" for v in top.tolist())
    print(
        f"   top-3 eigenvalues [{shown}], smallest {float(bottom[0]):.4g} (Lanczos, {t_eig:.1f} s)"
    )
    top_scipy = sla.eigsh(H.to_scipy(), k=1, which="LA", return_eigenvectors=False, tol=1e-6)
    print(f"   scipy eigsh on H.to_scipy() agrees on the largest: {top_scipy[0]:.4g}")

    t0 = time.perf_counter()
    est = ck.trace(H, method="hutch++", num_matvecs=90, generator=generator)
    t_est = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = ck.trace(H, method="exact")
    t_exact = time.perf_counter() - t0
    lo, hi = est.confidence_interval(0.95)
    print(
        f"   trace: exact {float(exact.value):.5g} ({exact.num_matvecs} matvecs, {t_exact:.1f} s)"
    )
    print(
        f"          {est.method} {float(est.value):.5g} ± {float(est.stderr):.2g}"
        f" (95% CI [{float(lo):.5g}, {float(hi):.5g}], {est.num_matvecs} matvecs,"
        f" {t_est:.1f} s)"
    )
    return {
        "polynomial_row_sum": rs,
        "linear_relu_row_sum": rs2,
        "top_eigenvalues": top.tolist(),
        "trace_exact": float(exact.value),
        "trace_estimate": est,
    }
