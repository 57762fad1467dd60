"""What the sweep measures at each grid point, through curvkit's public API only.

Every quantity is a function ``fn(ctx, options) -> Measured``: tidy measurement rows (one
per number: ``quantity, value, stderr, method, num_matvecs``) plus rows of long-format array
tables (eigenvalues, densities, estimator errors). The runner adds the grid-point keys, the
seconds spent, and writes them. To add a quantity, write such a function and register it in
``QUANTITIES`` with its option defaults; the config then accepts it by name.

Quantities and their measurement names:

``loss``            ``loss_batch`` (the curvature batch), ``loss_train``, ``loss_test``
``accuracy``        ``accuracy_train``, ``accuracy_test`` (held-out split; classification)
``trace``           ``trace`` (``ck.trace``; standard error and method recorded)
``eigenvalues``     ``lambda_max``, ``lambda_min``; table ``eigenvalues`` (top-k, bottom-k)
``density``         ``density_negative_mass``; table ``density`` (``ck.spectral_density``)
``diagonal``        ``diag_mean``, ``diag_norm``, ``diag_abs_max``, ``diag_negative_fraction``
``row_sum``         ``rowsum_norm`` = ``‖H·1‖``, ``rowsum_diag_corr`` (Pearson correlation of
                    ``H·1`` with ``diag H``), ``rowsum_offdiag_ratio`` =
                    ``‖H·1 − diag H‖ / ‖diag H‖``. The off-diagonal row sums are *signed*: a
                    row whose off-diagonal entries cancel contributes nothing, so the ratio
                    measures net, not absolute, off-diagonal mass.
``frobenius``       ``frobenius_norm`` (``ck.frobenius_norm``)
``ggn_residual``    ``ggn_residual_share`` = ``‖H − G‖_F / ‖H‖_F`` (estimated, same probes
                    for numerator and denominator), ``ggn_trace`` (exact GGN trace)
``cost``            ``grad_seconds``, ``hvp_seconds``, ``hvp_ratio`` (one ``H @ v`` over one
                    gradient on the same batch; repeated products of the point's operator,
                    which keeps its graph, so one second backward each),
                    ``hvp_block_ratio`` (per probe of a ``K``-column ``H @ V``),
                    ``ggnvp_ratio``
``estimator_error`` table ``estimator_error``: relative error of trace estimators versus
                    their cost against the exact trace (only where ``D <= max_params``)

Diagonal statistics use the exact diagonal where the model has at most
``diagonal.exact_max_params`` parameters, otherwise the first method of
``diagonal.methods`` that applies; estimator error is carried into the statistics by
Monte-Carlo propagation of the per-entry standard errors (``stderr`` columns).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import curvkit as ck
from curvkit.datasets import Dataset

__all__ = [
    "QUANTITIES",
    "Measured",
    "PointContext",
    "check_quantity_options",
    "derive_seed",
    "matches_where",
]

WHERE_KEYS = (
    "model",
    "architecture",
    "train_batch_size",
    "curvature_batch_size",
    "seed",
    "step",
    "draw",
)


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any hashable parts (independent of ``PYTHONHASHSEED``)."""
    import hashlib

    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class Measured:
    """The output of one quantity at one point."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(
        self,
        quantity: str,
        value: float,
        stderr: float = 0.0,
        method: str = "",
        num_matvecs: int = 0,
        cost: float | None = None,
        dof: int | None = None,
    ) -> None:
        """``dof``: degrees of freedom of ``stderr`` where it is a sample's (intervals then
        take t quantiles: Hutch++ at a small budget has a handful), NaN otherwise."""
        self.rows.append(
            {
                "quantity": quantity,
                "value": float(value),
                "stderr": float(stderr),
                "dof": float("nan") if dof is None else float(dof),
                "method": method,
                "num_matvecs": int(num_matvecs),
                "cost": float(num_matvecs if cost is None else cost),
            }
        )


class CountingOperator(ck.LinearOperator):
    """Wraps an operator and counts the columns it multiplies (matvecs)."""

    def __init__(self, op: ck.LinearOperator) -> None:
        super().__init__(
            op.shape,
            op.dtype,
            op.device,
            symmetric=op.is_symmetric,
            psd=op.is_psd,
            param_shapes=op.param_shapes,
        )
        self.op = op
        self.count = 0

    def _matmat(self, V: Tensor) -> Tensor:
        self.count += V.shape[1]
        return self.op.matmat(V)


@dataclass
class PointContext:
    """Everything a quantity may use at one grid point.

    The model is in the sweep's curvature mode; quantities must leave it as they found it
    (curvkit's operators do).
    """

    model: nn.Module
    loss_fn: nn.Module
    X: Tensor
    y: Tensor
    dataset: Dataset
    point: dict[str, Any]
    seed: int
    cache: dict[str, Any] = field(default_factory=dict)

    def generator(self, purpose: str) -> torch.Generator:
        """A generator seeded from the point's seed and ``purpose`` (CPU or the device's)."""
        device = self.X.device if self.X.device.type != "cpu" else "cpu"
        return torch.Generator(device=device).manual_seed(derive_seed(self.seed, purpose))

    @property
    def H(self) -> ck.HessianOperator:  # noqa: N802 - the math symbol
        if "H" not in self.cache:
            self.cache["H"] = ck.HessianOperator(
                self.model,
                self.loss_fn,
                (self.X, self.y),
                backend=self.cache.get("backend", "auto"),
            )
        return self.cache["H"]

    @property
    def G(self) -> ck.LinearOperator:  # noqa: N802 - the math symbol
        if "G" not in self.cache:
            self.cache["G"] = ck.GGNOperator(self.model, self.loss_fn, (self.X, self.y))
        return self.cache["G"]

    @property
    def num_params(self) -> int:
        return self.H.shape[0]


# ---------------------------------------------------------------------- helpers
def _f(x: Any) -> float:
    return float(x.detach().cpu()) if isinstance(x, Tensor) else float(x)


def _evaluate(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor, chunk: int = 2048):
    """Mean loss and (for class targets) accuracy over ``(X, y)`` without gradients."""
    total, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for s in range(0, len(y), chunk):
            xb, yb = X[s : s + chunk], y[s : s + chunk]
            out = model(xb)
            total += float(loss_fn(out, yb)) * len(yb)
            if yb.dtype == torch.int64:
                correct += int((out.argmax(dim=1) == yb).sum())
            n += len(yb)
    return total / n, correct / n


def _mc_stats(
    fn: Callable[[Tensor], list[float]],
    value: Tensor,
    stderr: Tensor,
    samples: int,
    generator: torch.Generator,
) -> tuple[list[float], list[float]]:
    """Statistics of ``value`` and their standard errors by Monte-Carlo propagation.

    Draws ``value + stderr * z`` with standard normal ``z`` and takes the spread of
    ``fn`` over the draws; exact inputs (zero stderr) give zero error.
    """
    central = fn(value)
    if samples < 2 or not bool((stderr > 0).any()):
        return central, [0.0] * len(central)
    draws = []
    for _ in range(samples):
        z = torch.randn(value.shape, generator=generator, dtype=value.dtype, device="cpu")
        draws.append(fn(value + stderr * z.to(value.device)))
    spread = np.std(np.asarray(draws, dtype=float), axis=0, ddof=1)
    return central, [float(s) for s in spread]


# ---------------------------------------------------------------------- quantities
def q_loss(ctx: PointContext, opt: dict) -> Measured:
    m = Measured()
    batch_loss, _ = _evaluate(ctx.model, ctx.loss_fn, ctx.X, ctx.y)
    m.add("loss_batch", batch_loss, method="exact")
    if "train_eval" not in ctx.cache:
        ctx.cache["train_eval"] = _evaluate(ctx.model, ctx.loss_fn, *ctx.cache["train_split"])
        ctx.cache["test_eval"] = _evaluate(ctx.model, ctx.loss_fn, *ctx.cache["test_split"])
    m.add("loss_train", ctx.cache["train_eval"][0], method="exact")
    m.add("loss_test", ctx.cache["test_eval"][0], method="exact")
    return m


def q_accuracy(ctx: PointContext, opt: dict) -> Measured:
    m = Measured()
    if ctx.dataset.task != "classification":
        m.notes.append("accuracy skipped: regression task")
        return m
    if "train_eval" not in ctx.cache:
        ctx.cache["train_eval"] = _evaluate(ctx.model, ctx.loss_fn, *ctx.cache["train_split"])
        ctx.cache["test_eval"] = _evaluate(ctx.model, ctx.loss_fn, *ctx.cache["test_split"])
    m.add("accuracy_train", ctx.cache["train_eval"][1], method="exact")
    m.add("accuracy_test", ctx.cache["test_eval"][1], method="exact")
    return m


def q_trace(ctx: PointContext, opt: dict) -> Measured:
    m = Measured()
    est = ck.trace(
        ctx.H,
        method=opt["method"],
        num_matvecs=opt["num_matvecs"],
        generator=ctx.generator("trace"),
    )
    ctx.cache["trace"] = est
    m.add("trace", _f(est.value), _f(est.stderr), est.method, est.num_matvecs, est.cost, est.dof)
    return m


def _supported(fn: Callable, options: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``options`` that ``fn`` accepts (zero/empty values mean its default)."""
    import inspect

    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {k: v for k, v in options.items() if v and (takes_any or k in params)}


