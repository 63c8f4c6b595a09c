"""Sweeps end to end through the real CLI: grid with skips, crashes recorded, resume, metric sanity."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd

from qsweep.sweep import run_point

TESTS = Path(__file__).parent


def qsweep(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    paths = [(env or {}).get("PYTHONPATH"), str(TESTS), os.environ.get("PYTHONPATH")]
    env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "qsweep", "run", f"output_dir={tmp_path}", "device=cpu",
                           "bench=fast", "eval.n_samples=32", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def runs(tmp_path: Path, experiment: str, parents: bool = False) -> pd.DataFrame:
    """The points of an experiment (with `parents`: the sweeps' parent runs instead)."""
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return pd.DataFrame(
        [{"name": r.info.run_name, "status": r.data.tags["status"], "reason": r.data.tags.get("reason", ""),
          "run_id": r.info.run_id, "parent": r.data.tags.get("mlflow.parentRunId"), **r.data.metrics}
         for r in client.search_runs([exp.experiment_id])
         if (r.data.tags.get("qsweep.role") == "sweep") == parents])


def test_grid_records_every_status_and_a_crash_does_not_stop_it(tmp_path):
    grid = ["-m", "model.builder._target_=fragile_models.fragile_toy", "+model.builder.how=raise",
            "tracking.experiment=crashy", "scheme=none,int8wo,intxwo_4,int4wo", "granularity=per_row,per_group",
            "group_size=32"]
    done = qsweep(tmp_path, *grid)
    assert done.returncode == 1, done.stderr[-2000:]  # a failed point makes the sweep exit non-zero
    assert "8 points: 1 ok, 3 failed, 2 skipped, 1 unsupported, 1 reused" in done.stdout, done.stdout[-3000:]
    table = runs(tmp_path, "crashy").set_index("name")
    assert table.loc["toy/int8wo-per_row-none", "status"] == "failed"
    assert "kernel exploded on purpose" in table.loc["toy/int8wo-per_row-none", "reason"]
    assert table.loc["toy/intxwo_4-per_row-none", "status"] == "skipped"
    assert table.loc["toy/int4wo-g32-none", "status"] == "unsupported"
    csv = next(tmp_path.glob("runs/*/results.csv"))
    assert len(pd.read_csv(csv)) == 8

    (parent,) = runs(tmp_path, "crashy", parents=True).itertuples()  # the sweep: every point nests under it
    assert parent.status == "failed" and parent.reason.startswith("8 points: 1 ok, 3 failed")
    assert set(table["parent"]) == {parent.run_id}

    again = qsweep(tmp_path, *grid)  # resume: only the failed points are tried again
    assert "8 points: 0 ok, 3 failed, 0 skipped, 0 unsupported, 5 reused" in again.stdout, again.stdout[-3000:]
    (resumed,) = runs(tmp_path, "crashy", parents=True).itertuples()  # the same parent, with the new points
    assert resumed.run_id == parent.run_id and resumed.reason.startswith("8 points: 0 ok, 3 failed")
    assert set(runs(tmp_path, "crashy")["parent"]) == {parent.run_id}


def test_run_names_and_the_results_table_say_which_model(tmp_path):
    grid = ["-m", "model=mlp_block", "model.builder.dim=64", "scheme=none,int8wo", "tracking.experiment=names"]
    done = qsweep(tmp_path, *grid)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[2/2] mlp_block/int8wo-per_row-none: ok" in done.stdout, done.stdout[-3000:]
    assert set(runs(tmp_path, "names")["name"]) == {"mlp_block/none-none", "mlp_block/int8wo-per_row-none"}
    table = pd.read_csv(next(tmp_path.glob("runs/*/results.csv")))
    assert list(table.columns[:2]) == ["model", "run"] and set(table["model"]) == {"mlp_block"}
    assert "mlp_block/int8wo-per_row-none" in set(table["run"])
    assert any(line.split()[:2] == ["model", "run"] for line in done.stdout.splitlines())  # the printed table


def test_resume_runs_zero_new_trials_and_force_reruns(tmp_path):
    grid = ["-m", "tracking.experiment=resume", "scheme=none,int8wo", "model.builder.in_features=128",
            "model.builder.hidden=128", "model.builder.out_features=128"]
    first = qsweep(tmp_path, *grid)
    assert first.returncode == 0 and "2 points: 2 ok, 0 failed, 0 skipped, 0 unsupported, 0 reused" in first.stdout
    before = len(runs(tmp_path, "resume"))
    second = qsweep(tmp_path, *grid)
    assert "2 points: 0 ok, 0 failed, 0 skipped, 0 unsupported, 2 reused" in second.stdout
    assert len(runs(tmp_path, "resume")) == before
    forced = qsweep(tmp_path, *grid, "force=true")
    # Both points measured again, the baseline once for the sweep (not once per point).
    assert "0 reused" in forced.stdout and len(runs(tmp_path, "resume")) == before + 2


def test_hard_crash_in_child_process_is_recorded(compose):
    root = compose("model.builder._target_=fragile_models.fragile_toy", "+model.builder.how=exit",
                   "scheme=int8wo")
    record = run_point(root)
    assert record.status == "failed" and "exit code 3" in record.reason


def test_timeout_is_recorded(compose):
    record = run_point(compose("scheme=int8wo", "bench.timeout_s=0.01"))
    assert record.status == "failed" and "timeout" in record.reason


def test_metric_sanity_size_and_drift_ordering(compose):
    common = ["isolate=false", "granularity=per_group", "group_size=32"]
    int8 = run_point(compose("scheme=int8wo", *common))
    int8x = run_point(compose("scheme=intxwo_8", *common))
    int2 = run_point(compose("scheme=intxwo_2", *common))
    assert int8.metrics["size_ratio"] > 3.3  # float32 -> int8 + one scale per 32 weights: at most 3.56x
    assert int8.metrics["size_bytes"] < 0.3 * 2 * 1024 * 1024 * 4
    assert int8.metrics["weights_mem_bytes"] < 0.3 * 2 * 1024 * 1024 * 4
    assert int2.metrics["drift_sqnr_db"] < int8x.metrics["drift_sqnr_db"] - 20  # ~6 dB per bit
    assert int2.metrics["drift_cosine"] < int8x.metrics["drift_cosine"]
    assert int8x.metrics["drift_sqnr_db"] > 35


def test_independent_measurements_report_their_median_and_spread(compose):
    root = compose("scheme=int8wo", "isolate=false", "bench.processes=3")
    record = run_point(root)
    client = mlflow.MlflowClient(f"sqlite:///{Path(root.output_dir) / 'mlflow.db'}")
    info = json.loads(Path(client.download_artifacts(record.run_id, "trial_info.json")).read_text())
    latencies = info["process_latency_ms"]
    assert len(latencies) == 3 and record.metrics["latency_ms"] == sorted(latencies)[1]
    spread = (max(latencies) - min(latencies)) / sorted(latencies)[1]
    assert record.metrics["latency_spread"] == spread
    assert "latency_spread" not in run_point(compose("scheme=int8wo", "isolate=false")).metrics


NET = '''
import torch
from torch import nn

from qsweep.models import ModelBundle


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 64, bias=False)
        self.fc2 = nn.Linear(64, 64, bias=False)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def net() -> ModelBundle:
    return ModelBundle(Net(), lambda batch, seed: (torch.randn(batch, 64, generator=torch.Generator().manual_seed(seed)),))
'''


def test_changed_model_code_means_a_new_baseline(tmp_path):
    """Same config, edited model code (the class's forward, not the builder function itself): the old
    baseline and points must not be reused."""
    models = tmp_path / "mods"
    models.mkdir()
    (models / "my_models.py").write_text(NET)
    grid = ["-m", "model.builder._target_=my_models.net", "~model.builder.in_features", "~model.builder.hidden",
            "~model.builder.out_features", "scheme=none,int8wo", "tracking.experiment=edited"]
    env = {"PYTHONPATH": str(models)}
    first = qsweep(tmp_path, *grid, env=env)
    assert "2 points: 2 ok, 0 failed, 0 skipped, 0 unsupported, 0 reused" in first.stdout, first.stdout[-3000:]
    assert "2 points: 0 ok, 0 failed, 0 skipped, 0 unsupported, 2 reused" in qsweep(tmp_path, *grid, env=env).stdout
    (models / "my_models.py").write_text(NET.replace("self.fc2(self.fc1(x))", "self.fc2(torch.relu(self.fc1(x)))"))
    edited = qsweep(tmp_path, *grid, env=env)
    assert "2 points: 2 ok, 0 failed, 0 skipped, 0 unsupported, 0 reused" in edited.stdout, edited.stdout[-3000:]
    assert (runs(tmp_path, "edited")["name"] == "toy/none-none").sum() == 2  # a second baseline


def test_model_identity_covers_code_and_weight_files(tmp_path):
    from qsweep.identity import model_identity

    weights = tmp_path / "model"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"x" * 10)
    hf = {"_target_": "qsweep.models.hf_causal_lm", "name_or_path": str(weights)}
    before = model_identity(hf)
    assert model_identity(hf) == before and model_identity({**hf, "random_init": True}) != before
    (weights / "model.safetensors").write_bytes(b"y" * 11)  # new weights, same config
    assert model_identity(hf) != before
    toy = model_identity({"_target_": "qsweep.models.toy_linear"})
    assert toy != model_identity({"_target_": "qsweep.models.transformer_block"})
    assert toy != model_identity({"_target_": "fragile_models.fragile_toy"})  # fragile_toy calls toy_linear


