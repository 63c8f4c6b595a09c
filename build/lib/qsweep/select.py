"""Pick the configuration to ship from the tracked runs and export it as a recipe file.

    qsweep select experiment=<name> select.max_drift=0.01 select.objective=speedup   -> recipes/<name>.yaml

Selection reads every run of one MLflow experiment (grid points and per-layer search trials alike),
keeps the measured ones (`status=ok`, finite metrics) of one model/device/dtype, applies the
constraints, marks the Pareto front over speedup, size, memory and drift, and picks by the objective.
The recipe file format is `qsweep.recipe`; `qsweep.apply` turns a recipe into a checkpoint.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from qsweep import objectives, schemes
from qsweep.config import ConfigError, RootConf, SelectConf, load_config, mlflow_uri
from qsweep.metrics import METRICS
from qsweep.objectives import COST, as_cost, pareto_dims, pareto_front, score, selection_objectives
from qsweep.recipe import (
    LEGACY_QUANT_FILE,
    RECIPE_FILE,
    Recipe,
    eval_section,
    export_recipe,
    from_artifact,
    model_section,
    safe_name,
)
from qsweep.tracking import CONTEXT_KEYS, load_runs, mark_selected, open_client

# Exit code of `qsweep select` when no run meets the constraints (a best-effort recipe is still written).
NO_FEASIBLE_EXIT = 3
KEYS = CONTEXT_KEYS  # runs are comparable only within one model/device/dtype
SHORTHANDS = {"experiment": "select.experiment", "recipe": "select.recipe", "name": "select.name"}


# ---------------------------------------------------------------- runs

def select_overrides(args: list[str]) -> list[str]:
    """Accept `experiment=`, `recipe=` and `name=` as shorthands for the select.* keys."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        out.append(f"{SHORTHANDS[key]}={value}" if eq and key in SHORTHANDS else arg)
    return out


def experiment_name(root: RootConf) -> str:
    return root.select.experiment or root.tracking.experiment


# ---------------------------------------------------------------- selection

@dataclass
class Selection:
    """The outcome of `select`: the chosen row and the candidate table it was chosen from."""

    run: pd.Series
    feasible: bool
    drift_metric: str  # the schema metric the cost comes from
    cost_label: str  # how the cost is computed, e.g. "accuracy_drop" or "1 - drift_cosine"
    table: pd.DataFrame  # candidates with cost, feasible, violation, pareto
    violations: list[str] = field(default_factory=list)  # why the pick is infeasible (best effort)


def resolve_drift_metric(frame: pd.DataFrame, sel: SelectConf) -> str:
    """The drift metric to use for these runs (objectives.resolve_drift_metric)."""
    measured = {c for c in frame.columns if frame[c].notna().any()}
    return objectives.resolve_drift_metric(sel.drift_metric, measured)


def drift_cost(frame: pd.DataFrame, metric: str, relative: bool) -> tuple[pd.Series, str]:
    """The drift cost of each row (lower is better) and a label saying how it is computed.

    relative=true turns an absolute accuracy_drop into a fraction of the baseline's task metric
    (0.01 = 1% of the baseline's accuracy); a relative one (perplexity increase) stays as it is.
    """
    values = frame[metric].astype(float)
    label, to_cost = as_cost(metric)  # a higher-is-better metric becomes a cost: 1 - drift_cosine
    if label != metric:
        return to_cost(values), label
    if not relative:
        return values, metric
    if metric != "accuracy_drop":
        raise ConfigError("select.relative=true applies to drift_metric accuracy_drop (or auto) only")
    delta = frame["task_metric_delta"].astype(float)
    baseline = frame["task_metric"].astype(float) - delta
    absolute = np.isclose(values, -delta)  # higher-is-better task: accuracy_drop = baseline - trial
    cost = values.where(~absolute, values / baseline).where(delta.notna())
    return cost, "accuracy_drop / baseline task_metric"


def candidates(frame: pd.DataFrame, sel: SelectConf) -> pd.DataFrame:
    """Measured quantized configs (`status=ok` grid points and search trials) of one model/device/dtype."""
    rows = frame[(frame["status"] == "ok") & frame["kind"].isin(["grid", "search"])]
    for key in KEYS:
        wanted = getattr(sel, key)
        if wanted is not None:
            rows = rows[rows[key] == wanted]
    groups = rows[list(KEYS)].drop_duplicates()
    if len(groups) > 1:
        listed = "; ".join("/".join(str(v) for v in g) for g in groups.itertuples(index=False))
        raise ConfigError(f"runs of several model/device/dtype: {listed}; "
                          "choose one with select.model=, select.device=, select.dtype=")
    if rows.empty:
        raise ConfigError("no measured (status=ok) quantized runs to select from"
                          + ("" if frame.empty else f" among {len(frame)} runs") + "; run a sweep first")
    return rows.copy()


