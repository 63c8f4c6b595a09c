"""A sweep: each Hydra job is one grid point. This module decides what a point needs (reuse, skip,
unsupported, baseline, run), records it in MLflow, and summarises the sweep at the end.

Several sweeps may run at once on one output_dir. A point is claimed (a file lock under
`<output_dir>/locks/`, released by the OS if the process dies) from its reuse check to its record, so two
sweeps sharing a point never both measure it: the one that waited finds the other's record and reports
it reused. The baseline of a context is claimed the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from qsweep import gpus, schemes
from qsweep.config import ConfigError, RootConf, first_line, mlflow_uri
from qsweep.flows import flow_spec
from qsweep.identity import model_identity, stable_hash
from qsweep.measure import STAGES
from qsweep.metrics import STATUSES
from qsweep.recipe import RECIPE_FILE, Recipe, eval_section, measured_recipe, model_section, to_json
from qsweep.runner import COMPILE_PHASES, TrialResult, TrialSpec, run_isolated, run_trial
from qsweep.tracking import (
    BASELINE_TAG,
    CONFIG_FILE,
    CONFIG_TAG,
    FAILED,
    MODEL_TAG,
    NOISY_TAG,
    NOTE_TAG,
    OK,
    POINT_TAG,
    RESULTS_FILE,
    ROLE_BASELINE,
    ROLE_TAG,
    SKIPPED,
    STATUS_TAG,
    TRACEBACK_FILE,
    TRIAL_INFO_FILE,
    UNSUPPORTED,
    PointRecord,
    RecordError,
    Tracker,
    now_ms,
    writer_id,
)

# hydra.run.dir / hydra.sweep.dir end in the process id: two sweeps started in the same second get
# their own folders (their own plan, records and results table).
if not OmegaConf.has_resolver("qsweep.pid"):
    # Cached: a launcher's jobs in other processes (joblib, submitit) resolve it to the sweep's folder.
    OmegaConf.register_new_resolver("qsweep.pid", os.getpid, use_cache=True)

RECORDS_FILE = "records.jsonl"
PLAN_FILE = "plan.json"
STAGE_TIMES_FILE = "stage_times.jsonl"  # every trial a sweep ran (baselines too) with its time per stage
COMPILE_KEYS = ("compile_frames", *(f"compile_{phase}" for phase in COMPILE_PHASES))  # as note_stage_times writes them
PARENTS_FILE = "parents.json"  # experiment -> {"uri", "run_id"} of this sweep's parent run there
TRIAL_INFO_TAGS = ("timing_mode", "peak_mem_kind", "prefill_timing_mode", "decode_timing_mode", "kv_cache")
TABLE_COLUMNS = ["model", "run", "flow", "status", "speedup", "latency_ms", "latency_cv", "size_ratio", "drift_sqnr_db",
                 "drift_cosine", "accuracy_drop", "ptq_accuracy_drop", "layers_quantized", "layers_total", "peak_mem_bytes",
                 "activation_peak_bytes", "reason"]


def resolve_device(root: RootConf) -> str:
    if root.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return root.device


def resolve_dtype(root: RootConf, device: str) -> str:
    dtype = root.model.dtype or root.dtype
    if dtype == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return dtype


def versions() -> dict[str, str]:
    import torchao

    return {"torch": torch.__version__, "torchao": torchao.__version__}


def run_name(root: RootConf) -> str:
    """Names that say what the point is, model first: `toy/int8wo-per_row-none`, `llama3_1_8b/int4wo-g128-max-autotune`."""
    compiled = root.compile.name + "".join(f"+{k}={v}" for k, v in sorted(root.compile.inductor.items()))
    if root.scheme.config is None:
        return f"{root.model.name}/none-{compiled}"
    gran = f"g{root.group_size}" if root.granularity.name == "per_group" else root.granularity.name
    head = "-lm_head" if root.model.lm_head == "quantize" else ""
    return f"{root.model.name}/{root.scheme.name}-{gran}{head}-{compiled}"


# ---------------------------------------------------------------- model identity

class Point:
    """One grid point with its identity hashes and everything needed to run and record it."""

    def __init__(self, root: RootConf, resolved_yaml: str = ""):
        self.root = root
        self.device = resolve_device(root)
        self.dtype = resolve_dtype(root, self.device)
        self.hw = schemes.Hardware.detect(self.device)
        self.resolved_yaml = resolved_yaml
        bench = {k: v for k, v in vars(root.bench).items() if k != "timeout_s"}
        # What makes two measurements comparable: same model, inputs, hardware, software, harness.
        # Which layers get quantized is part of the quant config, not of the context: one baseline for both.
        model = {k: v for k, v in vars(root.model).items() if k not in ("quantize_filter", "lm_head")}
        # The compile scope joins the context only where it is not the whole model: older records keep their keys.
        compiled: Any = root.compile.mode if root.compile.scope == "model" else [root.compile.mode, str(root.compile.scope)]
        if root.compile.inductor:
            compiled = {"mode": root.compile.mode, "scope": str(root.compile.scope), "inductor": root.compile.inductor}
        self.context = {"model": model, "model_identity": model_identity(dict(root.model.builder)),
                        "compile": compiled, "bench": bench,
                        "eval": vars(root.eval), "device": self.device, "dtype": self.dtype,
                        "hardware": self.hw.name, "seed": root.seed, **versions()}
        self.name = run_name(root)
        self.flow = flow_spec(root.scheme)  # None for ptq: a PTQ point hashes as it did before flows
        flow = {"flow": self.flow} if self.flow else {}
        self.point_key = stable_hash({**self.context, "scheme": root.scheme.name, "config": root.scheme.config,
                                      "granularity": root.granularity.name, "group_size": root.group_size,
                                      "layers": root.model.quantize_filter, **flow})
        self.skip = schemes.skip_reason(root.scheme, root.granularity, root.group_size)
        self.quant = None if self.skip else schemes.quant_spec(root.scheme, root.granularity, root.group_size)
        # A baseline quantizes no layer: its key is the baseline key, whatever the filter says.
        layers = {"layers": root.model.quantize_filter} if self.quant is not None else {}
        self.config_key = stable_hash({**self.context, "quant": self.quant, **layers, **flow})
        self.baseline_key = stable_hash({**self.context, "quant": None})

    def recipe(self, metrics: dict[str, float]) -> Recipe:
        """This point's config and measurements in the one recipe format."""
        r = self.root
        return measured_recipe(
            self.name, self.quant, model_section(dataclasses.asdict(r.model)), self.dtype,
            eval_section(dataclasses.asdict(r.eval), r.seed), metrics,
            source={"experiment": r.tracking.experiment, "run_name": self.name, "kind": "grid"},
            hardware={"device": self.device, "device_name": self.hw.name}, versions=versions(), flow=self.flow)

    @property
    def timing(self) -> str:
        if self.root.bench.timing == "auto":
            return "device" if self.device == "cuda" else "e2e"
        return self.root.bench.timing

    def params(self) -> dict[str, Any]:
        r = self.root
        return {"model": r.model.name, "scheme": r.scheme.name, "granularity": r.granularity.name,
                "group_size": r.group_size, "compile": r.compile.name, "dtype": self.dtype,
                "device": self.device, "device_name": self.hw.name, "batch_size": r.bench.batch_size,
                "timing": self.timing, "bits": r.scheme.bits, "flow": r.scheme.flow if r.scheme.config else "none",
                "torchao_config": schemes.describe(self.quant)
                if self.quant else "none", **({"lm_head": r.model.lm_head} if r.model.lm_head else {}),
                **({"inductor": json.dumps(r.compile.inductor, sort_keys=True)} if r.compile.inductor else {}),
                **versions()}

    def tags(self) -> dict[str, str]:
        return {POINT_TAG: self.point_key, CONFIG_TAG: self.config_key, BASELINE_TAG: self.baseline_key,
                MODEL_TAG: self.root.model.name}

    def spec(self, quant: dict | None, reference_path: Path, is_baseline: bool) -> TrialSpec:
        r = self.root
        return TrialSpec(
            model_builder=dict(r.model.builder), quant=quant, device=self.device, dtype=self.dtype,
            batch_size=r.bench.batch_size, compile_mode=r.compile.mode, warmup=r.bench.warmup,
            compile_cache_dir=r.compile.cache_dir, compile_scope=str(r.compile.scope),
            compile_inductor=dict(r.compile.inductor),
            repeats=r.bench.repeats, timing=self.timing, l2_flush=r.bench.l2_flush,
            eval_samples=r.eval.n_samples, eval_batch_size=r.eval.batch_size, seed=r.seed,
            quantize_filter=r.model.quantize_filter, reference_path=str(reference_path),
            is_baseline=is_baseline, flow=None if quant is None else self.flow)