def q_eigenvalues(ctx: PointContext, opt: dict) -> Measured:
    m = Measured()
    rows = []
    extra = _supported(
        ck.eigenvalues, {"tol": opt["tol"], "max_restarts": opt["max_restarts"], "ncv": opt["ncv"]}
    )
    for which, k, name in (
        ("LA", opt["top_k"], "lambda_max"),
        ("SA", opt["bottom_k"], "lambda_min"),
    ):
        if k < 1:
            continue
        op = CountingOperator(ctx.H)
        k_eff = min(k, op.shape[0] - 1)
        vals = ck.eigenvalues(
            op, k=k_eff, which=which, generator=ctx.generator(f"eig-{which}"), **extra
        )
        vals = torch.as_tensor(vals).detach().cpu().double().reshape(-1).sort().values
        extreme = vals[-1] if which == "LA" else vals[0]
        m.add(name, _f(extreme), 0.0, "lanczos", op.count)
        ordered = vals.flip(0) if which == "LA" else vals
        for rank, v in enumerate(ordered.tolist(), start=1):
            rows.append({"which": "top" if which == "LA" else "bottom", "rank": rank, "value": v})
    m.tables["eigenvalues"] = rows
    return m


def q_density(ctx: PointContext, opt: dict) -> Measured:
    m = Measured()
    op = CountingOperator(ctx.H)
    kwargs = _supported(
        ck.spectral_density,
        {
            "num_probes": opt["num_probes"],
            "num_steps": opt["num_steps"],
            "grid": opt["grid_size"],
            "sigma": opt["sigma"],
        },
    )
    out = ck.spectral_density(op, generator=ctx.generator("density"), **kwargs)
    grid, dens = (torch.as_tensor(t).detach().cpu().double() for t in (out[0], out[1]))
    neg = float(torch.trapezoid(torch.where(grid < 0, dens, 0.0), grid))
    # each probe's smoothed mass below zero, in closed form: their spread is the error
    nodes, weights = (torch.as_tensor(t).detach().cpu().double() for t in (out[2], out[3]))
    below = torch.special.ndtr(-nodes / out.sigma)
    per_probe = (weights * below).sum(-1)
    P = per_probe.numel()
    stderr = float(per_probe.std(unbiased=True) / P**0.5) if P > 1 else float("nan")
    m.add("density_negative_mass", neg, stderr, "slq", op.count, dof=P - 1 if P > 1 else None)
    m.tables["density"] = [
        {"grid": float(g), "density": float(d)} for g, d in zip(grid.tolist(), dens.tolist())
    ]
    return m


