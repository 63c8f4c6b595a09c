"""A sweep: each Hydra job is one grid point. This module decides what a point needs (reuse, skip,
unsupported, baseline, run), records it in MLflow, and summarises the sweep at the end."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from qsweep import schemes
from qsweep.config import RootConf, mlflow_uri
from qsweep.metrics import STATUSES
from qsweep.runner import TrialResult, TrialSpec, run_isolated, run_trial
from qsweep.tracking import PointRecord, Tracker

RECORDS_FILE = "records.jsonl"
PLAN_FILE = "plan.json"
QUANT_SPEC_FILE = "quant_spec.json"  # run artifact: the plain torchao config spec (grid and search runs)
TRIAL_INFO_TAGS = ("timing_mode", "peak_mem_kind", "prefill_timing_mode", "decode_timing_mode", "kv_cache")
TABLE_COLUMNS = ["run", "status", "speedup", "latency_ms", "latency_cv", "size_ratio", "drift_sqnr_db",
                 "drift_cosine", "accuracy_drop", "layers_quantized", "peak_mem_bytes", "reason"]


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


def _hash(payload: Any) -> str:
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_name(root: RootConf) -> str:
    """Names that say what the point is, e.g. `int4wo-g128-max-autotune` or `int8wo-per_row-none`."""
    if root.scheme.config is None:
        return f"none-{root.compile.name}"
    gran = f"g{root.group_size}" if root.granularity.name == "per_group" else root.granularity.name
    return f"{root.scheme.name}-{gran}-{root.compile.name}"


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
        self.context = {"model": vars(root.model), "compile": root.compile.mode, "bench": bench,
                        "eval": vars(root.eval), "device": self.device, "dtype": self.dtype,
                        "hardware": self.hw.name, "seed": root.seed, **versions()}
        self.name = run_name(root)
        self.point_key = _hash({**self.context, "scheme": root.scheme.name, "config": root.scheme.config,
                                "granularity": root.granularity.name, "group_size": root.group_size})
        self.skip = schemes.skip_reason(root.scheme, root.granularity, root.group_size)
        self.quant = None if self.skip else schemes.quant_spec(root.scheme, root.granularity, root.group_size)
        self.config_key = _hash({**self.context, "quant": self.quant})
        self.baseline_key = _hash({**self.context, "quant": None})

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
                "timing": self.timing, "bits": r.scheme.bits, "torchao_config": schemes.describe(self.quant)
                if self.quant else "none", **versions()}

    def tags(self) -> dict[str, str]:
        return {"qsweep.point": self.point_key, "qsweep.config": self.config_key,
                "qsweep.baseline": self.baseline_key, "model": self.root.model.name}

    def spec(self, quant: dict | None, reference_path: Path, is_baseline: bool) -> TrialSpec:
        r = self.root
        return TrialSpec(
            model_builder=dict(r.model.builder), quant=quant, device=self.device, dtype=self.dtype,
            batch_size=r.bench.batch_size, compile_mode=r.compile.mode, warmup=r.bench.warmup,
            compile_cache_dir=r.compile.cache_dir,
            repeats=r.bench.repeats, timing=self.timing, l2_flush=r.bench.l2_flush,
            eval_samples=r.eval.n_samples, eval_batch_size=r.eval.batch_size, seed=r.seed,
            quantize_filter=r.model.quantize_filter, reference_path=str(reference_path),
            is_baseline=is_baseline)


def run_point(root: RootConf, resolved_yaml: str = "", progress: str = "") -> PointRecord:
    """Decide and do what one grid point needs; every outcome is recorded, nothing raises."""
    point = Point(root, resolved_yaml)
    tracker = Tracker(mlflow_uri(root), root.tracking.experiment)
    record = _decide(point, tracker)
    print(f"{progress}{record.run_name}: {_one_liner(record)}", flush=True)
    return record


def _decide(point: Point, tracker: Tracker) -> PointRecord:
    root = point.root
    if not root.force:
        done = [r for r in tracker.find(**{"qsweep.point": point.point_key})
                if r.data.tags.get("status") in ("ok", "skipped", "unsupported")]
        if done:
            return tracker.load(done[0])
    if point.skip:
        return _record(point, tracker, "skipped", point.skip, {})
    if point.quant is None:
        return ensure_baseline(point, tracker)
    if not root.force:
        same = tracker.find(**{"qsweep.config": point.config_key, "status": "ok"})
        if same:
            first = tracker.load(same[0])
            return _record(point, tracker, "skipped", f"same torchao config as {first.run_name}", {})
    why = schemes.unsupported_reason(root.scheme, point.hw, point.dtype, root.bench.batch_size)
    if why:
        return _record(point, tracker, "unsupported", why, {})
    baseline = ensure_baseline(point, tracker)
    if baseline.status != "ok":
        return _record(point, tracker, "failed", f"baseline failed: {baseline.reason}", {})
    result = _run(point, point.quant, _reference_path(point), is_baseline=False)
    if result.status == "ok":
        result.metrics.update(relative_to_baseline(result.metrics, baseline.metrics))
    return _record(point, tracker, result.status, result.reason, result.metrics, result)


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


def ensure_baseline(point: Point, tracker: Tracker) -> PointRecord:
    """The unquantized baseline for this point's context: measured once, reused across the grid."""
    reference = _reference_path(point)
    if str(reference) in _SWEEP_BASELINES:  # measured earlier in this sweep: the same run, reused
        return dataclasses.replace(_SWEEP_BASELINES[str(reference)], reused=True)
    if reference.exists() and not point.root.force:
        found = tracker.find(**{"qsweep.config": point.baseline_key, "status": "ok"})
        if found:
            return tracker.load(found[0])
    reference.parent.mkdir(parents=True, exist_ok=True)
    result = _run(point, None, reference, is_baseline=True)
    if result.status == "ok":
        result.metrics.update(speedup=1.0, size_ratio=1.0)
    baseline_point = Point(_as_baseline(point.root), point.resolved_yaml)
    record = _record(baseline_point, tracker, result.status, result.reason, result.metrics, result,
                     extra_tags={"qsweep.role": "baseline"})
    _SWEEP_BASELINES[str(reference)] = record
    return record


