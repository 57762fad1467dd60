"""The benchmark's report logic (scripts/bench.py): summaries, the issue-4 target check and
the regression check, on synthetic rows (no timing runs)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "bench", Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

KS = [16]

#: every figure the target check reads, each meeting its target
MEETS = {
    "grad": (1.0, 1.0, 1.0),
    "curvkit": (1.5, 1.8, 1.8),
    "curvkit_cold": (1.9, 1.9, 1.9),
    "ggn": (1.4, 1.5, 1.5),
    "ggn_cold": (1.6, 1.5, 1.5),
    "curvkit_k16": (0.8, 6.0, 3.0),  # (time, memory, memory beyond the (D, K) result)
    "curvkit_qf_k16": (0.6, 2.0, 2.0),
    "curvkit_qf_grouped_k16": (0.5, 2.0, 2.0),
    "ggn_k16": (0.7, 5.0, 2.5),
    "ggn_qf_k16": (0.3, 2.0, 2.0),
    "double_backward": (2.5, 2.0, 2.0),
    "func_jvp_grad": (3.0, 3.0, 3.0),
}


def _row(model: str, figures: dict) -> dict:
    methods = {
        name: {"ratio": t, "memory_ratio": m, "memory_ratio_working": w}
        for name, (t, m, w) in figures.items()
    }
    return {"model": model, "batch": 32, "methods": methods}


def _summary(figures: dict, others: dict | None = None) -> dict:
    rows = [_row("mlp", figures), _row("cnn", others or figures)]
    return bench.summarise(rows, KS)


def test_summarise_takes_geometric_means_and_the_worst_row_against_the_fastest_peer():
    slow = {**MEETS, "curvkit": (3.0, 1.8, 1.8), "curvkit_cold": (2.6, 1.9, 1.9)}
    summary = _summary(MEETS, slow)
    assert summary["geomean_ratio"]["curvkit"] == pytest.approx(math.sqrt(1.5 * 3.0))
    assert summary["geomean_memory_ratio_working"]["curvkit_k16"] == pytest.approx(3.0)
    # the peers redo forward and first backward: compared with the isolated product
    assert summary["worst_curvkit_over_fastest_peer"] == pytest.approx(2.6 / 2.5)
    assert summary["worst_kept_graph_product_over_fastest_peer"] == pytest.approx(3.0 / 2.5)
    assert bench.geomean([None, 2.0, float("nan"), 8.0, 0.0]) == pytest.approx(4.0)


def test_check_targets_passes_when_every_target_is_met(capsys):
    assert bench.check_targets(_summary(MEETS), KS, margin=0.1) == []
    out = capsys.readouterr().out
    assert "MISS" not in out
    # every target the figures cover was checked
    assert out.count("  ok   ") == 17


@pytest.mark.parametrize(
    "name, figure, label",
    [
        ("curvkit", (2.3, 1.8, 1.8), "one HessianOperator product / eager gradient"),
        ("curvkit_cold", (1.9, 2.4, 2.4), "one isolated (cold) product's peak memory"),
        ("curvkit_k16", (1.2, 6.0, 3.0), "K=16 products, per probe"),
        ("curvkit_k16", (0.8, 9.0, 5.0), "K=16 products, peak memory beyond"),
        ("curvkit_qf_k16", (0.6, 5.0, 5.0), "K=16 quadratic forms, peak memory"),
        ("curvkit_qf_grouped_k16", (1.3, 2.0, 2.0), "K=16 Hutchinson's grouped forms, per"),
        ("ggn_k16", (0.7, 9.0, 4.9), "GGN K=16 products, peak memory beyond"),
        ("ggn_qf_k16", (0.3, 4.9, 4.9), "GGN K=16 quadratic forms, peak memory"),
        ("ggn_cold", (2.3, 1.5, 1.5), "one isolated (cold) GGN product / eager gradient"),
        ("ggn_cold", (1.6, 2.3, 2.3), "one isolated GGN product's peak memory"),
        ("double_backward", (1.2, 2.0, 2.0), "one isolated product / fastest peer's"),
    ],
)
def test_check_targets_reports_each_miss(name, figure, label):
    """A figure over its target by more than the margin is a miss, named by its label."""
    misses = bench.check_targets(_summary({**MEETS, name: figure}), KS, margin=0.1)
    assert len(misses) == 1 and misses[0].startswith(label), misses


def test_check_targets_allows_the_margin_and_skips_missing_figures():
    within = {**MEETS, "curvkit": (2.15, 1.8, 1.8)}  # 7.5% over 2.0
    assert bench.check_targets(_summary(within), KS, margin=0.1) == []
    assert bench.check_targets(_summary(within), KS, margin=0.05) != []
    no_ggn = {k: v for k, v in MEETS.items() if not k.startswith("ggn")}
    assert bench.check_targets(_summary(no_ggn), KS, margin=0.1) == []


def _report(summary: dict, **config) -> dict:
    return {"device": "cpu, 1 threads", "config": {"sizes": "tiny", "ks": KS, **config},
            "summary": summary}  # fmt: skip


def test_check_baseline_flags_curvkit_regressions_beyond_the_margin():
    baseline = _report(_summary(MEETS))
    slower = {**MEETS, "curvkit_k16": (1.0, 6.0, 3.0), "double_backward": (9.0, 2.0, 2.0)}
    assert bench.check_baseline(_report(_summary(MEETS)), baseline, margin=0.1) == []
    # a peer's figure is not curvkit's: only curvkit_k16 (25% slower) regresses
    assert bench.check_baseline(_report(_summary(slower)), baseline, margin=0.1) == ["curvkit_k16"]
    assert bench.check_baseline(_report(_summary(slower)), baseline, margin=0.3) == []


@pytest.mark.parametrize(
    "change",
    [{"device": "cpu, 2 threads"}, {"config": {"sizes": "cpu", "ks": KS}},
     {"config": {"sizes": "tiny", "ks": [8]}}],
    ids=["threads", "sizes", "K"],
)  # fmt: skip
def test_a_baseline_measured_differently_is_a_miss(change, capsys):
    baseline = {**_report(_summary(MEETS)), **change}
    assert bench.check_baseline(_report(_summary(MEETS)), baseline, margin=0.5) == [
        "baseline not comparable"
    ]
    assert "measured differently" in capsys.readouterr().out


def test_a_method_that_failed_on_a_measured_row_is_a_miss(capsys):
    """It would otherwise vanish from its geometric mean (or the mean would be None)."""
    rows = [_row("mlp", MEETS), _row("cnn", MEETS)]
    rows[1]["methods"]["curvkit_k16"] = {"error": "OutOfMemoryError: CUDA out of memory"}
    misses = bench.check_targets(bench.summarise(rows, KS), KS, margin=0.1)
    assert "K=16 products, per probe / eager gradient (geomean)" in misses
    out = capsys.readouterr().out
    assert "failed on 1 row(s), e.g. cnn:32: OutOfMemoryError" in out
    # a figure over fewer rows than were measured says so
    del rows[1]["methods"]["curvkit_k16"]
    bench.check_targets(bench.summarise(rows, KS), KS, margin=0.1)
    assert "1 of 2 rows" in capsys.readouterr().out


def test_a_row_that_cannot_finish_is_not_started():
    done = [{"model": "resnet18", "batch": 128, "wall_s": 50.0, "methods": {}}]
    assert bench._expected_seconds({"model": "resnet18", "batch": 512}, done) == 200.0
    assert bench._expected_seconds({"model": "resnet18", "batch": 32}, done) == 50.0
    assert bench._expected_seconds({"model": "mlp", "batch": 512}, done) == 0.0


def test_merged_reports_keep_measured_rows_over_failed_ones():
    def report(rows):
        return {
            "device": "cpu",
            "config": {"ks": KS, "batch_sizes": [32]},
            "command": "bench",
            "wall_s": 1.0,
            "rows": rows,
        }

    failed = {"model": "mlp", "batch": 32, "error": "timed out", "note": "timed out"}
    measured = _row("mlp", MEETS)
    merged = bench.merge_reports([report([measured]), report([failed, _row("cnn", MEETS)])])
    assert [(r["model"], "methods" in r) for r in merged["rows"]] == [
        ("mlp", True),
        ("cnn", True),
    ]
    assert merged["wall_s"] == 2.0
    assert all(r["run"] == "bench" for r in merged["rows"])
    with pytest.raises(SystemExit, match="differ"):
        bench.merge_reports([report([measured]), {**report([]), "device": "cuda"}])
    other_sizes = {**report([]), "config": {"ks": KS, "batch_sizes": [32], "sizes": "full"}}
    with pytest.raises(SystemExit, match="sizes"):
        bench.merge_reports([report([measured]), other_sizes])
    # a setting that may differ is listed per run
    budget = {**report([]), "config": {"ks": KS, "batch_sizes": [32], "budget_s": 4.0}}
    merged = bench.merge_reports([{**report([measured]), "config": {**budget["config"],
                                   "budget_s": 6.0}}, budget])  # fmt: skip
    assert merged["config"]["budget_s"] == [6.0, 4.0]
