"""Per-layer recipe search with Optuna: which layer gets which scheme, under a drift budget.

Every quantizable layer (or group of layers sharing one choice) picks a candidate scheme; the trial's
assignment becomes a torchao `FqnToConfig`. A trial costs one accuracy evaluation of a deep copy of
the model built once per process: no compile, no latency measurement. Speed comes from a cost model
of cached single-layer microbenchmarks, and the best recipes are then measured end to end exactly
as grid trials are (`confirm`). A sensitivity pass (one layer at a time) seeds the study with greedy
recipes, and the uniform recipes are seeded too, so the search starts from the best uniform scheme.

The study lives in an Optuna RDB storage (resume, several workers); the study is a parent MLflow
run and each trial a nested run with the grid's metric schema.
"""

from __future__ import annotations

import copy
import functools
import gc
import hashlib
import itertools
import json
import math
import re
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from qsweep import measure, schemes
from qsweep.config import ConfigError, RootConf, choices, first_line, load_config, mlflow_uri
from qsweep.models import build_model
from qsweep.runner import (
    drift_metrics,
    eval_outputs,
    group_size_of,
    quantizable_layers,
    quantize,
    run_isolated,
    run_trial,
    to_device,
)
from qsweep.sweep import Point, _reference_path, ensure_baseline, relative_to_baseline
from qsweep.tracking import Tracker

FQN_TO_CONFIG = "torchao.quantization.FqnToConfig"
NONE = "none"


# ---------------------------------------------------------------- candidates and search space

@dataclass(frozen=True)
class Candidate:
    """One scheme a layer may take: its name in the search and its torchao spec (None = unquantized)."""

    name: str
    spec: dict | None

    def fits(self, layer: nn.Linear) -> bool:
        """torchao rejects a group size that does not divide in_features; such a layer cannot take it."""
        group = group_size_of(self.spec)
        return not group or layer.in_features % group == 0


def resolve_candidates(root: RootConf, overrides: list[str], hw: schemes.Hardware, dtype: str) -> list[Candidate]:
    """search.candidates -> Candidates. `name` uses the run's granularity if the scheme accepts it, else
    the scheme's first; `name:granularity` picks one. Candidates this hardware cannot run are dropped."""
    base = [o for o in overrides if o.split("=")[0].lstrip("+~") not in ("scheme", "granularity")]
    found: list[Candidate] = []
    for text in root.search.candidates:
        name, _, gran = text.partition(":")
        if name not in choices("scheme"):
            raise ConfigError(f"unknown search candidate {name!r}; valid schemes: {', '.join(choices('scheme'))}")
        if gran and gran not in choices("granularity"):
            raise ConfigError(f"unknown granularity in candidate {text!r}; valid: {', '.join(choices('granularity'))}")
        scheme = load_config([*base, f"scheme={name}"])[0].scheme
        gran = gran or (root.granularity.name if not scheme.granularities or root.granularity.name
                        in scheme.granularities else scheme.granularities[0])
        point = load_config([*base, f"scheme={name}", f"granularity={gran}"])[0]
        skip = schemes.skip_reason(point.scheme, point.granularity, point.group_size)
        if skip:
            raise ConfigError(f"search candidate {text!r}: {skip}")
        why = schemes.unsupported_reason(point.scheme, hw, dtype, root.bench.batch_size)
        if why:
            print(f"qsweep search: dropping candidate {text}: {why}", flush=True)
            continue
        found.append(Candidate(text, schemes.quant_spec(point.scheme, point.granularity, point.group_size)))
    if len({c.name for c in found}) < 2:
        raise ConfigError("search needs at least two candidates this hardware can run; "
                          f"got {[c.name for c in found]} from {root.search.candidates}")
    return found


@dataclass
class Space:
    """Groups of layers (key -> FQNs) and the candidates each group may take."""

    groups: dict[str, list[str]]
    choices: dict[str, list[str]]

    @property
    def free(self) -> dict[str, list[str]]:
        """Groups with a real choice: the study's parameters."""
        return {k: v for k, v in self.choices.items() if len(v) > 1}

    def complete(self, params: dict[str, str]) -> dict[str, str]:
        """A full assignment (every group) from the study's parameters (free groups only)."""
        return {k: params.get(k, v[0] if v else NONE) for k, v in self.choices.items()}

    def uniform(self, name: str) -> dict[str, str]:
        """Every group takes `name` where it can (as a uniform grid point does), else stays unquantized."""
        return {k: name if name in v else (NONE if NONE in v else v[0]) for k, v in self.choices.items()}

    def size(self) -> int:
        return math.prod(len(v) for v in self.free.values())


