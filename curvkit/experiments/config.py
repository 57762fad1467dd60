"""Sweep configuration: parse a TOML file, validate every name and option before any compute.

The schema (every key optional unless marked; see ``experiments/configs/default.toml``)::

    name = "default"              # output folder results/<name> unless `output` is given
    output = "results/default"    # relative to the current directory
    dtype = "float32"             # "float32" | "float64"
    device = "cpu"
    threads = 0                   # torch.set_num_threads (0: leave torch's default)
    curvature_mode = "eval"       # model mode during curvature: "eval" | "train"
    backend = "auto"              # HessianOperator autodiff backend ("auto": timed choice)

    [data]                        # required
    name = "digits"               # see curvkit.datasets
    seed = 0                      # split/synthetic-data seed, fixed across model seeds
    ...                           # dataset options

    [[models]]                    # required, one table per architecture
    name = "mlp"                  # see curvkit.zoo
    label = "MLP (ReLU)"          # optional, unique; default built from name and knobs
    ...                           # size knobs

    [grid]
    seeds = [0]                   # model init, batch order, curvature batches, estimators
    train_batch_sizes = [32]
    curvature_batch_sizes = [128, "full"]
    checkpoints = [0, 200]        # training steps; 0 = at initialisation
    draws = 1                     # independent curvature batches per grid point

    [training]
    optimizer = "sgd"             # "sgd" | "adam"
    lr = 0.05
    momentum = 0.9
    weight_decay = 0.0

    [quantities]
    measure = ["loss", "trace", ...]   # default: every quantity
    [quantities.<name>]           # options of one quantity, incl. `where`
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from curvkit.datasets import check_dataset_spec
from curvkit.zoo import check_model_spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ConfigError", "SweepConfig", "ModelSpec", "load_config", "parse_config"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
OPTIMIZERS = ("sgd", "adam")
TOP_KEYS = {
    "name",
    "output",
    "dtype",
    "device",
    "threads",
    "curvature_mode",
    "backend",
    "data",
    "models",
    "grid",
    "training",
    "quantities",
}
GRID_DEFAULTS: dict[str, Any] = {
    "seeds": [0],
    "train_batch_sizes": [32],
    "curvature_batch_sizes": [128, "full"],
    "checkpoints": [0, 200],
    "draws": 1,
}
TRAINING_DEFAULTS: dict[str, Any] = {
    "optimizer": "sgd",
    "lr": 0.05,
    "momentum": 0.9,
    "weight_decay": 0.0,
}


class ConfigError(ValueError):
    """A configuration problem, raised before any compute; the message names the fix."""


@dataclass(frozen=True)
class ModelSpec:
    """One architecture of the sweep: zoo name, knobs, and the label used in tables."""

    name: str
    label: str
    knobs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    lr: float | None = None  # overrides training.lr for this architecture


@dataclass
class SweepConfig:
    """A validated sweep configuration (see the module docstring for the schema)."""

    name: str
    output: Path
    dtype: str
    device: str
    threads: int
    curvature_mode: str
    backend: str
    data: dict[str, Any]
    models: list[ModelSpec]
    grid: dict[str, Any]
    training: dict[str, Any]
    quantities: list[str]
    quantity_options: dict[str, dict[str, Any]]
    source: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def fingerprint(self) -> str:
        """Hash of everything that changes a point's numbers, except the grid itself.

        Finished points are reused on a rerun only when this matches, so adding seeds or
        batch sizes resumes, while changing the data, training or quantity settings does not
        silently mix old and new numbers.
        """
        payload = {
            "dtype": self.dtype,
            "curvature_mode": self.curvature_mode,
            "data": self.data,
            "models": [(m.name, m.label, m.knobs, m.lr) for m in self.models],
            "training": self.training,
            "quantities": self.quantities,
            "quantity_options": self.quantity_options,
        }
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fail(msg: str, source: Path | None) -> ConfigError:
    where = f"{source}: " if source else ""
    return ConfigError(where + msg)


def _check_keys(table: dict, allowed: set[str], section: str, source: Path | None) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise _fail(
            f"unknown key(s) {unknown} in [{section}]; allowed keys are {sorted(allowed)}", source
        )


def _int_list(value: Any, key: str, source: Path | None, allow_full: bool = False) -> list:
    if not isinstance(value, list) or not value:
        raise _fail(f"grid.{key} must be a non-empty list, got {value!r}", source)
    out = []
    for v in value:
        if allow_full and v == "full":
            out.append("full")
        elif isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            out.append(v)
        else:
            hint = ' or "full"' if allow_full else ""
            raise _fail(
                f"grid.{key} entries must be non-negative integers{hint}, got {v!r}", source
            )
    if len(set(map(str, out))) != len(out):
        raise _fail(f"grid.{key} lists a value twice: {value}", source)
    return out


def _check_dataset_option_types(name: str, options: dict[str, Any]) -> None:
    """Each dataset option must have the type of the dataset function's default."""
    import inspect

    from curvkit.datasets import DATASETS

    params = inspect.signature(DATASETS[name]).parameters
    for key, value in options.items():
        param = params[key]
        default = param.default
        if isinstance(default, bool):
            ok, what = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            what = "a number"
        elif isinstance(default, str) or (default is None and "str" in str(param.annotation)):
            ok, what = isinstance(value, str), "a string"
        else:
            continue
        if not ok:
            raise ValueError(f"dataset {name!r}: option {key} must be {what}, got {value!r}")


