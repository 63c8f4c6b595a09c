"""MLflow, the one place qsweep writes and reads it: one experiment per model (or `tracking.experiment`),
one run per grid point nested under its sweep's parent run, the metric schema from qsweep.metrics, and
every tag, role and artifact name below.

Several qsweep processes may share one SQLite store (two terminals, a launcher with n_jobs > 1). SQLite
has no server to order them, so every store access of a Tracker holds one file lock beside the database
(`mlflow.db.lock`): MLflow's first-time schema creation and migration (which races: `table logged_models
already exists`), experiment creation and the writes of a run happen one process at a time. Locks are
held for milliseconds, never during a trial.

A run is written status last: created RUNNING with its writer (host:pid), then params, metrics and
artifacts, then the `status` tag, then FINISHED/FAILED. A run without a status tag, or still RUNNING, is
half-written and never reused; one whose writer process is gone is marked FAILED on the next start.
A point's run starts and ends when its trial did (not when it was written), so MLflow's Duration is the
trial's wall time.

Reads go through the client, page by page, not `mlflow.search_runs`: that one reads the process-wide
tracking URI (`mlflow.set_tracking_uri`), and qsweep passes a store per call (tests use one per test).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from qsweep.config import ConfigError, first_line
from qsweep.metrics import BY_NAME, METRICS, STATUSES, only_metrics

# MLflow's SQLite store logs its schema migrations at INFO on every new store.
logging.getLogger("alembic").setLevel(logging.WARNING)

# ---------------------------------------------------------------- names

# Statuses of a point (the `status` tag): measured, failed (retried by the next sweep), skipped (a
# combination the scheme forbids, or a duplicate config), unsupported (this hardware cannot run it).
OK, FAILED, SKIPPED, UNSUPPORTED = STATUSES
STATUS_TAG, REASON_TAG, MODEL_TAG, NOISY_TAG = "status", "reason", "model", "noisy"
ROLE_TAG = "qsweep.role"  # what a run is, when it is not a grid point: one of the roles below
ROLE_BASELINE = "baseline"  # the unquantized measurement of a context
ROLE_SWEEP = "sweep"  # a sweep's parent run: its results table, plots and counts; the points nest under it
ROLE_SEARCH = "search-study"  # a per-layer search's parent run
ROLE_TRIAL, ROLE_CONFIRM = "search-trial", "search-confirm"  # its trials, and recipes measured end to end
ROLE_REPORT, ROLE_APPLY = "report", "apply"  # `qsweep report` and `qsweep apply` runs
NOT_POINTS = (ROLE_REPORT, ROLE_APPLY)  # roles of runs that are not measurements of a config
PARENT_ROLES = (ROLE_SEARCH, ROLE_SWEEP)  # summaries: their children are the points, they are never candidates
POINT_TAG = "qsweep.point"  # hash of a grid point: config, model identity, hardware, versions (reuse)
CONFIG_TAG = "qsweep.config"  # hash of the torchao config in its context: two points, one measurement
BASELINE_TAG = "qsweep.baseline"  # hash of a point's baseline context
STUDY_TAG = "qsweep.study"  # a search's study name, on its parent and trials
SWEEP_TAG = "qsweep.sweep"  # a sweep parent's grid hash: what a resumed sweep finds again
WRITER_TAG = "qsweep.writer"  # host:pid of the process writing the run; tells an orphan from a live run
SELECTED_TAG, SELECTED_RECIPE_TAG = "selected", "selected.recipe"  # `qsweep select`'s pick and its file
PARENT_TAG, RUN_NAME_TAG = "mlflow.parentRunId", "mlflow.runName"
NOTE_TAG = "mlflow.note.content"  # a run's description, markdown on its MLflow page
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # an experiment's saved views in the MLflow UI (qsweep.dashboard)
# Runs qsweep writes carry one of these tags; other runs in the experiment are left alone.
QSWEEP_TAGS = (WRITER_TAG, POINT_TAG, ROLE_TAG, STUDY_TAG)

# Artifact file names (the recipe's own file names live in qsweep.recipe).
CONFIG_FILE = "config.yaml"  # a point's resolved Hydra config
TRIAL_INFO_FILE = "trial_info.json"  # how a trial was measured (timing mode, memory kind, ...)
TRACEBACK_FILE = "traceback.txt"  # a failed trial's traceback or crashed child's last stderr lines
RESULTS_FILE = "results.csv"  # a sweep's results table (the sweep folder and its parent run)
SENSITIVITY_FILE = "sensitivity.csv"  # a search parent's per-layer sensitivity (group, candidate, drift)
CONTEXT_KEYS = ("model", "device", "dtype")  # a search trial that lacks them inherits them from its parent


@dataclass
class PointRecord:
    """What a sweep keeps of one grid point: the row of the results table."""

    run_name: str
    status: str
    reason: str
    params: dict[str, Any]
    metrics: dict[str, float]
    run_id: str | None = None
    reused: bool = False
    experiment: str | None = None

    def row(self) -> dict[str, Any]:
        return {"model": self.params.get("model"), "run": self.run_name,
                "status": self.status + (" (reused)" if self.reused else ""), **self.metrics, "reason": self.reason,
                "run_id": self.run_id}


class RecordError(RuntimeError):
    """Writing a run to the store failed. The run, if it was created, is marked failed with the reason."""

    def __init__(self, reason: str, run_id: str | None):
        super().__init__(reason)
        self.reason, self.run_id = reason, run_id


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store live beside the database (<dir>/mlartifacts/<experiment>); MLflow's
    default, ./mlruns under whatever directory the process started in, scatters them into the cwd."""
    path = sqlite_path(uri)
    if path is None:
        return None
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in experiment)
    return str(path.parent / "mlartifacts" / safe)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (absolute), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///")).resolve()