def run_point(root: RootConf, resolved_yaml: str = "", progress: str = "") -> PointRecord:
    """Decide and do what one grid point needs; every outcome is recorded, nothing raises: a point
    whose record cannot be written is `failed` with the reason, and the sweep goes on."""
    try:
        point = Point(root, resolved_yaml)
        tracker = Tracker(mlflow_uri(root), root.tracking.experiment)
        tracker.parent = sweep_parent(tracker, root.tracking.experiment)
        record = _decide(point, tracker, progress)
    except ConfigError:  # a user mistake (a bad tracking.uri): one line from the CLI, not a failed point
        raise
    except Exception as err:
        reason = f"{type(err).__name__}: {first_line(err)[:500]}"
        record = PointRecord(run_name(root), FAILED, f"not recorded: {reason}", {"model": root.model.name}, {})
    record = dataclasses.replace(record, experiment=root.tracking.experiment)
    print(f"{progress}{record.run_name}: {_one_liner(record)}", flush=True)
    return record


# Statuses that stand for a point until force=true; a failed point is tried again by the next sweep.
FINAL_STATUSES = (OK, SKIPPED, UNSUPPORTED)
# An `ok` record without these metrics is not a measurement (half-written by an older qsweep): never reused.
MEASURED = ("latency_ms", "size_bytes")
# When this Hydra sweep started (ms since the epoch, MLflow's clock; set by SummaryCallback): a record
# made after it, by this sweep or by a concurrent one, is this sweep's result, even a failed one and even
# under force=true. Outside a Hydra run (run_point called directly) there is no such sweep.
_SWEEP_STARTED_MS = math.inf


