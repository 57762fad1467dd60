"""The sweep runner: grid expansion, training to checkpoints, measurement, resume, sharding.

The grid is ``models x train_batch_sizes x curvature_batch_sizes x seeds x checkpoints x
draws``. At checkpoint 0 (initialisation) the training batch size plays no role, so those
points appear once, with ``train_batch_size = 0``; likewise the full training split is one
batch, measured once (``draw = 0``) however many draws the grid asks for.

Seeds (all derived from the grid seed with :func:`derive_seed`, so they do not depend on
``PYTHONHASHSEED``, the shard, or the order points run in):

- model initialisation: ``(seed, "init")`` — the same weights for every training batch size;
- training batch order: ``(seed, "train-order", train_batch_size)``;
- curvature batch: ``(seed, "curvature-batch", step, curvature_batch_size, draw)``, drawn
  from the training split without replacement (``"full"``: the whole split) — shared by all
  models, so architectures are compared on the same batches;
- estimators: ``(seed, model, train_batch_size, step, curvature_batch_size, draw)`` plus a
  per-quantity purpose string.

Same config and seed therefore give the same numbers (timings aside), whether the sweep runs
in one go, resumed, or split into shards.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from curvkit.datasets import Dataset, load_dataset
from curvkit.experiments.config import ConfigError, SweepConfig, load_config
from curvkit.experiments.quantities import (
    QUANTITIES,
    PointContext,
    derive_seed,
    matches_where,
)
from curvkit.experiments.tables import KEY_COLUMNS, finished_points, write_point
from curvkit.zoo import build_model

__all__ = ["SweepResult", "expand_grid", "parse_shard", "run_sweep", "shard_points"]


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; ``None`` -> ``(0, 1)``."""
    if text is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ConfigError(
            f"--shard must be i/n with 0 <= i < n (e.g. 0/4 for the first of 4), got {text!r}"
        )
    return int(m.group(1)), int(m.group(2))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "-", text).strip("-")


def expand_grid(cfg: SweepConfig, num_train: int) -> list[dict[str, Any]]:
    """Every grid point, in canonical order, as a dict of ``KEY_COLUMNS``."""
    points = []
    for spec in cfg.models:
        for seed in cfg.grid["seeds"]:
            for step in cfg.grid["checkpoints"]:
                tbs_list = [0] if step == 0 else cfg.grid["train_batch_sizes"]
                for tbs in tbs_list:
                    for cbs in cfg.grid["curvature_batch_sizes"]:
                        # the full split is the same batch in every draw: measure it once
                        draws = 1 if cbs == "full" else cfg.grid["draws"]
                        for draw in range(draws):
                            size = num_train if cbs == "full" else int(cbs)
                            pid = "__".join(
                                [
                                    _slug(spec.label),
                                    f"tb{tbs}",
                                    f"cb{cbs}",
                                    f"s{seed}",
                                    f"step{step}",
                                    f"d{draw}",
                                ]
                            )
                            points.append(
                                {
                                    "point_id": pid,
                                    "model": spec.label,
                                    "architecture": spec.name,
                                    "train_batch_size": tbs,
                                    "curvature_batch_size": size,
                                    "curvature_batch_spec": str(cbs),
                                    "full_batch": cbs == "full" or size == num_train,
                                    "seed": seed,
                                    "step": step,
                                    "draw": draw,
                                }
                            )
    ids = [p["point_id"] for p in points]
    if len(set(ids)) != len(ids):
        raise ConfigError("two grid points share an id; make the model labels more distinct")
    return points


def shard_points(points: list[dict], shard: tuple[int, int]) -> list[dict]:
    """Round-robin share ``i`` of ``n`` of the canonical point list (disjoint, covering)."""
    i, n = shard
    return [p for k, p in enumerate(points) if k % n == i]


@dataclass
class SweepResult:
    """What :func:`run_sweep` did."""

    output: Path
    total_points: int
    shard_points: int
    skipped: int
    computed: int
    seconds: float
    figures: list[Path]


class _Trainer:
    """One training run: a model trained step by step with a seeded batch order."""

    def __init__(
        self,
        model: nn.Module,
        data: Dataset,
        cfg: SweepConfig,
        tbs: int,
        seed: int,
        lr: float | None = None,
    ):
        self.model, self.data, self.tbs = model, data, tbs
        self.loss_fn = data.loss_fn()
        tr = dict(cfg.training, lr=cfg.training["lr"] if lr is None else lr)
        params = [p for p in model.parameters() if p.requires_grad]
        if tr["optimizer"] == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=tr["lr"], momentum=tr["momentum"], weight_decay=tr["weight_decay"]
            )
        else:
            self.opt = torch.optim.Adam(params, lr=tr["lr"], weight_decay=tr["weight_decay"])
        self.gen = torch.Generator().manual_seed(derive_seed(seed, "train-order", tbs))
        self.order = torch.empty(0, dtype=torch.int64)
        self.steps = 0
        self.last_loss = float("nan")

    def _next_indices(self) -> torch.Tensor:
        if len(self.order) < self.tbs:
            self.order = torch.randperm(self.data.num_train, generator=self.gen)
        idx, self.order = self.order[: self.tbs], self.order[self.tbs :]
        return idx

    def train_to(self, step: int) -> None:
        self.model.train()
        X, y = self.data.train
        while self.steps < step:
            idx = self._next_indices().to(X.device)
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model(X[idx]), y[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training diverged at step {self.steps} (loss {float(loss)}); lower "
                    "training.lr (or the model's lr) in the config"
                )
            loss.backward()
            self.opt.step()
            self.steps += 1
            self.last_loss = float(loss.detach())
        self.opt.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Put ``model`` in the sweep's curvature mode, restoring its mode afterwards."""
    was = {m: m.training for m in model.modules()}
    model.train(mode == "train")
    try:
        yield
    finally:
        for m, t in was.items():
            m.training = t


