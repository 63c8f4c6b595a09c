"""Scale-out: grid points in parallel through Hydra's joblib and submitit launchers, a shared store
(PostgreSQL + `mlflow server`, started by scripts/services.sh) written by parallel grid workers and a
2-worker search, each point and trial recorded exactly once; per-GPU claims and pinning (no GPU needed)."""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from torch import nn

from qsweep import gpus
from qsweep.models import toy_linear, transformer_block
from qsweep.runner import TrialSpec, run_isolated

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"(\d+) points: (\d+) ok, (\d+) failed, (\d+) skipped, (\d+) unsupported, (\d+) reused")
SERVICES = ROOT / "scripts" / "services.sh"
COMMON = ["device=cpu", "bench=fast", "eval.n_samples=64", "eval.batch_size=32"]
TOY = ["model=toy", "model.builder.in_features=64", "model.builder.hidden=64", "model.builder.out_features=64"]
GRID = [*TOY, "scheme=none,int8wo,intxwo_4", "granularity=per_row,per_group", "group_size=32"]
# 6 grid points, 5 records: the per_group `none` point is the per_row one's baseline.
GRID_RUNS = ["toy/int8wo-g32-none", "toy/int8wo-per_row-none", "toy/intxwo_4-g32-none", "toy/intxwo_4-per_row-none",
             "toy/none-none"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "QSWEEP_CONF_DIR")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    env[gpus.LOCK_DIR_ENV] = str(tmp_path / "gpu-locks")
    return env


def qsweep(tmp_path: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "qsweep", *args], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-4000:])
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-4000:]
    return done


def grid_runs(uri: str, experiment: str) -> tuple[list, list]:
    """(points, sweep parent runs) of an experiment."""
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("qsweep.role") == "sweep"]
    return [r for r in runs if r not in parents], parents


def assert_each_point_once(uri: str, experiment: str = "toy", names: list[str] = GRID_RUNS) -> list:
    points, parents = grid_runs(uri, experiment)
    assert sorted(r.info.run_name for r in points) == names
    # Exactly once by identity too: one run per point hash, every one finished with a status.
    assert max(Counter(r.data.tags["qsweep.point"] for r in points).values()) == 1
    assert all(r.info.status == "FINISHED" and r.data.tags.get("status") in ("ok", "skipped") for r in points)
    assert len(parents) == 1 and parents[0].data.tags["status"] == "ok"
    assert {r.data.tags["mlflow.parentRunId"] for r in points} == {parents[0].info.run_id}
    return points


def summary(stdout: str) -> dict[str, int]:
    """The sweep's counts line: `6 points: 4 ok, 0 failed, 1 skipped, 0 unsupported, 1 reused`."""
    found = SUMMARY.findall(stdout)
    assert len(found) == 1, stdout[-3000:]
    return dict(zip(["points", "ok", "failed", "skipped", "unsupported", "reused"], map(int, found[0])))


def assert_counts(stdout: str, points: int, skipped: int = 0) -> None:
    """Every point accounted for: measured by its job (ok) or by the job that got to it first (a point that
    is the baseline another job measured for its own point is reported reused)."""
    counts = summary(stdout)
    assert counts["points"] == points and counts["failed"] == counts["unsupported"] == 0, counts
    assert counts["skipped"] == skipped and counts["ok"] + counts["reused"] == points - skipped, counts
    assert counts["ok"] >= 1, counts


def writers(runs: list) -> set[str]:
    """The processes (host:pid) that wrote the runs."""
    return {r.data.tags["qsweep.writer"] for r in runs}


# ---------------------------------------------------------------- launchers, SQLite store

