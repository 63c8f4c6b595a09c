"""The Optuna study: sensitivity pass and greedy seeds, the objective under a drift budget, RDB
storage with resume and retries, and the trials as a table (best, Pareto front, exhaustive)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from qsweep.accuracy import NonFiniteError, check_metrics
from qsweep.config import ConfigError, RootConf, first_line
from qsweep.objectives import SEARCH_OBJECTIVES
from qsweep.objectives import pareto_front as pareto_mask
from qsweep.recipe import RECIPE_FILE, Recipe, safe_name, to_json
from qsweep.search.evaluate import CostModel, Evaluator
from qsweep.search.parallel import WORKER_ENV, optuna_storage
from qsweep.search.space import NONE, Candidate, Space, counts, recipe_key, recipe_spec
from qsweep.sweep import Point
from qsweep.tracking import Tracker


def error_reason(err: Exception, limit: int = 500) -> str:
    """A failed evaluation's reason: a NonFiniteError's message is the whole reason."""
    if isinstance(err, NonFiniteError):
        return str(err)[:limit]
    return f"{type(err).__name__}: {first_line(err)[:limit]}"


def finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


# ---------------------------------------------------------------- sensitivity and seeds

def sensitivity(ev: Evaluator, space: Space, cands: dict[str, Candidate], cost: CostModel, objective: str,
                drift_fn) -> pd.DataFrame:
    """Quantize one group at a time with each candidate: drift and gain per (group, candidate).

    A (group, candidate) that raises, or whose outputs or drift are NaN/Inf, is recorded as failed and
    leaves the search space.
    """
    rows = []
    for key, names in space.free.items():
        for name in names:
            if name == NONE:
                continue
            assignment = {k: name if k == key else NONE for k in space.groups}
            row: dict[str, Any] = {"group": key, "candidate": name, "layers": len(space.groups[key])}
            try:
                metrics = ev.measure(recipe_spec(assignment, space, list(cands.values())))
                row.update(status="ok", drift=drift_fn(metrics), **metrics,
                           gain=cost.gain(key, name, space, cands, objective))
            except Exception as err:
                row.update(status="failed", reason=error_reason(err, 300))
            rows.append(row)
    table = pd.DataFrame(rows)
    for row in rows:
        if row["status"] == "failed":
            space.choices[row["group"]].remove(row["candidate"])
    return table


def cached_sensitivity(setup: Setup) -> pd.DataFrame:
    """The sensitivity table, reused on resume (and by other workers) when nothing it depends on changed."""
    root = setup.root
    what = {**setup.cost.context, "model": dict(root.model.builder), "eval": vars(root.eval),
            "space": setup.space.choices, "candidates": {n: c.spec for n, c in setup.cands.items()},
            "drift": [root.search.drift_metric, root.search.relative], "objective": root.search.objective}
    key = hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
    path = setup.out_dir / "sensitivity.json"
    if path.exists() and json.loads(path.read_text()).get("key") == key:
        table = pd.DataFrame(json.loads(path.read_text())["rows"])
        for row in table[table["status"] == "failed"].itertuples():
            setup.space.choices[row.group].remove(row.candidate)
        print("qsweep search: sensitivity table reused from", path, flush=True)
        return table
    table = sensitivity(setup.ev, setup.space, setup.cands, setup.cost, root.search.objective, setup.drift)
    path.write_text(json.dumps({"key": key, "rows": json.loads(table.to_json(orient="records"))}))
    return table


def greedy_seeds(table: pd.DataFrame, space: Space, budgets: list[float]) -> list[dict[str, str]]:
    """Greedy recipes at several drift budgets, assuming per-group drifts add up: repeatedly take the
    upgrade with the best gain per unit of drift that keeps the estimated total within the budget."""
    ok = table[table["status"] == "ok"] if len(table) else table
    info = {(r.group, r.candidate): (max(float(r.drift), 0.0), float(r.gain)) for r in ok.itertuples()
            if finite(float(r.drift), float(r.gain))}  # a cached table may predate failing NaN rows
    seeds = []
    for budget in budgets:
        current = {k: NONE for k in space.free}
        spent = 0.0
        while True:
            best, best_ratio = None, -math.inf
            for (key, name), (drift, gain) in info.items():
                d0, g0 = info.get((key, current[key]), (0.0, 0.0))
                d_gain, d_drift = gain - g0, drift - d0
                if d_gain <= 0 or spent + d_drift > budget:
                    continue
                ratio = d_gain / max(d_drift, 1e-12)
                if ratio > best_ratio:
                    best, best_ratio = (key, name, d_drift), ratio
            if best is None:
                break
            current[best[0]] = best[1]
            spent += best[2]
        if current not in seeds:
            seeds.append(current)
    return seeds


# ---------------------------------------------------------------- study

@dataclass
class Setup:
    """Everything one worker builds before trials: shared by the objective, confirmation and reports."""

    root: RootConf
    point: Point
    ev: Evaluator
    space: Space
    cands: dict[str, Candidate]
    cost: CostModel
    study_name: str
    storage: str
    out_dir: Path
    tracker: Tracker
    parent_run_id: str
    drift_budget: float
    memo: dict[str, dict] = field(default_factory=dict)

    def drift(self, metrics: dict[str, float]) -> float:
        """The budgeted drift of one evaluation (relative: a fraction of the baseline task metric)."""
        s = self.root.search
        if s.drift_metric not in metrics:
            raise ConfigError(f"model {self.root.model.name} has no {s.drift_metric}; "
                              f"it reports: {', '.join(sorted(k for k in metrics if k.startswith(('drift', 'acc'))))}")
        value = metrics[s.drift_metric]
        return value / abs(self.ev.base_task["task_metric"]) if s.relative else value

    def value(self, metrics: dict[str, float]) -> float:
        """The objective's value of one evaluation (higher is better)."""
        return metrics[SEARCH_OBJECTIVES[self.root.search.objective].value]

    def evaluate(self, assignment: dict[str, str]) -> dict[str, float]:
        """Metrics of one recipe; NonFiniteError if its outputs, drift or objective are NaN/Inf."""
        metrics = self.ev.measure(recipe_spec(assignment, self.space, list(self.cands.values())))
        predicted = self.cost.predict_ms(assignment, self.space, self.cands)
        metrics.update(predicted_latency_ms=predicted, predicted_speedup=self.cost.base_ms / predicted)
        check_metrics(metrics)
        return metrics

    def feasible(self, metrics: dict[str, float]) -> bool:
        """Within the drift budget, with a finite drift and objective (NaN compares False, but say so)."""
        drift, value = self.drift(metrics), self.value(metrics)
        return finite(drift, value) and drift <= self.drift_budget


