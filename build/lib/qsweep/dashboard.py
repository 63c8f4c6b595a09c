"""The MLflow UI as the place a sweep is reviewed: saved views of an experiment's runs (qsweep's metric
columns, sorted by an objective, trade-off charts first) and the links `qsweep ui` prints.

What MLflow 3.17's UI lets a link or the store preselect (read from its JS bundle, mlflow/server/js):
- `workflowType=machine_learning` opens the "Model training" side of the UI. Without it, a fresh browser is
  on the GenAI side, where an experiment opens on its traces Overview: the `mlflow.experimentKind` tag is
  not consulted while the GenAI / Model training switch exists.
- `#/experiments/<id>/runs` is the runs tab; `compareRunsMode=TABLE|CHART|ARTIFACT` its table, chart or
  artifact view; `searchFilter`, `orderByKey` (`metrics.`speedup``), `orderByAsc`, `startTime`,
  `lifecycleFilter`, `datasetsFilter` the filter and sort.
- Visible columns, their order and width, the chart cards and how many runs the charts show are UI state,
  kept in the browser's local storage, which no URL parameter sets. A saved view does: an experiment tag
  `mlflow.sharedViewState.<id>` = {"name", "createdAt", "state": JSON of the UI state and the sort and
  filter}, listed in the page's Views menu and opened by `viewStateShareKey=<id>`. A link that also
  carries one of the filter/sort parameters ignores the view, so the sort goes into the view.
- `#/compare-runs?runs=[ids]&experiments=[id]` compares runs side by side; `#/experiments/<id>/runs/<run>`
  is a run's page (its description is the `mlflow.note.content` tag, markdown), `.../artifacts/<file>` one
  artifact.
- On `localhost`/`127.0.0.1` MLflow 3.17 opens its AI-assistant panel once, on a browser's first visit;
  another loopback address (`--host 127.0.0.2`) does not.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from qsweep import tracking
from qsweep.config import SelectConf, first_line, to_root
from qsweep.metrics import BY_NAME
from qsweep.objectives import COST, DRIFT, drift_metrics, resolve_drift_metric, selection_objectives

LEADING = ("speedup", "size_ratio")  # the objectives a reader looks at first
VIEW_PREFIX = "qsweep-"  # saved view ids: qsweep-speedup, qsweep-size_ratio, ..., qsweep-drift
# Columns besides the objectives and drift metrics, in the order shown (MLflow groups them by kind).
MORE_METRICS = ("latency_ms", "size_bytes")
PARAMS = ("scheme", "granularity", "group_size", "compile")
TAGS = (tracking.STATUS_TAG, tracking.REASON_TAG, tracking.NOISY_TAG)
WORKFLOW = {"workflowType": "machine_learning"}  # the "Model training" side of MLflow 3's UI


def drift_order(present: set[str], drift_metric: str = "auto") -> list[str]:
    """The drift metrics an experiment's runs carry, the one selection ranks by first (`auto`, as
    `qsweep select`: accuracy_drop where the runs have it, else drift_cosine)."""
    chosen = resolve_drift_metric(drift_metric, present)
    return [chosen] + [m for m in drift_metrics() if m in present and m != chosen]


def ordered_objectives() -> list[str]:
    """`select.objective` choices, speedup and size_ratio first, the others in the schema's order."""
    return sorted(selection_objectives(), key=lambda m: LEADING.index(m) if m in LEADING else len(LEADING))


def objective_sort(objective: str, drift: list[str]) -> tuple[str, bool]:
    """(metric, ascending) the runs table is sorted by for a `select.objective`: its schema direction;
    `drift` sorts by the drift metric, best first."""
    column, higher = selection_objectives()[objective]
    if column == COST:
        column = drift[0]
        higher = bool(BY_NAME[column].higher_is_better)
    return column, not higher


def _key(kind: str, name: str) -> str:
    return f"{kind}.`{name}`"  # MLflow's canonical column key, e.g. metrics.`speedup`