def group_key(fqn: str, patterns: list[str]) -> str:
    """The first matching regex names the group; its capture groups split it (one choice per block)."""
    for i, pattern in enumerate(patterns):
        match = re.search(pattern, fqn)
        if match:
            return f"g{i}" + "".join(f"[{c}]" for c in match.groups())
    return fqn


def build_space(layers: dict[str, nn.Linear], candidates: list[Candidate], patterns: list[str]) -> Space:
    """Group layers by regex and keep, per group, the candidates every member can take."""
    groups: dict[str, list[str]] = {}
    for fqn in layers:
        groups.setdefault(group_key(fqn, patterns), []).append(fqn)
    allowed = {k: [c.name for c in candidates if all(c.fits(layers[f]) for f in fqns)] for k, fqns in groups.items()}
    return Space(groups, allowed)


def recipe_spec(assignment: dict[str, str], space: Space, candidates: list[Candidate]) -> dict:
    """The torchao FqnToConfig spec of a group assignment (unquantized layers map to None)."""
    by_name = {c.name: c.spec for c in candidates}
    fqn_to_config = {fqn: copy.deepcopy(by_name.get(assignment[key])) for key, fqns in space.groups.items()
                     for fqn in fqns}
    return {"_target_": FQN_TO_CONFIG, "fqn_to_config": fqn_to_config}


def counts(assignment: dict[str, str], space: Space) -> dict[str, int]:
    """Layers per scheme, e.g. {"int8wo": 2, "none": 1}: the compact param of a trial."""
    out: dict[str, int] = {}
    for key, name in assignment.items():
        out[name] = out.get(name, 0) + len(space.groups[key])
    return dict(sorted(out.items()))


def _key(assignment: dict[str, str]) -> str:
    return json.dumps(assignment, sort_keys=True)


# ---------------------------------------------------------------- accuracy evaluation

class Evaluator:
    """The model built once per process, its baseline outputs and task metric; `measure` evaluates a
    quantized deep copy with the grid's drift metrics (same eval inputs as runner trials)."""

    def __init__(self, root: RootConf, device: str, dtype: str):
        self.root, self.device, self.dtype = root, device, getattr(torch, dtype)
        with torch.device(device):  # initialise on the device, as runner trials do (big LMs)
            self.bundle = build_model(dict(root.model.builder), root.seed)
        self.model = self.bundle.model.to(self.dtype).to(device)
        self.layers = quantizable_layers(self.model, root.model.quantize_filter)
        self.inputs = self.bundle.make_inputs(root.eval.n_samples, root.seed + 1)
        self.base_task = self._task(self.model)
        self.reference = {"outputs": self._outputs(self.model), "task": self.base_task}
        self.base_size = measure.model_size_bytes(self.model)

    def _outputs(self, model: nn.Module) -> torch.Tensor:
        return eval_outputs(model, self.bundle, self.inputs, self.device, self.dtype, self.root.eval.batch_size)

    def _task(self, model: nn.Module) -> dict[str, float]:
        return self.bundle.evaluate(model, self.device, self.dtype) if self.bundle.evaluate else {}

    def measure(self, quant: dict | None) -> dict[str, float]:
        """Drift, task metric and size of the model quantized with `quant` (a torchao spec)."""
        model = copy.deepcopy(self.model)
        layers = quantizable_layers(model, self.root.model.quantize_filter)
        start = time.perf_counter()
        if quant is not None:
            quantize(model, quant, layers)
        metrics = {"quantize_s": time.perf_counter() - start, "layers_total": len(layers),
                   "layers_quantized": sum(type(m.weight.data) is not torch.Tensor for m in layers.values())}
        size = measure.model_size_bytes(model)
        metrics.update(size_bytes=size, size_ratio=self.base_size / size)
        metrics.update(drift_metrics(self.reference, self._outputs(model), self._task(model), self.bundle))
        del model
        _free(self.device)
        return metrics