def apply_constraints(rows: pd.DataFrame, sel: SelectConf) -> pd.DataFrame:
    """Add `feasible` and `violation` (sum of relative excesses over each limit; 0 when feasible)."""
    rows = rows.copy()
    limits = _limits(sel)
    violation = pd.Series(0.0, index=rows.index)
    for column, limit, upper in limits:
        value = rows[column].astype(float)
        excess = (value - limit) if upper else (limit - value)
        violation += (excess.clip(lower=0) / max(abs(limit), 1e-12)).fillna(math.inf)
    rows["violation"] = violation
    rows["feasible"] = violation == 0
    return rows


def _limits(sel: SelectConf) -> list[tuple[str, float, bool]]:
    """(column, limit, is an upper bound) for each active constraint."""
    limits = [("cost", sel.max_drift, True)]
    if sel.min_speedup is not None:
        limits.append(("speedup", sel.min_speedup, False))
    if sel.max_size_bytes is not None:
        limits.append(("size_bytes", sel.max_size_bytes, True))
    if sel.max_mem_bytes is not None:
        limits.append(("peak_mem_bytes", sel.max_mem_bytes, True))
    return limits


def rank(rows: pd.DataFrame, objective: str) -> pd.DataFrame:
    """Rows best first: the objective, then the drift cost and the other objectives (schema order) as
    tie-breaks; each in its schema direction, a missing value last."""
    first = selection_objectives()[objective]
    order = [first, *((c, up) for c, up in {COST: False, **pareto_dims()}.items() if c != first[0])]
    keys = pd.DataFrame({f"k{i}": -score(rows, c, up) for i, (c, up) in enumerate(order)}, index=rows.index)
    return rows.loc[keys.sort_values(list(keys.columns), kind="stable").index]


def select(frame: pd.DataFrame, sel: SelectConf) -> Selection:
    """Choose a run: the best feasible one by the objective, else the least infeasible (best effort)."""
    rows = candidates(frame, sel)
    metric = resolve_drift_metric(rows, sel)
    rows[COST], label = drift_cost(rows, metric, sel.relative)
    # A NaN cost or an infinite metric is not a measurement (NaN/Inf outputs): never a candidate. A metric
    # the run does not have (NaN here) only ranks it last.
    measured = [m.name for m in METRICS if m.name in rows]
    infinite = np.isinf(rows[measured].astype(float)).any(axis=1)
    rows = rows[np.isfinite(rows[COST].astype(float)) & ~infinite]
    if rows.empty:
        raise ConfigError(f"no measured run has a finite {metric}; choose another select.drift_metric")
    rows = apply_constraints(rows, sel)
    rows["pareto"] = pareto_front(rows)
    feasible = rows[rows["feasible"]]
    if not feasible.empty:
        return Selection(rank(feasible, sel.objective).iloc[0], True, metric, label, rows)
    least = rows[rows["violation"] == rows["violation"].min()]
    best = rank(least, sel.objective).iloc[0]
    return Selection(best, False, metric, label, rows, _violations(best, sel, label))


def _violations(row: pd.Series, sel: SelectConf, label: str) -> list[str]:
    out = []
    for column, limit, upper in _limits(sel):
        value = float(row[column])
        if math.isnan(value) or (value > limit if upper else value < limit):
            name = label if column == "cost" else column
            out.append(f"{name} {value:.4g} {'>' if upper else '<'} {limit:g}")
    return out


# ---------------------------------------------------------------- recipes

def run_recipe(client, run: pd.Series) -> dict:
    """The recipe fields a run carries: its recipe.json (quant, model, eval and more), else from an older
    store its quant_spec.json, else the quant rebuilt from its config.yaml."""
    for name in (RECIPE_FILE, LEGACY_QUANT_FILE):
        text = artifact_text(client, run["run_id"], name)
        if text is not None:
            return from_artifact(name, text)
    text = artifact_text(client, run["run_id"], "config.yaml")
    if text is not None:
        cfg = OmegaConf.create(text)
        spec = schemes.quant_spec(cfg.scheme, cfg.granularity, cfg.group_size)
        if spec is not None:
            return {"quant": spec}
    raise ConfigError(f"run {run['run']} ({run['run_id']}) has neither {RECIPE_FILE} nor config.yaml; "
                      "cannot tell its torchao config")