def default_storage(root: RootConf) -> str:
    return root.search.storage or f"sqlite:///{Path(root.output_dir).resolve() / 'optuna.db'}"


def open_study(setup: Setup):
    """Create or load the study; heartbeats let another worker fail and retry a trial whose worker died."""
    import optuna

    s = setup.root.search
    storage = optuna_storage(setup.storage, s.max_retry)  # RDB with heartbeats, or a journal file
    # Parallel workers (qsweep.search.parallel) each seed their own sampler, or they would all draw the same
    # recipes; the constant liar keeps TPE off the recipes other workers are evaluating now.
    worker = os.environ.get(WORKER_ENV)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=s.seed + int(worker or 0), multivariate=True, n_startup_trials=10,
                                             **({"constant_liar": True} if worker is not None else {}))
    directions = ["maximize", "minimize"] if s.pareto else ["maximize"]
    return optuna.create_study(storage=storage, sampler=sampler, study_name=setup.study_name,
                               directions=directions, load_if_exists=True)


def objective_fn(setup: Setup):
    """The Optuna objective: one accuracy evaluation plus the cost model's prediction."""
    s = setup.root.search

    def objective(trial):
        params = {k: trial.suggest_categorical(k, v) for k, v in setup.space.free.items()}
        assignment = setup.space.complete(params)
        key = recipe_key(assignment)
        duplicate = key in setup.memo
        started = time.perf_counter()
        try:
            metrics = setup.memo[key] if duplicate else setup.evaluate(assignment)
        except Exception as err:  # NaN/Inf outputs or drift too: a FAIL trial never counts as best
            log_trial(setup, trial.number, assignment, "failed", error_reason(err),
                       {}, None if isinstance(err, NonFiniteError) else traceback.format_exc())
            print(f"[trial {trial.number}] failed: {error_reason(err, 200)}", flush=True)
            raise
        setup.memo[key] = metrics
        drift, value = setup.drift(metrics), setup.value(metrics)
        # <= 0 is feasible; TPE models it. A non-finite drift or objective is never feasible.
        trial.set_constraint("drift", drift - setup.drift_budget if finite(drift, value) else math.inf)
        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("counts", counts(assignment, setup.space))
        if duplicate:
            trial.set_user_attr("duplicate", True)
        else:
            trial.set_user_attr("run_id", log_trial(setup, trial.number, assignment, "ok", "", metrics))
        ok = "ok" if setup.feasible(metrics) else "over budget"
        print(f"[trial {trial.number}] {s.objective} {value:.3f}x  {s.drift_metric} {drift:.4g} ({ok})  "
              f"{counts(assignment, setup.space)}{'  (seen)' if duplicate else ''}  "
              f"{time.perf_counter() - started:.2f}s", flush=True)
        return (value, drift) if s.pareto else value

    return objective


