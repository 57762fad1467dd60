"""Tidy result tables on disk: Parquet (pyarrow) with a CSV fallback, written atomically.

Layout of a results folder::

    results/<name>/
        config.toml              the config of the last sweep run here (its grid is what
                                 `load_tables` consolidates)
        sweep.json               summary of the last sweep: points, finished, left out
        points/<point_id>/       one folder per finished grid point (renamed into place
            meta.json            atomically, so a folder that exists is complete)
            points.parquet       one row: the point's keys, sizes, wall time
            measurements.parquet one tidy row per measured number
            eigenvalues.parquet  long-format arrays keyed by the point
            density.parquet
            estimator_error.parquet
        points/.superseded/      earlier results of points measured again (never read)
        points.parquet, measurements.parquet, ...   the grid's points concatenated
                                 (`consolidate`)
        figures/                 PDF + PNG

Every table carries the grid-point keys (``KEY_COLUMNS``), so tables join on them.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from collections.abc import Collection, Mapping
from pathlib import Path

import pandas as pd

__all__ = [
    "KEY_COLUMNS",
    "TABLES",
    "consolidate",
    "finished_points",
    "folder_selection",
    "load_tables",
    "read_table",
    "write_point",
    "write_table",
]

KEY_COLUMNS = [
    "point_id",
    "model",
    "architecture",
    "train_batch_size",
    "curvature_batch_size",
    "curvature_batch_spec",
    "full_batch",
    "seed",
    "step",
    "draw",
]
#: Folder under ``points/`` that keeps a point's earlier result when it is remeasured.
SUPERSEDED = ".superseded"
TABLES = ("points", "measurements", "eigenvalues", "density", "estimator_error")
#: Columns that hold text in every table (read back as text from CSV too).
TEXT_COLUMNS = ("point_id", "model", "architecture", "curvature_batch_spec")
#: The quantity whose rows an array table holds (``measurements`` rows carry a ``group``).
TABLE_QUANTITY = {t: t for t in ("eigenvalues", "density", "estimator_error")}


def _parquet_available() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def write_table(df: pd.DataFrame, stem: Path, fmt: str | None = None) -> Path:
    """Write ``df`` to ``stem.parquet`` (or ``stem.csv`` without pyarrow) atomically.

    The file is written under a temporary name in the same folder and renamed into place,
    so readers never see a half-written table.
    """
    stem = Path(stem)
    fmt = fmt or ("parquet" if _parquet_available() else "csv")
    path = stem.with_suffix("." + fmt)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    if fmt == "parquet":
        df.to_parquet(tmp, index=False)
    else:
        df.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def read_table(stem: Path) -> pd.DataFrame | None:
    """Read ``stem.parquet`` or ``stem.csv``; ``None`` if neither exists."""
    stem = Path(stem)
    pq, csv = stem.with_suffix(".parquet"), stem.with_suffix(".csv")
    if pq.exists():
        return pd.read_parquet(pq)
    if csv.exists():
        # text columns stay text: a batch spec "8" or a label "1" must not turn into a number
        return pd.read_csv(
            csv,
            dtype=dict.fromkeys(TEXT_COLUMNS, str),
            keep_default_na=False,  # "NA" or "nan" as a model label stays text
            na_values=[""],  # what to_csv writes for a missing number
        )
    return None


def write_point(
    root: Path,
    point_id: str,
    tables: dict[str, pd.DataFrame],
    meta: dict,
    fmt: str | None = None,
    replace: bool = False,
) -> bool:
    """Write one finished point's tables as ``root/points/<point_id>/`` in one atomic rename.

    Returns ``False`` (and writes nothing) if the point is already there, e.g. written by a
    concurrent shard. With ``replace``, an existing folder is moved (never deleted) to
    ``root/points/.superseded/`` first; readers skip that folder.
    """
    points_dir = Path(root) / "points"
    points_dir.mkdir(parents=True, exist_ok=True)
    final = points_dir / point_id
    if final.exists() and not replace:
        return False
    tmp = points_dir / f".tmp-{point_id}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, df in tables.items():
            write_table(df, tmp / name, fmt)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        if replace and final.exists():
            aside = points_dir / SUPERSEDED / f"{point_id}-{uuid.uuid4().hex[:8]}"
            aside.parent.mkdir(exist_ok=True)
            os.rename(final, aside)
        try:
            os.rename(tmp, final)
        except OSError:
            if final.exists():  # lost a race with another shard: theirs is complete
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def finished_points(root: Path) -> dict[str, dict]:
    """``{point_id: meta}`` of every finished point under ``root/points``."""
    points_dir = Path(root) / "points"
    out: dict[str, dict] = {}
    if not points_dir.is_dir():
        return out
    for d in points_dir.iterdir():
        if d.name.startswith(".") or not d.is_dir():
            continue
        meta = d / "meta.json"
        if meta.exists():
            out[d.name] = json.loads(meta.read_text())
    return out


def _keep_rows(df: pd.DataFrame, table: str, quantities: Collection[str] | None) -> pd.DataFrame:
    """The rows of one point's ``table`` made by ``quantities`` (all rows for ``None``)."""
    if quantities is None:
        return df
    if table == "measurements" and "group" in df:
        return df[df["group"].isin(list(quantities))]
    if table in TABLE_QUANTITY and TABLE_QUANTITY[table] not in quantities:
        return df.iloc[:0]
    return df


