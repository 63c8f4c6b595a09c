"""Recipe -> checkpoint: export -> apply -> reload round trips on real digits_mlp runs (uniform and
per-layer); a failed apply never replaces a verified checkpoint; nothing is written outside output_dir."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import FAST
from known_runs import PER_LAYER
from qsweep.cli import main
from qsweep.config import load_config, mlflow_uri
from qsweep.recipe import load_recipe
from qsweep.runner import run_trial
from qsweep.sweep import Point, relative_to_baseline, resolved_yaml, run_point
from qsweep.tracking import Tracker

DIGITS = ["model=digits_mlp", "model.builder.epochs=10", "isolate=false"]


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
    assert recipe.source["run_name"] == "digits_mlp/int8wo-per_row-none"  # int8 per-row is the smallest at this size
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
                   {"recipe.json": json.dumps({"groups": {}, "quant": PER_LAYER})},  # as an older search logged it
                   parent_run_id=parent)
    assert main(["select", f"output_dir={out}", "experiment=digits_search", "select.max_drift=0.5"]) == 0
    recipe = load_recipe(out / "recipes" / "digits_search.yaml")
    assert recipe.quant == PER_LAYER and recipe.eval == {"n_samples": 64, "batch_size": 32, "seed": 0}
    check = _apply(out, out / "recipes" / "digits_search.yaml")
    assert check["ok"] and check["reload"]["max_abs_output_diff"] == 0.0


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _apply_runs(out: Path) -> list:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("digits_mlp").experiment_id],
                              "tags.`qsweep.role` = 'apply'", order_by=["attributes.start_time DESC"])


def test_failed_apply_keeps_the_verified_checkpoint(digits_grid, capsys):
    out = digits_grid
    assert main(["select", f"output_dir={out}", *FAST, *DIGITS, "select.max_drift=0.05", "name=keep"]) == 0
    good = out / "recipes" / "keep.yaml"
    _apply(out, good)
    checkpoint = out / "checkpoints" / "keep" / "model.safetensors"
    digest = _digest(checkpoint)
    tampered = yaml.safe_load(good.read_text())
    tampered["metrics"]["size_bytes"] *= 2  # the recorded size no longer matches: verification must fail
    bad = out / "recipes" / "tampered.yaml"
    bad.write_text(yaml.safe_dump({**tampered, "name": "keep"}))
    assert main(["apply", f"recipe={bad}", f"output_dir={out}", *FAST]) == 1
    assert "VERIFICATION FAILED" in capsys.readouterr().out
    assert _digest(checkpoint) == digest
    assert json.loads((out / "checkpoints" / "keep" / "verification.json").read_text())["ok"] is True
    assert json.loads((out / "checkpoints" / "keep.failed" / "verification.json").read_text())["ok"] is False
    latest = _apply_runs(out)[0].data.tags
    assert (latest["status"], latest["verified"]) == ("failed", "false") and "size_bytes" in latest["reason"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no staging left


def test_recipe_name_cannot_escape_output_dir(digits_grid, tmp_path):
    out = digits_grid
    assert main(["select", f"output_dir={out}", *FAST, *DIGITS, "select.max_drift=0.05", "name=esc"]) == 0
    recipe = yaml.safe_load((out / "recipes" / "esc.yaml").read_text())
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text(yaml.safe_dump({**recipe, "name": "../../escaped"}))
    before = set(out.parent.iterdir())
    assert main(["apply", f"recipe={hostile}", f"output_dir={out}", *FAST]) == 0
    assert (out / "checkpoints" / "escaped" / "model.safetensors").exists()
    assert set(out.parent.iterdir()) == before and not (out.parent / "escaped").exists()


def test_unknown_layer_in_per_layer_recipe_is_one_line(digits_grid, tmp_path, capsys):
    out = digits_grid
    assert main(["select", f"output_dir={out}", *FAST, *DIGITS, "select.max_drift=0.05", "name=fqn"]) == 0
    recipe = yaml.safe_load((out / "recipes" / "fqn.yaml").read_text())
    recipe["quant"] = {**PER_LAYER, "fqn_to_config": {**PER_LAYER["fqn_to_config"], "layers.9": None}}
    path = tmp_path / "fqn.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["apply", f"recipe={path}", f"output_dir={out}", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "qsweep: error: recipe fqn: 1 layer name(s) match no module of model digits_mlp: layers.9"


def test_apply_of_a_model_with_nan_outputs_fails_verification(tmp_path):
    from qsweep.apply import apply_recipe, describe_verification
    from qsweep.recipe import Recipe

    recipe = Recipe(name="nan", quant={"_target_": "torchao.quantization.Int8WeightOnlyConfig"},
                    model={"name": "fragile", "builder": {"_target_": "fragile_models.fragile_toy",
                                                          "how": "nan_outputs"}},
                    dtype="float32", eval={"n_samples": 8, "batch_size": 8, "seed": 0}, metrics={},
                    selection={"drift_metric": "drift_cosine", "relative": False, "cost_label": "1 - drift_cosine"},
                    source={}, hardware={}, versions={}, created="")
    applied = apply_recipe(recipe, "cpu", tmp_path)
    assert applied.verification["ok"] is False
    assert "non-finite outputs: 100% NaN" in describe_verification(applied)


def test_a_runs_own_recipe_artifact_applies_as_it_is(digits_grid):
    """Every grid point logs its recipe in the one format: downloaded from MLflow, apply takes it unchanged."""
    out = digits_grid
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits_mlp").experiment_id
    (run,) = client.search_runs([experiment], "attributes.run_name = 'digits_mlp/intxwo_4-g32-none'")
    path = Path(client.download_artifacts(run.info.run_id, "recipe.json", str(out)))
    recipe = load_recipe(path)
    assert recipe.source["kind"] == "grid" and recipe.metrics["size_bytes"] == run.data.metrics["size_bytes"]
    assert recipe.model["builder"]["_target_"] == "qsweep.models.digits_mlp" and recipe.eval["n_samples"] == 64
    assert main(["apply", f"recipe={path}", f"output_dir={out}", *FAST]) == 0
    check = json.loads((out / "checkpoints" / recipe.name / "verification.json").read_text())
    assert check["ok"] and check["drift"]["metric"] == "accuracy_drop"