def trial_recipe(setup: Setup, name: str, number: int, assignment: dict[str, str],
                 metrics: dict[str, float]) -> Recipe:
    """A trial's recipe in the one format; `source.groups` keeps the group -> scheme choice it came from."""
    return dataclasses.replace(
        setup.point.recipe(metrics), name=safe_name(name),
        quant=recipe_spec(assignment, setup.space, list(setup.cands.values())),
        source={"experiment": setup.root.tracking.experiment, "run_name": name, "kind": "search",
                "study": setup.study_name, "trial": number, "groups": assignment})


def log_trial(setup: Setup, number: int, assignment: dict[str, str], status: str, reason: str,
               metrics: dict[str, float], tb: str | None = None, role: str = "search-trial") -> str:
    """One nested MLflow run: the grid's params and metric schema, the recipe as a JSON artifact."""
    params = {**setup.point.params(), "scheme": "recipe", "granularity": "mixed", "bits": None,
              "torchao_config": "FqnToConfig", "recipe_counts": counts(assignment, setup.space),
              "study": setup.study_name, "trial": number}
    tags = {"qsweep.study": setup.study_name, "qsweep.role": role, "model": setup.root.model.name}
    name = f"{setup.study_name}-{'confirm' if role != 'search-trial' else 'trial'}-{number}"
    texts = {RECIPE_FILE: to_json(trial_recipe(setup, name, number, assignment, metrics))}
    if tb:
        texts["traceback.txt"] = tb
    return setup.tracker.record(name, status, reason, params, metrics, tags, texts, parent_run_id=setup.parent_run_id)


