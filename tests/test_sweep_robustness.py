"""Sweep robustness: stale grid points, `where` across grid changes, validation, failures."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

import curvkit.experiments.runner as runner
from curvkit.cli import main as cli_main
from curvkit.experiments import ConfigError, parse_config, run_sweep
from curvkit.experiments import tables as T
from curvkit.experiments.config import config_toml
from curvkit.experiments.figures import FIGURES, make_figures
from curvkit.experiments.tables import KEY_COLUMNS, finished_points, load_tables, read_table
from tests.test_sweep import tiny, values

QUIET = {"progress": False, "figures": False}


def _toml(path, **over):
    """``tiny(**over)`` as a TOML file."""
    path.write_text(config_toml(parse_config(tiny(**over))))
    return path


# ---------------------------------------------------------------------- grid changes
def test_tables_hold_only_the_current_grid(tmp_path):
    """Points of seeds no longer in the config stay on disk but leave the tables."""
    out = tmp_path / "out"
    run_sweep(parse_config(tiny()), output=out, **QUIET)
    assert len(finished_points(out)) == 12
    smaller = parse_config(tiny(grid={"seeds": [1]}))
    with pytest.warns(UserWarning, match="6 finished point"):
        result = run_sweep(smaller, output=out, **QUIET)
    assert (result.computed, result.left_out) == (0, 6)
    summary = json.loads((out / "sweep.json").read_text())
    assert (summary["points"], summary["finished"], summary["left_out"]) == (6, 6, 6)
    assert len(finished_points(out)) == 12, "finished results are never deleted"
    # the consolidated files, and a later load (grid from the folder's config.toml)
    assert set(read_table(out / "measurements")["seed"]) == {1}
    with pytest.warns(UserWarning, match="not in the current grid"):
        assert set(load_tables(out)["points"]["seed"]) == {1}
        run_sweep(smaller, output=tmp_path / "fresh", **QUIET)
        pd.testing.assert_frame_equal(values(out), values(tmp_path / "fresh"))
    assert set(load_tables(out, all_points=True)["points"]["seed"]) == {0, 1}


def _ee(checkpoints: list[int]) -> dict:
    return tiny(
        grid={"seeds": [0], "train_batch_sizes": [8], "checkpoints": checkpoints},
        quantities={
            "measure": ["loss", "estimator_error"],
            "estimator_error": {"methods": ["hutchinson"], "budgets": [4], "repeats": 1},
        },
    )


def _ee_tables(root) -> tuple[pd.DataFrame, pd.DataFrame]:
    t = load_tables(root)
    e = t["estimator_error"].sort_values(["point_id", "budget"]).reset_index(drop=True)
    return values(root), e


@pytest.mark.parametrize(
    "first,then", [([0, 5], [0, 5, 10]), ([0, 5, 10], [0, 5])], ids=["extend", "shrink"]
)
def test_where_last_follows_the_grid_like_a_fresh_run(tmp_path, first, then):
    """step = "last" resolves against the current grid, whatever ran in the folder before."""
    out = tmp_path / "out"
    run_sweep(parse_config(_ee(first)), output=out, **QUIET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # points outside the grid / measured again
        run_sweep(parse_config(_ee(then)), output=out, **QUIET)
        resumed = _ee_tables(out)
    run_sweep(parse_config(_ee(then)), output=tmp_path / "fresh", **QUIET)
    fresh = _ee_tables(tmp_path / "fresh")
    assert set(fresh[1]["step"]) == {then[-1]}
    for a, b in zip(resumed, fresh):
        pd.testing.assert_frame_equal(a, b)
    if then[-1] < first[-1]:  # the remeasured points' first results are kept aside
        assert len(list((out / "points" / T.SUPERSEDED).iterdir())) == 1


def test_refused_resume_keeps_the_folders_config(tmp_path):
    out = tmp_path / "out"
    args = ["-o", str(out), "--no-figures", "--no-progress", "--max-points", "2"]
    assert cli_main(["sweep", str(_toml(tmp_path / "a.toml")), *args]) == 0
    before = (out / "config.toml").read_text()
    other = _toml(tmp_path / "b.toml", training={"lr": 0.01})
    with pytest.raises(ConfigError, match="different settings"):
        run_sweep(other, output=out, **QUIET)
    assert cli_main(["sweep", str(other), "-o", str(out), "--check"]) == 2
    assert (out / "config.toml").read_text() == before


def test_tables_are_consolidated_without_figures(tmp_path):
    run_sweep(parse_config(tiny()), output=tmp_path, max_points=3, **QUIET)
    assert read_table(tmp_path / "measurements")["point_id"].nunique() == 3
    run_sweep(parse_config(tiny()), output=tmp_path, **QUIET)
    assert read_table(tmp_path / "points")["point_id"].nunique() == 12
    assert not (tmp_path / "figures").exists()


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "quantities,match",
    [
        ({"trace": {"method": "hutch+"}}, "unknown method 'hutch\\+'.*hutch\\+\\+"),
        ({"diagonal": {"methods": ["xdaig"]}}, "unknown method 'xdaig'.*xdiag"),
        ({"estimator_error": {"methods": ["hutchinsn"]}}, "'hutchinsn'.*hutchinson"),
        ({"estimator_error": {"budgets": [0]}}, "positive integers"),
        ({"trace": {"where": {"step": "lst"}}}, "where.step = 'lst'.*'last'"),
        ({"trace": {"where": {"curvature_batch_size": 64}}}, "= 64 is not in the grid.*full"),
        ({"trace": {"where": {"seed": [0, 7]}}}, "where.seed = 7"),
        ({"trace": {"where": {"architecture": "cnn"}}}, "'cnn'.*'mlp'"),
        ({"trace": {"where": {"draw": 1}}}, "where.draw = 1"),
    ],
)
def test_quantity_option_values_are_checked(quantities, match, tmp_path, capsys):
    raw = tiny(quantities={"measure": ["trace", "diagonal", "estimator_error"], **quantities})
    with pytest.raises(ConfigError, match=match):
        parse_config(raw)


def test_default_where_outside_the_grid_is_reported():
    raw = tiny(grid={"curvature_batch_sizes": [8]})
    parse_config(raw)  # estimator_error is not measured: its default `where` is not checked
    raw["quantities"] = {"measure": ["estimator_error"]}
    with pytest.raises(ConfigError, match="default `where`"):
        parse_config(raw)
    raw["quantities"]["estimator_error"] = {"where": {"step": "last", "seed": "first"}}
    assert parse_config(raw).quantity_options["estimator_error"]["where"]["seed"] == "first"


def test_dataset_option_values_are_config_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="dim must be an integer, got 'six'"):
        parse_config(tiny(data={"dim": "six"}))
    with pytest.raises(ConfigError, match="data.seed"):
        parse_config(tiny(data={"seed": "x"}))
    # a value of the right type the dataset refuses: still a ConfigError, before any compute
    with pytest.raises(ConfigError, match="test_fraction"):
        run_sweep(parse_config(tiny(data={"test_fraction": 2.0})), output=tmp_path, **QUIET)
    assert not tmp_path.joinpath("points").exists()


def test_check_runs_every_check_of_a_sweep(tmp_path, capsys):
    cfg = _toml(tmp_path / "big.toml", grid={"curvature_batch_sizes": [500]})
    assert cli_main(["sweep", str(cfg), "--check", "-o", str(tmp_path / "o")]) == 2
    assert "exceed the 72 training samples" in capsys.readouterr().err
    ok = _toml(tmp_path / "ok.toml")
    assert cli_main(["sweep", str(ok), "--check", "-o", str(tmp_path / "o")]) == 0
    assert "12 grid points" in capsys.readouterr().out
    assert not (tmp_path / "o").exists(), "--check writes nothing"


def test_negative_max_points_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match="max-points"):
        run_sweep(parse_config(tiny()), output=tmp_path, max_points=-1, **QUIET)
    with pytest.raises(SystemExit) as exc:
        cli_main(["sweep", str(_toml(tmp_path / "a.toml")), "--max-points", "-1"])
    assert exc.value.code == 2 and "non-negative" in capsys.readouterr().err
    assert not (tmp_path / "points").exists()


def test_ctrl_c_in_the_cli(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_sweep", interrupted)
    assert cli_main(["sweep", str(_toml(tmp_path / "a.toml")), "-o", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted; finished points are kept" in err and "Traceback" not in err


def test_csv_tables_keep_the_batch_spec_as_text(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "_parquet_available", lambda: False)
    run_sweep(parse_config(tiny()), output=tmp_path, **QUIET)
    assert (tmp_path / "measurements.csv").exists()
    spec = load_tables(tmp_path)["measurements"]["curvature_batch_spec"]
    assert {type(v) for v in spec} == {str} and set(spec) == {"8", "full"}


# ---------------------------------------------------------------------- figures
TRACED = tiny(
    grid={"seeds": [0], "train_batch_sizes": [8]},
    quantities={"measure": ["loss", "trace"], "trace": {"num_matvecs": 4}},
)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """A tiny finished sweep with traces (figure b has data)."""
    out = tmp_path_factory.mktemp("traced")
    run_sweep(parse_config(TRACED), output=out, **QUIET)
    return out


def test_non_finite_values_and_failing_figures_spare_the_others(traced, tmp_path, monkeypatch):
    tables = load_tables(traced)
    m = tables["measurements"]
    m.loc[(m["quantity"] == "trace") & (m["point_id"] == m["point_id"].iloc[0]), "value"] = np.inf
    full = tables["points"][tables["points"]["curvature_batch_spec"] == "full"]
    tables["density"] = pd.concat(  # all-NaN curves once made figure (a) abort every figure
        [full[KEY_COLUMNS].assign(grid=g, density=np.nan) for g in (-1.0, 0.0, 1.0)]
    )

    def broken(tables):
        raise RuntimeError("boom")

    monkeypatch.setitem(FIGURES, "a0_broken", broken)
    with pytest.warns(UserWarning) as record:
        written = make_figures(traced, out=tmp_path, formats=("png",), tables=tables)
    messages = " ".join(str(w.message) for w in record)
    assert "row(s) of measurements hold non-finite" in messages
    assert "row(s) of density hold non-finite" in messages
    assert "a0_broken failed" in messages
    assert [p.stem for p in written] == ["b_vs_curvature_batch"]

    # the end of a sweep survives a failing figure: sweep.json is written
    with pytest.warns(UserWarning, match="a0_broken failed"):
        result = run_sweep(parse_config(TRACED), output=tmp_path / "s", progress=False)
    assert (tmp_path / "s" / "sweep.json").exists()
    assert {p.stem for p in result.figures} == {"b_vs_curvature_batch"}


@pytest.mark.parametrize("alone", ["row_sum", "ggn_residual"])
def test_a_quantity_that_reuses_anothers_options_runs_alone(tmp_path, alone):
    """row_sum reads the diagonal's options and ggn_residual the Frobenius norm's; measured
    without them they take those quantities' defaults (a KeyError mid-sweep before)."""
    cfg = parse_config(tiny(quantities={"measure": [alone]}))
    run_sweep(cfg, output=tmp_path / "out", progress=False, figures=False, max_points=1)
    m = load_tables(tmp_path / "out")["measurements"]
    assert len(m) and bool(np.isfinite(m["value"]).all())


def test_error_bars_say_their_degrees_of_freedom(tmp_path):
    """A trace by Hutch++ rests on a handful of samples: its dof goes into the table (t
    intervals); the SLQ negative mass gets a spread over probes, not a zero stderr."""
    cfg = parse_config(
        tiny(
            quantities={
                "measure": ["trace", "density", "frobenius"],
                "trace": {"method": "hutch++", "num_matvecs": 12},
                "density": {"num_probes": 4, "num_steps": 10},
            }
        )
    )
    run_sweep(cfg, output=tmp_path / "out", progress=False, figures=False, max_points=2)
    m = load_tables(tmp_path / "out")["measurements"].set_index("quantity")
    assert (m.loc["trace", "dof"] == 3).all()  # 12 // 3 = 4 Hutchinson probes
    neg = m.loc["density_negative_mass"]
    assert (neg["dof"] == 3).all() and (neg["stderr"] >= 0).all()
    assert bool(np.isfinite(neg["stderr"]).all())
    assert m.loc["frobenius_norm", "dof"].notna().all()
