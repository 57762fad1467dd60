"""Sweep runner: config validation, resume after a crash or kill, sharding, determinism."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from curvkit.cli import main as cli_main
from curvkit.experiments import ConfigError, expand_grid, parse_config, run_sweep, shard_points
from curvkit.experiments import quantities as Q
from curvkit.experiments.config import load_config
from curvkit.experiments.tables import finished_points, load_tables

REPO = Path(__file__).resolve().parent.parent


def tiny(**over) -> dict:
    cfg = {
        "name": "tiny",
        "dtype": "float64",
        "threads": 1,
        "data": {"name": "teacher-student-classification", "num_samples": 96, "dim": 6},
        "models": [{"name": "mlp", "width": 4, "depth": 1, "label": "mlp"}],
        "grid": {
            "seeds": [0, 1],
            "train_batch_sizes": [8, 16],
            "curvature_batch_sizes": [8, "full"],
            "checkpoints": [0, 5],
        },
        "quantities": {"measure": ["loss", "accuracy"]},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def values(root: Path) -> pd.DataFrame:
    m = load_tables(root)["measurements"]
    return m.drop(columns=["seconds"]).sort_values(["point_id", "quantity"]).reset_index(drop=True)


# ---------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    "over,match",
    [
        ({"models": [{"name": "vgg"}]}, "unknown model 'vgg'"),
        ({"models": [{"name": "mlp", "wdth": 3}]}, "no knob"),
        ({"data": {"name": "imagenet"}}, "unknown dataset 'imagenet'"),
        ({"data": {"name": "digits", "num_samples": 3}}, "no option"),
        ({"quantities": {"measure": ["trace", "curvature_vibes"]}}, "unknown quantity"),
        ({"quantities": {"trace": {"num_matvec": 3}}}, "unknown option"),
        ({"quantities": {"density": {"where": {"colour": 1}}}}, "unknown grid key"),
        ({"grid": {"seeds": []}}, "non-empty list"),
        ({"grid": {"curvature_batch_sizes": ["all"]}}, '"full"'),
        ({"grid": {"batch": [1]}}, "unknown key"),
        ({"training": {"optimizer": "lion"}}, "optimizer"),
        ({"dtype": "float16"}, "dtype"),
        ({"colour": "red"}, "unknown key"),
        ({"models": [{"name": "mlp"}, {"name": "mlp"}]}, "unique"),
        ({"models": [{"name": "mlp", "lr": -0.1}]}, "lr must be a positive number"),
    ],
)
def test_config_errors_before_compute(over, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(tiny(**over))


def test_config_errors_that_need_the_data(tmp_path):
    with pytest.raises(ConfigError, match="exceed"):
        run_sweep(parse_config(tiny(grid={"curvature_batch_sizes": [500]})), output=tmp_path)
    with pytest.raises(ConfigError, match="image inputs"):
        run_sweep(parse_config(tiny(models=[{"name": "cnn"}])), output=tmp_path)
    assert not (tmp_path / "points").exists()


def test_per_model_learning_rate(tmp_path):
    """A model's own lr overrides training.lr; lr=0 there leaves that model untrained."""
    models = [
        {"name": "mlp", "width": 4, "depth": 1, "label": "frozen", "lr": 1e-300},
        {"name": "mlp", "width": 4, "depth": 1, "label": "trained"},
    ]
    cfg = parse_config(tiny(models=models, training={"lr": 0.5}))
    assert [m.lr for m in cfg.models] == [1e-300, None]
    assert cfg.fingerprint() != parse_config(tiny(models=models[1:])).fingerprint()
    run_sweep(cfg, output=tmp_path, progress=False, figures=False)
    m = values(tmp_path)
    loss = m[m.quantity == "loss_train"].set_index(
        ["model", "step", "seed", "train_batch_size", "curvature_batch_size"]
    )["value"]
    frozen = loss.xs("frozen")
    trained = loss.xs("trained")
    at_init = frozen.xs(0, level="step").mean()
    assert frozen.xs(5, level="step").mean() == pytest.approx(at_init, rel=1e-9)
    assert trained.xs(5, level="step").mean() != pytest.approx(
        trained.xs(0, level="step").mean(), rel=1e-6
    )


def test_shipped_configs_are_valid():
    for name in ("default", "paper", "paper-large"):
        cfg = load_config(REPO / "experiments" / "configs" / f"{name}.toml")
        assert cfg.name == name and cfg.models


