"""Confirmation by measurement: the best recipes run end to end as grid trials, are timed again
in turn with the baseline (paired), and the measured verdict overrides the cost model's prediction."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from qsweep import gpus, measure
from qsweep.measure import GRAPHED_MODES, forward_call, to_device
from qsweep.objectives import SEARCH_OBJECTIVES
from qsweep.runner import run_isolated, run_trial
from qsweep.schemes import quantize
from qsweep.search.evaluate import free_device_memory
from qsweep.search.space import recipe_spec
from qsweep.search.study import Setup, log_trial
from qsweep.sweep import ensure_baseline, reference_path, relative_to_baseline


def confirm(setup: Setup, rows: pd.DataFrame) -> pd.DataFrame:
    """Measure recipes end to end as grid trials (compile, latency, memory, drift vs the grid's baseline)."""
    if rows.empty:
        return pd.DataFrame()
    tracker, point = setup.tracker, setup.point
    goal = SEARCH_OBJECTIVES[setup.root.search.objective]
    baseline = ensure_baseline(point, tracker)
    if baseline.status != "ok":
        print(f"qsweep search: cannot confirm, baseline failed: {baseline.reason}", flush=True)
        return pd.DataFrame()
    out = []
    for r in rows.itertuples():
        assignment = json.loads(r.recipe)
        spec = point.spec(recipe_spec(assignment, setup.space, list(setup.cands.values())),
                          reference_path(point), is_baseline=False)
        with gpus.trial_device(point.device, setup.root.isolate) as (env, _):  # alone on a free GPU
            result = (run_isolated(spec, setup.root.bench.timeout_s, env) if setup.root.isolate else run_trial(spec))
        if result.status == "ok":
            result.metrics.update(relative_to_baseline(result.metrics, baseline.metrics))
            result.metrics["predicted_speedup"] = r.predicted_speedup
        log_trial(setup, int(r.trial), assignment, result.status, result.reason, result.metrics,
                   result.traceback, role="search-confirm")
        m = result.metrics
        out.append({"trial": int(r.trial), "uniform": r.uniform, "counts": r.counts, "status": result.status,
                    "predicted_speedup": r.predicted_speedup, "speedup": m.get("speedup"),
                    "size_ratio": m.get("size_ratio"), goal.measured: m.get(goal.measured),
                    setup.root.search.drift_metric:
                    m.get(setup.root.search.drift_metric), "latency_ms": m.get("latency_ms"),
                    "latency_cv": m.get("latency_cv"), "reason": result.reason[:100], "recipe": r.recipe})
    confirmed = pd.DataFrame(out)
    rounds = setup.root.search.paired_rounds
    if rounds > 0:
        ok = confirmed[confirmed["status"] == "ok"]
        confirmed = confirmed.merge(paired_speedups(setup, ok, rounds), on="trial", how="left")
    return confirmed


def paired_speedups(setup: Setup, rows: pd.DataFrame, rounds: int) -> pd.DataFrame:
    """Speedups measured in this process with the baseline and each recipe timed in turn, round after
    round. Between separate processes a shared host's speed drifts by more than the gaps being judged;
    within a round the drift hits every variant alike, so the per-round ratio to the baseline cancels it.
    paired_speedup is the median ratio, paired_noise half the spread of the ratios (relative)."""
    ev, bench, mode = setup.ev, setup.root.bench, setup.root.compile.mode
    inputs = [to_device(t, ev.device, ev.dtype) for t in ev.bundle.timed_inputs(bench.batch_size, setup.root.seed)]
    variants: dict[Any, nn.Module] = {"baseline": ev.model}
    for r in rows.itertuples():
        model = copy.deepcopy(ev.model)
        quantize(model, recipe_spec(json.loads(r.recipe), setup.space, list(setup.cands.values())), {})
        variants[int(r.trial)] = model
    calls = {key: forward_call(model, inputs, mode) for key, model in variants.items()}
    for call in calls.values():
        call()  # compile, warm up
    times: dict[Any, list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            stats = measure.time_call(call, device=ev.device, warmup=1, repeats=bench.repeats, timing=setup.point.timing,
                                      l2_flush=bench.l2_flush, graphed_already=mode in GRAPHED_MODES)
            times[key].append(stats.median_ms)
    out = [{"trial": key, **paired_ratio(times["baseline"], times[key])} for key in variants if key != "baseline"]
    del variants, calls
    free_device_memory(ev.device)
    return pd.DataFrame(out, columns=["trial", "paired_speedup", "paired_noise"])


def paired_ratio(baseline_ms: list[float], recipe_ms: list[float]) -> dict[str, float]:
    """Median of the per-round baseline/recipe ratios, and half their spread relative to it."""
    ratios = np.asarray(baseline_ms) / np.asarray(recipe_ms)
    median = float(np.median(ratios))
    return {"paired_speedup": median, "paired_noise": float(np.ptp(ratios) / 2 / median)}


def measured_verdict(confirmed: pd.DataFrame, drift_metric: str, budget: float,
                     objective: str = "speedup") -> dict[str, Any]:
    """The answer by measurement, which overrides the cost model's prediction: the best confirmed recipe
    within the drift budget, and whether it is mixed and beats the best uniform one by more than the noise.
    The measure is the objective's `measured` metric (objectives.SEARCH_OBJECTIVES); one without timing
    noise (size: the saved file's size_ratio) has no noise. For a timed one (speed), paired timings (one
    process, in turn) are used where present, with their spread as the noise; otherwise the isolated
    trials' speedups, with twice the larger latency CV as the noise, or how far the re-measured unquantized
    recipe strayed from its baseline if that is larger (run-to-run noise that a within-run CV does not
    see). A smaller margin proves nothing."""
    goal = SEARCH_OBJECTIVES[objective]
    ok = confirmed[(confirmed["status"] == "ok") & np.isfinite(confirmed[goal.measured].astype(float))]
    if drift_metric in ok:  # NaN drift never meets the budget
        ok = ok[ok[drift_metric].astype(float).fillna(math.inf) <= budget]
    if ok.empty:
        return {"measured_best": None, "measured_mixed_beats_uniform": False}
    paired = goal.paired is not None and goal.paired in ok and bool(ok[goal.paired].notna().all())
    metric = goal.paired if paired else goal.measured
    ranked = ok.sort_values(metric, ascending=False)
    top, uniform = ranked.iloc[0], ranked[ranked["uniform"] != ""]
    verdict: dict[str, Any] = {
        "measured_best": {"trial": int(top["trial"]), "metric": metric, "value": float(top[metric]),
                          "counts": json.loads(top["counts"]), "uniform": top["uniform"] or None},
        "measured_by": "paired timing" if paired else goal.measured_by}
    if top["uniform"] != "" or uniform.empty:
        return {**verdict, "measured_mixed_beats_uniform": top["uniform"] == ""}
    rival = uniform.iloc[0]
    if goal.paired is None:
        noise = 0.0
    elif paired:
        noise = max(float(top["paired_noise"]), float(rival["paired_noise"]))
    else:
        cvs = [row.get("latency_cv") for row in (top, rival)]
        noise = 2 * max((cv for cv in cvs if cv is not None and not math.isnan(cv)), default=0.0)
        unquantized = ok[ok["uniform"] == "none"][goal.measured]
        if len(unquantized):
            noise = max(noise, abs(1 - float(unquantized.iloc[0])))
    margin = top[metric] / rival[metric] - 1
    return {**verdict, "measured_margin": float(margin), "measured_noise": float(noise),
            "measured_mixed_beats_uniform": bool(margin > noise)}