def _free(device: str) -> None:
    if device == "cuda":  # a collection costs ~0.3 s with MLflow and Optuna loaded: only where memory is scarce
        gc.collect()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- latency cost model

class CostModel:
    """Latency of each unique (layer shape, input shape, scheme) measured once in isolation and cached
    in JSON; a recipe's latency is the baseline's minus the per-layer time saved.

    Timings honour the run's compile mode and bench settings, so they answer the same question as a
    grid trial; torch._dynamo is reset around each compiled microbenchmark because hundreds of Linear
    modules would otherwise exhaust the recompile limit and silently fall back to eager.
    """

    def __init__(self, root: RootConf, evaluator: Evaluator, timing: str, context: dict):
        self.root, self.ev, self.timing = root, evaluator, timing
        self.path = Path(root.output_dir) / "cache" / "latency.json"
        self.context = context
        self.cache: dict[str, dict] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.shapes = self._input_shapes()
        self.base_ms = self._cached({"what": "model", "builder": dict(root.model.builder)}, self._bench_model)["ms"]

    def _input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each layer's input shape on the bench batch (a hook on one eager forward)."""
        shapes: dict[str, tuple[int, ...]] = {}

        def hook(fqn: str):
            def record(module, args) -> None:  # a pre-hook that returns a value would replace the inputs
                shapes.setdefault(fqn, tuple(args[0].shape))
            return record

        hooks = [m.register_forward_pre_hook(hook(fqn)) for fqn, m in self.ev.layers.items()]
        try:
            with torch.inference_mode():
                self.ev.model(*self._bench_inputs())
        finally:
            for hook in hooks:
                hook.remove()
        return shapes

    def _bench_inputs(self) -> list[torch.Tensor]:
        raw = self.ev.bundle.timed_inputs(self.root.bench.batch_size, self.root.seed)
        return [to_device(t, self.ev.device, self.ev.dtype) for t in raw]

    def _cached(self, what: dict, bench) -> dict:
        key = hashlib.sha1(json.dumps({**self.context, **what}, sort_keys=True, default=str).encode()).hexdigest()
        if key not in self.cache:
            self.cache[key] = {**bench(), "what": json.dumps(what, default=str)[:300]}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{id(self)}.tmp")  # atomic: several workers share the cache
            tmp.write_text(json.dumps(self.cache, indent=1))
            tmp.replace(self.path)
        return self.cache[key]

    def layer(self, fqn: str, cand: Candidate) -> dict:
        """{"ms": latency of this layer alone with `cand`, "bytes": its weights in memory}."""
        m = self.ev.layers[fqn]
        shape = (m.in_features, m.out_features, m.bias is not None, self.shapes.get(fqn))
        return self._cached({"what": "layer", "shape": shape, "quant": cand.spec},
                            lambda: self._bench_layer(shape, cand.spec))

    def _time(self, module: nn.Module, inputs: list[torch.Tensor]) -> float:
        mode = self.root.compile.mode
        if mode:
            torch._dynamo.reset()
        runnable = torch.compile(module, mode=mode) if mode else module

        def call():
            with torch.inference_mode():
                return runnable(*inputs)

        call()
        bench = self.root.bench
        stats = measure.time_call(call, device=self.ev.device, warmup=bench.warmup, repeats=bench.repeats,
                                  timing=self.timing, l2_flush=bench.l2_flush,
                                  graphed_already=mode in ("reduce-overhead", "max-autotune"))
        if mode:
            torch._dynamo.reset()
        # p10, not the median: a cost model wants the layer's own cost, and on a shared host other
        # processes only ever add time (CUDA-graph timings barely differ between the two).
        return stats.p10_ms

    def _bench_layer(self, shape: tuple, spec: dict | None) -> dict:
        in_f, out_f, bias, in_shape = shape
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(in_f, out_f, bias=bias)).to(self.ev.device, self.ev.dtype).eval()
        if spec is not None:
            quantize(module, spec, {"0": module[0]})
        x = torch.randn(*(in_shape or (self.root.bench.batch_size, in_f)), device=self.ev.device, dtype=self.ev.dtype)
        out = {"ms": self._time(module, [x]), "bytes": measure.tensor_bytes(module.state_dict())}
        del module
        _free(self.ev.device)
        return out

    def _bench_model(self) -> dict:
        return {"ms": self._time(self.ev.model, self._bench_inputs())}

    def predict_ms(self, assignment: dict[str, str], space: Space, cands: dict[str, Candidate]) -> float:
        """Baseline latency minus the time each quantized layer saves (negative savings slow it down)."""
        saved = sum(self.layer(f, cands[NONE]).get("ms", 0) - self.layer(f, cands[name])["ms"]
                    for key, name in assignment.items() if name != NONE for f in space.groups[key])
        return max(self.base_ms - saved, 1e-6)

    def gain(self, key: str, name: str, space: Space, cands: dict[str, Candidate], objective: str) -> float:
        """What quantizing one group with `name` saves: ms (speedup) or weight bytes (size)."""
        if name == NONE:
            return 0.0
        unit = "ms" if objective == "speedup" else "bytes"
        return sum(self.layer(f, cands[NONE])[unit] - self.layer(f, cands[name])[unit] for f in space.groups[key])