def consolidate(
    root: Path,
    fmt: str | None = None,
    select: Mapping[str, Collection[str] | None] | None = None,
) -> dict[str, pd.DataFrame]:
    """Concatenate finished points' tables into ``root/<table>.parquet`` (atomically).

    Args:
        root: the results folder.
        fmt: ``"parquet"`` or ``"csv"`` (default: Parquet when pyarrow is installed).
        select: ``{point_id: quantities}``: only these points, and of each only the rows the
            listed quantities made (``None``: all its rows); finished points not in
            ``select`` are left out, with a warning, and stay on disk. ``None``: every
            finished point, every row.
    """
    root = Path(root)
    points_dir = root / "points"
    frames: dict[str, list[pd.DataFrame]] = {t: [] for t in TABLES}
    left_out = []
    if points_dir.is_dir():
        for d in sorted(points_dir.iterdir()):
            if d.name.startswith(".") or not (d / "meta.json").exists():
                continue
            if select is not None and d.name not in select:
                left_out.append(d.name)
                continue
            quantities = None if select is None else select[d.name]
            for t in TABLES:
                df = read_table(d / t)
                if df is not None and len(df):
                    df = _keep_rows(df, t, quantities)
                if df is not None and len(df):
                    frames[t].append(df)
    if left_out:
        warnings.warn(
            f"{len(left_out)} finished point(s) under {points_dir} are not in the current grid "
            f"(e.g. {left_out[0]}) and are left out of the tables and figures; their folders "
            "are kept",
            stacklevel=2,
        )
    out = {}
    for t, parts in frames.items():
        df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=KEY_COLUMNS)
        write_table(df, root / t, fmt)
        out[t] = df
    return out


def folder_selection(root: Path) -> dict[str, list[str]] | None:
    """The current grid of a results folder, from its ``config.toml`` (see ``consolidate``).

    ``None`` (every finished point counts) when the folder has no readable config.
    """
    path = Path(root) / "config.toml"
    if not path.is_file():
        return None
    from curvkit.experiments.config import ConfigError, load_config
    from curvkit.experiments.runner import grid_selection

    try:
        return grid_selection(load_config(path))
    except ConfigError as err:
        warnings.warn(
            f"{path} is not a valid config ({err}); using every finished point", stacklevel=2
        )
        return None


def load_tables(root: Path, *, all_points: bool = False) -> dict[str, pd.DataFrame]:
    """The result tables of a results folder (re-consolidating from ``points/`` if present).

    The tables hold the grid of the folder's ``config.toml`` (the config of the last sweep
    run there); with ``all_points``, or without a config, every finished point.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {root} does not exist; run `curvkit sweep` first")
    if (root / "points").is_dir():
        return consolidate(root, select=None if all_points else folder_selection(root))
    out = {}
    for t in TABLES:
        df = read_table(root / t)
        if df is not None:
            out[t] = df
    if "measurements" not in out:
        raise FileNotFoundError(
            f"{root} holds no curvkit result tables (measurements.parquet/.csv or points/)"
        )
    return out