def reusable(run: Any, force: bool) -> bool:
    """Whether a stored run of a point can stand for measuring it now: complete (status set, not RUNNING,
    an `ok` one with its metrics), and final (ok/skipped/unsupported, unless force=true) or recorded
    since this sweep started."""
    status = run.data.tags.get(STATUS_TAG)
    if status is None or run.info.status == "RUNNING":
        return False
    needed = MEASURED + (("speedup", "size_ratio") if run.data.tags.get(ROLE_TAG) != ROLE_BASELINE
                         and run.data.params.get("scheme") != "none" else ())
    if status == OK and not all(k in run.data.metrics for k in needed):
        return False
    # Recorded (ended) since this sweep started; a run starts when its trial did, which may be earlier.
    fresh = (run.info.end_time or run.info.start_time) >= _SWEEP_STARTED_MS
    return fresh or (status in FINAL_STATUSES and not force)


@contextlib.contextmanager
def claim(root: RootConf, key: str, waiting: str = "") -> Iterator[None]:
    """Hold `<output_dir>/locks/<key>.lock` across processes: whoever holds a point's claim is the one
    that checks, measures and records it. Prints `waiting` when another process holds it."""
    from filelock import FileLock, Timeout

    path = Path(root.output_dir) / "locks" / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if waiting:
            print(waiting, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _done(point: Point, tracker: Tracker, **tags: str) -> PointRecord | None:
    found = [r for r in tracker.find(**tags) if reusable(r, point.root.force)]
    return tracker.load(found[0]) if found else None


def _decide(point: Point, tracker: Tracker, progress: str = "") -> PointRecord:
    root = point.root
    if point.quant is None and not point.skip:  # scheme=none: the point is its context's baseline
        return ensure_baseline(point, tracker, progress)
    # Two points with one torchao config (group size under per-row) are one measurement: one claim.
    key = point.point_key if point.skip else point.config_key
    with claim(root, key, f"{progress}{point.name}: waiting for another sweep measuring it"):
        done = _done(point, tracker, **{POINT_TAG: point.point_key})
        if done:
            return done
        if point.skip:
            return _record(point, tracker, SKIPPED, point.skip, {})
        if not root.force:
            same = _done(point, tracker, **{CONFIG_TAG: point.config_key, STATUS_TAG: OK})
            if same:
                return _record(point, tracker, SKIPPED, f"same torchao config as {same.run_name}", {})
        why = schemes.unsupported_reason(root.scheme, point.hw, point.dtype, root.bench.batch_size)
        if why:
            return _record(point, tracker, UNSUPPORTED, why, {})
        baseline = ensure_baseline(point, tracker, progress)
        if baseline.status != OK:
            return _record(point, tracker, FAILED, f"baseline failed: {baseline.reason}", {})
        result, window = _run(point, point.quant, reference_path(point), is_baseline=False)
        if result.status == OK:
            result.metrics.update(relative_to_baseline(result.metrics, baseline.metrics))
        return _record(point, tracker, result.status, result.reason, result.metrics, result,
                       baseline_metrics=baseline.metrics, window=window)


def relative_to_baseline(metrics: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """speedup (baseline latency / trial latency) and size_ratio (baseline bytes / trial bytes)."""
    out = {}
    if metrics.get("latency_ms") and baseline.get("latency_ms"):
        out["speedup"] = baseline["latency_ms"] / metrics["latency_ms"]
    if metrics.get("size_bytes") and baseline.get("size_bytes"):
        out["size_ratio"] = baseline["size_bytes"] / metrics["size_bytes"]
    return out


# Baselines this sweep has measured, by context: with force=true the baseline is re-measured once
# per sweep, not once per point, and a failed one is not retried by every point. Cleared per sweep.
_SWEEP_BASELINES: dict[str, PointRecord] = {}


def ensure_baseline(point: Point, tracker: Tracker, progress: str = "") -> PointRecord:
    """The unquantized baseline for this point's context: measured once (by one of the sweeps running
    at the time), reused across the grid."""
    reference = reference_path(point)
    if str(reference) in _SWEEP_BASELINES:  # measured earlier in this sweep: the same run, reused
        return dataclasses.replace(_SWEEP_BASELINES[str(reference)], reused=True)
    baseline_point = Point(_as_baseline(point.root), point.resolved_yaml)
    with claim(point.root, point.baseline_key,
               f"{progress}{baseline_point.name}: waiting for another sweep measuring the baseline"):
        found = _done(point, tracker, **{CONFIG_TAG: point.baseline_key, ROLE_TAG: ROLE_BASELINE})
        if found and (found.status != OK or reference.exists()):
            return found
        reference.parent.mkdir(parents=True, exist_ok=True)
        result, window = _run(baseline_point, None, reference, is_baseline=True)
        if result.status == OK:
            result.metrics.update(speedup=1.0, size_ratio=1.0)
        record = _record(baseline_point, tracker, result.status, result.reason, result.metrics, result,
                         extra_tags={ROLE_TAG: ROLE_BASELINE}, window=window)
    _SWEEP_BASELINES[str(reference)] = record
    return record


def _as_baseline(root: RootConf) -> RootConf:
    from copy import deepcopy

    from qsweep.config import SchemeConf

    base = deepcopy(root)
    base.scheme = SchemeConf(name="none", config=None)
    return base


def reference_path(point: Point) -> Path:
    """The baseline outputs that a point's drift is measured against, one file per context (baseline key)."""
    return Path(point.root.output_dir) / "baselines" / f"{point.baseline_key}.pt"


def _run(point: Point, quant: dict | None, reference: Path, is_baseline: bool) -> tuple[TrialResult, tuple[int, int]]:
    """The trial's result (bench.processes measurements combined) and when it started and ended (ms since
    the epoch, MLflow's clock): the point's run spans the trial, not the moment it was written."""
    spec = point.spec(quant, reference, is_baseline)
    results = []
    # On CUDA a free GPU is claimed for the trial, which sees only it (qsweep.gpus): one trial per GPU.
    with gpus.trial_device(point.device, point.root.isolate, f"{point.name}: waiting for a free GPU") as (env, gpu):
        started = now_ms()
        for _ in range(max(1, point.root.bench.processes)):
            result = run_isolated(spec, point.root.bench.timeout_s, env) if point.root.isolate else run_trial(spec)
            note_stage_times(point.name, result)
            if gpu is not None:
                result.info["device_index"] = gpu
            if result.status != OK:
                return result, (started, now_ms())
            results.append(result)
    return combine_measurements(results), (started, now_ms())


# Speed metrics that differ between independent measurements of one point; the rest (drift, size) do not.
SPEED_METRICS = ("latency_ms", "latency_ms_p10", "latency_ms_p90", "latency_e2e_ms", "throughput",
                 "prefill_tok_s", "decode_tok_s", "time_compile_s")


def combine_measurements(results: list[TrialResult]) -> TrialResult:
    """Independent measurements of one point (bench.processes) as one: speed metrics are their median,
    latency_cv the largest replay CV, latency_spread the relative range of their latencies."""
    if len(results) == 1:
        return results[0]
    first = results[0]
    metrics = dict(first.metrics)
    for key in SPEED_METRICS:
        values = [r.metrics[key] for r in results if key in r.metrics]
        if values:
            metrics[key] = statistics.median(values)
    latencies = [r.metrics["latency_ms"] for r in results]
    metrics["latency_spread"] = (max(latencies) - min(latencies)) / statistics.median(latencies)
    metrics["latency_cv"] = max(r.metrics["latency_cv"] for r in results)
    info = {**first.info, "process_latency_ms": latencies}
    return TrialResult(first.status, first.reason, metrics, info, first.traceback)


def _record(point: Point, tracker: Tracker, status: str, reason: str, metrics: dict[str, float],
            result: TrialResult | None = None, extra_tags: dict[str, str] | None = None,
            baseline_metrics: dict[str, float] | None = None, window: tuple[int, int] | None = None) -> PointRecord:
    texts = {CONFIG_FILE: point.resolved_yaml} if point.resolved_yaml else {}
    if point.quant is not None:  # what `qsweep select` exports and `qsweep apply` reads
        texts[RECIPE_FILE] = to_json(point.recipe(metrics))
    tags = {**point.tags(), **(extra_tags or {})}
    if result is not None:
        texts[TRIAL_INFO_FILE] = json.dumps(result.info, indent=1, default=str)
        if result.traceback:
            texts[TRACEBACK_FILE] = result.traceback
        # How it was measured, searchable in the MLflow UI (a CUDA-graph capture can fall back to e2e).
        tags.update({key: str(result.info[key]) for key in TRIAL_INFO_TAGS if key in result.info})
        noisy = noise_flag(metrics, baseline_metrics, point.root.bench.max_cv)
        if noisy:
            tags[NOISY_TAG] = noisy
    params = point.params()
    if result is not None and "device_index" in result.info:  # the GPU the trial ran on (qsweep.gpus)
        params["device_index"] = result.info["device_index"]
    try:
        start_ms, end_ms = window or (None, None)
        run_id = tracker.record(point.name, status, reason, params, metrics, tags, texts,
                                start_ms=start_ms, end_ms=end_ms)
    except RecordError as err:  # that point failed, not the sweep
        return PointRecord(point.name, FAILED, err.reason, params, metrics, err.run_id)
    return PointRecord(point.name, status, reason, params, metrics, run_id)


NOISE_METRICS = ("latency_cv", "latency_spread")


def noise_flag(metrics: dict[str, float], baseline: dict[str, float] | None, max_cv: float) -> str | None:
    """The `noisy` tag of a run, or None: a speedup is as noisy as the noisier of its two measurements,
    so the trial's and the baseline's latency_cv and latency_spread are all held against bench.max_cv;
    the tag names the worst."""
    worst = None
    for side, values in (("", metrics), ("baseline ", baseline or {})):
        for noise in NOISE_METRICS:
            value = values.get(noise)
            if value is not None and value > max_cv and (worst is None or value > worst[0]):
                worst = (value, f"{side}{noise} {value:.3f} > bench.max_cv {max_cv}")
    return worst[1] if worst else None


def _one_liner(record: PointRecord) -> str:
    m = record.metrics
    text = record.status + (" (reused)" if record.reused else "")
    if record.status == "ok":
        parts = [f"{m[k]:.2f}x {label}" for k, label in (("speedup", "speed"), ("size_ratio", "smaller"))
                 if k in m]
        if "drift_sqnr_db" in m:
            parts.append(f"SQNR {m['drift_sqnr_db']:.1f} dB")
        return f"{text}  " + ", ".join(parts) + (f"; {record.reason}" if record.reason else "")
    return f"{text}: {record.reason}"


# ---------------------------------------------------------------- grid and summary

def expand_grid(overrides: list[str], sweeper_params: dict[str, str] | None = None) -> list[list[str]]:
    """The grid points of a multirun, exactly as Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = [f"{k}={v}" for k, v in (sweeper_params or {}).items()] + list(overrides)
    parsed = OverridesParser.create().parse_overrides(params)
    return BasicSweeper.split_arguments(parsed, None)[0]


def append_record(directory: Path, record: PointRecord) -> None:
    with open(directory / RECORDS_FILE, "a") as f:
        f.write(json.dumps(record.__dict__, default=str) + "\n")


def load_records(directory: Path) -> list[PointRecord]:
    path = directory / RECORDS_FILE
    if not path.exists():
        return []
    return [PointRecord(**json.loads(line)) for line in path.read_text().splitlines() if line]


def summarize(records: list[PointRecord], directory: Path | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """Results table sorted by speedup (written to `directory`/results.csv if given) and counts per status."""
    table = pd.DataFrame([r.row() for r in records])
    for col in [*TABLE_COLUMNS, "run_id"]:
        if col not in table:
            table[col] = None
    # run_id last: the MLflow run of each row (the console table leaves it out)
    table = table[[*TABLE_COLUMNS, "run_id"]].sort_values("speedup", ascending=False, na_position="last")
    if directory is not None:
        table.to_csv(directory / RESULTS_FILE, index=False)
    counts = {s: sum(r.status == s and not r.reused for r in records) for s in STATUSES}
    counts["reused"] = sum(r.reused for r in records)
    return table, counts


def describe_counts(records: list[PointRecord], counts: dict[str, int]) -> str:
    """`18 points: 8 ok, 0 failed, 9 skipped, 1 unsupported, 0 reused`."""
    return f"{len(records)} points: " + ", ".join(f"{n} {s}" for s, n in counts.items())


def print_summary(records: list[PointRecord], directory: Path) -> dict[str, int]:
    table, counts = summarize(records, directory)
    shown = table.copy()
    shown["peak_mem_bytes"] = shown["peak_mem_bytes"].map(lambda b: f"{b / 2**20:.1f} MiB" if pd.notna(b) else "")
    # Partly quantized points show how many of their candidate layers torchao replaced, e.g. 1/3.
    shown["layers_quantized"] = [f"{q:.0f}/{t:.0f}" if pd.notna(q) and pd.notna(t) else None
                                 for q, t in zip(shown["layers_quantized"], shown["layers_total"])]
    shown = shown.drop(columns=["layers_total", "activation_peak_bytes", "run_id"])
    shown["reason"] = shown["reason"].fillna("").str.slice(0, 70)
    shown = shown.dropna(axis="columns", how="all")
    with pd.option_context("display.max_columns", None, "display.width", 220, "display.float_format",
                           "{:.3g}".format):
        print("\n" + shown.rename(columns={"peak_mem_bytes": "peak_mem", "layers_quantized": "layers"})
              .to_string(index=False))
    print(f"\n{describe_counts(records, counts)}")
    print(f"results table: {directory / RESULTS_FILE}")
    stages = describe_stage_times(directory)
    if stages:
        print(stages)
    return counts


def note_stage_times(run: str, result: TrialResult) -> None:
    """Append a trial's stage times to its sweep's STAGE_TIMES_FILE (reused points cost nothing: not there)."""
    if _SWEEP is None:
        return
    times = {k: v for k, v in result.metrics.items() if k.startswith("time_")}
    compiled = {f"compile_{k}": v for k, v in result.info.get("compile_phases", {}).items()}
    parts = {f"{k}_s": v for k, v in result.info.get("stage_parts", {}).items()}
    with open(_SWEEP.directory / STAGE_TIMES_FILE, "a") as f:
        f.write(json.dumps({"run": run, "status": result.status, **times, **compiled, **parts}) + "\n")


def stage_totals(directory: Path) -> dict[str, float]:
    """Seconds per stage summed over the trials a sweep ran, with `trials` (their count), `total` (their
    time_total_s) and `wall` (the sweep's wall time so far)."""
    path = directory / STAGE_TIMES_FILE
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    totals = {stage: sum(r.get(f"time_{stage}_s", 0.0) for r in rows) for stage in STAGES}
    totals.update(trials=len(rows), total=sum(r.get("time_total_s", 0.0) for r in rows))
    totals.update({key: sum(r.get(key, 0) for r in rows) for key in COMPILE_KEYS})
    by_path = sorted(compile_path_keys({key for r in rows for key in r}))
    totals.update({key: sum(r.get(key, 0.0) for r in rows) for key in by_path})
    plan = directory / PLAN_FILE
    if plan.exists() and "started_ms" in (started := json.loads(plan.read_text())):
        totals["wall"] = time.time() - started["started_ms"] / 1000
    return totals


def describe_stage_times(directory: Path) -> str:
    """`time by stage over 12 trials: build 30 s (5%) · ... · other 2 s (0%); trials 600 s, sweep wall time 640 s`."""
    totals = stage_totals(directory)
    if not totals.get("trials"):
        return ""
    total = totals["total"] or 1e-9
    other = total - sum(totals[s] for s in STAGES)
    parts = [f"{s} {totals[s]:.0f} s ({totals[s] / total:.0%})" for s in STAGES] + [f"other {other:.0f} s ({other / total:.0%})"]
    wall = f", sweep wall time {totals['wall']:.0f} s" if "wall" in totals else ""
    return (f"time by stage over {totals['trials']} trials: " + " · ".join(parts)
            + f"; trials {totals['total']:.0f} s{wall}{describe_compile(totals)} ({directory / STAGE_TIMES_FILE})")


def compile_path_keys(keys) -> list[str]:
    """The `compile_<path>_s` keys among `keys` (compile seconds of a timed path: StageClock.part), in order."""
    return [key for key in keys if key.startswith("compile_") and key.endswith("_s") and key not in COMPILE_KEYS]


def describe_compile(totals: dict[str, float]) -> str:
    """`; compile: 15 graphs, Dynamo 4 s, backend 23 s (Inductor 14 s), the rest (first runs, autotuning,
    capture) 116 s; compile by path: decode 90 s, forward 20 s, prefill 33 s` (paths: the timed calls whose
    first runs and CUDA-graph captures compile counts; an eager trial's too)."""
    paths = {key.removeprefix("compile_").removesuffix("_s"): totals[key] for key in compile_path_keys(totals)}
    by_path = "; compile by path: " + ", ".join(f"{p} {v:.0f} s" for p, v in paths.items()) if paths else ""
    if not totals.get("compile_frames"):
        return by_path
    traced = totals["compile_dynamo_trace_s"] + totals["compile_backend_s"]
    return (f"; compile: {totals['compile_frames']:.0f} graphs, Dynamo {totals['compile_dynamo_trace_s']:.0f} s, "
            f"backend {totals['compile_backend_s']:.0f} s (Inductor {totals['compile_inductor_s']:.0f} s), "
            f"the rest (first runs, autotuning, capture) {max(totals['compile'] - traced, 0):.0f} s{by_path}")


class SummaryCallback(Callback):
    """Hydra callback: writes the plan (number of points, grid) before, and the results table after; a
    multirun's points nest under its parent run in each experiment, which gets the table and counts."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _SWEEP
        _start_sweep()
        _SWEEP = None  # one point: no parent run

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _start_sweep()
        overrides = [f"{k}={v}" for k, v in (config.hydra.sweeper.params or {}).items()]
        overrides += list(config.hydra.overrides.task)
        grid = expand_grid(overrides)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        plan = {"total": len(grid), "grid": " ".join(overrides), "key": grid_key(grid), "writer": writer_id(),
                "started_ms": _SWEEP_STARTED_MS}
        (sweep_dir / PLAN_FILE).write_text(json.dumps(plan))
        _join_sweep(sweep_dir)
        print(f"qsweep: {len(grid)} grid points -> {sweep_dir}", flush=True)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.types import RunMode

        # A launcher with n_jobs > 1 runs the jobs in other processes: they join the sweep from its plan.
        if config.hydra.mode == RunMode.MULTIRUN:
            _join_sweep(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._finish(Path(config.hydra.sweep.dir))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._finish(Path(config.hydra.runtime.output_dir))

    @staticmethod
    def _finish(directory: Path) -> None:
        global _SWEEP
        _start_sweep(ended=True)  # outside a sweep, no record is "this sweep's" (one process, many sweeps)
        _SWEEP = None
        records = load_records(directory)
        if not records:
            return
        print_summary(records, directory)
        finish_parents(directory, records)
        if any(r.status == FAILED for r in records):  # a failed point reused from a concurrent sweep too
            sys.exit(1)


def _start_sweep(ended: bool = False) -> None:
    global _SWEEP_STARTED_MS
    _SWEEP_STARTED_MS = math.inf if ended else time.time() * 1000
    _SWEEP_BASELINES.clear()


# ---------------------------------------------------------------- the sweep's parent runs

@dataclasses.dataclass(frozen=True)
class SweepRun:
    """The multirun this process works for: its folder, its plan (grid and grid hash) and its main
    process, which writes (and finishes) its parent runs."""

    directory: Path
    plan: dict[str, Any]


# Set by SummaryCallback for the jobs of a multirun; None outside one (a single run, run_point called directly).
_SWEEP: SweepRun | None = None


def _join_sweep(directory: Path) -> None:
    global _SWEEP, _SWEEP_STARTED_MS
    path = directory / PLAN_FILE
    _SWEEP = SweepRun(directory, json.loads(path.read_text())) if path.exists() else None
    if _SWEEP is not None and "started_ms" in _SWEEP.plan:  # a launcher's job in another process: the sweep's start
        if _SWEEP.plan["started_ms"] != _SWEEP_STARTED_MS:  # a launcher's worker kept from an earlier sweep
            _SWEEP_BASELINES.clear()
        _SWEEP_STARTED_MS = _SWEEP.plan["started_ms"]


def grid_key(grid: list[list[str]]) -> str:
    """What a resumed sweep is recognised by: its grid points (force= and hydra.* keys aside)."""
    return stable_hash(sorted(sorted(o for o in point if not o.startswith(("force=", "hydra."))) for point in grid))


def sweep_parent(tracker: Tracker, experiment: str) -> str | None:
    """This multirun's parent run in the tracker's experiment, which its points nest under: created on
    the sweep's first point there, or a resumed sweep's (same grid) found again; None outside a multirun."""
    from filelock import FileLock

    sweep = _SWEEP
    if sweep is None:
        return None
    with FileLock(str(sweep.directory / f"{PARENTS_FILE}.lock")):
        parents = sweep_parents(sweep.directory)
        if experiment not in parents:
            params = {"grid": sweep.plan["grid"], "points": sweep.plan["total"], "folder": str(sweep.directory)}
            run_id = tracker.sweep_parent(sweep.plan["key"], f"sweep {sweep.directory.name}", params,
                                          sweep.plan["writer"])
            parents[experiment] = {"uri": tracker.uri, "run_id": run_id}
            (sweep.directory / PARENTS_FILE).write_text(json.dumps(parents, indent=1))
        return parents[experiment]["run_id"]


def sweep_parents(directory: Path) -> dict[str, dict[str, str]]:
    """The parent runs of the sweep in `directory`: experiment -> {"uri", "run_id"}."""
    path = directory / PARENTS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def finish_parents(directory: Path, records: list[PointRecord]) -> None:
    """End each parent run of the sweep with the sweep's results in its experiment: `results.csv`, the
    counts per status (tags `points.<status>`, and as the reason), the table as its description, and
    status `failed` when a point failed. A store that refuses is one line, not a traceback."""
    for experiment, parent in sweep_parents(directory).items():
        mine = [r for r in records if r.experiment == experiment]
        table, counts = summarize(mine)
        summary = describe_counts(mine, counts)
        try:
            tracker = Tracker(parent["uri"], experiment)
            status = FAILED if any(r.status == FAILED for r in mine) else OK  # as the sweep's exit code
            tracker.finish(parent["run_id"], status, summary, texts={RESULTS_FILE: table.to_csv(index=False)},
                           tags={**{f"points.{s}": str(n) for s, n in counts.items()},
                                 NOTE_TAG: _parent_note(table, summary)})
        except Exception as err:
            print(f"qsweep: the sweep's parent run in {experiment} was not written: "
                  f"{type(err).__name__}: {first_line(err)[:300]}", flush=True)


def _parent_note(table: pd.DataFrame, summary: str, limit: int = 7000) -> str:
    """The parent run's description (markdown on its MLflow page): counts and the results table, as many
    rows as MLflow's tag limit takes."""
    columns = ["run", "status", "speedup", "size_ratio", "drift_sqnr_db", "accuracy_drop", "latency_ms", "reason"]
    shown = table[columns].dropna(axis="columns", how="all").copy()
    shown["reason"] = shown.get("reason", pd.Series(dtype=str)).fillna("").astype(str).str.slice(0, 60)
    shown["reason"] = shown["reason"].str.replace("|", "\\|", regex=False)  # a table cell, not a column break
    shown = shown.astype(object).where(shown.notna(), None)  # tabulate blanks None, not NaN
    head = f"**{summary}**. Artifacts: `{RESULTS_FILE}` (every column), the report's plots and `report.html`.\n\n"
    for rows in range(min(len(shown), 50), 0, -1):
        text = head + shown.head(rows).to_markdown(index=False, floatfmt=".4g", missingval="")
        if rows < len(shown):
            text += f"\n\n({len(shown) - rows} more rows in `{RESULTS_FILE}`)"
        if len(text) <= limit:
            return text
    return head


def resolved_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
