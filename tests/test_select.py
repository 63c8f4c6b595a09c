"""Selection from a known set of runs, recipe export -> apply -> reload round trips on real digits_mlp
runs (uniform and per-layer), and the recipe allowlist."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from conftest import FAST
from known_runs import BASE_TASK, PER_LAYER, record_known_runs
from qsweep.cli import main
from qsweep.config import ConfigError, SelectConf, load_config, mlflow_uri
from qsweep.runner import run_trial
from qsweep.select import (
    drift_cost,
    load_recipe,
    load_runs,
    pareto_front,
    select,
)
from qsweep.sweep import QUANT_SPEC_FILE, Point, relative_to_baseline, resolved_yaml, run_point
from qsweep.tracking import Tracker

DIGITS = ["model=digits_mlp", "model.builder.epochs=10", "isolate=false"]


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
    assert main(["select", *base, "select.max_drift=0.0001", "name=strict"]) == 0
    out = capsys.readouterr().out
    assert "NO RUN MEETS THE CONSTRAINTS" in out and "accuracy_drop 0.002 > 0.0001" in out
    strict = yaml.safe_load((tmp_path / "recipes" / "strict.yaml").read_text())
    assert strict["selection"]["feasible"] is False and strict["quant"]["_target_"].endswith("Int8WeightOnlyConfig")
    client = mlflow.MlflowClient(tracking_uri=uri)
    tagged = {r.info.run_id for r in client.search_runs([client.get_experiment_by_name("known").experiment_id],
                                                         "tags.selected = 'true'")}
    assert tagged == {ids["int8wo-per_row-max-autotune"]}


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


# ---------------------------------------------------------------- real runs: export -> apply -> reload


@pytest.fixture(scope="module")
def digits_grid(tmp_path_factory):
    """A real CPU sweep of digits_mlp: baseline + int8wo per_row + intxwo_4 g32."""
    out = tmp_path_factory.mktemp("digits")
    for overrides in (["scheme=int8wo", "granularity=per_row"], ["scheme=intxwo_4", "granularity=per_group"]):
        root, cfg = load_config([f"output_dir={out}", *FAST, *DIGITS, *overrides, "group_size=32"])
        assert run_point(root, resolved_yaml(cfg)).status == "ok"
    return out


def _apply(out: Path, recipe: Path, *extra: str) -> dict:
    assert main(["apply", f"recipe={recipe}", f"output_dir={out}", *FAST, *extra]) == 0
    name = recipe.stem
    return json.loads((out / "checkpoints" / name / "verification.json").read_text())


def test_uniform_recipe_round_trips(digits_grid, capsys):
    out = digits_grid
    assert main(["select", f"output_dir={out}", *FAST, *DIGITS, "select.objective=size_ratio",
                 "select.max_drift=0.05"]) == 0
    recipe = load_recipe(out / "recipes" / "digits_mlp.yaml")
    assert recipe.source["run_name"] == "int8wo-per_row-none"  # int8 per-row is the smallest at this size
    assert recipe.quant["_target_"] == "torchao.quantization.Int8WeightOnlyConfig"
    check = _apply(out, out / "recipes" / "digits_mlp.yaml")
    assert check["ok"] and check["reload"]["max_abs_output_diff"] == 0.0
    assert check["drift"]["abs_diff"] <= 1e-9 and check["size_bytes"]["rel_diff"] == 0.0
    assert check["info"]["drift_sqnr_db"]["measured"] == pytest.approx(check["info"]["drift_sqnr_db"]["recorded"])
    assert (out / "checkpoints" / "digits_mlp" / "model.safetensors").exists()
    # the torch.save path gives the same numbers
    check = _apply(out, out / "recipes" / "digits_mlp.yaml", "select.checkpoint_format=torch")
    assert check["ok"] and (out / "checkpoints" / "digits_mlp" / "model.pt").exists()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    applied = client.search_runs([client.get_experiment_by_name("digits_mlp").experiment_id],
                                 "tags.`qsweep.role` = 'apply'")
    assert len(applied) == 2 and applied[0].data.tags["verified"] == "true"
    assert {f.path for f in client.list_artifacts(applied[0].info.run_id)} == {"recipe.yaml", "verification.json"}


def test_per_layer_recipe_round_trips(digits_grid):
    """A per-layer (FqnToConfig) trial recorded as a search does; select exports it and apply reproduces it."""
    out = digits_grid
    root, cfg = load_config([f"output_dir={out}", *FAST, *DIGITS, "scheme=int8wo", "tracking.experiment=digits_search"])
    point = Point(root)
    baseline = Tracker(mlflow_uri(root), "digits_mlp").find(**{"qsweep.role": "baseline"})[0].data.metrics
    result = run_trial(point.spec(PER_LAYER, out / "baselines" / f"{point.baseline_key}.pt", is_baseline=False))
    assert result.status == "ok" and result.metrics["layers_quantized"] == 2
    result.metrics.update(relative_to_baseline(result.metrics, baseline))
    tracker = Tracker(mlflow_uri(root), "digits_search")
    parent = tracker.record("search", "ok", "", point.params(), {}, point.tags(), {"config.yaml": resolved_yaml(cfg)})
    tracker.record("trial-0", "ok", "", {"trial": 0}, result.metrics, {"model": "digits_mlp"},
                   {QUANT_SPEC_FILE: json.dumps(PER_LAYER)}, parent_run_id=parent)
    assert main(["select", f"output_dir={out}", "experiment=digits_search", "select.max_drift=0.5"]) == 0
    recipe = load_recipe(out / "recipes" / "digits_search.yaml")
    assert recipe.quant == PER_LAYER and recipe.eval == {"n_samples": 64, "batch_size": 32, "seed": 0}
    check = _apply(out, out / "recipes" / "digits_search.yaml")
    assert check["ok"] and check["reload"]["max_abs_output_diff"] == 0.0


# ---------------------------------------------------------------- allowlist


@pytest.mark.parametrize("field, value, message", [
    ("quant", {"_target_": "os.system", "command": "true"}, "refusing to build 'os.system'"),
    ("quant", {"_target_": "torchao.quantization.quant_api.quantize_"}, "refusing to build"),
    ("builder", {"_target_": "subprocess.run", "args": ["true"]}, "refusing model builder 'subprocess.run'"),
])
def test_recipe_outside_allowlist_is_refused(tmp_path, capsys, field, value, message):
    recipe = {"name": "bad", "quant": {"_target_": "torchao.quantization.Int8WeightOnlyConfig"},
              "model": {"name": "toy", "builder": {"_target_": "qsweep.models.toy_linear"}}, "dtype": "float32",
              "eval": {"n_samples": 8, "batch_size": 8, "seed": 0}, "metrics": {}, "selection": {},
              "source": {}, "hardware": {}, "versions": {}, "created": "2026-01-01"}
    if field == "quant":
        recipe["quant"] = value
    else:
        recipe["model"]["builder"] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=message):
        load_recipe(path)
    assert main(["apply", f"recipe={path}", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qsweep: error: refusing") and "\n" not in err
