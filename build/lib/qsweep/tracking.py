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
# With a tracking server MLflow prints two links for every run it ends: a sweep prints its own progress.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

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
REPORT_FILE = "report.html"  # qsweep.report's page (plots and every point), on report runs and sweep parents
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
        return {"model": self.params.get("model"), "run": self.run_name, "flow": self.params.get("flow"),
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
        self.parent: str | None = None  # the run that runs recorded without a parent_run_id nest under
        self.lock = store_lock(uri)
        with self.lock:  # the first store access creates and migrates the schema: once, one process at a time
            self.client = mlflow.MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self._create_experiment(experiment)
            if not found or EXPERIMENT_KIND[0] not in found.tags:
                # MLflow 3 opens experiments of unknown kind on its GenAI (traces) page; ours are run tables.
                set_experiment_tag(self.client, self.experiment_id, *EXPERIMENT_KIND)
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
               parent_run_id: str | None = None, files: list[Path] | None = None,
               start_ms: int | None = None, end_ms: int | None = None) -> str:
        """Create a finished run; returns its id. `texts` become artifacts (file name -> content), `files`
        are logged as they are. `start_ms`/`end_ms` (ms since the epoch) are when the work it records
        began and ended (a trial); default: now. Raises RecordError (with the run marked failed, if it
        was created) when the store refuses."""
        run_id = None
        try:
            with self.lock:
                run_id = self.start(name, params, tags, parent_run_id or self.parent, start_ms=start_ms)
                self.finish(run_id, status, reason, metrics, texts, files=files, end_ms=end_ms)
        except Exception as err:
            raise self._record_error(err, run_id) from err
        return run_id

    def start(self, name: str, params: dict, tags: dict[str, str], parent_run_id: str | None = None,
              start_ms: int | None = None, writer: str | None = None) -> str:
        """Create a RUNNING run with its params and no status yet (finish() sets it); returns its id.
        `writer` (host:pid) is the process that will finish it: this one unless given."""
        from mlflow.entities import Param

        all_tags = {**tags, WRITER_TAG: writer or writer_id()}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        with self.lock:
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags,
                                            start_time=start_ms).info.run_id
            try:
                self.client.log_batch(run_id, params=[Param(k, _param(v)) for k, v in params.items()])
            except Exception as err:
                raise self._record_error(err, run_id) from err
        return run_id

    def reopen(self, run_id: str, writer: str | None = None) -> None:
        """Make a finished run RUNNING again, written by this process (or `writer`), its status unset
        until finish()."""
        with self.lock:
            self.client.set_tag(run_id, WRITER_TAG, writer or writer_id())
            with contextlib.suppress(Exception):  # no status tag to delete
                self.client.delete_tag(run_id, STATUS_TAG)
            self.client.update_run(run_id, status="RUNNING")

    def finish(self, run_id: str, status: str, reason: str, metrics: dict[str, float] | None = None,
               texts: dict[str, str] | None = None, files: list[Path] | None = None,
               end_ms: int | None = None, tags: dict[str, str] | None = None) -> None:
        """Log metrics, artifacts and `tags`, then the status (last: a run with a status is complete),
        then end it (at `end_ms`, default now). Raises RecordError, with the run marked failed, when the
        store refuses."""
        from mlflow.entities import RunTag

        try:
            with self.lock:
                self.log_metrics(run_id, metrics or {})
                for file_name, content in (texts or {}).items():
                    self.client.log_text(run_id, content, file_name)
                self.log_files(run_id, files or [])
                self.set_tags(run_id, tags or {})
                self.client.log_batch(run_id, tags=[RunTag(STATUS_TAG, status), RunTag(REASON_TAG, reason[:5000])])
                self.client.set_terminated(run_id, "FINISHED" if status != FAILED else "FAILED", end_time=end_ms)
        except Exception as err:
            raise self._record_error(err, run_id) from err

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """Log the schema's metrics (a name outside it is a bug: KeyError); non-finite values are left out."""
        from mlflow.entities import Metric

        finite = {k: v for k, v in only_metrics(metrics).items() if math.isfinite(v)}
        if finite:
            with self.lock:
                self.client.log_batch(run_id, metrics=[Metric(k, v, 0, step) for k, v in finite.items()])

    def log_files(self, run_id: str, paths: list[Path]) -> None:
        """Log files as artifacts of a run, under their own names."""
        with self.lock:
            for path in paths:
                self.client.log_artifact(run_id, str(path))

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            with self.lock:
                self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:8000]) for k, v in tags.items()])  # MLflow's limit

    def sweep_parent(self, key: str, name: str, params: dict, writer: str) -> str:
        """The parent run of a sweep of grid `key` in this experiment, RUNNING until the sweep ends and
        written by `writer` (the sweep's main process): a finished (or failed) parent of the same grid is
        reopened, so a resumed sweep adds to it; a parent another live sweep is still writing is left to
        it, and this sweep gets its own."""
        with self.lock:  # find and reopen at once: two sweeps of one grid never take the same parent
            for run in self.find(**{ROLE_TAG: ROLE_SWEEP, SWEEP_TAG: key}):
                if run.info.status == "RUNNING" and not writer_gone(run.data.tags.get(WRITER_TAG)):
                    continue
                self.reopen(run.info.run_id, writer)
                return run.info.run_id
            return self.start(name, params, {ROLE_TAG: ROLE_SWEEP, SWEEP_TAG: key}, writer=writer)

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
                # Ended at its own start: an orphan is no record of a sweep running now (sweep.reusable).
                self._mark_failed(run.info.run_id, f"orphaned: its writer ({writer}) ended before the run "
                                                   "was finished; never reused", end_time=run.info.start_time)
                marked.append(run.info.run_id)
        return marked

    def _mark_failed(self, run_id: str, reason: str, end_time: int | None = None) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(STATUS_TAG, FAILED), RunTag(REASON_TAG, reason[:5000])])
        self.client.set_terminated(run_id, "FAILED", end_time=end_time)

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
        return PointRecord(tags.get(RUN_NAME_TAG, run.info.run_id), tags.get(STATUS_TAG, "?"),
                           tags.get(REASON_TAG, ""), dict(run.data.params), dict(run.data.metrics),
                           run.info.run_id, reused=True)


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:6000]


