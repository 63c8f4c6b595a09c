"""One trial: build a fresh model, quantize it, measure it, compare it with the baseline's outputs.

`run_isolated` runs a trial in its own child process with a timeout: torchao and inductor change
process-global state (inductor flags, matmul precision, compiled caches), so one trial must not
shape another's numbers, and a crash or OOM must not take the sweep down. Children fork from a
server that has already imported torch, so each trial starts in about a second.
"""

from __future__ import annotations

import gc
import math
import multiprocessing as mp
import os
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qsweep import measure
from qsweep.accuracy import accuracy_drop, logits_drift, output_drift
from qsweep.config import first_line
from qsweep.models import ModelBundle, build_model
from qsweep.schemes import build


@dataclass
class TrialSpec:
    """Everything a trial needs, as plain data (it crosses a process boundary)."""

    model_builder: dict
    quant: dict | None  # torchao config spec (see schemes.build); None = baseline
    device: str
    dtype: str
    batch_size: int
    compile_mode: str | None = None
    compile_cache_dir: str | None = None
    warmup: int = 5
    repeats: int = 30
    timing: str = "e2e"  # "device" | "e2e"
    l2_flush: bool = False
    eval_samples: int = 256
    eval_batch_size: int = 64
    seed: int = 0
    quantize_filter: str | None = None  # regex on Linear FQNs allowed to be quantized
    reference_path: str | None = None  # baseline outputs; a baseline trial writes them here
    is_baseline: bool = False


@dataclass
class TrialResult:
    status: str  # ok | failed | unsupported
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # non-numeric facts: timing mode, memory kind
    traceback: str | None = None


def run_trial(spec: TrialSpec) -> TrialResult:
    """Run one trial in this process. Exceptions become a failed/unsupported result."""
    try:
        return _measure(spec)
    except torch.cuda.OutOfMemoryError as err:
        return TrialResult("failed", f"CUDA out of memory: {first_line(err)[:500]}", traceback=traceback.format_exc())
    except (ImportError, NotImplementedError) as err:  # e.g. a kernel package missing on this host
        return TrialResult("unsupported", f"{type(err).__name__}: {first_line(err)[:500]}",
                           traceback=traceback.format_exc())
    except Exception as err:
        return TrialResult("failed", f"{type(err).__name__}: {first_line(err)[:500]}", traceback=traceback.format_exc())


def _measure(spec: TrialSpec) -> TrialResult:
    dtype = getattr(torch, spec.dtype)
    with torch.device(spec.device):  # initialise on the device: an 8B model takes minutes on a CPU
        bundle = build_model(spec.model_builder, spec.seed)
    model = bundle.model.to(dtype)
    candidates = quantizable_layers(model, spec.quantize_filter)
    metrics: dict[str, float] = {"layers_total": len(candidates)}
    info: dict[str, Any] = {}

    model = model.to(spec.device)
    if spec.quant is not None:
        start = time.perf_counter()
        quantize(model, spec.quant, candidates)
        _sync(spec.device)
        metrics["quantize_s"] = time.perf_counter() - start
    metrics["layers_quantized"] = sum(_is_quantized(m) for m in candidates.values())
    info["quantized_layers"] = [name for name, m in candidates.items() if _is_quantized(m)]
    # Drop quantization temporaries so they do not count towards the trial's memory.
    gc.collect()
    if spec.device == "cuda":
        torch.cuda.empty_cache()
        metrics["weights_mem_bytes"] = torch.cuda.memory_allocated()
    else:
        metrics["weights_mem_bytes"] = measure.tensor_bytes(model.state_dict())

    metrics["size_bytes"] = measure.model_size_bytes(model)

    metrics.update(_accuracy(spec, bundle, model, dtype))
    metrics.update(_speed(spec, bundle, model, dtype, info))
    return TrialResult("ok", metrics=metrics, info=info)


def quantizable_layers(model: nn.Module, pattern: str | None) -> dict[str, nn.Linear]:
    """Linear layers (by fully-qualified name) that the trial may quantize."""
    regex = re.compile(pattern) if pattern else None
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (regex is None or regex.search(name))}