def artifact_text(client, run_id: str, name: str) -> str | None:
    """The text of one run artifact, or None when the run has no such file."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per tiny file otherwise
    if name not in {f.path for f in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run_id, name, tmp)).read_text()


def run_context(client, frame: pd.DataFrame, run: pd.Series, root: RootConf) -> tuple[dict, dict]:
    """(model, eval) a run was measured with: from the config.yaml of the run, its parent or another run
    of the same model (the baseline), else from the composed config when it names the same model."""
    chain = [run["run_id"], run["parent_run_id"]]
    same_model = frame[(frame["model"] == run["model"]) & (frame["run_id"] != run["run_id"])]
    chain += list(same_model.sort_values("kind")["run_id"])  # "baseline" sorts first
    for run_id in chain:
        if not isinstance(run_id, str):
            continue
        text = artifact_text(client, run_id, "config.yaml")
        if text is not None:
            cfg = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
            return _context(cfg["model"], cfg["eval"], cfg.get("seed", 0))
    if root.model.name == run["model"]:
        return _context(asdict(root.model), asdict(root.eval), root.seed)
    raise ConfigError(f"no config.yaml recorded for model {run['model']!r}; pass model={run['model']} "
                      "so the recipe can name its builder")


def _context(model: dict, evaluation: dict, seed: int) -> tuple[dict, dict]:
    return model_section(model), eval_section(evaluation, seed)


def build_recipe(selection: Selection, sel: SelectConf, experiment: str, quant: dict, model: dict,
                 evaluation: dict, name: str, flow: dict | None = None) -> Recipe:
    """A recipe from a selection (pure: no I/O); `flow` is the run's (qsweep.flows), None for ptq."""
    run = selection.run
    metrics = {m.name: float(run[m.name]) for m in METRICS if pd.notna(run.get(m.name))}
    table = selection.table
    choice = {"drift_metric": selection.drift_metric, "cost": float(run["cost"]), "cost_label": selection.cost_label,
              "max_drift": sel.max_drift, "relative": sel.relative, "objective": sel.objective,
              "min_speedup": sel.min_speedup, "max_size_bytes": sel.max_size_bytes,
              "max_mem_bytes": sel.max_mem_bytes, "feasible": selection.feasible,
              "violations": selection.violations, "candidates": len(table),
              "feasible_candidates": int(table["feasible"].sum()), "pareto_candidates": int(table["pareto"].sum())}
    return Recipe(
        name=name, quant=quant, model=model, dtype=str(run["dtype"]), eval=evaluation, metrics=metrics,
        selection=choice,
        source={"experiment": experiment, "run_id": run["run_id"], "run_name": run["run"], "kind": run["kind"]},
        hardware={"device": str(run["device"]), "device_name": str(run.get("device_name", ""))},
        versions={"torch": str(run.get("torch", "")), "torchao": str(run.get("torchao", ""))},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), flow=flow)


# ---------------------------------------------------------------- commands

def select_command(args: list[str]) -> int:
    """`qsweep select experiment=<name> select.max_drift=0.01 select.objective=speedup`.

    Writes recipes/<name>.yaml and tags the run selected=true. When no run meets the constraints, the
    least-violating run is written to recipes/<name>.best-effort.yaml instead (a feasible recipe and the
    `selected` tag are left alone) and the exit code is NO_FEASIBLE_EXIT.
    """

    root, _ = load_config(select_overrides(args))
    sel, experiment, uri = root.select, experiment_name(root), mlflow_uri(root)
    frame = load_runs(uri, experiment)
    selection = select(frame, sel)
    client = open_client(uri)
    stored = run_recipe(client, selection.run)
    if "model" in stored and "eval" in stored:
        model, evaluation = stored["model"], stored["eval"]
    else:  # an older store: the model and eval settings come from a run's config.yaml
        model, evaluation = run_context(client, frame, selection.run, root)
    quant = stored["quant"]
    name = safe_name(sel.name or experiment)
    recipe = build_recipe(selection, sel, experiment, quant, model, evaluation, name, stored.get("flow"))
    file_name = f"{name}.yaml" if selection.feasible else f"{name}.best-effort.yaml"
    path = export_recipe(recipe, Path(root.output_dir) / "recipes" / file_name)
    if selection.feasible:
        mark_selected(client, experiment, selection.run["run_id"], path)
    print(describe_selection(selection, sel))
    print(f"recipe: {path}")
    return 0 if selection.feasible else NO_FEASIBLE_EXIT


def describe_selection(selection: Selection, sel: SelectConf) -> str:
    """The selection in a few lines: constraints, counts, the front and the pick."""
    table, run = selection.table, selection.run
    limits = ", ".join(f"{selection.cost_label if c == 'cost' else c} {'<=' if up else '>='} {v:g}"
                       for c, v, up in _limits(sel))
    lines = [f"{len(table)} candidates, {int(table['feasible'].sum())} meet {limits}, "
             f"{int(table['pareto'].sum())} on the Pareto front ({', '.join(selection_objectives())})"]
    front = rank(table[table["pareto"]], sel.objective)
    shown = front[["run", "kind", *(c for c in pareto_dims() if c in front), "feasible"]]
    lines.append(shown.rename(columns={COST: selection.cost_label}).to_string(index=False, float_format="{:.4g}".format))
    summary = (f"{run['run']} (run {run['run_id'][:8]}): speedup {run['speedup']:.3g}x, size_ratio "
               f"{run['size_ratio']:.3g}x, {selection.cost_label} {run['cost']:.4g}")
    if selection.feasible:
        lines.append(f"selected by {sel.objective}: {summary}")
    else:
        lines.append(f"NO RUN MEETS THE CONSTRAINTS. Best effort (least violation): {summary}; "
                     f"violates {'; '.join(selection.violations)}")
    if run["speedup"] < 1:
        lines.append("note: the selected config is slower than the unquantized baseline on this device")
    return "\n".join(lines)
