"""MLflow: one experiment per sweep, one run per grid point, the metric schema from qsweep.metrics."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qsweep.metrics import only_metrics

# MLflow's SQLite store logs its schema migrations at INFO on every new store.
logging.getLogger("alembic").setLevel(logging.WARNING)
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


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

    def row(self) -> dict[str, Any]:
        return {"run": self.run_name, "status": self.status + (" (reused)" if self.reused else ""),
                **self.metrics, "reason": self.reason}


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store live beside the database (<dir>/mlartifacts/<experiment>); MLflow's
    default, ./mlruns under whatever directory the process started in, scatters them into the cwd."""
    if not uri.startswith("sqlite:///"):
        return None
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in experiment)
    return str(Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts" / safe)


class Tracker:
    """A thin MlflowClient wrapper: no global active run, so nothing leaks between points."""

    def __init__(self, uri: str, experiment: str):
        import mlflow

        self.uri = uri
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=artifact_location(uri, experiment))
        if not found or EXPERIMENT_KIND[0] not in found.tags:
            # MLflow 3 opens experiments of unknown kind on its GenAI (traces) page; ours are run tables.
            self.client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)

    def find(self, **tags: str) -> list[Any]:
        """Runs of this experiment whose tags equal the given values (newest first)."""
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        return self.client.search_runs([self.experiment_id], filter_string=query,
                                       order_by=["attributes.start_time DESC"])

    def record(self, name: str, status: str, reason: str, params: dict, metrics: dict[str, float],
               tags: dict[str, str], texts: dict[str, str] | None = None,
               parent_run_id: str | None = None) -> str:
        """Create a finished run; returns its id. `texts` become artifacts (file name -> content)."""
        all_tags = {"status": status, "reason": reason[:5000], **tags}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        run_id = run.info.run_id
        from mlflow.entities import Metric, Param

        finite = {k: v for k, v in only_metrics(metrics).items() if math.isfinite(v)}
        self.client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in finite.items()],
                              params=[Param(k, _param(v)) for k, v in params.items()])
        for file_name, content in (texts or {}).items():
            self.client.log_text(run_id, content, file_name)
        self.client.set_terminated(run_id, "FINISHED" if status != "failed" else "FAILED")
        return run_id

    def load(self, run: Any) -> PointRecord:
        """A PointRecord from a stored run (for reuse on resume)."""
        tags = run.data.tags
        return PointRecord(tags.get("mlflow.runName", run.info.run_id), tags.get("status", "?"),
                           tags.get("reason", ""), dict(run.data.params), dict(run.data.metrics),
                           run.info.run_id, reused=True)


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:6000]