def quantize(model: nn.Module, quant: dict, candidates: dict[str, nn.Linear]) -> None:
    """Apply a torchao config spec in place. Per-layer recipes (FqnToConfig) name their own layers;
    a uniform scheme goes to every candidate whose in_features the group size divides (torchao
    rejects the others; skipping them matches what users expect and is counted)."""
    from torchao.quantization import quantize_

    config = build(quant)
    if quant["_target_"].endswith("FqnToConfig"):
        quantize_(model, config, filter_fn=None)
        return
    group = group_size_of(quant)
    chosen = {id(m) for m in candidates.values() if not group or m.in_features % group == 0}
    quantize_(model, config, filter_fn=lambda module, fqn: id(module) in chosen)


def group_size_of(spec: Any) -> int | None:
    """The group size a torchao config spec uses (searched through nested granularities), or None."""
    if isinstance(spec, dict):
        if isinstance(spec.get("group_size"), int):
            return spec["group_size"]
        for value in spec.values():
            found = group_size_of(value)
            if found:
                return found
    return None


def _is_quantized(layer: nn.Linear) -> bool:
    return type(layer.weight.data) is not torch.Tensor


def eval_outputs(model: nn.Module, bundle: ModelBundle, inputs: tuple[torch.Tensor, ...], device: str,
                 dtype: torch.dtype, batch_size: int) -> torch.Tensor:
    """The outputs drift is measured on (LMs: logits at a few positions, see ModelBundle.drift_outputs)."""
    outs = []
    with torch.inference_mode():
        for start in range(0, inputs[0].shape[0], batch_size):
            chunk = tuple(to_device(t[start:start + batch_size], device, dtype) for t in inputs)
            out = bundle.drift_outputs(model, chunk) if bundle.drift_outputs else model(*chunk)
            outs.append((out.logits if hasattr(out, "logits") else out).float().cpu())
    return torch.cat(outs)


def drift_metrics(reference: dict, outputs: torch.Tensor, task: dict[str, float],
                  bundle: ModelBundle) -> dict[str, float]:
    """Output drift and task-metric change against a baseline reference {"outputs", "task"}."""
    metrics = output_drift(reference["outputs"], outputs)
    if bundle.logits:
        metrics.update(logits_drift(reference["outputs"], outputs))
    if "task_metric" in task and "task_metric" in reference["task"]:
        base, value = reference["task"]["task_metric"], task["task_metric"]
        metrics.update(task, task_metric_delta=value - base,
                       task_metric_delta_rel=(value - base) / base if base else math.nan,
                       accuracy_drop=accuracy_drop(base, value, bundle.task_higher_is_better))
    return metrics


def _accuracy(spec: TrialSpec, bundle: ModelBundle, model: nn.Module, dtype) -> dict[str, float]:
    """Drift on the eval inputs (eager model: drift belongs to the quantization, not to compile)."""
    inputs = bundle.make_inputs(spec.eval_samples, spec.seed + 1)
    outputs = eval_outputs(model, bundle, inputs, spec.device, dtype, spec.eval_batch_size)
    task = bundle.evaluate(model, spec.device, dtype) if bundle.evaluate else {}
    if spec.is_baseline:
        torch.save({"outputs": outputs, "task": task}, spec.reference_path)
        return dict(task)
    return drift_metrics(torch.load(spec.reference_path, weights_only=True), outputs, task, bundle)


def accuracy_metrics(spec: TrialSpec, bundle: ModelBundle, model: nn.Module) -> dict[str, float]:
    """Drift and task metrics of `model` against the baseline outputs at `spec.reference_path`, exactly
    as a trial records them (a baseline spec writes the reference instead). Used to re-measure a
    reloaded checkpoint."""
    return _accuracy(spec, bundle, model, getattr(torch, spec.dtype))


# torch.compile modes that capture their own CUDA graphs: time them as they are, without another graph.
GRAPHED_MODES = ("reduce-overhead", "max-autotune")


def forward_call(model: nn.Module, inputs: list[torch.Tensor], compile_mode: str | None = None) -> Callable[[], Any]:
    """model(*inputs) under inference_mode, compiled with `compile_mode` (None: as given). The first
    call compiles."""
    runnable = torch.compile(model, mode=compile_mode) if compile_mode else model

    def call():
        with torch.inference_mode():
            return runnable(*inputs)

    return call