# ---------------------------------------------------------------- sensitivity and seeds

def sensitivity(ev: Evaluator, space: Space, cands: dict[str, Candidate], cost: CostModel, objective: str,
                drift_fn) -> pd.DataFrame:
    """Quantize one group at a time with each candidate: drift and gain per (group, candidate).

    A (group, candidate) that raises is recorded as failed and leaves the search space.
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
                row.update(status="failed", reason=f"{type(err).__name__}: {first_line(err)[:300]}")
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
    info = {(r.group, r.candidate): (max(float(r.drift), 0.0), float(r.gain)) for r in ok.itertuples()}
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
        return metrics["predicted_speedup" if self.root.search.objective == "speedup" else "size_ratio"]

    def evaluate(self, assignment: dict[str, str]) -> dict[str, float]:
        metrics = self.ev.measure(recipe_spec(assignment, self.space, list(self.cands.values())))
        predicted = self.cost.predict_ms(assignment, self.space, self.cands)
        metrics.update(predicted_latency_ms=predicted, predicted_speedup=self.cost.base_ms / predicted)
        return metrics


def default_storage(root: RootConf) -> str:
    return root.search.storage or f"sqlite:///{Path(root.output_dir).resolve() / 'optuna.db'}"


def open_study(setup: Setup):
    """Create or load the study; heartbeats let another worker fail and retry a trial whose worker died."""
    import optuna

    s = setup.root.search
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            setup.storage, heartbeat_interval=60, grace_period=180,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=s.max_retry))
        sampler = optuna.samplers.TPESampler(seed=s.seed, multivariate=True, n_startup_trials=10)
    directions = ["maximize", "minimize"] if s.pareto else ["maximize"]
    return optuna.create_study(storage=storage, sampler=sampler, study_name=setup.study_name,
                               directions=directions, load_if_exists=True)


def objective_fn(setup: Setup):
    """The Optuna objective: one accuracy evaluation plus the cost model's prediction."""
    s = setup.root.search

    def objective(trial):
        params = {k: trial.suggest_categorical(k, v) for k, v in setup.space.free.items()}
        assignment = setup.space.complete(params)
        key = _key(assignment)
        duplicate = key in setup.memo
        started = time.perf_counter()
        try:
            metrics = setup.memo[key] if duplicate else setup.evaluate(assignment)
        except Exception as err:
            _log_trial(setup, trial.number, assignment, "failed", f"{type(err).__name__}: {first_line(err)[:500]}",
                       {}, traceback.format_exc())
            print(f"[trial {trial.number}] failed: {type(err).__name__}: {first_line(err)[:200]}", flush=True)
            raise
        setup.memo[key] = metrics
        drift, value = setup.drift(metrics), setup.value(metrics)
        trial.set_constraint("drift", drift - setup.drift_budget)  # <= 0 is feasible; TPE models it
        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("counts", counts(assignment, setup.space))
        if duplicate:
            trial.set_user_attr("duplicate", True)
        else:
            trial.set_user_attr("run_id", _log_trial(setup, trial.number, assignment, "ok", "", metrics))
        ok = "ok" if drift <= setup.drift_budget else "over budget"
        print(f"[trial {trial.number}] {s.objective} {value:.3f}x  {s.drift_metric} {drift:.4g} ({ok})  "
              f"{counts(assignment, setup.space)}{'  (seen)' if duplicate else ''}  "
              f"{time.perf_counter() - started:.2f}s", flush=True)
        return (value, drift) if s.pareto else value

    return objective