def _model_label(name: str, knobs: dict[str, Any]) -> str:
    if not knobs:
        return name
    return name + "(" + ",".join(f"{k}={v}" for k, v in sorted(knobs.items())) + ")"


def parse_config(raw: dict[str, Any], source: Path | None = None) -> SweepConfig:
    """Validate a config dictionary (as read from TOML); raise :class:`ConfigError`.

    Checks every model, dataset and quantity name and option without building or loading
    anything expensive.
    """
    from curvkit.experiments.quantities import QUANTITIES, check_quantity_options

    raw = copy.deepcopy(raw)
    _check_keys(raw, TOP_KEYS, "top level", source)
    name = raw.get("name") or (source.stem if source else "sweep")
    if not isinstance(name, str) or not name or "/" in name:
        raise _fail(f"name must be a non-empty string without '/', got {name!r}", source)
    output = Path(raw.get("output", f"results/{name}"))
    dtype = raw.get("dtype", "float32")
    if dtype not in DTYPES:
        raise _fail(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}", source)
    device = str(raw.get("device", "cpu"))
    try:
        torch.device(device)
    except RuntimeError as err:
        raise _fail(f"invalid device {device!r}: {err}", source) from None
    threads = raw.get("threads", 0)
    if not isinstance(threads, int) or threads < 0:
        raise _fail(f"threads must be a non-negative integer, got {threads!r}", source)
    mode = raw.get("curvature_mode", "eval")
    if mode not in ("eval", "train"):
        raise _fail(
            f"curvature_mode must be 'eval' or 'train', got {mode!r} (train: BatchNorm uses "
            "batch statistics, which couples the samples of the curvature batch)",
            source,
        )

    backend = raw.get("backend", "auto")
    from curvkit.operators.hessian import HESSIAN_BACKENDS

    if backend != "auto" and backend not in HESSIAN_BACKENDS:
        raise _fail(
            f"backend must be 'auto' or one of {list(HESSIAN_BACKENDS)}, got {backend!r}", source
        )

    # ---------------------------------------------------------------- data
    data = raw.get("data")
    if not isinstance(data, dict) or "name" not in data:
        raise _fail('a [data] table with a `name` is required, e.g. name = "digits"', source)
    data = dict(data)
    try:
        options = {k: v for k, v in data.items() if k not in ("name", "seed")}
        check_dataset_spec(data["name"], options)
        _check_dataset_option_types(data["name"], options)
    except ValueError as err:
        raise _fail(f"[data]: {err}", source) from None
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise _fail(f"data.seed must be a non-negative integer, got {seed!r}", source)

    # ---------------------------------------------------------------- models
    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise _fail('at least one [[models]] table is required, e.g. name = "mlp"', source)
    models = []
    for i, m in enumerate(models_raw):
        if not isinstance(m, dict) or "name" not in m:
            raise _fail(f"[[models]] entry {i} needs a `name`", source)
        knobs = {k: v for k, v in m.items() if k not in ("name", "label", "lr")}
        try:
            check_model_spec(m["name"], knobs)
        except ValueError as err:
            raise _fail(f"[[models]] entry {i}: {err}", source) from None
        lr = m.get("lr")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0):
            raise _fail(f"[[models]] entry {i}: lr must be a positive number, got {lr!r}", source)
        label = m.get("label") or _model_label(m["name"], knobs)
        models.append(ModelSpec(m["name"], str(label), knobs, None if lr is None else float(lr)))
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise _fail(f"model labels must be unique, got {labels}; set `label` per model", source)

    # ---------------------------------------------------------------- grid
    grid = dict(GRID_DEFAULTS)
    grid_raw = raw.get("grid", {})
    _check_keys(grid_raw, set(GRID_DEFAULTS), "grid", source)
    grid.update(grid_raw)
    grid["seeds"] = _int_list(grid["seeds"], "seeds", source)
    grid["train_batch_sizes"] = _int_list(grid["train_batch_sizes"], "train_batch_sizes", source)
    grid["curvature_batch_sizes"] = _int_list(
        grid["curvature_batch_sizes"], "curvature_batch_sizes", source, allow_full=True
    )
    grid["checkpoints"] = sorted(_int_list(grid["checkpoints"], "checkpoints", source))
    for key in ("train_batch_sizes", "curvature_batch_sizes"):
        if 0 in grid[key]:
            raise _fail(f"grid.{key} entries must be positive", source)
    draws = grid["draws"]
    if not isinstance(draws, int) or draws < 1:
        raise _fail(f"grid.draws must be a positive integer, got {draws!r}", source)

    # ---------------------------------------------------------------- training
    training = dict(TRAINING_DEFAULTS)
    tr_raw = raw.get("training", {})
    _check_keys(tr_raw, set(TRAINING_DEFAULTS), "training", source)
    training.update(tr_raw)
    if training["optimizer"] not in OPTIMIZERS:
        raise _fail(
            f"training.optimizer must be one of {list(OPTIMIZERS)}, got {training['optimizer']!r}",
            source,
        )
    for key in ("lr", "momentum", "weight_decay"):
        v = training[key]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise _fail(f"training.{key} must be a non-negative number, got {v!r}", source)
    if training["lr"] == 0 and any(c > 0 for c in grid["checkpoints"]):
        raise _fail("training.lr is 0, so every checkpoint equals the initialisation", source)

    # ---------------------------------------------------------------- quantities
    q_raw = dict(raw.get("quantities", {}))
    measure = q_raw.pop("measure", list(QUANTITIES))
    if not isinstance(measure, list) or not measure:
        raise _fail("quantities.measure must be a non-empty list of quantity names", source)
    unknown = [q for q in measure if q not in QUANTITIES]
    if unknown:
        raise _fail(
            f"unknown quantity(ies) {unknown}; available quantities: {', '.join(QUANTITIES)}",
            source,
        )
    for q in q_raw:
        if q not in QUANTITIES:
            raise _fail(
                f"[quantities.{q}]: unknown quantity {q!r}; available: {', '.join(QUANTITIES)}",
                source,
            )
    options = {}
    architectures = list(dict.fromkeys(m.name for m in models))
    for q in QUANTITIES:
        try:
            options[q] = check_quantity_options(
                q, q_raw.get(q, {}), grid, labels, architectures, measured=q in measure
            )
        except ValueError as err:
            raise _fail(f"[quantities.{q}]: {err}", source) from None
    # keep the registry's order, whatever order the config lists them in
    quantities = [q for q in QUANTITIES if q in measure]

    return SweepConfig(
        name=name,
        output=output,
        dtype=dtype,
        device=device,
        threads=threads,
        curvature_mode=mode,
        backend=backend,
        data=data,
        models=models,
        grid=grid,
        training=training,
        quantities=quantities,
        quantity_options={q: options[q] for q in quantities},
        source=source,
        raw=raw,
    )


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(items) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_table(table: dict[str, Any], path: tuple[str, ...]) -> list[str]:
    lines: list[str] = []
    tables, arrays = [], []
    for key, value in table.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in tables:
        header = ".".join(_toml_key(k) for k in (*path, key))
        lines += ["", f"[{header}]", *_toml_table(value, (*path, key))]
    for key, items in arrays:
        header = ".".join(_toml_key(k) for k in (*path, key))
        for item in items:  # nested tables of an array item are written inline
            lines += ["", f"[[{header}]]"]
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in item.items()]
    return lines


def config_toml(cfg: SweepConfig) -> str | None:
    """The config as TOML text that reads back to the same settings (``None`` if it can't).

    Used to record a config given as a dictionary in its results folder's ``config.toml``.
    """
    raw = dict(cfg.raw, name=cfg.name)
    try:
        text = "\n".join(_toml_table(raw, ())).strip() + "\n"
        back = tomllib.loads(text)
    except (TypeError, ValueError):
        return None
    return text if back == raw else None


def load_config(path: str | Path) -> SweepConfig:
    """Read and validate a TOML sweep config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    return parse_config(raw, path)