def test_a_noisy_baseline_makes_its_speedups_noisy(compose):
    from qsweep import sweep

    # A trial's own CV cannot reach 3 with 5 repeats (at most sqrt(5)), so only the baseline can be noisy.
    over = ("isolate=false", "bench.max_cv=3")
    base = run_point(compose("scheme=none", *over))
    client = mlflow.MlflowClient(f"sqlite:///{Path(compose().output_dir) / 'mlflow.db'}")
    assert "noisy" not in client.get_run(base.run_id).data.tags
    client.log_metric(base.run_id, "latency_cv", 10.0)  # as if the baseline had been measured on a busy host
    sweep._SWEEP_BASELINES.clear()
    trial = run_point(compose("scheme=int8wo", *over))
    assert trial.status == "ok" and trial.metrics["latency_cv"] < 3
    assert client.get_run(trial.run_id).data.tags["noisy"] == "baseline latency_cv 10.000 > bench.max_cv 3.0"


SWEEP_DIRS = """
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import qsweep.sweep  # noqa: F401  (registers qsweep's resolvers, as `qsweep run` does)
from qsweep.config import CONF_DIR

with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
    cfg = compose("config", return_hydra_config=True)
OmegaConf.register_new_resolver("now", lambda pattern: "2026-01-01_00-00-00", replace=True)  # the same second
print(cfg.hydra.sweep.dir, cfg.hydra.run.dir)
"""


def test_sweeps_started_in_the_same_second_get_their_own_folders():
    first, second = (subprocess.run([sys.executable, "-c", SWEEP_DIRS], capture_output=True, text=True,
                                    check=True).stdout.split() for _ in range(2))
    assert all("2026-01-01_00-00-00" in d for d in first + second)
    assert first[0] != second[0] and first[1] != second[1]