def hessian_diagonal(ctx: PointContext, opt: dict) -> ck.Estimate:
    """The Hessian diagonal: exact if affordable, else the first applicable method."""
    if "diagonal" in ctx.cache:
        return ctx.cache["diagonal"]
    methods = list(opt["methods"])
    if ctx.num_params <= opt["exact_max_params"]:
        methods = ["exact", *methods]
    errors = []
    for method in methods:
        try:
            est = ck.diagonal(
                ctx.H,
                method=method,
                num_matvecs=opt["num_matvecs"],
                generator=ctx.generator("diagonal"),
            )
        except (ValueError, TypeError, NotImplementedError, RuntimeError, ImportError) as err:
            errors.append(f"{method}: {type(err).__name__}: {str(err)[:200]}")
            continue
        ctx.cache["diagonal"] = est
        ctx.cache["diagonal_notes"] = errors
        return est
    raise RuntimeError("no diagonal method applies: " + "; ".join(errors))


def q_diagonal(ctx: PointContext, opt: dict) -> Measured:
    m = Measured()
    est = hessian_diagonal(ctx, opt)
    m.notes += [f"diagonal fallback: {e}" for e in ctx.cache.get("diagonal_notes", [])]
    d, s = est.value.detach().double().cpu(), est.stderr.detach().double().cpu()
    s = torch.nan_to_num(s, nan=0.0)
    D = d.numel()

    def stats(v: Tensor) -> list[float]:
        return [
            float(v.mean()),
            float(v.norm()),
            float(v.abs().max()),
            float((v < 0).double().mean()),
        ]

    vals, errs = _mc_stats(stats, d, s, opt["error_samples"], ctx.generator("diag-mc"))
    errs[0] = float(s.pow(2).sum().sqrt() / D)  # the mean's error, exactly
    names = ("diag_mean", "diag_norm", "diag_abs_max", "diag_negative_fraction")
    for name, v, e in zip(names, vals, errs):
        m.add(name, v, e, est.method, est.num_matvecs, est.cost)
    return m