def test_cli_reports_config_error(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\nname = "digits"\n[[models]]\nname = "vgg"\n')
    assert cli_main(["sweep", str(bad)]) == 2
    assert "unknown model 'vgg'" in capsys.readouterr().err


# ---------------------------------------------------------------------- grid
def test_grid_and_shards():
    cfg = parse_config(tiny())
    points = expand_grid(cfg, num_train=72)
    # step 0 once per seed (training batch size irrelevant), step 5 per training batch size
    assert len(points) == 2 * 2 + 2 * 2 * 2
    assert {p["train_batch_size"] for p in points if p["step"] == 0} == {0}
    shards = [shard_points(points, (i, 3)) for i in range(3)]
    ids = [p["point_id"] for s in shards for p in s]
    assert sorted(ids) == sorted(p["point_id"] for p in points) and len(set(ids)) == len(ids)


# ---------------------------------------------------------------------- resume, shards
def test_resume_after_crash_recomputes_nothing(tmp_path, monkeypatch):
    cfg = parse_config(tiny())
    calls = {"n": 0}
    original = Q.QUANTITIES["loss"]

    def crashing(ctx, opt):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt("simulated kill")
        return original.fn(ctx, opt)

    monkeypatch.setitem(Q.QUANTITIES, "loss", Q.QuantitySpec(crashing, {}, "crash"))
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, output=tmp_path, progress=False, figures=False)
    done = finished_points(tmp_path)
    assert len(done) == 5
    assert not [p for p in (tmp_path / "points").iterdir() if p.name.startswith(".")]
    stamps = {pid: (tmp_path / "points" / pid / "meta.json").stat().st_mtime_ns for pid in done}

    monkeypatch.setitem(Q.QUANTITIES, "loss", original)
    result = run_sweep(cfg, output=tmp_path, progress=False, figures=False)
    assert (result.skipped, result.computed, result.total_points) == (5, 7, 12)
    for pid, stamp in stamps.items():
        assert (tmp_path / "points" / pid / "meta.json").stat().st_mtime_ns == stamp
    again = run_sweep(cfg, output=tmp_path, progress=False, figures=False)
    assert again.computed == 0 and again.skipped == 12

    # the resumed run equals an uninterrupted one
    fresh = tmp_path / "fresh"
    run_sweep(cfg, output=fresh, progress=False, figures=False)
    pd.testing.assert_frame_equal(values(tmp_path), values(fresh))


def test_shards_union_equals_full_grid(tmp_path):
    cfg = parse_config(tiny())
    for i in range(3):
        r = run_sweep(
            cfg, output=tmp_path / "sharded", shard=f"{i}/3", progress=False, figures=False
        )
        assert r.shard_points == 4
    run_sweep(cfg, output=tmp_path / "whole", progress=False, figures=False)
    pd.testing.assert_frame_equal(values(tmp_path / "sharded"), values(tmp_path / "whole"))
    assert len(finished_points(tmp_path / "sharded")) == 12
    with pytest.raises(ConfigError, match="shard"):
        run_sweep(cfg, output=tmp_path / "x", shard="3/3")


def test_changed_settings_refuse_to_mix(tmp_path):
    run_sweep(parse_config(tiny()), output=tmp_path, progress=False, figures=False, max_points=2)
    with pytest.raises(ConfigError, match="different settings"):
        run_sweep(parse_config(tiny(training={"lr": 0.01})), output=tmp_path, progress=False)
    # growing the grid is fine
    r = run_sweep(
        parse_config(tiny(grid={"seeds": [0, 1, 2]})),
        output=tmp_path,
        progress=False,
        figures=False,
    )
    assert r.skipped == 2 and r.total_points == 18


def test_killed_subprocess_resumes(tmp_path):
    cfg_path = tmp_path / "cfg.toml"
    cfg_path.write_text(
        'name = "killme"\ndtype = "float64"\n'
        '[data]\nname = "teacher-student-classification"\nnum_samples = 96\ndim = 6\n'
        '[[models]]\nname = "mlp"\nwidth = 4\nlabel = "mlp"\n'
        "[grid]\nseeds = [0, 1, 2, 3]\ntrain_batch_sizes = [8, 16]\n"
        'curvature_batch_sizes = [8, 16, "full"]\ncheckpoints = [0, 5]\n'
        '[quantities]\nmeasure = ["loss", "accuracy"]\n'
    )
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "curvkit.cli",
        "sweep",
        str(cfg_path),
        "-o",
        str(out),
        "--no-figures",
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(finished_points(out)) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = finished_points(out)
    assert 3 <= len(before) < 36, "the kill should land mid-sweep"
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = finished_points(out)
    assert len(after) == 36
    assert all(after[pid]["finished"] == meta["finished"] for pid, meta in before.items())
    assert load_tables(out)["measurements"]["point_id"].nunique() == 36