def test_joblib_launcher_with_two_jobs_records_every_point_once(tmp_path):
    done = qsweep(tmp_path, "run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"output_dir={tmp_path}",
                  *COMMON, *GRID)
    assert_counts(done.stdout, points=6, skipped=1)
    # The jobs ran in the launcher's worker processes and joined the sweep's folder, plan and parent run.
    assert "[6/6]" in done.stdout and "[6/?]" not in done.stdout
    assert len(list(tmp_path.glob("runs/*/results.csv"))) == 1
    points = assert_each_point_once(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(writers(points)) == 2
    assert all("device_index" not in r.data.params for r in points)  # CPU: no GPU claimed


def test_submitit_local_launcher_records_every_point_once(tmp_path):
    done = qsweep(tmp_path, "run", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                  f"output_dir={tmp_path}", *COMMON, *TOY, "scheme=none,int8wo")
    assert_counts(done.stdout, points=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    points = assert_each_point_once(uri, names=["toy/int8wo-per_row-none", "toy/none-none"])
    # One submitit job (its own process) per point, which measured it there, not in the sweep's process.
    assert len(list(tmp_path.glob("runs/*/.submitit/*/*_result.pkl"))) == 2
    sweep_process = grid_runs(uri, "toy")[1][0].data.tags["qsweep.writer"]
    assert sweep_process not in writers(points)


def test_launcher_presets_compose(tmp_path):
    from hydra import compose, initialize_config_dir

    from qsweep.config import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        joblib = compose("config", ["hydra/launcher=gpus"], return_hydra_config=True).hydra.launcher
        slurm = compose("config", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                        return_hydra_config=True).hydra.launcher
    assert joblib._target_.endswith("JoblibLauncher") and joblib.n_jobs == gpus.gpu_count() >= 1
    assert slurm._target_.endswith("SlurmLauncher") and slurm.gpus_per_node == 1 and slurm.partition == "gpu"
    assert slurm.timeout_min > 0 and slurm.tasks_per_node == 1


# ---------------------------------------------------------------- GPU claims (no GPU needed)

def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    for value, expected in [("0,1", ["0", "1"]), ("2, 3", ["2", "3"]), ("", []), ("-1", []), ("1,-1,0", ["1"]),
                            ("GPU-8a1c,GPU-77f0", ["GPU-8a1c", "GPU-77f0"])]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
        assert gpus.visible_gpus() == expected, value
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpus.gpu_count() == 1  # a launcher's n_jobs on a machine without a GPU


def test_one_trial_per_gpu_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setenv(gpus.LOCK_DIR_ENV, str(tmp_path))
    with gpus.claim_gpu(["0", "1"]) as first, gpus.claim_gpu(["0", "1"]) as second:
        assert {first, second} == {"0", "1"}
        got: list[str] = []

        def third() -> None:
            with gpus.claim_gpu(["0", "1"], waiting="waiting for a free GPU") as gpu:
                got.append(gpu)

        waiter = threading.Thread(target=third)
        waiter.start()
        time.sleep(3 * gpus.POLL_S)
        assert got == []  # both GPUs busy: it waits
    waiter.join(10)
    assert got in (["0"], ["1"])
    # A CPU trial, or one in-process, claims nothing.
    with gpus.trial_device("cpu", True) as (env, index):
        assert env == {} and index is None


class _Slow(nn.Module):
    """A model whose every forward also waits: search trials long enough that both workers get some."""

    def __init__(self, inner: nn.Module, delay_s: float):
        super().__init__()
        self.inner, self.delay_s = inner, delay_s

    def forward(self, *args):
        time.sleep(self.delay_s)
        return self.inner(*args)


def slow_block(delay_s: float, **kwargs):
    bundle = transformer_block(**kwargs)
    return dataclasses.replace(bundle, model=_Slow(bundle.model, delay_s))


def toy_noting_env(note: str, **kwargs):
    """The toy model; notes the CUDA_VISIBLE_DEVICES its trial process sees."""
    Path(note).write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
    return toy_linear(**kwargs)


def test_the_claimed_gpu_reaches_the_trial_process_and_is_recorded(compose, tmp_path, monkeypatch):
    import contextlib

    from qsweep.sweep import run_point

    note = tmp_path / "visible.txt"
    spec = TrialSpec(model_builder={"_target_": "test_scaleout.toy_noting_env", "note": str(note), "in_features": 32,
                                    "hidden": 32, "out_features": 32}, quant=None, device="cpu", dtype="float32",
                     batch_size=4, warmup=1, repeats=3, eval_samples=8, eval_batch_size=8,
                     reference_path=str(tmp_path / "reference.pt"), is_baseline=True)
    assert run_isolated(spec, 120, {"CUDA_VISIBLE_DEVICES": "5"}).status == "ok"
    assert note.read_text() == "5"  # set in the child, not inherited from the fork server

    @contextlib.contextmanager
    def fake_gpu(device, isolated, waiting=""):  # a CPU host standing in for GPU 3
        yield {"CUDA_VISIBLE_DEVICES": "3"}, 3

    monkeypatch.setattr(gpus, "trial_device", fake_gpu)
    root = compose("model.builder._target_=test_scaleout.toy_noting_env", f"+model.builder.note={note}",
                   "model.builder.in_features=32", "model.builder.hidden=32", "model.builder.out_features=32",
                   "scheme=int8wo")
    record = run_point(root)
    assert record.status == "ok" and note.read_text() == "3"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for run_id in (record.run_id, *[r.info.run_id for r in grid_runs(client.tracking_uri, "toy")[0]]):
        assert client.get_run(run_id).data.params["device_index"] == "3"  # the trial and its baseline


# ---------------------------------------------------------------- shared store: PostgreSQL + MLflow server

@dataclass
class Services:
    tracking: str
    optuna: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def services():
    """PostgreSQL and an MLflow server on loopback (random ports, a fresh folder), stopped afterwards."""
    if not shutil.which("pg_ctl") and not glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"):
        if os.environ.get("CI"):  # .ci/run installs it: missing there is a broken CI, not a skip
            pytest.fail("PostgreSQL is not installed (apt-get install -y postgresql)")
        pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql)")
    # World-searchable: as root the database runs as user postgres, which must reach its folder.
    folder = Path(tempfile.mkdtemp(prefix="qsweep-services-", dir="/tmp" if os.path.isdir("/tmp") else None))
    folder.chmod(0o755)
    pg_port, mlflow_port = _free_port(), _free_port()
    env = {**os.environ, "QSWEEP_SERVICES_DIR": str(folder), "QSWEEP_PG_PORT": str(pg_port),
           "QSWEEP_MLFLOW_PORT": str(mlflow_port), "PYTHON": sys.executable, "QSWEEP_MLFLOW_WORKERS": "2"}
    try:
        started = subprocess.run(["bash", str(SERVICES), "start"], env=env, capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, (started.stdout, started.stderr[-3000:])
        status = subprocess.run(["bash", str(SERVICES), "status"], env=env, capture_output=True, text=True, timeout=60)
        assert "PostgreSQL: running" in status.stdout and "MLflow server: running" in status.stdout, status.stdout
        yield Services(f"http://127.0.0.1:{mlflow_port}", f"postgresql://qsweep@127.0.0.1:{pg_port}/optuna")
    finally:
        stopped = subprocess.run(["bash", str(SERVICES), "stop"], env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stderr


def test_parallel_grid_workers_share_the_tracking_server(services, tmp_path):
    done = qsweep(tmp_path, "run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"output_dir={tmp_path}",
                  f"tracking.uri={services.tracking}", *COMMON, *GRID)
    assert_counts(done.stdout, points=6, skipped=1)
    assert not (tmp_path / "mlflow.db").exists()  # everything went to the server
    points = assert_each_point_once(services.tracking)
    assert len(writers(points)) == 2
    artifacts = mlflow.MlflowClient(services.tracking).list_artifacts(points[0].info.run_id)
    assert "config.yaml" in {a.path for a in artifacts}  # served by the tracking server


def test_two_search_workers_share_one_study_in_postgres(services, tmp_path):
    import optuna

    study = "scaleout-2w"
    # Each forward waits 0.2 s: a trial takes ~0.5 s, so a worker that starts a second late still gets trials.
    over = ["model=mlp_block", "model.builder._target_=test_scaleout.slow_block", "+model.builder.delay_s=0.2",
            "model.builder.dim=64", "search.candidates=[none,int8wo,intxwo_4]",
            "search.drift_metric=drift_max_abs", "search.max_drift=10", "search.objective=size", "search.n_trials=16",
            "search.confirm_top_k=1", "search.paired_rounds=0", f"search.study={study}", "search.n_workers=2",
            f"search.storage={services.optuna}", f"tracking.uri={services.tracking}", "tracking.experiment=search"]
    done = qsweep(tmp_path, "search", f"output_dir={tmp_path}", *COMMON, *over)
    assert "2 workers (CPU) run 16 more" in done.stdout

    trials = optuna.load_study(study_name=study, storage=services.optuna).get_trials(deepcopy=False)
    numbers = sorted(t.number for t in trials)
    assert numbers == list(range(len(trials))) and len(trials) >= 16  # a worker may finish one past n_trials
    assert all(t.state.is_finished() for t in trials), Counter(t.state.name for t in trials)

    client = mlflow.MlflowClient(services.tracking)
    experiment = client.get_experiment_by_name("search").experiment_id
    runs = client.search_runs([experiment], f"tags.`qsweep.study` = '{study}'", max_results=1000)
    by_role = {role: [r for r in runs if r.data.tags["qsweep.role"] == role]
               for role in ("search-study", "search-trial", "search-confirm")}
    logged = Counter(int(r.data.params["trial"]) for r in by_role["search-trial"])
    # Every trial evaluated (not a repeat of a recipe its worker had seen) is one MLflow run, exactly once.
    evaluated = {t.number for t in trials if not t.user_attrs.get("duplicate")}
    assert set(logged) == evaluated and max(logged.values()) == 1
    assert len(writers(by_role["search-trial"])) == 2  # both workers ran trials
    # One parent run (the coordinator's), finished once; confirmation measured once, not per worker.
    assert len(by_role["search-study"]) == 1 and by_role["search-study"][0].data.tags["status"] == "ok"
    assert {r.data.tags["mlflow.parentRunId"] for r in by_role["search-trial"]} == {by_role["search-study"][0].info.run_id}
    assert 1 <= len(by_role["search-confirm"]) <= 2  # the best recipe, and the best uniform one if it differs
    summary = (tmp_path / "search" / study / "summary.json").read_text()
    assert '"trials_total": ' + str(len(trials)) in summary
