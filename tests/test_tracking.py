"""Records: a run is complete only once its status is written (last); half-written runs are never reused
and are marked failed on the next start; a search's parent run says how the search ended."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import mlflow

from conftest import FAST
from qsweep import sweep
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

    sweep._start_sweep()  # the next sweep starts after the crash: marking the orphan must not make it "fresh"
    try:
        record = run_point(compose(*SMALL_TOY, "scheme=int8wo", "isolate=false"))
    finally:
        sweep._start_sweep(ended=True)
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


def test_a_points_run_lasts_as_long_as_its_trial(tmp_path, compose, monkeypatch):
    from qsweep import sweep

    walls: list[float] = []  # each trial's wall time, measured around it here
    trial = sweep.run_trial

    def timed(spec):
        start = time.perf_counter()
        try:
            return trial(spec)
        finally:
            walls.append(time.perf_counter() - start)

    monkeypatch.setattr(sweep, "run_trial", timed)
    record = run_point(compose(*SMALL_TOY, "scheme=int8wo", "isolate=false"))
    assert record.status == "ok" and len(walls) == 2  # the baseline's trial, then the point's
    client = _client(tmp_path)
    baseline, point = sorted(client.search_runs([client.get_experiment_by_name("toy").experiment_id]),
                             key=lambda r: r.info.start_time)
    for run, wall in ((baseline, walls[0]), (point, walls[1])):
        duration = (run.info.end_time - run.info.start_time) / 1000
        expected = run.data.metrics.get("time_total_s", wall)  # the trial's own total, where it records one
        assert abs(duration - expected) <= 0.1 * expected, (run.info.run_name, duration, expected)


def test_a_sweeps_parent_nests_its_points_and_is_taken_again_only_when_free(tmp_path):
    from qsweep.config import SelectConf
    from qsweep.select import candidates
    from qsweep.tracking import ROLE_SWEEP, load_runs, writer_id

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "nest")
    parent = tracker.sweep_parent("grid-a", "sweep 1", {"points": 2}, writer_id())
    assert tracker.sweep_parent("grid-a", "sweep 2", {}, writer_id()) != parent  # still written: not taken
    tracker.parent = parent
    params = {"model": "toy", "device": "cpu", "dtype": "float32", "scheme": "int8wo"}
    point = tracker.record("toy/int8wo-per_row-none", "ok", "", params, {"speedup": 2.0, "latency_ms": 1.0}, {})
    tracker.finish(parent, "ok", "1 points: 1 ok")
    assert tracker.sweep_parent("grid-a", "sweep 3", {}, writer_id()) == parent  # resumed: the same parent
    assert tracker.client.get_run(parent).info.status == "RUNNING"  # reopened, its status unset until the end

    frame = load_runs(uri, "nest").set_index("run_id")
    assert frame.loc[parent, "kind"] == "parent" and frame.loc[parent, "role"] == ROLE_SWEEP
    assert frame.loc[point, "kind"] == "grid" and frame.loc[point, "parent_run_id"] == parent
    assert list(candidates(frame.reset_index(), SelectConf())["run_id"]) == [point]  # never the parent
