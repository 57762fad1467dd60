"""Paper figures from the result tables alone (never recomputes curvature).

``make_figures(results_dir)`` writes ``figures/<name>.pdf`` (vector) and ``.png`` for every
registered figure whose data is in the tables. Sizes fit a two-column paper (ICML/NeurIPS-
style: one column 3.25 in, full text width 6.75 in; 8 pt text), the style is set once in
``STYLE``, every architecture keeps its colour across figures, and legends sit outside the
axes (above them) so they never cover data.

The figure set (registered in ``FIGURES``, in order):

(a) ``a_spectral_density``: smoothed Hessian eigenvalue densities per architecture, at
    initialisation and after training (full training split; first seed).
(b) ``b_vs_curvature_batch``: top eigenvalue and trace versus curvature batch size (log
    axis; symmetric-log value axis where values can be negative), mean over seeds and draws
    with standard-error bars; the full-batch value drawn as an open marker.
(c) ``c_vs_train_batch``: the same versus training batch size (at the largest curvature
    batch, last checkpoint).
(d) ``d_rowsum_offdiag``: signed off-diagonal row-sum ratio ``‖H·1 − diag H‖ / ‖diag H‖``
    versus curvature batch size per architecture.
(e) ``e_estimator_error``: relative error of trace estimators versus matvecs (log-log).
(f) ``f_product_cost``: time of one Hessian(-/GGN)-vector product relative to a gradient,
    per architecture.

To add a figure, write ``fn(tables) -> matplotlib.figure.Figure | None`` (``None`` when its
data is missing) and decorate it with ``@register_figure("g_my_figure")``; it is then made
by ``curvkit figures`` and at the end of every sweep.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from curvkit.experiments.tables import load_tables  # noqa: E402

__all__ = ["COLUMN_WIDTH", "FIGURES", "STYLE", "TEXT_WIDTH", "make_figures", "register_figure"]

#: Width of one column / of the full text of a two-column paper (inches; ICML 2024).
COLUMN_WIDTH = 3.25
TEXT_WIDTH = 6.75
PANEL_HEIGHT = 1.75

STYLE = {
    "font.size": 8,
    "axes.labelsize": 8,
    "axes.titlesize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.5,
    "errorbar.capsize": 1.5,
    "axes.grid": True,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.4,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "savefig.dpi": 300,
    "figure.constrained_layout.use": True,
}

Tables = dict[str, pd.DataFrame]
FIGURES: dict[str, Callable[[Tables], Figure | None]] = {}


def register_figure(name: str) -> Callable:
    """Decorator: add a figure function to the set ``make_figures`` draws."""

    def deco(fn: Callable[[Tables], Figure | None]) -> Callable[[Tables], Figure | None]:
        FIGURES[name] = fn
        return fn

    return deco


# ---------------------------------------------------------------------- helpers
def _models(tables: Tables) -> list[str]:
    pts = tables.get("points")
    if pts is not None and len(pts) and "model_order" in pts:
        pts = pts.sort_values("model_order", kind="stable")
    src = pts if pts is not None and len(pts) else tables["measurements"]
    return list(dict.fromkeys(src["model"]))


def _colours(tables: Tables) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(_models(tables))}


def _unit(tables: Tables) -> str:
    pts = tables.get("points")
    if pts is not None and "task" in pts and len(pts) and (pts["task"] == "regression").all():
        return "loss units"
    return "nats"


def _measure(tables: Tables, quantity: str) -> pd.DataFrame:
    m = tables.get("measurements")
    if m is None or not len(m):
        return pd.DataFrame()
    return m[m["quantity"] == quantity]


def _aggregate(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean over seeds/draws with a standard error.

    With several samples the error bar is the standard error of the mean over them (batch
    sampling and estimator noise together); with one sample it is the estimator's own.
    """

    def agg(g: pd.DataFrame) -> pd.Series:
        n = len(g)
        mean = g["value"].mean()
        if n > 1:
            sem = g["value"].std(ddof=1) / np.sqrt(n)
        else:
            sem = float(g["stderr"].iloc[0]) if "stderr" in g else 0.0
        return pd.Series({"mean": mean, "sem": sem, "n": n})

    if df.empty:
        return pd.DataFrame(columns=[*by, "mean", "sem", "n"])
    return df.groupby(by, sort=True)[["value", "stderr"]].apply(agg).reset_index()