def _speed(spec: TrialSpec, bundle: ModelBundle, model: nn.Module, dtype, info: dict) -> dict[str, float]:
    inputs = [to_device(t, spec.device, dtype) for t in bundle.timed_inputs(spec.batch_size, spec.seed)]
    if spec.compile_cache_dir:  # read by inductor when it compiles, so setting it here is in time
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(spec.compile_cache_dir).resolve())
    runnable = torch.compile(model, mode=spec.compile_mode) if spec.compile_mode else model
    call = forward_call(runnable, inputs)
    start = time.perf_counter()
    call()  # the first call compiles (and autotunes); keep it out of the latency
    _sync(spec.device)
    compile_s = time.perf_counter() - start if spec.compile_mode else 0.0

    with measure.PeakMemory(spec.device) as peak:
        call()
    graphed = spec.compile_mode in GRAPHED_MODES
    stats = measure.time_call(call, device=spec.device, warmup=spec.warmup, repeats=spec.repeats,
                              timing=spec.timing, l2_flush=spec.l2_flush, graphed_already=graphed)
    info.update(timing_mode=stats.mode, peak_mem_kind=peak.kind)
    if spec.device == "cuda" and spec.timing == "device":
        # The same calls as a user makes them, launch overhead included: the gap to latency_ms is
        # the CPU-side cost that CUDA graphs (or reduce-overhead) would remove.
        e2e = measure.time_call(call, device=spec.device, warmup=spec.warmup, repeats=spec.repeats,
                                timing="e2e", l2_flush=spec.l2_flush)
        info["latency_e2e_samples_ms"] = e2e.samples_ms
        e2e_ms = e2e.median_ms
    else:
        e2e_ms = stats.median_ms
    info["latency_samples_ms"] = stats.samples_ms
    metrics = {
        "latency_ms": stats.median_ms, "latency_ms_p10": stats.p10_ms, "latency_ms_p90": stats.p90_ms,
        "latency_cv": stats.cv, "throughput": spec.batch_size / (stats.median_ms / 1e3),
        "latency_e2e_ms": e2e_ms, "compile_s": compile_s, "peak_mem_bytes": peak.peak_bytes,
    }
    if peak.peak_reserved_bytes is not None:
        metrics["peak_mem_reserved_bytes"] = peak.peak_reserved_bytes
    if bundle.extra_speed:
        def timer(fn):
            return measure.time_call(fn, device=spec.device, warmup=spec.warmup, repeats=spec.repeats,
                                     timing=spec.timing, l2_flush=spec.l2_flush, graphed_already=graphed)

        prompt = tuple(inputs) if bundle.speed_inputs is None else tuple(  # the timed inputs are the prompt
            to_device(t, spec.device, dtype) for t in bundle.make_inputs(spec.batch_size, spec.seed))
        metrics.update(bundle.extra_speed(runnable, prompt, timer, info))
    return metrics


def to_device(t: torch.Tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Move an input; only floating-point tensors take the model's dtype (token ids stay integers)."""
    return t.to(device, dtype) if t.is_floating_point() else t.to(device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- isolation

_CONTEXT: mp.context.BaseContext | None = None


def _context() -> mp.context.BaseContext:
    global _CONTEXT  # one fork server per parent process, started on first use
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        # Not torchao: importing it queries the GPU, and a CUDA context in the fork server would make
        # every forked trial fail with "Cannot re-initialize CUDA in forked subprocess".
        _CONTEXT.set_forkserver_preload(["torch", "qsweep.runner"])
    return _CONTEXT


def _child(spec: TrialSpec, conn) -> None:
    conn.send(run_trial(spec))
    conn.close()


def run_isolated(spec: TrialSpec, timeout_s: float) -> TrialResult:
    """Run a trial in a fresh child process; a timeout, crash or OOM kill becomes a failed result."""
    ctx = _context()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(spec, send), daemon=True)
    start = time.perf_counter()
    proc.start()
    send.close()
    try:
        if receive.poll(timeout_s):
            result = receive.recv()
            proc.join(30)
            return result
    except EOFError:
        pass  # the child died before sending a result
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
    if time.perf_counter() - start >= timeout_s:
        return TrialResult("failed", f"timeout: trial ran longer than {timeout_s:g} s (bench.timeout_s)")
    code = proc.exitcode
    hint = " (killed: likely out of memory)" if code == -9 else ""
    return TrialResult("failed", f"trial process died with exit code {code}{hint}")
