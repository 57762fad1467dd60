"""Tidy result tables on disk: Parquet (pyarrow) with a CSV fallback, written atomically.

Layout of a results folder::

    results/<name>/
        config.toml              copy of the config that made it
        points/<point_id>/       one folder per finished grid point (renamed into place
            meta.json            atomically, so a folder that exists is complete)
            points.parquet       one row: the point's keys, sizes, wall time
            measurements.parquet one tidy row per measured number
            eigenvalues.parquet  long-format arrays keyed by the point
            density.parquet
            estimator_error.parquet
        points.parquet, measurements.parquet, ...   all points concatenated (`consolidate`)
        figures/                 PDF + PNG

Every table carries the grid-point keys (``KEY_COLUMNS``), so tables join on them.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pandas as pd

__all__ = [
    "KEY_COLUMNS",
    "TABLES",
    "consolidate",
    "finished_points",
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
TABLES = ("points", "measurements", "eigenvalues", "density", "estimator_error")


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
        return pd.read_csv(csv)
    return None


def write_point(
    root: Path, point_id: str, tables: dict[str, pd.DataFrame], meta: dict, fmt: str | None = None
) -> bool:
    """Write one finished point's tables as ``root/points/<point_id>/`` in one atomic rename.

    Returns ``False`` (and writes nothing) if the point is already there, e.g. written by a
    concurrent shard.
    """
    points_dir = Path(root) / "points"
    points_dir.mkdir(parents=True, exist_ok=True)
    final = points_dir / point_id
    if final.exists():
        return False
    tmp = points_dir / f".tmp-{point_id}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, df in tables.items():
            write_table(df, tmp / name, fmt)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
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


def consolidate(root: Path, fmt: str | None = None) -> dict[str, pd.DataFrame]:
    """Concatenate every finished point's tables into ``root/<table>.parquet`` (atomically)."""
    root = Path(root)
    points_dir = root / "points"
    frames: dict[str, list[pd.DataFrame]] = {t: [] for t in TABLES}
    if points_dir.is_dir():
        for d in sorted(points_dir.iterdir()):
            if d.name.startswith(".") or not (d / "meta.json").exists():
                continue
            for t in TABLES:
                df = read_table(d / t)
                if df is not None and len(df):
                    frames[t].append(df)
    out = {}
    for t, parts in frames.items():
        df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=KEY_COLUMNS)
        write_table(df, root / t, fmt)
        out[t] = df
    return out


def load_tables(root: Path) -> dict[str, pd.DataFrame]:
    """The result tables of a results folder (re-consolidating from ``points/`` if present)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {root} does not exist; run `curvkit sweep` first")
    if (root / "points").is_dir():
        return consolidate(root)
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