def view_state(sort: tuple[str, bool], drift: list[str]) -> dict:
    """A saved view's state: qsweep's metrics, params and status as columns (objectives and drift
    first), sorted by `sort`, every run in the charts, and trade-off charts (each objective against
    the drift metric) above one chart per metric."""
    objectives = [c for c, _ in map(selection_objectives().get, ordered_objectives()) if c != COST]
    metrics = list(dict.fromkeys([*objectives, *drift, *MORE_METRICS]))
    columns = ([_key("attributes", "Duration")] + [_key("metrics", m) for m in metrics]
               + [_key("params", p) for p in PARAMS] + [_key("tags", t) for t in TAGS])
    section = "qsweep"
    charts = [{"uuid": f"qsweep-{m}-vs-drift", "type": "SCATTER", "xaxis": {"key": drift[0], "type": "METRIC"},
               "yaxis": {"key": m, "type": "METRIC"}, "runsCountToCompare": 100, "metricSectionId": section,
               "deleted": False, "isGenerated": False} for m in objectives if m in ("speedup", "size_ratio")]
    charts += [{"uuid": f"qsweep-{m}", "type": "BAR", "metricKey": m, "runsCountToCompare": 100,
                "metricSectionId": section, "deleted": False, "isGenerated": False}
               for m in [*objectives, drift[0]]]
    # MLflow keeps its own two sections last; every other metric gets a generated chart in "Model metrics".
    sections = [{"uuid": section, "name": "qsweep: objectives vs drift", "display": True, "isReordered": True,
                 "deleted": False, "isGenerated": False},
                {"uuid": "qsweep-model", "name": "Model metrics", "display": False, "isReordered": False,
                 "deleted": False, "isGenerated": True},
                {"uuid": "qsweep-system", "name": "System metrics", "display": False, "isReordered": False,
                 "deleted": False, "isGenerated": True}]
    return {"orderByKey": _key("metrics", sort[0]), "orderByAsc": sort[1], "searchFilter": "",
            "selectedColumns": columns, "columnOrder": columns,
            "columnWidths": {_key("metrics", m): 110 for m in metrics}, "runsHiddenMode": "SHOW_ALL",
            "compareRunCharts": charts, "compareRunSections": sections, "isAccordionReordered": True,
            "hideEmptyCharts": True}


def saved_views(present: set[str], drift_metric: str = "auto") -> dict[str, str]:
    """Saved view id -> experiment tag value: one view per selection objective, sorted by it."""
    drift = drift_order(present, drift_metric)
    views = {}
    for i, objective in enumerate(ordered_objectives()):
        sort = objective_sort(objective, drift)
        name = f"qsweep: by {sort[0]}" + (" (drift)" if objective == DRIFT else "")
        # createdAt orders the Views menu (newest first): the objectives in the schema's order.
        envelope = {"name": name, "createdAt": 1_700_000_000_000 - i,
                    "state": json.dumps(view_state(sort, drift), separators=(",", ":"))}
        views[VIEW_PREFIX + objective] = json.dumps(envelope, separators=(",", ":"))
    return views


def write_views(uri: str, experiment_id: str, drift_metric: str = "auto") -> None:
    """Give an experiment qsweep's saved views, for the metrics its runs carry."""
    tracking.set_views(uri, experiment_id, saved_views(tracking.metric_keys(uri, experiment_id), drift_metric))


def _url(base: str, route: str, params: dict[str, str]) -> str:
    return f"{base}/#{route}?" + urllib.parse.urlencode(params, quote_via=urllib.parse.quote)


def runs_url(base: str, experiment_id: str, objective: str, mode: str = "TABLE") -> str:
    """The experiment's runs (`mode`: TABLE or CHART) in qsweep's saved view for `objective`."""
    params = {**WORKFLOW, "viewStateShareKey": VIEW_PREFIX + objective}
    if mode != "TABLE":
        params["compareRunsMode"] = mode
    return _url(base, f"/experiments/{experiment_id}/runs", params)


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's side-by-side comparison of runs: params and metrics, one column per run."""
    return _url(base, "/compare-runs", {"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id]),
                                         **WORKFLOW})


