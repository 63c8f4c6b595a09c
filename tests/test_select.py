"""Selection from a known set of runs: constraints, objectives, the Pareto front, best effort, and the
recipe written by `qsweep select`."""

from __future__ import annotations

import hashlib

import mlflow
import pandas as pd
import pytest
import yaml

from known_runs import BASE_TASK, PER_LAYER, record_known_runs
from qsweep.cli import main
from qsweep.config import ConfigError, SelectConf
from qsweep.objectives import pareto_front
from qsweep.recipe import load_recipe
from qsweep.select import NO_FEASIBLE_EXIT, drift_cost, load_runs, select
from qsweep.tracking import Tracker


def _pick(frame: pd.DataFrame, **kwargs):
    return select(frame, SelectConf(**kwargs))


def test_select_picks_by_objective_under_constraints(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record_known_runs(uri, "known")
    frame = load_runs(uri, "known")
    # the search trial inherits model/device/dtype from its parent; the failed and parent runs are not candidates
    assert frame.set_index("run").loc["trial-3", ["kind", "model", "device"]].tolist() == ["search", "digits_mlp", "cuda"]
    best = _pick(frame, max_drift=0.01)
    assert (best.run["run"], best.feasible, best.drift_metric) == ("trial-3", True, "accuracy_drop")
    assert len(best.table) == 6 and "int4wo-g32-max-autotune" not in set(best.table["run"])
    assert set(best.table.loc[best.table["pareto"], "run"]) == {
        "int8wo-per_row-max-autotune", "int4wo-g128-max-autotune", "float8dq-per_row-max-autotune",
        "intxwo_2-g32-max-autotune", "trial-3"}
    assert _pick(frame, max_drift=0.005).run["run"] == "float8dq-per_row-max-autotune"
    assert _pick(frame, max_drift=0.1, objective="size_ratio").run["run"] == "intxwo_2-g32-max-autotune"
    assert _pick(frame, max_drift=0.02, objective="peak_mem_bytes").run["run"] == "int4wo-g128-max-autotune"
    assert _pick(frame, max_drift=0.01, objective="drift").run["run"] == "int8wo-per_row-max-autotune"
    assert _pick(frame, max_drift=0.01, min_speedup=2.5).feasible is False
    assert _pick(frame, max_drift=0.02, max_size_bytes=1.2e6 / 3).run["run"] == "int4wo-g128-max-autotune"
    # relative: 1% of a 0.5 baseline accuracy is 0.005 absolute, so the 0.008 search trial no longer fits
    relative = _pick(frame, max_drift=0.01, relative=True)
    assert relative.run["run"] == "float8dq-per_row-max-autotune"
    assert relative.run["cost"] == pytest.approx(0.004 / BASE_TASK)


def test_no_feasible_run_returns_marked_best_effort(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record_known_runs(uri, "known")
    choice = _pick(load_runs(uri, "known"), max_drift=0.001)
    assert choice.feasible is False and not choice.table["feasible"].any()
    assert choice.run["run"] == "int8wo-per_row-max-autotune"  # least excess over the drift limit
    assert choice.violations == ["accuracy_drop 0.002 > 0.001"]


def _selected(uri: str, experiment: str) -> set[str]:
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], "tags.selected = 'true'")
    return {r.info.run_id for r in runs}


def test_select_command_writes_recipe_and_moves_selected_tag(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ids = record_known_runs(uri, "known")
    base = [f"output_dir={tmp_path}", "model=digits_mlp", "experiment=known"]
    assert main(["select", *base, "select.max_drift=0.01"]) == 0
    recipe = load_recipe(tmp_path / "recipes" / "known.yaml")
    assert recipe.quant == PER_LAYER and recipe.source["run_id"] == ids["trial-3"]
    assert recipe.source["kind"] == "search" and recipe.selection["feasible"] is True
    assert recipe.metrics["speedup"] == 2.4 and recipe.hardware["device"] == "cuda"
    assert recipe.model["builder"]["_target_"] == "qsweep.models.digits_mlp"
    assert _selected(uri, "known") == {ids["trial-3"]}
    assert main(["select", *base, "select.max_drift=0.005"]) == 0  # a new feasible pick moves the tag
    assert _selected(uri, "known") == {ids["float8dq-per_row-max-autotune"]}


def test_best_effort_never_replaces_a_feasible_recipe(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ids = record_known_runs(uri, "known")
    base = [f"output_dir={tmp_path}", "model=digits_mlp", "experiment=known"]
    assert main(["select", *base, "select.max_drift=0.01"]) == 0
    feasible = tmp_path / "recipes" / "known.yaml"
    digest = hashlib.sha256(feasible.read_bytes()).hexdigest()
    assert main(["select", *base, "select.max_drift=0.0001"]) == NO_FEASIBLE_EXIT
    out = capsys.readouterr().out
    assert "NO RUN MEETS THE CONSTRAINTS" in out and "accuracy_drop 0.002 > 0.0001" in out
    assert hashlib.sha256(feasible.read_bytes()).hexdigest() == digest
    strict = yaml.safe_load((tmp_path / "recipes" / "known.best-effort.yaml").read_text())
    assert strict["selection"]["feasible"] is False and strict["quant"]["_target_"].endswith("Int8WeightOnlyConfig")
    assert _selected(uri, "known") == {ids["trial-3"]}  # the tag stays on the feasible choice


def test_non_finite_runs_are_never_candidates(tmp_path):
    """A run marked ok whose drift is NaN (as an older qsweep recorded NaN outputs) is not selectable."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record_known_runs(uri, "known")
    frame = load_runs(uri, "known")
    frame.loc[frame["run"] == "trial-3", "accuracy_drop"] = float("nan")
    frame.loc[frame["run"] == "float8dq-per_row-max-autotune", "speedup"] = float("inf")
    best = _pick(frame, max_drift=0.01)
    assert best.run["run"] == "int8wo-per_row-max-autotune"
    assert {"trial-3", "float8dq-per_row-max-autotune"}.isdisjoint(best.table["run"])


def test_several_devices_must_be_chosen(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record_known_runs(uri, "known")
    Tracker(uri, "known").record("int8wo-per_row-none", "ok", "", {"model": "digits_mlp", "device": "cpu",
                                                                    "dtype": "float32"}, {"accuracy_drop": 0.0},
                                 {"model": "digits_mlp"})
    frame = load_runs(uri, "known")
    with pytest.raises(ConfigError, match="select.device="):
        _pick(frame)
    assert _pick(frame, device="cpu").run["run"] == "int8wo-per_row-none"


def test_pareto_front_and_costs():
    rows = pd.DataFrame({"speedup": [2.0, 1.0, 2.0, float("nan")], "cost": [0.1, 0.05, 0.2, 0.0]})
    assert pareto_front(rows, {"speedup": True, "cost": False}).tolist() == [True, True, False, True]
    frame = pd.DataFrame({"drift_cosine": [0.99], "drift_sqnr_db": [30.0]})
    assert drift_cost(frame, "drift_cosine", False)[0].iloc[0] == pytest.approx(0.01)
    assert drift_cost(frame, "drift_sqnr_db", False)[0].iloc[0] == -30.0
