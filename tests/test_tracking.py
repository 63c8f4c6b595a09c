"""Records: a run is complete only once its status is written (last); half-written runs are never reused
and are marked failed on the next start; a search's parent run says how the search ended."""

from __future__ import annotations

import socket
import subprocess
import sys

import mlflow

from conftest import FAST
from qsweep.cli import main
from qsweep.sweep import run_point
from qsweep.tracking import Tracker

WRITER_TAG = "qsweep.writer"
SMALL_TOY = ["model.builder.in_features=64", "model.builder.hidden=64", "model.builder.out_features=64"]

# A sweep process killed (kill -9) while it writes the baseline's metrics to MLflow.
KILLED_WHILE_WRITING = """
import os, sys
import mlflow

log_batch = mlflow.MlflowClient.log_batch

def dies_on_metrics(self, run_id, metrics=(), *args, **kwargs):
    if metrics:
        os._exit(9)
    return log_batch(self, run_id, metrics, *args, **kwargs)

mlflow.MlflowClient.log_batch = dies_on_metrics
from qsweep.config import load_config
from qsweep.sweep import run_point

run_point(load_config(sys.argv[1:])[0])
"""


def _client(tmp_path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_a_run_killed_while_written_is_never_reused_and_is_marked_failed(tmp_path, compose):
    over = [f"output_dir={tmp_path}", *FAST, *SMALL_TOY, "isolate=false"]
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, *over, "scheme=none"],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr[-2000:]
    client = _client(tmp_path)
    experiment = client.get_experiment_by_name("toy").experiment_id
    (orphan,) = client.search_runs([experiment])
    assert orphan.info.status == "RUNNING" and "status" not in orphan.data.tags  # status comes last
    assert list((tmp_path / "baselines").glob("*.pt"))  # the baseline's outputs were written before it died

    record = run_point(compose(*SMALL_TOY, "scheme=int8wo", "isolate=false"))
    assert record.status == "ok" and record.metrics["speedup"] > 0 and record.metrics["size_ratio"] > 1
    orphan = client.get_run(orphan.info.run_id)
    assert orphan.info.status == "FAILED" and orphan.data.tags["status"] == "failed"
    assert orphan.data.tags["reason"].startswith("orphaned: its writer")
    baselines = client.search_runs([experiment], "tags.`qsweep.role` = 'baseline' and tags.status = 'ok'")
    assert len(baselines) == 1 and baselines[0].info.run_id != orphan.info.run_id  # measured again


def test_only_runs_whose_writer_is_gone_are_orphans(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "writers")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    try:
        alive = tracker.start("alive", {}, {"qsweep.role": "baseline"})
        gone = tracker.start("gone", {}, {"qsweep.role": "baseline"})
        foreign = tracker.client.create_run(tracker.experiment_id, run_name="not qsweep's").info.run_id
        tracker.client.set_tag(alive, WRITER_TAG, f"{socket.gethostname()}:{sleeper.pid}")  # another sweep
        tracker.client.set_tag(gone, WRITER_TAG, f"{socket.gethostname()}:{ended.pid}")  # killed mid-write
        assert tracker.fail_orphans() == [gone]
        assert tracker.client.get_run(alive).info.status == "RUNNING"  # another sweep is still writing it
        assert tracker.client.get_run(foreign).info.status == "RUNNING"  # not ours to judge
        assert not tracker.find(status="ok")
        tracker.finish(alive, "ok", "", {"latency_ms": 1.0})
        assert [r.info.run_id for r in tracker.find(status="ok")] == [alive]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_failed_search_leaves_its_parent_failed(tmp_path):
    # toy has no logits, so drift_kl cannot be measured: the search stops after creating its parent run.
    code = main(["search", f"output_dir={tmp_path}", *FAST, *SMALL_TOY, "search.drift_metric=drift_kl",
                 "search.n_trials=2", "isolate=false"])
    assert code == 2
    client = _client(tmp_path)
    (parent,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id],
                                   "tags.`qsweep.role` = 'search-study'")
    assert parent.info.status == "FAILED" and parent.data.tags["status"] == "failed"
    assert "has no drift_kl" in parent.data.tags["reason"]
