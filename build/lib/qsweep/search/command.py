"""`qsweep search`: prepare the setup, run or resume the study, confirm, and write and log the results."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from qsweep.config import ConfigError, RootConf, first_line, load_config, mlflow_uri
from qsweep.objectives import SEARCH_OBJECTIVES
from qsweep.recipe import to_json
from qsweep.search.confirm import confirm, measured_verdict
from qsweep.search.evaluate import CostModel, Evaluator
from qsweep.search.parallel import WORKER_ENV, coordinator_run, run_worker, run_workers
from qsweep.search.space import NONE, Candidate, build_space, recipe_key, resolve_candidates
from qsweep.search.study import (
    Setup,
    best_rows,
    cached_sensitivity,
    default_storage,
    exhaustive,
    greedy_seeds,
    pareto_front,
    run_trials,
    trial_recipe,
    trials_table,
)
from qsweep.sweep import Point
from qsweep.tracking import FAILED, MODEL_TAG, OK, ROLE_SEARCH, ROLE_TAG, STUDY_TAG, Tracker

# ---------------------------------------------------------------- plots

def plot_sensitivity(table: pd.DataFrame, path: Path, drift_metric: str) -> None:
    """Heat map: groups x candidates, colour = drift when only that group is quantized."""
    from qsweep.report import plot_sensitivity as heat_map

    ok = table[table["status"] == "ok"] if len(table) else table
    if ok.empty:
        return
    grid = ok.pivot_table(index="group", columns="candidate", values="drift", sort=False)
    heat_map(grid, path, f"per-layer sensitivity ({drift_metric}, one group quantized)")


def plot_pareto(table: pd.DataFrame, front: pd.DataFrame, best: pd.DataFrame, budget: float, path: Path,
                objective: str, drift_metric: str) -> None:
    """Every trial (drift vs objective), the Pareto front, uniform recipes labelled, the budget line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = table[table["state"] == "COMPLETE"]
    if ok.empty:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(ok["drift"], ok["value"], c=["tab:blue" if f else "tab:gray" for f in ok["feasible"]], s=14,
               alpha=0.6, label="trials (grey: over budget)")
    ax.plot(front["drift"], front["value"], "-o", color="tab:orange", ms=4, label="Pareto front")
    for r in ok[ok["uniform"] != ""].drop_duplicates("uniform").itertuples():
        ax.annotate(f"uniform {r.uniform}", (r.drift, r.value), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    if not best.empty:
        top = best.iloc[0]
        ax.scatter([top["drift"]], [top["value"]], marker="*", s=180, color="tab:red", label="best recipe", zorder=3)
    ax.axvline(budget, ls="--", color="k", lw=1, label="drift budget")
    ax.set_xlabel(drift_metric)
    ax.set_ylabel(SEARCH_OBJECTIVES[objective].value)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- command

def default_study_name(root: RootConf) -> str:
    s = root.search
    return s.study or f"{root.model.name}-{s.objective}-{s.drift_metric}"


def prepare(root: RootConf, overrides: list[str]) -> Setup:
    """Build the model, candidates, space, cost model and the parent MLflow run of one worker."""
    point = Point(root)
    cands_list = resolve_candidates(root, overrides, point.hw, point.dtype)
    cands = {c.name: c for c in cands_list}
    if NONE not in cands:
        cands[NONE] = Candidate(NONE, None)  # the cost model's reference, never offered unless listed
    ev = Evaluator(root, point.device, point.dtype)
    if not ev.layers:
        raise ConfigError(f"model {root.model.name} has no quantizable Linear layers (model.quantize_filter)")
    space = build_space(ev.layers, cands_list, root.search.groups)
    context = {**{k: v for k, v in point.context.items() if k not in ("eval", "model")},
               "threads": torch.get_num_threads()}  # CPU timings depend on the thread count
    cost = CostModel(root, ev, point.timing, context)
    study = default_study_name(root)
    out_dir = Path(root.output_dir) / "search" / study
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(mlflow_uri(root), root.tracking.experiment)
    # A parallel worker nests its trials under its coordinator's run (qsweep.search.parallel).
    parent = coordinator_run(tracker, study) if os.environ.get(WORKER_ENV) else _parent_run(tracker, root, point, study)
    budget = root.search.max_drift
    return Setup(root, point, ev, space, cands, cost, study, default_storage(root), out_dir, tracker, parent, budget)


def _parent_run(tracker: Tracker, root: RootConf, point: Point, study: str) -> str:
    """The study's MLflow run, RUNNING with no status until the search ends (run_search sets it): found
    again on resume, so all workers nest their trials under it."""
    found = tracker.find(**{STUDY_TAG: study, ROLE_TAG: ROLE_SEARCH})
    if found:
        run_id = found[-1].info.run_id  # the oldest, should two workers have raced to create one
        tracker.reopen(run_id)
        return run_id
    s = root.search
    params = {"model": root.model.name, "candidates": s.candidates, "objective": s.objective,
              "drift_metric": s.drift_metric, "max_drift": s.max_drift, "relative": s.relative,
              "pareto": s.pareto, "groups": s.groups, "compile": root.compile.name, "device": point.device,
              "dtype": point.dtype, "device_name": point.hw.name, "batch_size": root.bench.batch_size}
    tags = {STUDY_TAG: study, ROLE_TAG: ROLE_SEARCH, MODEL_TAG: root.model.name}
    return tracker.start(f"search-{study}", params, tags)


def run_search(root: RootConf, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) one search worker end to end; returns the summary that is also written as JSON.
    The parent run's status says how it ended: `ok` when a recipe met the budget, else `failed` with
    the reason (no recipe met it, or the error that stopped the search)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    setup = prepare(root, overrides or [])
    try:
        result = _search(setup, started, overrides or [])
    except BaseException as err:  # an interrupt too: a parent left RUNNING would look half-written
        reason = f"{type(err).__name__}: {first_line(err)[:500]}" if str(err) else type(err).__name__
        with contextlib.suppress(Exception):  # the search's own error is the one to report
            setup.tracker.finish(setup.parent_run_id, FAILED, f"search stopped: {reason}")
        raise
    s = root.search
    setup.tracker.finish(setup.parent_run_id, OK if result["best"] else FAILED,
                         "" if result["best"] else f"no recipe met {s.drift_metric} <= {s.max_drift}")
    return result


def _search(setup: Setup, started: float, overrides: list[str] | None = None) -> dict[str, Any]:
    root = setup.root
    s, space = root.search, setup.space
    probe = setup.ev.measure(None)
    setup.drift(probe)  # fail early, with the metrics this model has, if drift_metric is not one of them
    if s.relative and "task_metric" not in setup.ev.base_task:
        raise ConfigError(f"search.relative=true needs a task metric; model {root.model.name} has none")
    print(f"qsweep search: {len(setup.ev.layers)} layers in {len(space.groups)} groups, {len(space.free)} with a "
          f"choice, {space.size()} recipes; candidates {list(setup.cands)}; baseline latency "
          f"{setup.cost.base_ms:.3f} ms", flush=True)

    table = pd.DataFrame()
    if s.sensitivity:
        table = cached_sensitivity(setup)
        table.to_csv(setup.out_dir / "sensitivity.csv", index=False)
        plot_sensitivity(table, setup.out_dir / "sensitivity.png", s.drift_metric)
        _print_sensitivity(table, s.drift_metric)
    seeds = [space.uniform(n) for n in setup.cands if any(n in v for v in space.free.values())]
    if not table.empty:
        seeds += greedy_seeds(table, space, [b * setup.drift_budget for b in s.seed_budgets])
    seeds = list({recipe_key(x): x for x in seeds}.values())

    study, new, trials_s = (run_workers(setup, seeds, overrides or []) if s.n_workers > 1
                            else run_trials(setup, seeds))
    trials = trials_table(study, setup)
    trials.to_csv(setup.out_dir / "trials.csv", index=False)
    best, front = best_rows(trials), pareto_front(trials)
    uniform = best[best["uniform"] != ""]
    result = _summary(setup, trials, best, uniform, new, trials_s)

    if s.exhaustive:
        ex = exhaustive(setup)
        ex.to_csv(setup.out_dir / "exhaustive.csv", index=False)
        feasible = ex[(ex["state"] == "COMPLETE") & ex["feasible"]].sort_values("value", ascending=False)
        result["exhaustive"] = {"recipes": len(ex), "optimum": float(feasible["value"].iloc[0]) if len(feasible)
                                else None, "optimum_counts": feasible["counts"].iloc[0] if len(feasible) else None}
    plot_pareto(trials, front, best, setup.drift_budget, setup.out_dir / "pareto.png", s.objective, s.drift_metric)

    to_confirm = pd.concat([front[front["feasible"]] if s.pareto else best.head(s.confirm_top_k),
                            uniform.head(1)]).drop_duplicates("recipe").head(max(s.confirm_top_k, 0) + 1)
    confirmed = confirm(setup, to_confirm) if s.confirm_top_k > 0 else pd.DataFrame()
    if not confirmed.empty:
        confirmed.to_csv(setup.out_dir / "confirmed.csv", index=False)
        result["confirmed"] = confirmed.to_dict("records")
        result.update(measured_verdict(confirmed, s.drift_metric, setup.drift_budget, s.objective))
    result["wall_s"] = time.perf_counter() - started
    _write_outputs(setup, result, best)
    _print_result(result, confirmed, s)
    return result


def _summary(setup: Setup, trials: pd.DataFrame, best: pd.DataFrame, uniform: pd.DataFrame, new: int,
             trials_s: float) -> dict[str, Any]:
    def brief(rows: pd.DataFrame) -> dict | None:
        if rows.empty:
            return None
        r = rows.iloc[0]
        return {"trial": int(r["trial"]), "value": float(r["value"]), "drift": float(r["drift"]),
                "counts": json.loads(r["counts"]), "uniform": r["uniform"] or None,
                "recipe": json.loads(r["recipe"])}

    s = setup.root.search
    states = trials["state"].value_counts().to_dict() if len(trials) else {}
    return {"study": setup.study_name, "storage": setup.storage, "objective": s.objective,
            "drift_metric": s.drift_metric, "max_drift": s.max_drift, "relative": s.relative,
            "trials_total": len(trials), "trial_states": states, "trials_this_run": new,
            "distinct_recipes": int(trials.loc[trials["state"] == "COMPLETE", "recipe"].nunique()) if len(trials)
            else 0, "search_space": setup.space.size(), "trials_wall_s": trials_s,
            "best": brief(best), "best_uniform": brief(uniform),
            "mixed_beats_uniform": bool(len(best) and len(uniform) and best.iloc[0]["value"] >
                                        uniform.iloc[0]["value"] + 1e-9)}


BEST_RECIPE_FILE = "best_recipe.json"  # in the study's folder and on its parent run


def _write_outputs(setup: Setup, result: dict[str, Any], best: pd.DataFrame) -> None:
    """summary.json and best_recipe.json next to the plots, all of them artifacts of the parent run."""
    out = setup.out_dir
    (out / "summary.json").write_text(json.dumps(result, indent=1, default=str))
    winner = _winner(result)
    if winner:  # the one recipe format: `qsweep apply recipe=<this file>` takes it as it is
        metrics = setup.memo.get(recipe_key(winner["recipe"]), {})
        recipe = trial_recipe(setup, f"{setup.study_name}-best", winner["trial"], winner["recipe"], metrics)
        (out / BEST_RECIPE_FILE).write_text(to_json(recipe))
    tracker, run_id = setup.tracker, setup.parent_run_id
    tracker.log_files(run_id, [f for f in sorted(out.iterdir()) if f.suffix in (".csv", ".png", ".json")])
    if not best.empty:
        tracker.log_metrics(run_id, setup.memo.get(best.iloc[0]["recipe"], {}), step=int(result["trials_total"]))
    keys = ("trials_total", "trials_this_run", "distinct_recipes", "wall_s", "mixed_beats_uniform",
            "measured_mixed_beats_uniform", "measured_margin", "measured_noise", "measured_by")
    tags = {f"search.{k}": str(result[k]) for k in keys if k in result}
    if winner:
        tags["search.best_trial"] = str(winner["trial"])
    tracker.set_tags(run_id, tags)


def _winner(result: dict[str, Any]) -> dict | None:
    """The measured best when recipes were confirmed end to end, else the search's predicted best."""
    measured = result.get("measured_best")
    if measured:
        trials = {c["trial"]: c for c in result.get("confirmed", [])}
        best = result["best"]
        if best and best["trial"] == measured["trial"]:
            return best
        row = trials.get(measured["trial"])
        if row is not None and "recipe" in row:
            return {"trial": measured["trial"], "recipe": json.loads(row["recipe"])}
    return result["best"]


def _print_sensitivity(table: pd.DataFrame, drift_metric: str) -> None:
    if table.empty:
        return
    ok = table[table["status"] == "ok"]
    if not ok.empty:
        grid = ok.pivot_table(index="group", columns="candidate", values="drift", sort=False)
        with pd.option_context("display.max_rows", 60, "display.width", 200, "display.float_format", "{:.4g}".format):
            print(f"\nsensitivity ({drift_metric}, one group quantized at a time):\n{grid}\n", flush=True)
    for r in table[table["status"] == "failed"].itertuples():
        print(f"sensitivity: {r.group} with {r.candidate} failed, left out of the search: {r.reason}", flush=True)


def _print_result(result: dict[str, Any], confirmed: pd.DataFrame, s) -> None:
    best, uni = result["best"], result["best_uniform"]
    print(f"\nstudy {result['study']}: {result['trials_total']} trials ({result['trials_this_run']} this run, "
          f"{result['distinct_recipes']} distinct recipes of {result['search_space']}), states "
          f"{result['trial_states']}; trials took {result['trials_wall_s']:.1f} s, the whole search "
          f"{result['wall_s']:.1f} s")
    unit = SEARCH_OBJECTIVES[s.objective].value
    if best:
        print(f"best recipe (trial {best['trial']}): {unit} {best['value']:.4f}  {s.drift_metric} "
              f"{best['drift']:.4g}  {best['counts']}")
    else:
        print(f"no recipe met {s.drift_metric} <= {s.max_drift}")
    if uni:
        print(f"best uniform ({uni['uniform']}): {unit} {uni['value']:.4f}  {s.drift_metric} {uni['drift']:.4g}")
    if "exhaustive" in result:
        ex = result["exhaustive"]
        print(f"exhaustive optimum over {ex['recipes']} recipes: {unit} {ex['optimum']}  {ex['optimum_counts']}")
    if not confirmed.empty:
        with pd.option_context("display.width", 220, "display.max_columns", None, "display.float_format",
                               "{:.4g}".format):
            print(f"\nconfirmed end to end:\n{confirmed.drop(columns='recipe').to_string(index=False)}")
        measured = result.get("measured_best")
        if measured:
            verdict = "a mixed recipe beats" if result["measured_mixed_beats_uniform"] else "no mixed recipe beats"
            margin = (f" (margin {result['measured_margin']:+.1%}, noise {result['measured_noise']:.1%})"
                      if "measured_margin" in result else "")
            print(f"measured winner (trial {measured['trial']}, by {result['measured_by']}): "
                  f"{measured['metric']} {measured['value']:.3f}x  "
                  f"{measured['counts']}  -> {verdict} the best uniform scheme end to end{margin}")


def search_command(args: list[str]) -> int:
    """`qsweep search [overrides]`: run or resume a per-layer search; 0 when a recipe met the budget."""
    root, _ = load_config(list(args))
    if os.environ.get(WORKER_ENV):  # started by a coordinator with search.n_workers > 1: trials only
        return run_worker(root, list(args))
    result = run_search(root, list(args))
    return 0 if result["best"] else 1