def run_trials(setup: Setup, seeds: list[dict[str, str]]) -> tuple[Any, int, float]:
    """Seed and run the study up to search.n_trials finished trials; returns (study, new trials, seconds)."""
    import optuna

    s = setup.root.search
    study = open_study(setup)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if "metrics" in trial.user_attrs:
            setup.memo.setdefault(recipe_key(setup.space.complete(trial.params)), trial.user_attrs["metrics"])
    for seed in seeds:
        study.enqueue_trial({k: seed[k] for k in setup.space.free}, skip_if_exists=True)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    before = len(study.get_trials(deepcopy=False, states=finished))
    remaining = s.n_trials - before
    started = time.perf_counter()
    if remaining > 0:
        print(f"qsweep search: study {setup.study_name!r} holds {before} trials; running {remaining} more",
              flush=True)
        study.optimize(objective_fn(setup), n_trials=remaining, timeout=s.timeout_s, catch=(Exception,),
                       callbacks=[optuna.study.MaxTrialsCallback(s.n_trials, states=finished)])
    else:
        print(f"qsweep search: study {setup.study_name!r} already holds {before} trials "
              f"(search.n_trials={s.n_trials}); raise it to add trials", flush=True)
    after = len(study.get_trials(deepcopy=False, states=finished))
    return study, after - before, time.perf_counter() - started


# ---------------------------------------------------------------- results

def trials_table(study, setup: Setup) -> pd.DataFrame:
    """One row per trial: state, objective, drift, feasibility, recipe and metrics."""
    rows = []
    uniforms = {recipe_key(setup.space.uniform(n)): n for n in setup.cands}
    for t in study.trials:
        assignment = setup.space.complete(t.params) if t.params else {}
        metrics = t.user_attrs.get("metrics", {})
        row = {"trial": t.number, "state": t.state.name, "recipe": recipe_key(assignment),
               "uniform": uniforms.get(recipe_key(assignment), ""), "counts": json.dumps(t.user_attrs.get("counts", {})),
               "duplicate": bool(t.user_attrs.get("duplicate", False))}
        if metrics:  # a study stored before NaN trials were failed may hold some: never feasible
            row.update(value=setup.value(metrics), drift=setup.drift(metrics), **metrics)
            row["feasible"] = setup.feasible(metrics)
        rows.append(row)
    table = pd.DataFrame(rows)
    if "feasible" not in table:
        table["feasible"] = False
    table["feasible"] = table["feasible"].fillna(False).astype(bool)
    return table


def best_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Feasible, distinct recipes, best objective first (ties: lower drift, earlier trial)."""
    ok = table[(table["state"] == "COMPLETE") & table["feasible"]]
    if len(ok):  # a NaN value or drift sorts last, yet a lone one would still come first
        ok = ok[ok["value"].map(math.isfinite) & ok["drift"].map(math.isfinite)]
    return ok.sort_values(["value", "drift", "trial"], ascending=[False, True, True]).drop_duplicates("recipe")


def pareto_front(table: pd.DataFrame) -> pd.DataFrame:
    """Distinct complete recipes that no other beats on both objective (higher) and drift (lower)."""
    ok = table[table["state"] == "COMPLETE"].drop_duplicates("recipe")
    if len(ok):
        ok = ok[ok["value"].map(math.isfinite) & ok["drift"].map(math.isfinite)]
    return ok[pareto_mask(ok, {"value": True, "drift": False})].sort_values("drift")


def exhaustive(setup: Setup) -> pd.DataFrame:
    """Every recipe of the space, evaluated like a trial (memoised): the optimum the search aims at."""
    free = setup.space.free
    if setup.space.size() > setup.root.search.max_exhaustive:
        raise ConfigError(f"search space has {setup.space.size()} recipes > search.max_exhaustive="
                          f"{setup.root.search.max_exhaustive}; exhaustive is for small models")
    rows = []
    for combo in itertools.product(*free.values()):
        assignment = setup.space.complete(dict(zip(free, combo)))
        key = recipe_key(assignment)
        try:
            metrics = setup.memo.get(key) or setup.evaluate(assignment)
        except Exception as err:
            rows.append({"recipe": key, "state": "FAIL", "reason": error_reason(err, 200)})
            continue
        setup.memo[key] = metrics
        drift = setup.drift(metrics)
        rows.append({"recipe": key, "state": "COMPLETE", "value": setup.value(metrics), "drift": drift,
                     "feasible": setup.feasible(metrics), "counts": json.dumps(counts(assignment, setup.space))})
    return pd.DataFrame(rows)