def _value_scale(ax, values: np.ndarray) -> None:
    """Log axis for positive values, symmetric-log where values can be negative."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return
    if (values > 0).all():
        if values.max() / values.min() > 20:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    else:
        nonzero = np.abs(values[values != 0])
        lin = float(np.quantile(nonzero, 0.1)) if len(nonzero) else 1.0
        ax.set_yscale("symlog", linthresh=max(lin, 1e-12))


def _legend_above(fig: Figure, axes, ncol: int | None = None) -> None:
    handles, labels = [], []
    for ax in np.atleast_1d(axes).ravel():
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels and not lab.startswith("_"):
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(
            handles,
            labels,
            loc="outside upper center",
            ncol=ncol or min(len(labels), 4),
            handlelength=1.8,
            columnspacing=1.0,
        )


def _int_ticks(ax, values) -> None:
    """Log x axis with the plotted sizes as plain integer tick labels."""
    vals = sorted({int(v) for v in values if np.isfinite(v) and v > 0})
    ax.set_xscale("log")
    if vals:
        ax.set_xticks(vals, [str(v) for v in vals])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def _last_step(df: pd.DataFrame) -> int:
    return int(df["step"].max())


def _panels(n: int, width: float = TEXT_WIDTH, max_cols: int = 4, height: float = PANEL_HEIGHT):
    cols = min(n, max_cols)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(width, height * rows + 0.35), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()


# ---------------------------------------------------------------------- (a)
@register_figure("a_spectral_density")
def fig_spectral_density(tables: Tables) -> Figure | None:
    dens = tables.get("density")
    if dens is None or dens.empty:
        return None
    models = [m for m in _models(tables) if m in set(dens["model"])]
    colours = _colours(tables)
    unit = _unit(tables)
    fig, axes = _panels(len(models))
    for ax, model in zip(axes, models):
        d = dens[dens["model"] == model]
        d = d[d["curvature_batch_size"] == d["curvature_batch_size"].max()]
        d = d[(d["seed"] == d["seed"].min()) & (d["draw"] == d["draw"].min())]
        steps = sorted(d["step"].unique())
        for step in (steps[0], steps[-1]) if len(steps) > 1 else steps:
            s = d[d["step"] == step]
            s = s[s["train_batch_size"] == s["train_batch_size"].min()]
            for _pid, curve in s.groupby("point_id"):
                curve = curve.sort_values("grid")
                ax.plot(
                    curve["grid"],
                    np.maximum(curve["density"], 1e-12),
                    color=colours[model],
                    ls="--" if step == 0 else "-",
                    alpha=0.9,
                    label="initialisation" if step == 0 else f"after {step} steps",
                )
        ax.set_yscale("log")
        top = d["density"].max() if len(d) else 1.0
        ax.set_ylim(max(top * 1e-6, 1e-8), top * 3)
        ax.set_title(model)
        ax.set_xlabel(f"eigenvalue λ ({unit})")
    axes[0].set_ylabel(f"density (1/{unit})")
    # legend entries are line styles; colour encodes the architecture (panel title)
    handles = [
        plt.Line2D([], [], color="0.3", ls="--", label="initialisation"),
        plt.Line2D([], [], color="0.3", ls="-", label="trained (last checkpoint)"),
    ]
    fig.legend(handles=handles, loc="outside upper center", ncol=2)
    return fig


# ---------------------------------------------------------------------- (b), (c)
def _vs_batch(tables: Tables, x: str, xlabel: str) -> Figure | None:
    lam = _measure(tables, "lambda_max")
    tr = _measure(tables, "trace")
    if lam.empty and tr.empty:
        return None
    colours = _colours(tables)
    unit = _unit(tables)
    fig, axes = plt.subplots(1, 2, figsize=(TEXT_WIDTH, PANEL_HEIGHT + 0.45))
    for ax, df, ylabel in (
        (axes[0], lam, f"top eigenvalue λmax ({unit})"),
        (axes[1], tr, f"trace tr(H) ({unit})"),
    ):
        if df.empty:
            ax.set_visible(False)
            continue
        last = _last_step(df)
        if x == "curvature_batch_size":
            df = df[df["step"] == last]
            df = df[df["train_batch_size"] == df["train_batch_size"].min()]
        else:
            df = df[(df["step"] == last) & (df["train_batch_size"] > 0)]
            df = df[
                df.groupby("model")["curvature_batch_size"].transform("max")
                == df["curvature_batch_size"]
            ]
        agg = _aggregate(df, ["model", x, "full_batch"])
        for model in _models(tables):
            a = agg[agg["model"] == model].sort_values(x)
            if a.empty:
                continue
            ax.errorbar(
                a[x], a["mean"], yerr=a["sem"], color=colours[model], marker="o", label=model
            )
            full = a[a["full_batch"].astype(bool)]
            if x == "curvature_batch_size" and len(full):
                ax.plot(
                    full[x],
                    full["mean"],
                    ls="none",
                    marker="o",
                    ms=6,
                    mfc="white",
                    mec=colours[model],
                    zorder=3,
                )
        _int_ticks(ax, agg[x])
        _value_scale(ax, np.concatenate([agg["mean"] - agg["sem"], agg["mean"] + agg["sem"]]))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    note = "open marker: full training split" if x == "curvature_batch_size" else ""
    if note:
        axes[0].plot([], [], ls="none", marker="o", ms=6, mfc="white", mec="0.3", label=note)
    _legend_above(fig, axes, ncol=min(len(_models(tables)) + bool(note), 4))
    return fig


@register_figure("b_vs_curvature_batch")
def fig_vs_curvature_batch(tables: Tables) -> Figure | None:
    return _vs_batch(tables, "curvature_batch_size", "curvature batch size (samples)")


@register_figure("c_vs_train_batch")
def fig_vs_train_batch(tables: Tables) -> Figure | None:
    m = tables.get("measurements")
    if m is None or m.empty or (m["train_batch_size"] > 0).sum() == 0:
        return None
    if m.loc[m["train_batch_size"] > 0, "train_batch_size"].nunique() < 2:
        return None
    return _vs_batch(tables, "train_batch_size", "training batch size (samples)")


# ---------------------------------------------------------------------- (d)
@register_figure("d_rowsum_offdiag")
def fig_rowsum_offdiag(tables: Tables) -> Figure | None:
    df = _measure(tables, "rowsum_offdiag_ratio")
    if df.empty:
        return None
    colours = _colours(tables)
    fig, axes = plt.subplots(1, 2, figsize=(TEXT_WIDTH, PANEL_HEIGHT + 0.45), sharey=True)
    last = _last_step(df)
    for ax, step, title in ((axes[0], 0, "initialisation"), (axes[1], last, f"after {last} steps")):
        d = df[df["step"] == step]
        d = d[d["train_batch_size"] == d["train_batch_size"].min()]
        agg = _aggregate(d, ["model", "curvature_batch_size"])
        for model in _models(tables):
            a = agg[agg["model"] == model].sort_values("curvature_batch_size")
            if len(a):
                ax.errorbar(
                    a["curvature_batch_size"],
                    a["mean"],
                    yerr=a["sem"],
                    color=colours[model],
                    marker="o",
                    label=model,
                )
        _int_ticks(ax, agg["curvature_batch_size"])
        ax.set_title(title)
        ax.set_xlabel("curvature batch size (samples)")
    vals = df["value"].to_numpy()
    _value_scale(axes[0], vals)
    axes[0].set_ylabel("‖H·1 − diag H‖ / ‖diag H‖\n(signed off-diagonal row sums)")
    _legend_above(fig, axes)
    return fig


# ---------------------------------------------------------------------- (e)
@register_figure("e_estimator_error")
def fig_estimator_error(tables: Tables) -> Figure | None:
    err = tables.get("estimator_error")
    if err is None or err.empty:
        return None
    models = [m for m in _models(tables) if m in set(err["model"])]
    methods = list(dict.fromkeys(err["method"]))
    markers = dict(zip(methods, "osD^v<>p*"))
    cmap = plt.get_cmap("Dark2")
    mcol = {m: cmap(i % 8) for i, m in enumerate(methods)}
    fig, axes = _panels(len(models), width=TEXT_WIDTH if len(models) > 1 else COLUMN_WIDTH)
    for ax, model in zip(axes, models):
        d = err[err["model"] == model]
        for method in methods:
            g = d[d["method"] == method].groupby("budget")
            if not len(g):
                continue
            cost = g["cost"].mean()
            mean = g["rel_error"].mean()
            sem = g["rel_error"].std(ddof=1).fillna(0) / np.sqrt(g.size())
            ax.errorbar(
                cost, mean, yerr=sem, marker=markers[method], color=mcol[method], label=method
            )
        c = np.array(sorted(d["cost"].unique()), dtype=float)
        c = c[c > 0]
        if len(c):
            ref = d.groupby("budget")["rel_error"].mean().max()
            ax.plot(c, ref * np.sqrt(c[0] / c), color="0.5", ls=":", label="∝ 1/√matvecs")
        # ticks at the budgets only: control-variate methods add a fixed cost, and a tick
        # per distinct cost crowds the axis
        _int_ticks(ax, d["budget"])
        ax.set_yscale("log")
        ax.set_title(model if len(models) > 1 else f"{model}: trace estimators")
        if len(models) == 1:
            ax.set_xlabel("cost (Hessian-vector products)")
    if len(models) > 1:
        fig.supxlabel("cost (Hessian-vector products)", fontsize=plt.rcParams["axes.labelsize"])
    axes[0].set_ylabel("relative error |est − tr H| / |tr H|")
    _legend_above(fig, axes, ncol=2 if len(models) == 1 else None)
    return fig


# ---------------------------------------------------------------------- (f)
@register_figure("f_product_cost")
def fig_product_cost(tables: Tables) -> Figure | None:
    names = {
        "hvp_ratio": "H @ v",
        "hvp_block_ratio": "H @ V, per column",
        "ggnvp_ratio": "G @ v",
    }
    m = tables.get("measurements")
    if m is None or m.empty:
        return None
    df = m[m["quantity"].isin(names)]
    if df.empty:
        return None
    models = [x for x in _models(tables) if x in set(df["model"])]
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, PANEL_HEIGHT + 0.6))
    width = 0.8 / len(names)
    cmap = plt.get_cmap("Set2")
    for j, (q, label) in enumerate(names.items()):
        d = df[df["quantity"] == q]
        means = [d.loc[d["model"] == x, "value"].median() for x in models]
        lo = [d.loc[d["model"] == x, "value"].quantile(0.25) for x in models]
        hi = [d.loc[d["model"] == x, "value"].quantile(0.75) for x in models]
        pos = np.arange(len(models)) + (j - (len(names) - 1) / 2) * width
        ax.bar(
            pos,
            means,
            width,
            color=cmap(j),
            label=label,
            yerr=[np.subtract(means, lo), np.subtract(hi, means)],
            ecolor="0.3",
        )
    ax.axhline(1.0, color="0.3", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(models)), models, rotation=20, ha="right")
    ax.set_ylabel("time / one gradient (×)")
    ax.grid(axis="x", visible=False)
    _legend_above(fig, [ax], ncol=3)
    return fig


# ---------------------------------------------------------------------- driver
#: Columns a figure plots, per table: rows where one is NaN or infinite are left out.
FINITE_COLUMNS = {
    "measurements": ("value",),
    "eigenvalues": ("value",),
    "density": ("grid", "density"),
    "estimator_error": ("cost", "rel_error"),
}


def _finite(tables: Tables) -> Tables:
    """``tables`` without rows whose plotted numbers are not finite (with a warning)."""
    out = dict(tables)
    for name, columns in FINITE_COLUMNS.items():
        df = tables.get(name)
        if df is None or df.empty or not set(columns) <= set(df.columns):
            continue
        values = df[list(columns)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
        ok = np.isfinite(values).all(axis=1)
        if not ok.all():
            bad = df[~ok]
            what = f" (e.g. {bad['quantity'].iloc[0]})" if "quantity" in bad else ""
            warnings.warn(
                f"{int((~ok).sum())} row(s) of {name} hold non-finite values{what}, e.g. at "
                f"{bad['point_id'].iloc[0] if 'point_id' in bad else '?'}; the figures leave "
                "them out",
                stacklevel=3,
            )
            df = df[ok]
        if "stderr" in df:
            stderr = pd.to_numeric(df["stderr"], errors="coerce")
            if not np.isfinite(stderr.fillna(0).to_numpy(dtype=float)).all():
                df = df.assign(stderr=stderr.where(np.isfinite(stderr)))
        out[name] = df
    return out


def make_figures(
    results: str | Path,
    out: str | Path | None = None,
    formats: tuple[str, ...] = ("pdf", "png"),
    *,
    tables: Tables | None = None,
    all_points: bool = False,
) -> list[Path]:
    """Draw every registered figure whose data is present; return the written files.

    Args:
        results: a results folder written by ``curvkit sweep``.
        out: figure folder (default: ``results/figures``).
        formats: file formats to write.
        tables: the tables to draw (default: :func:`load_tables` of ``results``, i.e. the
            grid of its ``config.toml``, or every finished point with ``all_points``).
        all_points: draw every finished point, also those outside the folder's config grid.

    Rows with non-finite plotted values are left out (with a warning); a figure that still
    fails is skipped with a warning, and the others are drawn.
    """
    results = Path(results)
    if tables is None:
        tables = load_tables(results, all_points=all_points)
    tables = _finite(tables)
    out = Path(out) if out is not None else results / "figures"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with plt.rc_context(STYLE):
        for name, fn in FIGURES.items():
            fig = None
            try:
                fig = fn(tables)
                if fig is None:
                    continue
                paths = []
                for fmt in formats:
                    path = out / f"{name}.{fmt}"
                    fig.savefig(path)
                    paths.append(path)
            except Exception as err:  # one bad figure must not cost the others
                warnings.warn(
                    f"figure {name} failed and is skipped: {type(err).__name__}: {err}",
                    stacklevel=2,
                )
                continue
            finally:
                if fig is not None:
                    plt.close(fig)
            written += paths
    return written