_STORE_LOCKS: dict[str, Any] = {}


def store_lock(uri: str) -> contextlib.AbstractContextManager:
    """The cross-process lock of a SQLite store (`<db>.lock`, reentrant within a process); a no-op for a
    tracking server, which orders its clients itself."""
    path = sqlite_path(uri)
    if path is None:
        return contextlib.nullcontext()
    if str(path) not in _STORE_LOCKS:
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        _STORE_LOCKS[str(path)] = FileLock(f"{path}.lock")
    return _STORE_LOCKS[str(path)]


def open_client(uri: str) -> Any:
    """An MlflowClient on a store that exists: a new SQLite store is created and migrated under the store
    lock, as a Tracker does (a reader such as `qsweep select` may start while sweeps create the store)."""
    import mlflow

    with store_lock(uri):
        client = mlflow.MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # the first store access builds (and migrates) the store
    return client


def writer_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def writer_gone(writer: str | None) -> bool:
    """True when the process that wrote a run is known to have ended: no writer tag (a run of an older
    qsweep, which wrote each run at once), or a process of this host that no longer exists. A writer
    on another host cannot be checked and counts as alive."""
    if not writer:
        return True
    host, _, pid = writer.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


# (uri, experiment id) whose orphans this process has already marked: once per process start.
_CHECKED_ORPHANS: set[tuple[str, str]] = set()