def _curvature_batch(data: Dataset, point: dict) -> tuple[torch.Tensor, torch.Tensor]:
    X, y = data.train
    if point["curvature_batch_spec"] == "full":
        return X, y
    g = torch.Generator().manual_seed(
        derive_seed(
            point["seed"],
            "curvature-batch",
            point["step"],
            point["curvature_batch_spec"],
            point["draw"],
        )
    )
    idx = torch.randperm(data.num_train, generator=g)[: point["curvature_batch_size"]]
    return X[idx.to(X.device)], y[idx.to(y.device)]


def measure_point(
    cfg: SweepConfig, model: nn.Module, data: Dataset, point: dict
) -> tuple[dict[str, pd.DataFrame], dict]:
    """All configured quantities at one point; returns its tables and notes."""
    X, y = _curvature_batch(data, point)
    ctx = PointContext(
        model=model,
        loss_fn=data.loss_fn(),
        X=X,
        y=y,
        dataset=data,
        point=point,
        seed=derive_seed(
            point["seed"],
            point["model"],
            point["train_batch_size"],
            point["step"],
            point["curvature_batch_spec"],
            point["draw"],
        ),
    )
    ctx.cache["options"] = cfg.quantity_options
    ctx.cache["backend"] = cfg.backend
    ctx.cache["train_split"] = data.train
    ctx.cache["test_split"] = data.test
    keys = {k: point[k] for k in KEY_COLUMNS}
    rows: list[dict] = []
    arrays: dict[str, list[dict]] = {}
    notes: list[str] = []
    timing: dict[str, float] = {}
    with _mode(model, cfg.curvature_mode):
        for q in cfg.quantities:
            opt = cfg.quantity_options[q]
            if not matches_where(point, opt.get("where", {}), cfg.grid):
                continue
            t0 = time.perf_counter()
            measured = QUANTITIES[q].fn(ctx, opt)
            seconds = time.perf_counter() - t0
            timing[q] = seconds
            notes += measured.notes
            for r in measured.rows:
                rows.append({**keys, "group": q, **r, "seconds": seconds})
            for name, table in measured.tables.items():
                arrays.setdefault(name, []).extend({**keys, **r} for r in table)
    tables = {
        "measurements": pd.DataFrame(
            rows,
            columns=[
                *KEY_COLUMNS,
                "group",
                "quantity",
                "value",
                "stderr",
                "method",
                "num_matvecs",
                "cost",
                "seconds",
            ],
        )
    }
    for name, table in arrays.items():
        tables[name] = pd.DataFrame(table)
    return tables, {"notes": notes, "seconds_by_quantity": timing}


def _check_resumable(root: Path, fingerprint: str, done: dict[str, dict]) -> None:
    stale = [pid for pid, meta in done.items() if meta.get("fingerprint") != fingerprint]
    if stale:
        raise ConfigError(
            f"{root} holds {len(stale)} finished point(s) made with different settings "
            f"(data, models, training or quantity options changed; e.g. {stale[0]}). Resuming "
            "would mix old and new numbers: pass another --output folder, or delete "
            f"{root / 'points'} to start over. (Adding seeds or batch sizes to the grid is fine.)"
        )