def now_ms() -> int:
    """Now in MLflow's clock: ms since the epoch."""
    return int(time.time() * 1000)


# ---------------------------------------------------------------- reads

def experiment_runs(uri: str, experiment: str) -> tuple[str, list[Any]]:
    """(experiment id, every run of it, oldest first). ConfigError naming the existing experiments when
    there is no such experiment."""
    client = open_client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ConfigError(f"no MLflow experiment {experiment!r} in {uri}; existing: {', '.join(names) or 'none'}")
    return found.experiment_id, _all_runs(client, found.experiment_id)


def _all_runs(client: Any, experiment_id: str, filter_string: str = "") -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def load_runs(uri: str, experiment: str) -> pd.DataFrame:
    """Every run of an experiment as one row: ids, kind (baseline|grid|search|parent), tags, params, metrics.

    Missing metrics are NaN, so callers can use any schema metric as a column. A run other runs nest
    under, or with a parent role (a sweep's or a search's), is a `parent`, never a candidate; a child of
    a sweep is a `grid` point, any other child a `search` trial. Report and apply runs are left out.
    Search trials that do not carry model/device/dtype params inherit them from their parent run.
    """
    _, runs = experiment_runs(uri, experiment)
    rows = [_row(run) for run in runs]
    frame = pd.DataFrame(rows, columns=_columns(rows))
    if frame.empty:
        return frame
    frame = frame[~frame["role"].isin(NOT_POINTS)].reset_index(drop=True)
    sweeps = set(frame.loc[frame["role"] == ROLE_SWEEP, "run_id"])
    frame.loc[frame["kind"].eq("search") & frame["parent_run_id"].isin(sweeps), "kind"] = "grid"
    parents = set(frame["parent_run_id"].dropna())
    frame.loc[frame["run_id"].isin(parents) | frame["role"].isin(PARENT_ROLES), "kind"] = "parent"
    by_id = frame.set_index("run_id")
    for key in CONTEXT_KEYS:  # a search trial may record only what it varies
        missing = frame[key].isna() & frame["parent_run_id"].isin(by_id.index)
        frame.loc[missing, key] = frame.loc[missing, "parent_run_id"].map(by_id[key])
    return frame