def run_url(base: str, experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    route = f"/experiments/{experiment_id}/runs/{run_id}" + (f"/artifacts/{artifact}" if artifact else "")
    return _url(base, route, WORKFLOW)


@dataclass
class ExperimentLinks:
    """What `qsweep ui` prints for one experiment."""

    name: str
    experiment_id: str
    sort: tuple[str, bool]  # the runs table's order: (metric, ascending)
    runs: str  # the runs table, sorted by the objective, qsweep's columns visible
    charts: str  # the same view as charts: objectives vs drift, one chart per metric
    compare: str | None  # the best measured runs by the objective, side by side
    sweep: str | None  # the newest sweep's parent run: counts, results table, child runs
    report: str | None  # its report.html: the plots and every point

    def lines(self) -> list[str]:
        order = f"{self.sort[0]}, {'lowest' if self.sort[1] else 'highest'} first"
        found = [("runs", f"{self.runs}   ({order})"), ("charts", self.charts), ("compare", self.compare),
                 ("last sweep", self.sweep), ("its report", self.report)]
        return [f"{self.name}:"] + [f"  {label + ':':<12}{url}" for label, url in found if url]


def experiment_links(uri: str, base: str, experiment_id: str, name: str, objective: str = "speedup",
                     drift_metric: str = "auto", compare: int = 8) -> ExperimentLinks:
    """Write the experiment's saved views and return its links (`compare`: how many runs side by side)."""
    present = tracking.metric_keys(uri, experiment_id)
    tracking.set_views(uri, experiment_id, saved_views(present, drift_metric))
    sort = objective_sort(objective, drift_order(present, drift_metric))
    best = tracking.measured_run_ids(uri, experiment_id, sort[0], sort[1], compare)
    sweep = tracking.newest_run_id(uri, experiment_id, tracking.ROLE_SWEEP)
    return ExperimentLinks(name, experiment_id, sort, runs_url(base, experiment_id, objective),
                           runs_url(base, experiment_id, objective, "CHART"),
                           compare_url(base, experiment_id, best) if len(best) > 1 else None,
                           run_url(base, experiment_id, sweep) if sweep else None,
                           run_url(base, experiment_id, sweep, tracking.REPORT_FILE) if sweep else None)


def dashboard_links(uri: str, base: str, objective: str = "speedup", drift_metric: str = "auto",
                    limit: int = 5) -> list[ExperimentLinks]:
    """Links for the `limit` experiments with the newest runs, newest first."""
    return [experiment_links(uri, base, e.experiment_id, e.name, objective, drift_metric)
            for e in tracking.recent_experiments(uri, limit)]


class SweepReview(Callback):
    """Hydra callback: at the end of a sweep, each of its parent runs gets the report of its experiment
    (tables, plots, report.html; also under <sweep folder>/report/<experiment>/) and the experiment gets
    qsweep's saved views. Hydra ends callbacks in reverse order, so this runs before SummaryCallback's
    end, which writes the parent's results table and its status last."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from qsweep.recipe import safe_name
        from qsweep.report import build_report
        from qsweep.sweep import sweep_parents

        directory = Path(config.hydra.sweep.dir)
        try:
            sel = to_root(config).select
        except Exception:  # a report is never worth failing the sweep over
            sel = SelectConf()
        for experiment, parent in sweep_parents(directory).items():
            try:
                files, _ = build_report(parent["uri"], experiment, sel, directory / "report" / safe_name(experiment),
                                        quiet=True)
                tracker = tracking.Tracker(parent["uri"], experiment)
                tracker.log_files(parent["run_id"], files)
                write_views(parent["uri"], tracker.experiment_id, sel.drift_metric)
            except Exception as err:
                print(f"qsweep: no report for the sweep in {experiment}: {type(err).__name__}: "
                      f"{first_line(err)[:300]}", flush=True)
