"""Flows beyond one-shot quantize_ (qsweep.flows): a reduced `+sweep=flows` on digits_mlp on the CPU, and the
relations that must hold between its rows: QAT recovers what its PTQ twin loses, static int8 stays close to
dynamic int8, PT2E's compiled int8 model matches the float model, pruning is exactly 2:4, `select` picks
across flows and `apply` replays a QAT recipe to its recorded accuracy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from conftest import FAST
from qsweep.cli import main
from qsweep.config import ConfigError, load_config
from qsweep.flows import FlowSettings, check_flow, flow_spec, run_flow
from qsweep.flows.sparsity import prune_2_4
from qsweep.models import digits_mlp
from qsweep.recipe import load_recipe
from qsweep.schemes import quantizable_layers
from qsweep.sweep import Point
from qsweep.tracking import load_runs

DIGITS = ["isolate=false"]  # the digits model trained fully (40 epochs): 2-bit PTQ then loses ~8 points
# One scheme per family, the PTQ rows they are read against, and a CUDA-only one.
SCHEMES = "none,intxwo_2,qat_intxwo_2,int8dq,static_int8,pt2e_x86,eager_dynamic,sparse24"
QAT_STEPS = 60
STATIC_SQNR_BOUND_DB = 3.0  # static int8 (per-tensor, calibrated) within this of dynamic int8 (per-token)
STATIC_ACCURACY_BOUND = 0.01  # and within 1 accuracy point
PT2E_MIN_SQNR_DB = 35.0  # the compiled PT2E int8 model against the float model (measured ~51 dB)


@pytest.fixture(scope="module")
def flows_sweep(tmp_path_factory):
    """The reduced flows sweep, run as a user runs it; returns (output_dir, results table, MLflow runs)."""
    out = tmp_path_factory.mktemp("flows")
    done = subprocess.run(
        [sys.executable, "-m", "qsweep", "run", "-m", "+sweep=flows", f"output_dir={out}", *FAST, *DIGITS,
         f"scheme={SCHEMES}", "granularity=per_row,per_axis", f"scheme.qat.steps={QAT_STEPS}"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (table_path,) = out.glob("runs/*/results.csv")
    table = pd.read_csv(table_path)
    runs = load_runs(f"sqlite:///{out / 'mlflow.db'}", "flows")
    return out, table, runs


def _row(table: pd.DataFrame, scheme: str, granularity: str) -> pd.Series:
    rows = table[table["run"] == f"digits_mlp/{scheme}-{granularity}-none"]
    assert len(rows) == 1, list(table["run"])
    return rows.iloc[0]


def test_every_flow_is_one_table_and_one_experiment_with_its_flow_param(flows_sweep):
    _, table, runs = flows_sweep
    measured = table[~table["status"].str.startswith("skipped")].set_index("run")
    assert set(measured["flow"]) == {"none", "ptq", "qat", "static", "pt2e", "eager_dynamic", "sparsity"}
    points = runs[runs["kind"].isin(["grid", "baseline"])]
    assert set(points["flow"]) == {"none", "ptq", "qat", "static", "pt2e", "eager_dynamic", "sparsity"}
    assert points["flow"].notna().all()
    ok = measured[measured["status"] == "ok"]
    assert (ok.drop(index="digits_mlp/none-none")["layers_quantized"] == 3).all()  # every flow quantized all 3
    # the sparse kernels are CUDA's: unsupported here, with the reason
    sparse = _row(table, "sparse24", "per_row")
    assert sparse["status"] == "unsupported" and "needs a CUDA GPU" in sparse["reason"]


def test_qat_recovers_what_its_ptq_twin_loses(flows_sweep):
    _, table, runs = flows_sweep
    qat, ptq = _row(table, "qat_intxwo_2", "per_axis"), _row(table, "intxwo_2", "per_axis")
    assert qat["status"] == "ok" and ptq["status"] == "ok"
    # the twin is the PTQ run, measured with the same accuracy code on the same model and seed
    assert qat["ptq_accuracy_drop"] == pytest.approx(ptq["accuracy_drop"], abs=1e-9)
    assert ptq["accuracy_drop"] > 0.03  # 2-bit per-axis PTQ really loses accuracy on digits
    assert qat["accuracy_drop"] <= qat["ptq_accuracy_drop"]
    assert qat["accuracy_drop"] < 0.02
    run = runs[runs["run"] == "digits_mlp/qat_intxwo_2-per_axis-none"].iloc[0]
    assert run["train_steps"] == QAT_STEPS and run["train_s"] > 0


def test_static_int8_is_within_a_bound_of_dynamic_int8(flows_sweep):
    _, table, runs = flows_sweep
    static, dynamic = _row(table, "static_int8", "per_row"), _row(table, "int8dq", "per_row")
    assert static["status"] == "ok" and dynamic["status"] == "ok"
    assert abs(static["drift_sqnr_db"] - dynamic["drift_sqnr_db"]) <= STATIC_SQNR_BOUND_DB
    assert abs(static["accuracy_drop"] - dynamic["accuracy_drop"]) <= STATIC_ACCURACY_BOUND
    run = runs[runs["run"] == "digits_mlp/static_int8-per_row-none"].iloc[0]
    assert run["calib_batches"] == 8 and run["calib_s"] > 0


def test_pt2e_and_eager_dynamic_match_the_float_model(flows_sweep):
    _, table, _ = flows_sweep
    pt2e, eager = _row(table, "pt2e_x86", "per_row"), _row(table, "eager_dynamic", "per_row")
    assert pt2e["status"] == "ok" and pt2e["drift_sqnr_db"] >= PT2E_MIN_SQNR_DB
    assert pt2e["layers_quantized"] == 3  # every linear of the graph takes int8 weights
    assert eager["status"] == "ok" and eager["drift_sqnr_db"] >= PT2E_MIN_SQNR_DB


def test_select_picks_across_flows_and_apply_replays_a_qat_recipe(flows_sweep):
    out, table, runs = flows_sweep
    assert main(["select", f"output_dir={out}", *FAST, "experiment=flows", "select.objective=drift",
                 "select.max_drift=0.02", "name=flows_best"]) == 0
    picked = load_recipe(out / "recipes" / "flows_best.yaml")
    ok = table[(table["status"] == "ok") & (table["flow"] != "none")]
    best = ok.loc[ok["accuracy_drop"].idxmin()]
    assert picked.metrics["accuracy_drop"] == pytest.approx(best["accuracy_drop"])  # the lowest drop of any flow
    assert (picked.flow or {"name": "ptq"})["name"] == runs.set_index("run_id").loc[picked.source["run_id"], "flow"]

    # the QAT run's own recipe (every run logs one): apply trains the recorded steps with the recorded seed
    run_id = runs[runs["run"] == "digits_mlp/qat_intxwo_2-per_axis-none"].iloc[0]["run_id"]
    recipe = Path(mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}").download_artifacts(run_id, "recipe.json", str(out)))
    assert load_recipe(recipe).flow == {"name": "qat", "qat": {"steps": QAT_STEPS, "lr": 1e-4, "batch_size": 64,
                                                               "ptq_twin": True}}
    assert main(["apply", f"recipe={recipe}", f"output_dir={out}", *FAST]) == 0
    name = load_recipe(recipe).name
    check = json.loads((out / "checkpoints" / name / "verification.json").read_text())
    assert check["ok"] and check["drift"]["metric"] == "accuracy_drop"
    assert check["drift"]["abs_diff"] <= check["drift"]["tolerance"]
    task = check["info"]["task_metric"]
    assert task["measured"] == pytest.approx(task["recorded"], abs=check["drift"]["tolerance"])


def test_pruning_is_exactly_2_4_along_the_input_dimension(tmp_path):
    layer = digits_mlp(epochs=1, cache_dir=str(tmp_path)).model[2]  # the trained 512 x 512 layer
    before = layer.weight.detach().clone()
    prune_2_4(layer.weight)
    groups, original = layer.weight.detach().reshape(512, 128, 4), before.reshape(512, 128, 4)
    assert ((groups == 0).sum(-1) == 2).all()  # exactly 2 zeros in every group of 4
    magnitude = original.abs()
    smallest_kept = magnitude.masked_fill(groups == 0, float("inf")).amin(-1)
    largest_pruned = magnitude.masked_fill(groups != 0, -1.0).amax(-1)
    assert (smallest_kept >= largest_pruned).all()  # magnitude pruning: the 2 largest of each 4 stay
    kept = groups != 0
    assert torch.equal(groups[kept], original[kept])  # and stay unchanged


def test_sparsity_flow_off_cuda_is_not_implemented(tmp_path):
    bundle = digits_mlp(epochs=1, cache_dir=str(tmp_path))
    with pytest.raises(NotImplementedError, match="need a CUDA GPU"):
        run_flow({"name": "sparsity"}, bundle.model, bundle, {"_target_": "torchao.sparsity.sparse_api.SemiSparseWeightConfig"},
                 quantizable_layers(bundle.model, None), FlowSettings("cpu", torch.float32))


def test_flow_names_and_knobs_are_checked(compose):
    with pytest.raises(ConfigError, match="scheme.flow='bogus' is invalid; valid: ptq, qat, static, sparsity, pt2e"):
        compose("scheme=int8wo", "scheme.flow=bogus")
    with pytest.raises(ConfigError, match="stepz"):
        compose("scheme=qat_intxwo_4", "scheme.qat.stepz=3")
    with pytest.raises(ConfigError, match="scheme.qat.steps=0 is invalid"):
        compose("scheme=qat_intxwo_4", "scheme.qat.steps=0")
    # a recipe's flow is data from a file: checked like the config
    with pytest.raises(ConfigError, match="flow='rm' is invalid"):
        check_flow({"name": "rm"})
    with pytest.raises(ConfigError, match="bad qat keys"):
        check_flow({"name": "qat", "qat": {"steps": 10, "shell": "x"}})
    with pytest.raises(ConfigError, match="unknown keys"):
        check_flow({"name": "ptq", "qat": {}})


def test_ptq_points_keep_their_identity_and_flows_get_their_own(compose):
    ptq = Point(compose("scheme=intxwo_2", "granularity=per_axis"))
    qat = Point(compose("scheme=qat_intxwo_2", "granularity=per_axis"))
    assert ptq.flow is None and ptq.params()["flow"] == "ptq"  # hashes and recipes as before flows
    assert qat.quant == ptq.quant  # the same torchao config ...
    assert qat.config_key != ptq.config_key  # ... is another measurement under another flow
    assert qat.flow == {"name": "qat", "qat": {"steps": 100, "lr": 1e-4, "batch_size": 64, "ptq_twin": True}}
    assert flow_spec(compose("scheme=qat_intxwo_4", "scheme.qat.steps=7").scheme)["qat"]["steps"] == 7
    root, _ = load_config(["scheme=pt2e_x86"])
    assert flow_spec(root.scheme) == {"name": "pt2e", "calib": {"batches": 8, "batch_size": 32}}