def _row(run: Any) -> dict[str, Any]:
    tags = run.data.tags
    role = tags.get(ROLE_TAG)
    parent = tags.get(PARENT_TAG)
    kind = "baseline" if role == ROLE_BASELINE else "search" if parent else "grid"
    return {"run_id": run.info.run_id, "run": tags.get(RUN_NAME_TAG, run.info.run_id), "kind": kind,
            "status": tags.get(STATUS_TAG, "?"), "reason": tags.get(REASON_TAG, ""), "role": role,
            "parent_run_id": parent, "selected": tags.get(SELECTED_TAG) == "true",
            "start_time": run.info.start_time, "model": tags.get(MODEL_TAG),
            **run.data.params, **run.data.metrics}


def _columns(rows: list[dict]) -> list[str]:
    base = ["run_id", "run", "kind", "status", "reason", "role", "parent_run_id", "selected", "start_time",
            *CONTEXT_KEYS]
    extra = sorted({k for row in rows for k in row} - set(base) - set(BY_NAME))
    return base + extra + [m.name for m in METRICS]


def mark_selected(client: Any, experiment: str, run_id: str, recipe_path: Path) -> None:
    """Tag the chosen run selected=true with its recipe file (clearing an earlier choice in the experiment)."""
    found = client.get_experiment_by_name(experiment)
    with store_lock(client.tracking_uri):
        for old in _all_runs(client, found.experiment_id, f"tags.{SELECTED_TAG} = 'true'"):
            if old.info.run_id != run_id:
                client.delete_tag(old.info.run_id, SELECTED_TAG)
        client.set_tag(run_id, SELECTED_TAG, "true")
        client.set_tag(run_id, SELECTED_RECIPE_TAG, str(recipe_path))


def recent_experiments(uri: str, limit: int = 5) -> list[Any]:
    """The experiments with qsweep's runs (a status tag), the one with the newest run first (at most `limit`)."""
    client = open_client(uri)
    newest = {}
    for experiment in client.search_experiments(max_results=1000):
        runs = client.search_runs([experiment.experiment_id], f"tags.{STATUS_TAG} LIKE '%'", max_results=1,
                                  order_by=["attributes.start_time DESC"])
        if runs:
            newest[experiment.experiment_id] = (runs[0].info.start_time, experiment)
    return [e for _, e in sorted(newest.values(), key=lambda pair: pair[0], reverse=True)][:limit]


def measured_run_ids(uri: str, experiment_id: str, metric: str, ascending: bool, limit: int) -> list[str]:
    """Ids of the best `limit` measured runs (status ok, with `metric`; no parent runs) by `metric`."""
    order = [f"metrics.`{metric}` {'ASC' if ascending else 'DESC'}"]
    runs = open_client(uri).search_runs([experiment_id], f"tags.{STATUS_TAG} = '{OK}'", max_results=1000,
                                        order_by=order)
    found = [r.info.run_id for r in runs if metric in r.data.metrics and r.data.tags.get(ROLE_TAG) not in PARENT_ROLES]
    return found[:limit]


def set_experiment_tag(client: Any, experiment_id: str, key: str, value: str) -> None:
    """Set an experiment tag, idempotently: a tracking server has no store lock, and two workers setting the
    same new tag at once make one of them fail on the database's unique key (seen with PostgreSQL)."""
    try:
        client.set_experiment_tag(experiment_id, key, value)
    except Exception:
        if client.get_experiment(experiment_id).tags.get(key) == value:
            return  # the other writer set it
        client.set_experiment_tag(experiment_id, key, value)  # it exists now: this is an update


def newest_run_id(uri: str, experiment_id: str, role: str) -> str | None:
    """The newest run of an experiment with a role (e.g. the last sweep's parent), or None."""
    runs = open_client(uri).search_runs([experiment_id], f"tags.`{ROLE_TAG}` = '{role}'", max_results=1,
                                        order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def set_views(uri: str, experiment_id: str, views: dict[str, str]) -> None:
    """Write an experiment's saved MLflow UI views (view id -> the tag's JSON), where they changed."""
    client = open_client(uri)
    with store_lock(uri):
        current = client.get_experiment(experiment_id).tags
        for view_id, value in views.items():
            if current.get(VIEW_TAG_PREFIX + view_id) != value:
                set_experiment_tag(client, experiment_id, VIEW_TAG_PREFIX + view_id, value)


def metric_keys(uri: str, experiment_id: str) -> set[str]:
    """The metric names the runs of an experiment carry."""
    return {key for run in _all_runs(open_client(uri), experiment_id) for key in run.data.metrics}