class Tracker:
    """A thin MlflowClient wrapper: no global active run, so nothing leaks between points."""

    def __init__(self, uri: str, experiment: str):
        import mlflow

        self.uri = uri
        self.lock = store_lock(uri)
        with self.lock:  # the first store access creates and migrates the schema: once, one process at a time
            self.client = mlflow.MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self._create_experiment(experiment)
            if not found or EXPERIMENT_KIND[0] not in found.tags:
                # MLflow 3 opens experiments of unknown kind on its GenAI (traces) page; ours are run tables.
                self.client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)
            if (uri, self.experiment_id) not in _CHECKED_ORPHANS:
                _CHECKED_ORPHANS.add((uri, self.experiment_id))
                self.fail_orphans()

    def _create_experiment(self, name: str) -> str:
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location(self.uri, name))
        except Exception:  # a tracking server has no store lock: another client may have just created it
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def find(self, **tags: str) -> list[Any]:
        """Runs of this experiment whose tags equal the given values (newest first)."""
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        with self.lock:
            return self.client.search_runs([self.experiment_id], filter_string=query,
                                           order_by=["attributes.start_time DESC"])

    def record(self, name: str, status: str, reason: str, params: dict, metrics: dict[str, float],
               tags: dict[str, str], texts: dict[str, str] | None = None,
               parent_run_id: str | None = None) -> str:
        """Create a finished run; returns its id. `texts` become artifacts (file name -> content).
        Raises RecordError (with the run marked failed, if it was created) when the store refuses."""
        run_id = None
        try:
            with self.lock:
                run_id = self.start(name, params, tags, parent_run_id)
                self.finish(run_id, status, reason, metrics, texts)
        except Exception as err:
            raise self._record_error(err, run_id) from err
        return run_id

    def start(self, name: str, params: dict, tags: dict[str, str], parent_run_id: str | None = None) -> str:
        """Create a RUNNING run with its params and no status yet (finish() sets it); returns its id."""
        from mlflow.entities import Param

        all_tags = {**tags, WRITER_TAG: writer_id()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        with self.lock:
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id
            try:
                self.client.log_batch(run_id, params=[Param(k, _param(v)) for k, v in params.items()])
            except Exception as err:
                raise self._record_error(err, run_id) from err
        return run_id

    def reopen(self, run_id: str) -> None:
        """Make a finished run RUNNING again, written by this process, its status unset until finish()."""
        with self.lock:
            self.client.set_tag(run_id, WRITER_TAG, writer_id())
            with contextlib.suppress(Exception):  # no status tag to delete
                self.client.delete_tag(run_id, "status")
            self.client.update_run(run_id, status="RUNNING")

    def finish(self, run_id: str, status: str, reason: str, metrics: dict[str, float] | None = None,
               texts: dict[str, str] | None = None) -> None:
        """Log metrics and artifacts, then the status (last: a run with a status is complete), then end it.
        Raises RecordError, with the run marked failed, when the store refuses."""
        from mlflow.entities import Metric, RunTag

        try:
            finite = {k: v for k, v in only_metrics(metrics or {}).items() if math.isfinite(v)}
            with self.lock:
                if finite:
                    self.client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in finite.items()])
                for file_name, content in (texts or {}).items():
                    self.client.log_text(run_id, content, file_name)
                self.client.log_batch(run_id, tags=[RunTag("status", status), RunTag("reason", reason[:5000])])
                self.client.set_terminated(run_id, "FINISHED" if status != "failed" else "FAILED")
        except Exception as err:
            raise self._record_error(err, run_id) from err

    def fail_orphans(self) -> list[str]:
        """Mark FAILED, with a reason, every RUNNING qsweep run of this experiment whose writer process
        has ended (killed while writing, or a search stopped hard); returns their ids."""
        marked = []
        with self.lock:
            running = self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'")
            for run in running:
                tags = run.data.tags
                if not any(t in tags for t in QSWEEP_TAGS) or not writer_gone(tags.get(WRITER_TAG)):
                    continue
                writer = tags.get(WRITER_TAG, "an older qsweep")
                self._mark_failed(run.info.run_id, f"orphaned: its writer ({writer}) ended before the run "
                                                   "was finished; never reused")
                marked.append(run.info.run_id)
        return marked

    def _mark_failed(self, run_id: str, reason: str) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag("status", "failed"), RunTag("reason", reason[:5000])])
        self.client.set_terminated(run_id, "FAILED")

    def _record_error(self, err: Exception, run_id: str | None) -> RecordError:
        if isinstance(err, RecordError):
            return err
        reason = f"recording failed: {type(err).__name__}: {first_line(err)[:500]}"
        if run_id is not None:
            with contextlib.suppress(Exception):  # best effort: the store may be what failed
                self._mark_failed(run_id, reason)
        return RecordError(reason, run_id)

    def load(self, run: Any) -> PointRecord:
        """A PointRecord from a stored run (for reuse on resume)."""
        tags = run.data.tags
        return PointRecord(tags.get("mlflow.runName", run.info.run_id), tags.get("status", "?"),
                           tags.get("reason", ""), dict(run.data.params), dict(run.data.metrics),
                           run.info.run_id, reused=True)


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:6000]
