"""Objectives come from the metric schema: a new selection objective is one `Metric` entry, nothing else."""

from __future__ import annotations

import pandas as pd
import pytest

from qsweep import metrics, objectives
from qsweep.config import ConfigError, SelectConf, load_config
from qsweep.metrics import Metric
from qsweep.select import describe_selection, select

ENERGY = Metric("energy_j", "J", False, "energy of one inference", objective=True)


def runs(**extra: list) -> pd.DataFrame:
    """Three measured grid points of one model: fast, frugal (least energy) and exact (no drift)."""
    return pd.DataFrame({
        "run_id": ["a" * 32, "b" * 32, "c" * 32], "run": ["fast", "frugal", "exact"], "kind": "grid", "status": "ok",
        "model": "toy", "device": "cpu", "dtype": "float32", "speedup": [3.0, 1.5, 1.2],
        "size_ratio": [2.0, 2.0, 1.0], "peak_mem_bytes": [1e6, 1e6, 1e6], "accuracy_drop": [0.005, 0.008, 0.0],
        **extra})


def test_a_new_selection_objective_is_one_metric_entry(monkeypatch, tmp_path):
    frame = runs(energy_j=[2.0, 0.5, 1.0])
    overrides = [f"output_dir={tmp_path}", "select.objective=energy_j", "select.max_drift=0.01"]
    with pytest.raises(ConfigError, match=r"select.objective='energy_j' is invalid; valid: .*speedup.*drift"):
        load_config(overrides)
    before = select(frame, SelectConf(max_drift=0.01))
    assert before.run["run"] == "fast" and not before.table.set_index("run")["pareto"]["frugal"]

    monkeypatch.setattr(metrics, "METRICS", (*metrics.METRICS, ENERGY))  # the whole change: a schema entry

    sel = load_config(overrides)[0].select
    assert objectives.selection_objectives()["energy_j"] == ("energy_j", False)
    picked = select(frame, sel)
    assert picked.feasible and picked.run["run"] == "frugal"  # lower is better, as the schema says
    assert picked.table.set_index("run")["pareto"].to_dict() == {"fast": True, "frugal": True, "exact": True}
    text = describe_selection(picked, sel)
    assert "energy_j" in text and "selected by energy_j: frugal" in text
    assert select(frame, SelectConf(max_drift=0.01, objective="speedup")).run["run"] == "fast"


def test_choices_are_read_from_the_schema():
    assert objectives.selection_objectives() == {"size_ratio": ("size_ratio", True),
                                                 "peak_mem_bytes": ("peak_mem_bytes", False),
                                                 "speedup": ("speedup", True), "drift": ("cost", False)}
    assert objectives.drift_metrics() == ["accuracy_drop", "drift_cosine", "drift_kl", "drift_max_abs",
                                          "drift_sqnr_db", "top1_agreement"]
    assert objectives.search_drift_metrics() == ["accuracy_drop", "drift_kl", "drift_max_abs"]
    with pytest.raises(ConfigError, match="select.drift_metric='latency_ms' is invalid; valid: auto, accuracy_drop"):
        SelectConf(drift_metric="latency_ms")


def test_higher_is_better_drift_metrics_become_costs():
    values = pd.Series([0.99, 30.0])
    label, cost = objectives.as_cost("drift_cosine")
    assert label == "1 - drift_cosine" and cost(values)[0] == pytest.approx(0.01)
    label, cost = objectives.as_cost("drift_sqnr_db")
    assert label == "-drift_sqnr_db" and cost(values)[1] == -30.0
    label, cost = objectives.as_cost("drift_kl")
    assert label == "drift_kl" and cost(values) is values


def test_search_objectives_are_maximized_schema_metrics():
    for goal in objectives.SEARCH_OBJECTIVES.values():
        assert objectives.higher_is_better(goal.value) and objectives.higher_is_better(goal.measured)
    with pytest.raises(ValueError, match="maximized"):
        objectives.SearchObjective("predicted_latency_ms", "ms", "latency_ms", "isolated timing")
    with pytest.raises(ValueError, match="no better direction"):
        objectives.higher_is_better("task_metric")


def test_pareto_front_treats_a_missing_column_as_the_worst():
    rows = pd.DataFrame({"speedup": [2.0, 1.0], "cost": [0.1, 0.05]})
    assert objectives.pareto_front(rows, {"speedup": True, "cost": False, "energy_j": False}).tolist() == [True, True]
    assert objectives.pareto_front(rows.iloc[:0]).tolist() == []