def _log_trial(setup: Setup, number: int, assignment: dict[str, str], status: str, reason: str,
               metrics: dict[str, float], tb: str | None = None, role: str = "search-trial") -> str:
    """One nested MLflow run: the grid's params and metric schema, the recipe as a JSON artifact."""
    params = {**setup.point.params(), "scheme": "recipe", "granularity": "mixed", "bits": None,
              "torchao_config": "FqnToConfig", "recipe_counts": counts(assignment, setup.space),
              "study": setup.study_name, "trial": number}
    tags = {"qsweep.study": setup.study_name, "qsweep.role": role, "model": setup.root.model.name}
    texts = {"recipe.json": json.dumps({"groups": assignment, "quant": recipe_spec(
        assignment, setup.space, list(setup.cands.values()))}, indent=1)}
    if tb:
        texts["traceback.txt"] = tb
    name = f"{setup.study_name}-{'confirm' if role != 'search-trial' else 'trial'}-{number}"
    return setup.tracker.record(name, status, reason, params, metrics, tags, texts, parent_run_id=setup.parent_run_id)


def run_trials(setup: Setup, seeds: list[dict[str, str]]) -> tuple[Any, int, float]:
    """Seed and run the study up to search.n_trials finished trials; returns (study, new trials, seconds)."""
    import optuna

    s = setup.root.search
    study = open_study(setup)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if "metrics" in trial.user_attrs:
            setup.memo.setdefault(_key(setup.space.complete(trial.params)), trial.user_attrs["metrics"])
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
    uniforms = {_key(setup.space.uniform(n)): n for n in setup.cands}
    for t in study.trials:
        assignment = setup.space.complete(t.params) if t.params else {}
        metrics = t.user_attrs.get("metrics", {})
        row = {"trial": t.number, "state": t.state.name, "recipe": _key(assignment),
               "uniform": uniforms.get(_key(assignment), ""), "counts": json.dumps(t.user_attrs.get("counts", {})),
               "duplicate": bool(t.user_attrs.get("duplicate", False))}
        if metrics:
            row.update(value=setup.value(metrics), drift=setup.drift(metrics), **metrics)
            row["feasible"] = row["drift"] <= setup.drift_budget
        rows.append(row)
    table = pd.DataFrame(rows)
    if "feasible" not in table:
        table["feasible"] = False
    table["feasible"] = table["feasible"].fillna(False).astype(bool)
    return table


