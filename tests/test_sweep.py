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


def qsweep(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "qsweep", "run", f"output_dir={tmp_path}", "device=cpu",
                           "bench=fast", "eval.n_samples=32", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def runs(tmp_path: Path, experiment: str) -> pd.DataFrame:
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return mlflow.search_runs([exp.experiment_id], tracking_uri=None) if False else pd.DataFrame(
        [{"name": r.info.run_name, "status": r.data.tags["status"], "reason": r.data.tags.get("reason", ""),
          **r.data.metrics} for r in client.search_runs([exp.experiment_id])])


def test_grid_records_every_status_and_a_crash_does_not_stop_it(tmp_path):
    grid = ["-m", "model.builder._target_=fragile_models.fragile_toy", "+model.builder.how=raise",
            "tracking.experiment=crashy", "scheme=none,int8wo,intxwo_4,int4wo", "granularity=per_row,per_group",
            "group_size=32"]
    done = qsweep(tmp_path, *grid)
    assert done.returncode == 1, done.stderr[-2000:]  # a failed point makes the sweep exit non-zero
    assert "8 points: 1 ok, 3 failed, 2 skipped, 1 unsupported, 1 reused" in done.stdout, done.stdout[-3000:]
    table = runs(tmp_path, "crashy").set_index("name")
    assert table.loc["int8wo-per_row-none", "status"] == "failed"
    assert "kernel exploded on purpose" in table.loc["int8wo-per_row-none", "reason"]
    assert table.loc["intxwo_4-per_row-none", "status"] == "skipped"
    assert table.loc["int4wo-g32-none", "status"] == "unsupported"
    csv = next(tmp_path.glob("runs/*/results.csv"))
    assert len(pd.read_csv(csv)) == 8

    again = qsweep(tmp_path, *grid)  # resume: only the failed points are tried again
    assert "8 points: 0 ok, 3 failed, 0 skipped, 0 unsupported, 5 reused" in again.stdout, again.stdout[-3000:]


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