def _as_baseline(root: RootConf) -> RootConf:
    from copy import deepcopy

    from qsweep.config import SchemeConf

    base = deepcopy(root)
    base.scheme = SchemeConf(name="none", config=None)
    return base


def _reference_path(point: Point) -> Path:
    return Path(point.root.output_dir) / "baselines" / f"{point.baseline_key}.pt"


def _run(point: Point, quant: dict | None, reference: Path, is_baseline: bool) -> TrialResult:
    spec = point.spec(quant, reference, is_baseline)
    results = []
    for _ in range(max(1, point.root.bench.processes)):
        result = run_isolated(spec, point.root.bench.timeout_s) if point.root.isolate else run_trial(spec)
        if result.status != "ok":
            return result
        results.append(result)
    return combine_measurements(results)


# Speed metrics that differ between independent measurements of one point; the rest (drift, size) do not.
SPEED_METRICS = ("latency_ms", "latency_ms_p10", "latency_ms_p90", "latency_e2e_ms", "throughput",
                 "prefill_tok_s", "decode_tok_s", "compile_s")


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
            result: TrialResult | None = None, extra_tags: dict[str, str] | None = None) -> PointRecord:
    texts = {"config.yaml": point.resolved_yaml} if point.resolved_yaml else {}
    if point.quant is not None:  # the torchao config as plain data: what `qsweep select` exports
        texts[QUANT_SPEC_FILE] = json.dumps(point.quant, indent=1)
    tags = {**point.tags(), **(extra_tags or {})}
    if result is not None:
        texts["trial_info.json"] = json.dumps(result.info, indent=1, default=str)
        if result.traceback:
            texts["traceback.txt"] = result.traceback
        # How it was measured, searchable in the MLflow UI (a CUDA-graph capture can fall back to e2e).
        tags.update({key: str(result.info[key]) for key in TRIAL_INFO_TAGS if key in result.info})
        for noise in ("latency_cv", "latency_spread"):
            value = metrics.get(noise)
            if value is not None and value > point.root.bench.max_cv:
                tags["noisy"] = f"{noise} {value:.3f} > bench.max_cv {point.root.bench.max_cv}"
    run_id = tracker.record(point.name, status, reason, point.params(), metrics, tags, texts)
    return PointRecord(point.name, status, reason, point.params(), metrics, run_id)


def _one_liner(record: PointRecord) -> str:
    m = record.metrics
    text = record.status + (" (reused)" if record.reused else "")
    if record.status == "ok":
        parts = [f"{m[k]:.2f}x {label}" for k, label in (("speedup", "speed"), ("size_ratio", "smaller"))
                 if k in m]
        if "drift_sqnr_db" in m:
            parts.append(f"SQNR {m['drift_sqnr_db']:.1f} dB")
        return f"{text}  " + ", ".join(parts)
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


def summarize(records: list[PointRecord], directory: Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """Results table sorted by speedup (written to results.csv) and counts per status."""
    table = pd.DataFrame([r.row() for r in records])
    for col in TABLE_COLUMNS:
        if col not in table:
            table[col] = None
    table = table[TABLE_COLUMNS].sort_values("speedup", ascending=False, na_position="last")
    table.to_csv(directory / "results.csv", index=False)
    counts = {s: sum(r.status == s and not r.reused for r in records) for s in STATUSES}
    counts["reused"] = sum(r.reused for r in records)
    return table, counts


def print_summary(records: list[PointRecord], directory: Path) -> dict[str, int]:
    table, counts = summarize(records, directory)
    shown = table.copy()
    shown["peak_mem_bytes"] = shown["peak_mem_bytes"].map(lambda b: f"{b / 2**20:.1f} MiB" if pd.notna(b) else "")
    shown["reason"] = shown["reason"].fillna("").str.slice(0, 70)
    shown = shown.dropna(axis="columns", how="all")
    with pd.option_context("display.max_columns", None, "display.width", 220, "display.float_format",
                           "{:.3g}".format):
        print("\n" + shown.rename(columns={"peak_mem_bytes": "peak_mem"}).to_string(index=False))
    print(f"\n{len(records)} points: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    print(f"results table: {directory / 'results.csv'}")
    return counts


class SummaryCallback(Callback):
    """Hydra callback: writes the plan (number of points) before, and the results table after."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _SWEEP_BASELINES.clear()
        grid = expand_grid(list(config.hydra.overrides.task), dict(config.hydra.sweeper.params or {}))
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PLAN_FILE).write_text(json.dumps({"total": len(grid)}))
        print(f"qsweep: {len(grid)} grid points -> {sweep_dir}", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._finish(Path(config.hydra.sweep.dir))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._finish(Path(config.hydra.runtime.output_dir))

    @staticmethod
    def _finish(directory: Path) -> None:
        records = load_records(directory)
        if not records:
            return
        counts = print_summary(records, directory)
        if counts["failed"]:
            sys.exit(1)


def resolved_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