def best_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Feasible, distinct recipes, best objective first (ties: lower drift, earlier trial)."""
    ok = table[(table["state"] == "COMPLETE") & table["feasible"]]
    return ok.sort_values(["value", "drift", "trial"], ascending=[False, True, True]).drop_duplicates("recipe")


def pareto_front(table: pd.DataFrame) -> pd.DataFrame:
    """Distinct complete recipes that no other beats on both objective (higher) and drift (lower)."""
    from qsweep.select import pareto_front as pareto_mask

    ok = table[table["state"] == "COMPLETE"].drop_duplicates("recipe")
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
        key = _key(assignment)
        try:
            metrics = setup.memo.get(key) or setup.evaluate(assignment)
        except Exception as err:
            rows.append({"recipe": key, "state": "FAIL", "reason": first_line(err)[:200]})
            continue
        setup.memo[key] = metrics
        drift = setup.drift(metrics)
        rows.append({"recipe": key, "state": "COMPLETE", "value": setup.value(metrics), "drift": drift,
                     "feasible": drift <= setup.drift_budget, "counts": json.dumps(counts(assignment, setup.space))})
    return pd.DataFrame(rows)


def confirm(setup: Setup, rows: pd.DataFrame) -> pd.DataFrame:
    """Measure recipes end to end as grid trials (compile, latency, memory, drift vs the grid's baseline)."""
    if rows.empty:
        return pd.DataFrame()
    tracker, point = setup.tracker, setup.point
    baseline = ensure_baseline(point, tracker)
    if baseline.status != "ok":
        print(f"qsweep search: cannot confirm, baseline failed: {baseline.reason}", flush=True)
        return pd.DataFrame()
    out = []
    for r in rows.itertuples():
        assignment = json.loads(r.recipe)
        spec = point.spec(recipe_spec(assignment, setup.space, list(setup.cands.values())),
                          _reference_path(point), is_baseline=False)
        result = (run_isolated(spec, setup.root.bench.timeout_s) if setup.root.isolate else run_trial(spec))
        if result.status == "ok":
            result.metrics.update(relative_to_baseline(result.metrics, baseline.metrics))
            result.metrics["predicted_speedup"] = r.predicted_speedup
        _log_trial(setup, int(r.trial), assignment, result.status, result.reason, result.metrics,
                   result.traceback, role="search-confirm")
        m = result.metrics
        out.append({"trial": int(r.trial), "uniform": r.uniform, "counts": r.counts, "status": result.status,
                    "predicted_speedup": r.predicted_speedup, "speedup": m.get("speedup"),
                    "size_ratio": m.get("size_ratio"), setup.root.search.drift_metric:
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
    calls = {}
    for key, model in variants.items():
        runnable = torch.compile(model, mode=mode) if mode else model
        calls[key] = functools.partial(_infer, runnable, inputs)
        calls[key]()  # compile, warm up
    times: dict[Any, list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            stats = measure.time_call(call, device=ev.device, warmup=1, repeats=bench.repeats, timing=setup.point.timing,
                                      l2_flush=bench.l2_flush, graphed_already=mode in ("reduce-overhead", "max-autotune"))
            times[key].append(stats.median_ms)
    out = [{"trial": key, **paired_ratio(times["baseline"], times[key])} for key in variants if key != "baseline"]
    del variants, calls
    _free(ev.device)
    return pd.DataFrame(out, columns=["trial", "paired_speedup", "paired_noise"])


def paired_ratio(baseline_ms: list[float], recipe_ms: list[float]) -> dict[str, float]:
    """Median of the per-round baseline/recipe ratios, and half their spread relative to it."""
    ratios = np.asarray(baseline_ms) / np.asarray(recipe_ms)
    median = float(np.median(ratios))
    return {"paired_speedup": median, "paired_noise": float(np.ptp(ratios) / 2 / median)}


def _infer(model: nn.Module, inputs: list[torch.Tensor]):
    with torch.inference_mode():
        return model(*inputs)


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
    ax.set_ylabel("predicted_speedup" if objective == "speedup" else "size_ratio")
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
    parent = _parent_run(tracker, root, point, study)
    budget = root.search.max_drift
    return Setup(root, point, ev, space, cands, cost, study, default_storage(root), out_dir, tracker, parent, budget)


def _parent_run(tracker: Tracker, root: RootConf, point: Point, study: str) -> str:
    """The study's MLflow run: found again on resume, so all workers nest their trials under it."""
    found = tracker.find(**{"qsweep.study": study, "qsweep.role": "search-study"})
    if found:
        return found[-1].info.run_id  # the oldest, should two workers have raced to create one
    s = root.search
    params = {"model": root.model.name, "candidates": s.candidates, "objective": s.objective,
              "drift_metric": s.drift_metric, "max_drift": s.max_drift, "relative": s.relative,
              "pareto": s.pareto, "groups": s.groups, "compile": root.compile.name, "device": point.device,
              "dtype": point.dtype, "device_name": point.hw.name, "batch_size": root.bench.batch_size}
    tags = {"qsweep.study": study, "qsweep.role": "search-study", "model": root.model.name}
    return tracker.record(f"search-{study}", "ok", "", params, {}, tags)


def run_search(root: RootConf, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) one search worker end to end; returns the summary that is also written as JSON."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    setup = prepare(root, overrides or [])
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
    seeds = list({_key(x): x for x in seeds}.values())

    study, new, trials_s = run_trials(setup, seeds)
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
        result.update(measured_verdict(confirmed, s.drift_metric, setup.drift_budget))
    result["wall_s"] = time.perf_counter() - started
    _write_outputs(setup, result, best)
    _print_result(result, confirmed, s)
    return result


def measured_verdict(confirmed: pd.DataFrame, drift_metric: str, budget: float) -> dict[str, Any]:
    """The answer by measurement, which overrides the cost model's prediction: the fastest confirmed
    recipe within the drift budget, and whether it is mixed and beats the best uniform one by more than
    the noise. Paired timings (one process, in turn) are used where present, with their spread as the
    noise; otherwise the isolated trials' speedups, with twice the larger latency CV as the noise, or how
    far the re-measured unquantized recipe strayed from its baseline if that is larger (run-to-run noise
    that a within-run CV does not see). A smaller margin proves nothing."""
    ok = confirmed[(confirmed["status"] == "ok") & confirmed["speedup"].notna()]
    if drift_metric in ok:
        ok = ok[ok[drift_metric].fillna(math.inf) <= budget]
    if ok.empty:
        return {"measured_best": None, "measured_mixed_beats_uniform": False}
    paired = "paired_speedup" in ok and bool(ok["paired_speedup"].notna().all())
    speed = "paired_speedup" if paired else "speedup"
    ranked = ok.sort_values(speed, ascending=False)
    top, uniform = ranked.iloc[0], ranked[ranked["uniform"] != ""]
    verdict: dict[str, Any] = {
        "measured_best": {"trial": int(top["trial"]), "speedup": float(top[speed]),
                          "counts": json.loads(top["counts"]), "uniform": top["uniform"] or None},
        "measured_by": "paired" if paired else "isolated"}
    if top["uniform"] != "" or uniform.empty:
        return {**verdict, "measured_mixed_beats_uniform": top["uniform"] == ""}
    rival = uniform.iloc[0]
    if paired:
        noise = max(float(top["paired_noise"]), float(rival["paired_noise"]))
    else:
        cvs = [row.get("latency_cv") for row in (top, rival)]
        noise = 2 * max((cv for cv in cvs if cv is not None and not math.isnan(cv)), default=0.0)
        unquantized = ok[ok["uniform"] == "none"]["speedup"]
        if len(unquantized):
            noise = max(noise, abs(1 - float(unquantized.iloc[0])))
    margin = top[speed] / rival[speed] - 1
    return {**verdict, "measured_margin": float(margin), "measured_noise": float(noise),
            "measured_mixed_beats_uniform": bool(margin > noise)}


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


def _write_outputs(setup: Setup, result: dict[str, Any], best: pd.DataFrame) -> None:
    """summary.json and best_recipe.json next to the plots, all of them artifacts of the parent run."""
    out = setup.out_dir
    (out / "summary.json").write_text(json.dumps(result, indent=1, default=str))
    winner = _winner(result)
    if winner:
        spec = recipe_spec(winner["recipe"], setup.space, list(setup.cands.values()))
        (out / "best_recipe.json").write_text(json.dumps(spec, indent=1))
    client, run_id = setup.tracker.client, setup.parent_run_id
    for f in sorted(out.iterdir()):
        if f.suffix in (".csv", ".png", ".json"):
            client.log_artifact(run_id, str(f))
    if not best.empty:
        m = setup.memo.get(best.iloc[0]["recipe"], {})
        from mlflow.entities import Metric as MlMetric

        from qsweep.metrics import only_metrics

        step = int(result["trials_total"])
        client.log_batch(run_id, metrics=[MlMetric(k, v, 0, step) for k, v in only_metrics(m).items()
                                          if math.isfinite(v)])
    for k in ("trials_total", "trials_this_run", "distinct_recipes", "wall_s", "mixed_beats_uniform",
              "measured_mixed_beats_uniform", "measured_margin", "measured_noise", "measured_by"):
        if k in result:
            client.set_tag(run_id, f"search.{k}", str(result[k]))
    if winner:
        client.set_tag(run_id, "search.best_trial", str(winner["trial"]))


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
    unit = "predicted_speedup" if s.objective == "speedup" else "size_ratio"
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
            print(f"measured winner (trial {measured['trial']}, {result['measured_by']} timing): "
                  f"speedup {measured['speedup']:.3f}x  "
                  f"{measured['counts']}  -> {verdict} the best uniform scheme end to end{margin}")


def search_command(args: list[str]) -> int:
    """`qsweep search [overrides]`: run or resume a per-layer search; 0 when a recipe met the budget."""
    root, _ = load_config(list(args))
    result = run_search(root, list(args))
    return 0 if result["best"] else 1