def _options(ctx: PointContext, name: str) -> dict[str, Any]:
    """The options of quantity ``name``: the config's where it is measured, else its
    defaults (``row_sum`` uses the diagonal's, ``ggn_residual`` the Frobenius norm's)."""
    options = ctx.cache["options"].get(name)
    return dict(QUANTITIES[name].defaults) if options is None else options


def q_row_sum(ctx: PointContext, opt: dict) -> Measured:
    m = Measured()
    est = hessian_diagonal(ctx, _options(ctx, "diagonal"))
    r = ck.row_sum(ctx.H).detach().double().cpu()
    d, s = est.value.detach().double().cpu(), est.stderr.detach().double().cpu()
    s = torch.nan_to_num(s, nan=0.0)

    def stats(v: Tensor) -> list[float]:
        corr = torch.corrcoef(torch.stack([r, v]))[0, 1]
        return [float(corr), float((r - v).norm() / v.norm().clamp_min(1e-300))]

    vals, errs = _mc_stats(stats, d, s, opt["error_samples"], ctx.generator("rowsum-mc"))
    method = f"row_sum+{est.method}"
    m.add("rowsum_norm", float(r.norm()), 0.0, "exact", 1)
    m.add("rowsum_diag_corr", vals[0], errs[0], method, 1 + est.num_matvecs, 1 + est.cost)
    m.add("rowsum_offdiag_ratio", vals[1], errs[1], method, 1 + est.num_matvecs, 1 + est.cost)
    return m


def _frobenius_of_h(ctx: PointContext, opt: dict) -> ck.Estimate:
    if "frobenius" not in ctx.cache:
        ctx.cache["frobenius"] = ck.frobenius_norm(
            ctx.H, num_matvecs=opt["num_matvecs"], generator=ctx.generator("frobenius")
        )
    return ctx.cache["frobenius"]


def q_frobenius(ctx: PointContext, opt: dict) -> Measured:
    m = Measured()
    est = _frobenius_of_h(ctx, opt)
    m.add(
        "frobenius_norm",
        _f(est.value),
        _f(est.stderr),
        est.method,
        est.num_matvecs,
        est.cost,
        est.dof,
    )
    return m


def q_ggn_residual(ctx: PointContext, opt: dict) -> Measured:
    m = Measured()
    fro_opt = dict(_options(ctx, "frobenius"))
    fro_opt["num_matvecs"] = opt["num_matvecs"]
    if _options(ctx, "frobenius")["num_matvecs"] != opt["num_matvecs"]:
        ctx.cache.pop("frobenius", None)
    h = _frobenius_of_h(ctx, fro_opt)
    residual_cls = getattr(ck, "ResidualOperator", None)
    if residual_cls is not None:
        R: ck.LinearOperator = residual_cls(ctx.model, ctx.loss_fn, (ctx.X, ctx.y))
    else:
        R = ctx.H - ctx.G
    # the same generator purpose gives the same probes: correlated errors partly cancel
    r = ck.frobenius_norm(R, num_matvecs=opt["num_matvecs"], generator=ctx.generator("frobenius"))
    hv, rv = _f(h.value), _f(r.value)
    share = rv / hv if hv > 0 else float("nan")
    rel = math.hypot(_f(r.stderr) / max(rv, 1e-300), _f(h.stderr) / max(hv, 1e-300))
    m.add(
        "ggn_residual_share",
        share,
        abs(share) * rel,
        f"frobenius({r.method})",
        r.num_matvecs + h.num_matvecs,
        r.cost + h.cost,
    )
    if opt["ggn_trace"]:
        g = ctx.G.trace()
        m.add("ggn_trace", _f(g.value), _f(g.stderr), g.method, g.num_matvecs, g.cost)
    return m


