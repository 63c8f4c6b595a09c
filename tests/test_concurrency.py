"""Several sweeps at once on one fresh output_dir (one SQLite store): every distinct point recorded once,
no traceback, each sweep's own folder, summary and exit code; a point that cannot be recorded is failed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd

TESTS = Path(__file__).parent
COMMON = ["device=cpu", "bench=fast", "eval.n_samples=64", "eval.batch_size=32"]
TOY = ["model=toy", "model.builder.in_features=64", "model.builder.hidden=64", "model.builder.out_features=64",
       "scheme=none,int8wo,intxwo_4", "granularity=per_row,per_group", "group_size=32"]
BLOCK = ["model=mlp_block", "model.builder.dim=64", "scheme=none,int8wo"]
SUMMARY = re.compile(r"(\d+) points: (\d+) ok, (\d+) failed, (\d+) skipped, (\d+) unsupported, (\d+) reused")


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _start(tmp_path: Path, *args: str, python: list[str] | None = None) -> subprocess.Popen:
    command = python or [sys.executable, "-m", "qsweep"]
    return subprocess.Popen([*command, "run", "-m", f"output_dir={tmp_path}", *COMMON, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _summary(stdout: str) -> dict[str, int]:
    found = SUMMARY.findall(stdout)
    assert len(found) == 1, stdout[-3000:]
    return dict(zip(["points", "ok", "failed", "skipped", "unsupported", "reused"], map(int, found[0])))


def _runs(tmp_path: Path, experiment: str, parents: bool = False) -> pd.DataFrame:
    """The points of an experiment (with `parents`: the sweeps' parent runs instead)."""
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return pd.DataFrame([{"name": r.info.run_name, "state": r.info.status, "run_id": r.info.run_id, **r.data.tags}
                         for r in found if (r.data.tags.get("qsweep.role") == "sweep") == parents])


def test_three_sweeps_at_once_record_every_point_exactly_once(tmp_path):
    procs = [_start(tmp_path, *TOY), _start(tmp_path, *TOY), _start(tmp_path, *BLOCK)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, (out[-2000:], err[-3000:])
        assert "Traceback" not in out + err, err[-3000:]

    toy = _runs(tmp_path, "toy")
    # 6 grid points, 5 records: the per_group `none` point is the same baseline as the per_row one.
    assert sorted(toy["name"]) == ["toy/int8wo-g32-none", "toy/int8wo-per_row-none", "toy/intxwo_4-g32-none",
                                   "toy/intxwo_4-per_row-none", "toy/none-none"]
    assert sorted(toy["status"]) == ["ok", "ok", "ok", "ok", "skipped"] and set(toy["state"]) == {"FINISHED"}
    block = _runs(tmp_path, "mlp_block")
    assert sorted(block["name"]) == ["mlp_block/int8wo-per_row-none", "mlp_block/none-none"]
    assert set(block["status"]) == {"ok"}
    # Two sweeps of one grid at once: each its own parent run (neither takes the other's, still running).
    toy_parents, block_parents = _runs(tmp_path, "toy", parents=True), _runs(tmp_path, "mlp_block", parents=True)
    assert len(toy_parents) == 2 and len(block_parents) == 1
    assert set(toy_parents["status"]) == set(block_parents["status"]) == {"ok"}
    assert set(toy["mlflow.parentRunId"]) <= set(toy_parents["run_id"])
    assert set(block["mlflow.parentRunId"]) == set(block_parents["run_id"])

    # Each sweep its own folder and summary; the two toy sweeps together recorded each point once and
    # reported the rest (the points the other one measured, or that it waited for) as reused.
    first, second, third = (_summary(out) for out, _ in outputs)
    assert first["points"] == second["points"] == 6 and third == {"points": 2, "ok": 2, "failed": 0, "skipped": 0,
                                                                   "unsupported": 0, "reused": 0}
    assert first["ok"] + second["ok"] == 4 and first["skipped"] + second["skipped"] == 1
    assert first["reused"] + second["reused"] == 7 and first["failed"] + second["failed"] == 0
    folders = sorted(tmp_path.glob("runs/*/results.csv"))
    assert sorted(len(pd.read_csv(f)) for f in folders) == [2, 6, 6]


# `qsweep` whose MLflow store refuses one artifact: the int8wo per-row point cannot be recorded.
REFUSING_STORE = """
import sys
import mlflow

log_text = mlflow.MlflowClient.log_text

def refuses(self, run_id, text, artifact_file, *args, **kwargs):
    if artifact_file == "recipe.json" and "Int8WeightOnlyConfig" in text and "PerRow" in text:
        raise OSError("No space left on device (injected)")
    return log_text(self, run_id, text, artifact_file, *args, **kwargs)

mlflow.MlflowClient.log_text = refuses
from qsweep.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_a_point_that_cannot_be_recorded_is_failed_and_the_sweep_goes_on(tmp_path):
    proc = _start(tmp_path, *TOY[:4], "scheme=int8wo,intxwo_4", "granularity=per_row,per_group", "group_size=32",
                  python=[sys.executable, "-c", REFUSING_STORE])
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-3000:]  # a failed point
    assert "Traceback" not in out + err, err[-3000:]
    assert "toy/int8wo-per_row-none: failed: recording failed: OSError: No space left on device" in out
    assert _summary(out) == {"points": 4, "ok": 2, "failed": 1, "skipped": 1, "unsupported": 0, "reused": 0}
    runs = _runs(tmp_path, "toy").set_index("name")
    assert runs.loc["toy/int8wo-per_row-none", "status"] == "failed"  # the half-written run says why
    assert runs.loc["toy/int8wo-per_row-none", "state"] == "FAILED"
    assert runs.loc["toy/int8wo-per_row-none", "reason"].startswith("recording failed: OSError")
    assert runs.loc["toy/intxwo_4-g32-none", "status"] == "ok"  # the points after it ran