def run_sweep(
    config: SweepConfig | str | Path,
    *,
    output: str | Path | None = None,
    shard: tuple[int, int] | str | None = None,
    progress: bool = True,
    figures: bool = True,
    max_points: int | None = None,
) -> SweepResult:
    """Run (or resume) a sweep; write tables per finished point; then make the figures.

    Args:
        config: a :class:`SweepConfig` or the path of a TOML config.
        output: results folder (default: the config's ``output``, ``results/<name>``).
        shard: ``(i, n)`` or ``"i/n"``: run only share ``i`` of ``n`` of the grid points.
        progress: show a tqdm progress bar (on stderr) with time estimates.
        figures: call :func:`curvkit.experiments.figures.make_figures` at the end.
        max_points: stop after computing this many points (for smoke tests).
    """
    t_start = time.perf_counter()
    cfg = config if isinstance(config, SweepConfig) else load_config(config)
    shard = parse_shard(shard) if shard is None or isinstance(shard, str) else shard
    root = Path(output) if output is not None else cfg.output

    # ---- everything that can fail on the config fails here, before any compute
    data = load_dataset(
        cfg.data["name"],
        seed=cfg.data.get("seed", 0),
        **{k: v for k, v in cfg.data.items() if k not in ("name", "seed")},
    ).to(cfg.torch_dtype)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {cfg.device!r} requested but CUDA is not available")
    for key in ("train_batch_sizes", "curvature_batch_sizes"):
        too_big = [b for b in cfg.grid[key] if b != "full" and b > data.num_train]
        if too_big:
            raise ConfigError(
                f"grid.{key} {too_big} exceed the {data.num_train} training samples of "
                f'{data.name}; use smaller sizes or "full"'
            )
    for spec in cfg.models:  # build each once on the meta level: catches shape problems
        try:
            build_model(spec.name, data.input_shape, data.num_outputs, seed=0, **spec.knobs)
        except ValueError as err:
            raise ConfigError(f"model {spec.label!r} on {data.name}: {err}") from None
    for q in cfg.quantities:
        needs = {
            "trace": "trace",
            "eigenvalues": "eigenvalues",
            "density": "spectral_density",
            "diagonal": "diagonal",
            "row_sum": "row_sum",
            "frobenius": "frobenius_norm",
            "ggn_residual": "GGNOperator",
            "estimator_error": "trace",
            "cost": "GGNOperator",
        }
        import curvkit as ck

        if q in needs and not hasattr(ck, needs[q]):
            raise ConfigError(
                f"quantity {q!r} needs curvkit.{needs[q]}, which this curvkit does not provide"
            )

    points = expand_grid(cfg, data.num_train)
    mine = shard_points(points, shard)
    root.mkdir(parents=True, exist_ok=True)
    if cfg.source is not None:
        shutil.copyfile(cfg.source, root / "config.toml")
    fingerprint = cfg.fingerprint()
    done = finished_points(root)
    _check_resumable(
        root, fingerprint, {k: v for k, v in done.items() if k in {p["point_id"] for p in points}}
    )
    pending = [p for p in mine if p["point_id"] not in done]
    skipped = len(mine) - len(pending)
    if max_points is not None:
        pending = pending[:max_points]

    threads_before = torch.get_num_threads()
    if cfg.threads:
        # Small models gain nothing from intra-op threads, and on a shared, oversubscribed
        # machine OpenMP threads that wait for each other can slow convolutions 30-fold.
        torch.set_num_threads(cfg.threads)
    data = Dataset(
        data.name,
        data.X_train.to(device),
        data.y_train.to(device),
        data.X_test.to(device),
        data.y_test.to(device),
        data.task,
        data.num_outputs,
    )
    specs = {m.label: m for m in cfg.models}
    runs: dict[tuple, list[dict]] = {}
    for p in pending:
        runs.setdefault((p["model"], p["train_batch_size"], p["seed"]), []).append(p)

    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(pending),
        desc=f"sweep {cfg.name}" + (f" [shard {shard[0]}/{shard[1]}]" if shard[1] > 1 else ""),
        unit="pt",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    computed = 0
    try:
        for (label, tbs, seed), pts in runs.items():
            spec = specs[label]
            model = build_model(
                spec.name,
                data.input_shape,
                data.num_outputs,
                seed=derive_seed(seed, "init"),
                dtype=cfg.torch_dtype,
                **spec.knobs,
            ).to(device)
            trainer = _Trainer(model, data, cfg, max(tbs, 1), seed, lr=spec.lr)
            for p in sorted(pts, key=lambda p: p["step"]):
                bar.set_postfix_str(
                    f"{label} tb={tbs} cb={p['curvature_batch_spec']} s={seed} step={p['step']}",
                    refresh=False,
                )
                trainer.train_to(p["step"])
                t0 = time.perf_counter()
                tables, info = measure_point(cfg, model, data, p)
                seconds = time.perf_counter() - t0
                tables["points"] = pd.DataFrame(
                    [
                        {
                            **{k: p[k] for k in KEY_COLUMNS},
                            "dataset": data.name,
                            "task": data.task,
                            "num_params": sum(
                                q.numel() for q in model.parameters() if q.requires_grad
                            ),
                            "num_train": data.num_train,
                            "num_outputs": data.num_outputs,
                            "curvature_mode": cfg.curvature_mode,
                            "dtype": cfg.dtype,
                            "training_loss_last_step": trainer.last_loss,
                            "seconds": seconds,
                        }
                    ]
                )
                meta = {
                    "point": p,
                    "fingerprint": fingerprint,
                    "config": cfg.name,
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "seconds": seconds,
                    **info,
                }
                write_point(root, p["point_id"], tables, meta)
                computed += 1
                bar.update(1)
    finally:
        bar.close()
        torch.set_num_threads(threads_before)

    made: list[Path] = []
    if figures:
        from curvkit.experiments.figures import make_figures

        made = make_figures(root)
    (root / "sweep.json").write_text(
        json.dumps(
            {
                "config": cfg.name,
                "fingerprint": fingerprint,
                "points": len(points),
                "finished": len(finished_points(root)),
            },
            indent=1,
        )
    )
    return SweepResult(
        root, len(points), len(mine), skipped, computed, time.perf_counter() - t_start, made
    )
