"""Figures: a tiny sweep with every quantity, then every figure file opens and is non-trivial."""

from __future__ import annotations

import pytest
from PIL import Image

from curvkit.cli import main as cli_main
from curvkit.experiments import parse_config, run_sweep
from curvkit.experiments.figures import FIGURES, make_figures
from curvkit.experiments.tables import load_tables


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fig")
    cfg = parse_config(
        {
            "name": "figs",
            "dtype": "float64",
            "threads": 1,
            "data": {"name": "digits", "test_fraction": 0.5},
            "models": [
                {"name": "mlp", "width": 6, "depth": 1, "label": "MLP"},
                {"name": "cnn", "channels": 2, "depth": 1, "label": "CNN"},
            ],
            "grid": {
                "seeds": [0, 1],
                "train_batch_sizes": [16, 64],
                "curvature_batch_sizes": [16, 64, "full"],
                "checkpoints": [0, 30],
            },
            "training": {"lr": 0.1},
            "quantities": {
                "trace": {"num_matvecs": 6},
                "eigenvalues": {"top_k": 2, "bottom_k": 1},
                "density": {
                    "num_probes": 1,
                    "num_steps": 8,
                    "where": {"curvature_batch_size": "full"},
                },
                "diagonal": {"num_matvecs": 6},
                "frobenius": {"num_matvecs": 4},
                "ggn_residual": {"num_matvecs": 4},
                "cost": {"repeats": 1, "block_size": 2, "where": {"curvature_batch_size": 64}},
                "estimator_error": {
                    "methods": ["hutchinson", "hutch++"],
                    "budgets": [6, 12],
                    "repeats": 2,
                    "where": {
                        "model": "MLP",
                        "curvature_batch_size": 64,
                        "step": "last",
                        "seed": "first",
                    },
                },
            },
        }
    )
    result = run_sweep(cfg, output=out, progress=False)
    return out, result


def test_every_figure_is_written_and_opens(results):
    out, result = results
    names = {p.stem for p in result.figures}
    assert names == set(FIGURES), f"missing figures: {set(FIGURES) - names}"
    for path in result.figures:
        assert path.stat().st_size > 1000
        if path.suffix == ".png":
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:
                w, h = im.size
                # two-column paper sizes at 300 dpi: at most the text width (6.75 in)
                assert w <= 6.75 * 300 + 2 and h < 6 * 300
                colours = im.convert("L").getcolors(maxcolors=1 << 16) or range(11)
                assert len(colours) > 10, "blank figure"
        else:
            head = path.read_bytes()[:5]
            assert head == b"%PDF-"


def test_tables_are_tidy_and_keyed(results):
    out, _ = results
    t = load_tables(out)
    m = t["measurements"]
    assert {
        "trace",
        "lambda_max",
        "lambda_min",
        "rowsum_offdiag_ratio",
        "rowsum_diag_corr",
        "rowsum_norm",
        "frobenius_norm",
        "ggn_residual_share",
        "hvp_ratio",
        "loss_batch",
        "accuracy_test",
        "diag_mean",
    } <= set(m["quantity"])
    assert not m.duplicated(["point_id", "quantity"]).any()
    for name in ("eigenvalues", "density", "estimator_error"):
        assert {"point_id", "model", "seed", "step"} <= set(t[name].columns)
    tr = m[m["quantity"] == "trace"]
    assert (tr["stderr"] >= 0).all() and (tr["num_matvecs"] > 0).all() and tr["method"].all()


def test_figures_command_redraws_from_tables_only(results, tmp_path, capsys):
    out, _ = results
    assert cli_main(["figures", str(out), "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*.pdf"))) == len(FIGURES)
    assert cli_main(["figures", str(tmp_path / "nothing")]) == 2
    assert make_figures(out, out=tmp_path / "again")