def _timed(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def q_cost(ctx: PointContext, opt: dict) -> Measured:
    m = Measured()
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    H, G = ctx.H, ctx.G
    g = ctx.generator("cost")
    v = torch.randn(H.shape[0], generator=g, dtype=H.dtype, device="cpu").to(H.device)
    V = torch.randn(H.shape[0], opt["block_size"], generator=g, dtype=H.dtype).to(H.device)
    saved = [p.grad for p in params]

    def grad() -> None:
        with torch.enable_grad():
            loss = ctx.loss_fn(ctx.model(ctx.X), ctx.y)
            torch.autograd.grad(loss, params)

    buffers = [(b, b.detach().clone()) for b in ctx.model.buffers()]
    t_grad = _timed(grad, opt["repeats"])
    with torch.no_grad():  # a train-mode forward pass updates BatchNorm statistics
        for b, old in buffers:
            b.copy_(old)
    for p, s in zip(params, saved):
        p.grad = s
    t_hvp = _timed(lambda: H @ v, opt["repeats"])
    t_block = _timed(lambda: H @ V, max(1, opt["repeats"] // 2)) / opt["block_size"]
    t_ggn = _timed(lambda: G @ v, opt["repeats"])
    m.add("grad_seconds", t_grad, method="median")
    m.add("hvp_seconds", t_hvp, method="median", num_matvecs=opt["repeats"] + 1)
    m.add("hvp_ratio", t_hvp / t_grad, method="median")
    m.add("hvp_block_ratio", t_block, method=f"median,K={opt['block_size']}")
    m.rows[-1]["value"] = t_block / t_grad
    m.add("ggnvp_ratio", t_ggn / t_grad, method="median")
    return m


def q_estimator_error(ctx: PointContext, opt: dict) -> Measured:
    m = Measured()
    D = ctx.num_params
    if D > opt["max_params"]:
        m.notes.append(
            f"estimator_error skipped: {D} parameters > max_params={opt['max_params']} "
            "(the exact trace would cost D products)"
        )
        return m
    exact = ck.trace(ctx.H, method="exact")
    truth = _f(exact.value)
    rows = []
    for method in opt["methods"]:
        for budget in opt["budgets"]:
            for rep in range(opt["repeats"]):
                gen = ctx.generator(f"esterr-{method}-{budget}-{rep}")
                try:
                    est = ck.trace(ctx.H, method=method, num_matvecs=budget, generator=gen)
                except (ValueError, TypeError, NotImplementedError, RuntimeError) as err:
                    m.notes.append(f"estimator_error: {method} at {budget}: {err}")
                    break
                value = _f(est.value)
                rows.append(
                    {
                        "method": est.method,
                        "requested_method": method,
                        "budget": budget,
                        "repeat": rep,
                        "num_matvecs": est.num_matvecs,
                        "cost": float(est.cost),
                        "estimate": value,
                        "stderr": _f(est.stderr),
                        "truth": truth,
                        "rel_error": abs(value - truth) / max(abs(truth), 1e-300),
                    }
                )
    m.tables["estimator_error"] = rows
    m.add("trace_exact", truth, 0.0, "exact", exact.num_matvecs, exact.cost)
    return m


def _trace_methods() -> list[str]:
    from curvkit.estimators import TRACE_METHODS

    return ["auto", *sorted(TRACE_METHODS)]


def _diagonal_methods() -> list[str]:
    from curvkit.estimators import DIAGONAL_METHODS

    return ["auto", *sorted(DIAGONAL_METHODS)]


@dataclass(frozen=True)
class QuantitySpec:
    """A registered quantity: its function, option defaults and one-line description.

    ``choices`` maps an option that names estimator methods (a string, or a list of them)
    to a function returning the valid names; it is called when a config is checked, so
    methods registered later (``register_trace_method``) are accepted too.
    """

    fn: Callable[[PointContext, dict], Measured]
    defaults: dict[str, Any]
    doc: str
    choices: dict[str, Callable[[], list[str]]] = field(default_factory=dict)


#: Registry in measuring order. ``where`` (every quantity) limits it to matching grid points.
QUANTITIES: dict[str, QuantitySpec] = {
    "loss": QuantitySpec(q_loss, {}, "loss on the curvature batch, train and test split"),
    "accuracy": QuantitySpec(q_accuracy, {}, "accuracy on train and held-out split"),
    "trace": QuantitySpec(
        q_trace,
        {"method": "hutch++", "num_matvecs": 30},
        "Hessian trace (ck.trace)",
        {"method": _trace_methods},
    ),
    "eigenvalues": QuantitySpec(
        q_eigenvalues,
        {"top_k": 5, "bottom_k": 1, "tol": 1e-4, "max_restarts": 50, "ncv": 0},
        "top-k and bottom-k eigenvalues (Lanczos; relative tolerance tol, 0: default)",
    ),
    "density": QuantitySpec(
        q_density,
        {"num_probes": 2, "num_steps": 30, "grid_size": 0, "sigma": 0.0},
        "spectral density (SLQ); 0 keeps ck.spectral_density's default",
    ),
    "diagonal": QuantitySpec(
        q_diagonal,
        {
            "methods": ["hessian-backpack", "ggn-cv", "xdiag"],
            "num_matvecs": 30,
            "exact_max_params": 0,
            "error_samples": 64,
        },
        "Hessian diagonal statistics",
        {"methods": _diagonal_methods},
    ),
    "row_sum": QuantitySpec(
        q_row_sum, {"error_samples": 64}, "Hessian row-sum statistics (uses the diagonal)"
    ),
    "frobenius": QuantitySpec(q_frobenius, {"num_matvecs": 20}, "Frobenius norm of H"),
    "ggn_residual": QuantitySpec(
        q_ggn_residual,
        {"num_matvecs": 20, "ggn_trace": True},
        "Hessian-GGN residual share ||H-G||_F/||H||_F",
    ),
    "cost": QuantitySpec(
        q_cost, {"repeats": 5, "block_size": 16}, "product time relative to a gradient"
    ),
    "estimator_error": QuantitySpec(
        q_estimator_error,
        {
            "methods": ["hutchinson", "hutch++", "xtrace"],
            "budgets": [10, 20, 40, 80],
            "repeats": 3,
            "max_params": 5000,
            "where": {"curvature_batch_size": "full", "draw": 0, "step": "last"},
        },
        "trace-estimator error versus matvecs against the exact trace",
        {"methods": _trace_methods},
    ),
}


def _where_choices(
    grid: dict[str, Any], labels: list[str], architectures: list[str] | None
) -> dict[str, list]:
    """The values each ``where`` key can take in ``grid`` (``None``: not checked)."""
    tbs = list(grid["train_batch_sizes"])
    if 0 in grid["checkpoints"]:
        tbs = [0, *tbs]  # initialisation points carry train_batch_size = 0
    return {
        "model": list(labels),
        "architecture": list(architectures) if architectures is not None else None,
        "train_batch_size": tbs,
        "curvature_batch_size": list(grid["curvature_batch_sizes"]),
        "seed": [*grid["seeds"], "first"],
        "step": [*grid["checkpoints"], "first", "last"],
        "draw": list(range(grid["draws"])),
    }


def _check_where(
    where: dict[str, Any],
    grid: dict[str, Any],
    labels: list[str],
    architectures: list[str] | None,
    defaulted: bool,
) -> None:
    """Every ``where`` value must name a value of the grid: otherwise it never matches."""
    choices = _where_choices(grid, labels, architectures)
    for key, wanted in where.items():
        valid = choices[key]
        if valid is None:
            continue
        wanted_list = wanted if isinstance(wanted, list) else [wanted]
        hint = " (the default `where`; set `where` in the config to change it)" if defaulted else ""
        if not wanted_list:
            raise ValueError(f"where.{key} is an empty list, so it never matches{hint}")
        for w in wanted_list:
            if key == "curvature_batch_size":
                ok = not isinstance(w, bool) and str(w) in {str(v) for v in valid}
            else:
                ok = not isinstance(w, bool) and w in valid and type(w) in {type(v) for v in valid}
            if not ok:
                raise ValueError(
                    f"where.{key} = {w!r} is not in the grid, so the quantity would never be "
                    f"measured{hint}; valid values: {valid}"
                )


def check_quantity_options(
    name: str,
    options: dict[str, Any],
    grid: dict[str, Any],
    labels: list[str],
    architectures: list[str] | None = None,
    measured: bool = True,
) -> dict[str, Any]:
    """Merge ``options`` over the quantity's defaults; raise ``ValueError`` on a bad one.

    Checks option names and types, estimator method names against curvkit's registries,
    and (for a measured quantity, or a `where` given explicitly) that every ``where`` value
    names a value of ``grid``, so no quantity silently never runs.
    """
    spec = QUANTITIES[name]
    allowed = set(spec.defaults) | {"where"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; allowed options are {sorted(allowed)}")
    merged = {**spec.defaults, **options}
    for key, default in spec.defaults.items():
        if key == "where":
            continue
        value = merged[key]
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"option {key} must be true or false, got {value!r}")
        if isinstance(default, int) and not isinstance(default, bool):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"option {key} must be a non-negative integer, got {value!r}")
        if isinstance(default, float) and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
        ):
            raise ValueError(f"option {key} must be a non-negative number, got {value!r}")
        if isinstance(default, list) and not isinstance(value, list):
            raise ValueError(f"option {key} must be a list, got {value!r}")
        if isinstance(default, list) and not value:
            raise ValueError(f"option {key} must be a non-empty list")
        if isinstance(default, list) and all(
            isinstance(d, int) and not isinstance(d, bool) for d in default
        ):
            bad_ints = [v for v in value if not isinstance(v, int) or isinstance(v, bool) or v < 1]
            if bad_ints:
                raise ValueError(f"option {key} must list positive integers, got {bad_ints}")
    for key, valid_names in spec.choices.items():
        valid = valid_names()
        value = merged[key]
        for v in value if isinstance(value, list) else [value]:
            if not isinstance(v, str) or v not in valid:
                raise ValueError(
                    f"option {key}: unknown method {v!r}; valid methods: {', '.join(valid)}"
                )
    where = merged.get("where", {})
    if not isinstance(where, dict):
        raise ValueError(f"where must be a table of grid keys, got {where!r}")
    bad = sorted(set(where) - set(WHERE_KEYS))
    if bad:
        raise ValueError(f"where has unknown grid key(s) {bad}; use {list(WHERE_KEYS)}")
    if "model" in where:
        wanted = where["model"] if isinstance(where["model"], list) else [where["model"]]
        missing = [w for w in wanted if w not in labels]
        if missing:
            raise ValueError(f"where.model names {missing}, not among the models {labels}")
    if measured or "where" in options:
        _check_where(where, grid, labels, architectures, defaulted="where" not in options)
    merged["where"] = where
    return merged


def matches_where(point: dict[str, Any], where: dict[str, Any], grid: dict[str, Any]) -> bool:
    """Whether grid ``point`` satisfies a quantity's ``where`` filter.

    Values may be a scalar or a list; ``curvature_batch_size = "full"`` matches the full
    training split, ``step = "last"``/``"first"`` the last/first checkpoint, and
    ``seed = "first"`` the first seed of the grid.
    """
    for key, wanted in where.items():
        wanted_list = wanted if isinstance(wanted, list) else [wanted]
        resolved = []
        for w in wanted_list:
            if key == "step" and w == "last":
                w = grid["checkpoints"][-1]
            elif key == "step" and w == "first":
                w = grid["checkpoints"][0]
            elif key == "seed" and w == "first":
                w = grid["seeds"][0]
            resolved.append(w)
        actual = point["curvature_batch_spec"] if key == "curvature_batch_size" else point[key]
        if key == "curvature_batch_size":
            resolved = [str(w) for w in resolved]
            actual = str(actual)
        if actual not in resolved:
            return False
    return True
