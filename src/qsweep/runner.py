"""One trial: build a fresh model, quantize it, measure it, compare it with the baseline's outputs.

The work itself is done by `schemes` (quantize), `accuracy` (drift against the baseline) and `measure`
(latency, memory, size); this module orders it into one trial and isolates the trial.

`run_isolated` runs a trial in its own child process with a timeout: torchao and inductor change
process-global state (inductor flags, matmul precision, compiled caches), so one trial must not
shape another's numbers, and a crash or OOM must not take the sweep down. Children fork from a
server that has already imported torch, so each trial starts in about a second; on CUDA the next trial's
process is started while a trial runs and imports torchao and transformers meanwhile. A child that dies
without a word (abort, segfault, OOM kill, timeout) still leaves its last stderr lines, which become
the result's traceback.
"""

from __future__ import annotations

import ast
import atexit
import codecs
import contextlib
import copy
import dataclasses
import faulthandler
import functools
import gc
import inspect
import itertools
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qsweep import measure
from qsweep.accuracy import NonFiniteError, accuracy_metrics, check_metrics
from qsweep.config import first_line
from qsweep.flows import FlowSettings, run_flow
from qsweep.measure import GRAPHED_MODES, forward_call, sync, to_device
from qsweep.models import ModelBundle, build_model
from qsweep.schemes import is_per_layer, is_quantized, quantizable_layers


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
    compile_scope: str = "model"  # model | blocks (qsweep.config.CompileScope)
    compile_inductor: dict = field(default_factory=dict)  # torch._inductor.config options while compiling
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
    started: float | None = None  # time.time() when the trial process started (time_total_s); None: now
    progress_path: str | None = None  # where the trial keeps its stage times (read if it dies)
    flow: dict | None = None  # how quant is applied (qsweep.flows.flow_spec); None = ptq, one-shot quantize_


@dataclass
class TrialResult:
    status: str  # ok | failed | unsupported
    reason: str = ""  # why it is not ok; on an ok result, what it did not do (layers left unquantized)
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # non-numeric facts: timing mode, memory kind
    traceback: str | None = None


class BuilderError(RuntimeError):
    """The model builder cannot be imported or built: a user or environment problem, so `failed` (retried
    on the next run), never `unsupported` (which is cached as a fact about the hardware)."""


def run_trial(spec: TrialSpec) -> TrialResult:
    """Run one trial in this process. Exceptions become a failed/unsupported result; NaN/Inf outputs
    or metrics are failed (`non-finite outputs: 100% NaN`)."""
    clock = measure.StageClock(spec.started, spec.progress_path)
    result = _run_stages(spec, clock)
    result.metrics.update(clock.metrics())  # a failed trial's times too: what it cost before failing
    return result


def _run_stages(spec: TrialSpec, clock: measure.StageClock) -> TrialResult:
    try:
        return _measure(spec, clock)
    except NonFiniteError as err:
        return TrialResult("failed", str(err))
    except BuilderError as err:
        return TrialResult("failed", str(err)[:500], traceback=traceback.format_exc())
    except torch.cuda.OutOfMemoryError as err:
        return TrialResult("failed", f"CUDA out of memory: {first_line(err)[:500]}", traceback=traceback.format_exc())
    except (ImportError, NotImplementedError) as err:  # a kernel package missing on this host, at quantize/run
        return TrialResult("unsupported", f"{type(err).__name__}: {first_line(err)[:500]}",
                           traceback=traceback.format_exc())
    except Exception as err:
        return TrialResult("failed", f"{type(err).__name__}: {first_line(err)[:500]}", traceback=traceback.format_exc())


def _build(spec: TrialSpec) -> ModelBundle:
    try:
        with torch.device(spec.device):  # initialise on the device: an 8B model takes minutes on a CPU
            return build_model(spec.model_builder, spec.seed)
    except ImportError as err:
        raise BuilderError(f"cannot build model {spec.model_builder.get('_target_')!r}: "
                           f"{type(err).__name__}: {first_line(err)}") from err


def _measure(spec: TrialSpec, clock: measure.StageClock) -> TrialResult:
    dtype = getattr(torch, spec.dtype)
    with clock.stage("build"):
        _finish_imports_ahead()  # what a spare process has not imported yet counts as build
        bundle = _build(spec)
        model = bundle.model.to(dtype).to(spec.device)
        sync(spec.device)
    candidates = quantizable_layers(model, spec.quantize_filter)
    metrics: dict[str, float] = {"layers_total": len(candidates)}
    info: dict[str, Any] = {}
    reason = ""

    if spec.quant is not None:
        with clock.stage("quantize"):
            flowed = run_flow(spec.flow, model, bundle, spec.quant, candidates,
                              FlowSettings(spec.device, dtype, spec.seed))  # ptq, qat, static, ... (qsweep.flows)
            model, skipped, candidates = flowed.model, flowed.skipped, flowed.layers
            metrics.update(flowed.metrics)
            sync(spec.device)
        if not is_per_layer(spec.quant):  # a per-layer recipe leaves layers alone on purpose
            left = {name: skipped.get(name, "not replaced by torchao")
                    for name, m in candidates.items() if not is_quantized(m)}
            if left:
                info["unquantized_layers"] = left
                reason = unquantized_reason(left, len(candidates))
    metrics["layers_quantized"] = sum(is_quantized(m) for m in candidates.values())
    info["quantized_layers"] = [name for name, m in candidates.items() if is_quantized(m)]
    with clock.stage("quantize"):  # drop quantization temporaries: they are not the trial's memory
        gc.collect()
        if spec.device == "cuda":
            torch.cuda.empty_cache()
    with clock.part("sizes"), clock.stage("measure"):
        metrics["weights_mem_bytes"] = (torch.cuda.memory_allocated() if spec.device == "cuda"
                                        else measure.tensor_bytes(model.state_dict()))
        metrics["size_bytes"] = measure.model_size_bytes(model)
        metrics["weight_read_bytes"] = measure.weight_read_bytes(model)

    with clock.stage("eval"):
        metrics.update(accuracy_metrics(model, bundle, device=spec.device, dtype=dtype, samples=spec.eval_samples,
                                        batch_size=spec.eval_batch_size, seed=spec.seed,
                                        reference_path=spec.reference_path, is_baseline=spec.is_baseline))
    check_metrics(metrics)  # before minutes of compile and timing
    metrics.update(_speed(spec, bundle, model, dtype, info, clock))
    check_metrics(metrics)
    fell_back = timing_fallbacks(info) if spec.timing == "device" else ""
    return TrialResult("ok", "; ".join(r for r in (reason, fell_back) if r), metrics, info)


def timing_fallbacks(info: dict[str, Any]) -> str:
    """What was timed end to end although device timing was asked for (its CUDA-graph capture failed):
    launch overhead is then in the figure, so its speedup against a graph-timed run is not a kernel speedup."""
    failed = {key.removesuffix("timing_mode").rstrip("_") or "forward": mode for key, mode in info.items()
              if key.endswith("timing_mode") and str(mode).startswith("e2e (graph capture failed")}
    if not failed:
        return ""
    why = next(iter(failed.values())).removeprefix("e2e (").removesuffix(")")
    return f"timed e2e, not as a CUDA graph: {', '.join(failed)} ({why})"


def unquantized_reason(left: dict[str, str], total: int, shown: int = 4) -> str:
    """`2 of 3 layers left unquantized: 'fc2' (in_features 100 not divisible by group_size 64), ...`"""
    names = [f"{name!r} ({why})" for name, why in list(left.items())[:shown]]
    more = f" and {len(left) - shown} more (trial_info.json: unquantized_layers)" if len(left) > shown else ""
    return f"{len(left)} of {total} layers left unquantized: {', '.join(names)}{more}"


def compile_model(model: nn.Module, mode: str | None, cache_dir: str | None, scope: str = "model") -> nn.Module:
    """torch.compile with static shapes: prefill, decode and the timed forward each compile once for
    their own shape instead of a dynamic graph after the second shape (`dynamic=False`). Inductor's
    FX-graph and AOTAutograd caches (on by default) live under `cache_dir`, so a rerun loads compiled
    graphs instead of compiling them.

    scope="blocks" compiles one forward shared by every repeated block (see repeated_blocks) and leaves
    the rest eager: Dynamo traces and Inductor lowers and autotunes one block per input shape, where a
    whole-model graph lowers every layer again (an 8B Llama: 32 times)."""
    if cache_dir:  # read when Inductor or Triton compiles (an eager model's torchao kernels too): in time here
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir).resolve())
    if not mode:
        return model
    keep_cuda_int8_weights_off_int8pack_mm()
    if scope == "model":
        return torch.compile(model, mode=mode, dynamic=False)
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"compile.scope=blocks: {type(model).__name__} has no repeated blocks "
                         "(an nn.ModuleList of one class); use compile.scope=model")
    import torch._dynamo.config as dynamo_config

    # Where a block cannot run as block 0 (a cache that grows per layer, a layer index that means more),
    # Dynamo specialises a graph per block and input shape: far above the default limit of 8, after which
    # it would run eagerly.
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 8 * len(blocks))
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 64 * len(blocks))
    one_per_class = {type(m): m for m in blocks[0].modules()}.values()
    if not all(_layer_idx_only_indexes_the_cache(m) for m in one_per_class):
        for block in blocks:  # the layer index means more than a cache slot: each block its own graphs
            block.compile(mode=mode, dynamic=False)
        return model
    shared_forward = torch.compile(type(blocks[0]).forward, mode=mode, dynamic=False)
    for index, block in enumerate(blocks):
        indexed = [m for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]
        block.forward = functools.partial(_run_as_block_zero, shared_forward, block, index, indexed)
    return model


@functools.cache
def keep_cuda_int8_weights_off_int8pack_mm() -> int:
    """Stop Inductor rewriting int8 weight-only linears on CUDA into aten._weight_int8pack_mm; returns the
    rewrites changed. The rewrite (torch 2.11; its CUDA case came with pytorch #161680) matches
    mm(x, int8_weight.to(bf16).t()) * scales, torchao's Int8WeightOnlyConfig per row, and its CUDA kernel is
    slow at every row count: on an H100, a 4096 -> 14336 linear took 280 us at 1 row, 16.6 ms at 128 and
    131 ms at 1024, where bf16 takes 42 us, 46 us and 169 us, and cuBLAS on the cast weight 110, 111 and
    239 us (benchmarks/results/diag_int8wo.txt). It made an 8B int8wo point's compiled prefill take seconds.
    CUDA then gets cuBLAS on the cast weight, or at one row, with coordinate-descent tuning, Inductor's fused
    GEMV; the CPU keeps the rewrite, where the op is a tuned kernel."""
    from torch._inductor.fx_passes import post_grad

    post_grad.lazy_init()  # registers the patterns once per process; Inductor's own later call is a no-op

    def off_cuda(check, match) -> bool:
        return match.kwargs["x"].meta["val"].device.type != "cuda" and check(match)

    changed = 0
    for patterns in post_grad.pass_patterns:
        for entry in itertools.chain.from_iterable(patterns.patterns.values()):
            handler = getattr(entry, "handler", None)
            if getattr(handler, "__name__", "") == "woq_int8" and "quantization" in handler.__module__:
                entry.extra_check = functools.partial(off_cuda, entry.extra_check)
                changed += 1
    return changed


def _layer_idx_only_indexes_the_cache(module: nn.Module) -> bool:
    """Whether every method of the module's class but __init__ reads a `layer_idx` only to pass it to a
    cache's update(...) (an HF attention: `past_key_values.update(k, v, self.layer_idx)`), so that running
    the block as layer 0 of a view of its own cache layer computes what the block computes. Where the
    source cannot be read: whether the module has no layer_idx."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(module))))
    except (OSError, TypeError, SyntaxError):
        return not hasattr(module, "layer_idx")
    allowed: set[int] = set()
    reads: list[ast.Attribute] = []
    for method in ast.walk(tree):
        if not isinstance(method, ast.FunctionDef) or method.name == "__init__":
            continue
        for node in ast.walk(method):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update":
                allowed.update(id(arg) for arg in [*node.args, *(kw.value for kw in node.keywords)])
            if isinstance(node, ast.Attribute) and node.attr == "layer_idx":
                reads.append(node)
    return all(id(node) in allowed for node in reads)


def _run_as_block_zero(shared_forward, block: nn.Module, index: int, indexed: list[nn.Module], *args, **kwargs):
    """Block `index` as block 0 of a one-layer view of its KV cache, which it reads and writes as its own.

    An HF attention indexes the cache by its `layer_idx`, and Dynamo specialises a graph on that constant:
    one graph per layer, each autotuned again at its first run (minutes for an 8B int4 model). As block 0
    of its own view, every block passes the guards of one graph."""
    cache = kwargs.get("past_key_values")
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or len(layers) <= index:  # no cache, or one that grows per layer
        return shared_forward(block, *args, **kwargs)
    view = copy.copy(cache)
    view.layers = [layers[index]]
    for module in indexed:
        module.layer_idx = 0
    try:
        return shared_forward(block, *args, **{**kwargs, "past_key_values": view})
    finally:
        for module in indexed:
            module.layer_idx = index


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The members of the largest nn.ModuleList whose members are all of one class (a transformer's
    layers); [] if there is none with two or more."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
             and len({type(block) for block in m}) == 1]
    return list(max(lists, key=len)) if lists else []


def compile_cache_counts() -> dict[str, int]:
    """Inductor's cache hits and misses so far in this process (FX graph cache, AOTAutograd cache)."""
    from torch._dynamo.utils import counters

    wanted = ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass")
    out = {name: counters["inductor"][name] for name in wanted}
    out.update({k: v for k, v in counters["aot_autograd"].items() if k.startswith("autograd_cache")})
    return out


# Dynamo's own timers, nested: tracing Python bytecode, then the backend (AOTAutograd, which contains
# Inductor's lowering, which contains the wait for its parallel kernel compiles).
COMPILE_PHASES = {"dynamo_trace_s": "bytecode_tracing", "backend_s": "OutputGraph.call_user_compiler",
                  "inductor_s": "compile_fx_inner", "kernel_compile_wait_s": "async_compile.wait"}


def compile_phases() -> dict[str, float]:
    """Where this process's compile time went: graphs compiled (frames) and seconds per phase."""
    from torch._dynamo.utils import compilation_time_metrics as seconds

    out: dict[str, float] = {"frames": len(seconds.get("_compile.compile_inner", []))}
    out.update({name: round(sum(seconds.get(key, [])), 2) for name, key in COMPILE_PHASES.items()})
    return out


def _speed(spec: TrialSpec, bundle: ModelBundle, model: nn.Module, dtype, info: dict,
           clock: measure.StageClock) -> dict[str, float]:
    from torch._inductor import config as inductor_config

    with inductor_config.patch(spec.compile_inductor):  # Inductor compiles at first calls: all of them in here
        return _timed_paths(spec, bundle, model, dtype, info, clock)


def _timed_paths(spec: TrialSpec, bundle: ModelBundle, model: nn.Module, dtype, info: dict,
                 clock: measure.StageClock) -> dict[str, float]:
    with clock.stage("compile"):  # importing dynamo and wrapping the model: part of compiling
        runnable = compile_model(model, spec.compile_mode, spec.compile_cache_dir, spec.compile_scope)
    inputs = [to_device(t, spec.device, dtype) for t in bundle.timed_inputs(spec.batch_size, spec.seed)]
    call = forward_call(runnable, inputs)
    graphed = spec.compile_mode in GRAPHED_MODES
    weights = measure.tensor_bytes(model.state_dict())

    def timer(fn, path: str, warm_up=None, timing: str = spec.timing) -> measure.LatencyStats:
        with clock.part(path):
            return measure.time_call(fn, device=spec.device, warmup=spec.warmup, repeats=spec.repeats,
                                     timing=timing, l2_flush=spec.l2_flush, graphed_already=graphed, clock=clock,
                                     weights_bytes=weights, warm_up=warm_up)

    with clock.part("forward"):
        with clock.stage("compile"):
            call()  # the first call compiles (and autotunes); keep it out of the memory peak and latency
            sync(spec.device)
        with clock.stage("measure"):
            with measure.PeakMemory(spec.device) as peak:
                call()
            stats = timer(call, "forward")
            info.update(timing_mode=stats.mode, peak_mem_kind=peak.kind)
            if spec.device == "cuda" and spec.timing == "device":
                # The same calls as a user makes them, launch overhead included: the gap to latency_ms is
                # the CPU-side cost that CUDA graphs (or reduce-overhead) would remove.
                e2e = timer(call, "forward", timing="e2e")
                info["latency_e2e_samples_ms"] = e2e.samples_ms
                e2e_ms = e2e.median_ms
            else:
                e2e_ms = stats.median_ms
    info["latency_samples_ms"] = stats.samples_ms
    metrics = {
        "latency_ms": stats.median_ms, "latency_ms_p10": stats.p10_ms, "latency_ms_p90": stats.p90_ms,
        "latency_cv": stats.cv, "throughput": spec.batch_size / (stats.median_ms / 1e3),
        "latency_e2e_ms": e2e_ms, "peak_mem_bytes": peak.peak_bytes,
        "activation_peak_bytes": peak.activation_bytes,
    }
    if peak.peak_reserved_bytes is not None:
        metrics["peak_mem_reserved_bytes"] = peak.peak_reserved_bytes
    if bundle.extra_speed:

        prompt = tuple(inputs) if bundle.speed_inputs is None else tuple(  # the timed inputs are the prompt
            to_device(t, spec.device, dtype) for t in bundle.make_inputs(spec.batch_size, spec.seed))
        # What an LM's speed does outside its timed paths (allocating the KV cache, the first token) is prefill.
        with clock.stage("measure"), clock.part("prefill"):
            metrics.update(bundle.extra_speed(runnable, prompt, timer, info))
    info["stage_parts"] = {name: round(seconds, 4) for name, seconds in clock.parts.items()}
    if spec.compile_mode:
        info["compile_cache"] = compile_cache_counts()
        info["compile_phases"] = compile_phases()
    return metrics


# ---------------------------------------------------------------- isolation

_CONTEXT: mp.context.BaseContext | None = None


def _context() -> mp.context.BaseContext:
    global _CONTEXT  # one fork server per parent process, started on first use
    if _CONTEXT is None:
        if mp.get_start_method(allow_none=True) not in (None, *mp.get_all_start_methods()):
            # A joblib (loky) worker's default is `loky`, which a trial child could not set up again.
            mp.set_start_method("spawn", force=True)
        _CONTEXT = mp.get_context("forkserver")
        # Not torchao: importing it queries the GPU, and a CUDA context in the fork server would make
        # every forked trial fail with "Cannot re-initialize CUDA in forked subprocess".
        _CONTEXT.set_forkserver_preload(["torch", "qsweep.runner"])
    return _CONTEXT


# The last stderr lines of a child that died: enough for a C++ abort message or faulthandler's stack.
STDERR_TAIL_LINES = 100
STDERR_TAIL_BYTES = 256 * 1024


# What a CUDA trial imports before its first step: 8.6 s on an H200 host (transformers imports torchao,
# which starts CUDA, so the fork server cannot hold them), and before it compiles: Inductor and Triton, 2-3 s
# of every compiled trial's compile stage, cold or warm. A spare trial process imports them while the
# trial before it runs (run_isolated), and the grid's next trial starts with them loaded.
IMPORTS_AHEAD = ("torchao.quantization", "transformers.modeling_utils", "transformers.models.auto.modeling_auto",
                 "torch._inductor.compile_fx", "torch._inductor.codegen.triton", "triton")
_imports_ahead: threading.Thread | None = None  # this trial process's import thread, if it is a spare
_imports_ahead_s = 0.0


def _import_ahead() -> None:
    global _imports_ahead_s
    import importlib

    begun = time.perf_counter()
    for name in IMPORTS_AHEAD:
        try:
            importlib.import_module(name)
        except Exception:  # not installed, or fails off the main thread: the trial imports it itself
            pass
    try:
        keep_cuda_int8_weights_off_int8pack_mm()  # Inductor's pattern registration: the first compile's too
    except Exception:  # the trial's compile does it (and says why it fails) itself
        pass
    _imports_ahead_s = time.perf_counter() - begun


def _finish_imports_ahead() -> None:
    if _imports_ahead is not None:
        _imports_ahead.join()


def _worker(conn, stderr_path: str, env: dict[str, str] | None, import_ahead: bool) -> None:
    """A trial process: it waits for its spec (importing IMPORTS_AHEAD meanwhile if `import_ahead`),
    runs the trial and sends the result back."""
    global _imports_ahead
    # Before anything touches CUDA: CUDA_VISIBLE_DEVICES pins the trial to its GPU (qsweep.gpus). The
    # fork server's environment is the one it started with, so the parent's later changes never get here.
    os.environ.update(env or {})
    # Everything written to fd 2 (Python tracebacks, C++ abort messages, faulthandler) goes to a file
    # the parent reads even when this process dies without a word; the parent relays it to its stderr.
    fd = os.open(stderr_path, os.O_WRONLY | os.O_APPEND)
    sys.stderr.flush()
    os.dup2(fd, 2)
    os.close(fd)
    if import_ahead:
        _imports_ahead = threading.Thread(target=_import_ahead, daemon=True)
        _imports_ahead.start()
    try:
        spec, timeout_s = conn.recv()
    except EOFError:  # a spare the sweep ended without using
        return
    started = time.time()  # the trial's start, when its spec arrives: time_total_s counts from here
    faulthandler.enable(all_threads=True)  # SIGSEGV/SIGABRT/SIGBUS/SIGFPE/SIGILL: the Python stack
    # Where it hung, written just before the parent's timeout kills it with SIGKILL (no handler runs).
    faulthandler.dump_traceback_later(max(timeout_s - 2.0, 0.9 * timeout_s), exit=False)
    # And how far compilation got: a compile that never ends is told apart from one that never hits the cache.
    compile_report = threading.Timer(max(timeout_s - 3.0, 0.85 * timeout_s), _report_compile_progress)
    compile_report.daemon = True
    compile_report.start()
    result = run_trial(dataclasses.replace(spec, started=started))
    compile_report.cancel()
    faulthandler.cancel_dump_traceback_later()
    if import_ahead:
        result.info["imports_ahead_s"] = round(_imports_ahead_s, 2)
    conn.send(result)
    conn.close()


@dataclass
class _Process:
    proc: Any
    conn: Any  # duplex: the spec goes in, the result comes out
    stderr_path: str


def _start_process(env: dict[str, str] | None, import_ahead: bool) -> _Process:
    ctx = _context()
    here, there = ctx.Pipe()
    fd, stderr_path = tempfile.mkstemp(prefix="qsweep-trial-", suffix=".stderr")
    os.close(fd)
    proc = ctx.Process(target=_worker, args=(there, stderr_path, env, import_ahead), daemon=True)
    proc.start()
    there.close()
    return _Process(proc, here, stderr_path)


# One spare trial process per GPU environment, started when a trial starts, for the next trial there.
_SPARES: dict[tuple, _Process] = {}
_SPARES_LOCK = threading.Lock()


def _trial_process(env: dict[str, str] | None, spare: bool) -> _Process:
    """A process for the next trial: the spare started for this environment (its imports done or under
    way), else a new one; with `spare`, a new spare is started for the trial after this one."""
    key = tuple(sorted((env or {}).items()))
    with _SPARES_LOCK:
        ready = _SPARES.pop(key, None)
        if ready is not None and not ready.proc.is_alive():
            _close(ready)
            ready = None
        if spare:
            _SPARES[key] = _start_process(env, import_ahead=True)
    return ready or _start_process(env, import_ahead=spare)


def _close(process: _Process) -> None:
    process.conn.close()  # an idle worker's recv() ends: it exits
    process.proc.join(5)
    if process.proc.is_alive():
        process.proc.kill()
        process.proc.join()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(process.stderr_path)


@atexit.register
def close_spares() -> None:
    """End the spare trial processes (the sweep is over)."""
    with _SPARES_LOCK:
        while _SPARES:
            _close(_SPARES.popitem()[1])


def _report_compile_progress() -> None:
    print(f"qsweep: near the timeout: compile {compile_phases()}, inductor cache {compile_cache_counts()}",
          file=sys.stderr, flush=True)


class _StderrRelay(threading.Thread):
    """Follows the child's stderr file: copies new text to this process's stderr as it comes and keeps
    the tail. A file, not a pipe: it needs no EOF, so compile workers that inherit it cannot hold it open."""

    def __init__(self, path: str):
        super().__init__(daemon=True)
        self.path = path
        self._done = threading.Event()
        self._tail = bytearray()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def run(self) -> None:
        with open(self.path, "rb") as f:
            while not self._done.wait(0.1):
                self._drain(f)
            self._drain(f)

    def _drain(self, f) -> None:
        while chunk := f.read(65536):
            self._tail += chunk
            del self._tail[:-STDERR_TAIL_BYTES]
            text = self._decoder.decode(chunk)
            if text:
                try:
                    sys.stderr.write(text)
                    sys.stderr.flush()
                except (OSError, ValueError):  # a closed stderr must not lose the tail
                    pass

    def finish(self) -> str:
        """Stop after a last read; returns the last STDERR_TAIL_LINES lines."""
        self._done.set()
        self.join()
        lines = self._tail.decode("utf-8", errors="replace").splitlines()
        return "\n".join(lines[-STDERR_TAIL_LINES:])


def death_reason(exitcode: int | None) -> str:
    """Why a child ended without a result: the signal by name (SIGABRT, SIGSEGV, SIGKILL), else the exit code."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (likely out of memory: the kernel's OOM killer sends SIGKILL)" if -exitcode == signal.SIGKILL else ""
        return f"trial process killed by {name}{hint}"
    return f"trial process exited with exit code {exitcode} before sending a result"


def run_isolated(spec: TrialSpec, timeout_s: float, env: dict[str, str] | None = None,
                 spare: bool | None = None) -> TrialResult:
    """Run a trial in a fresh child process; a timeout, crash or OOM kill becomes a failed result whose
    reason names the signal or exit code and whose traceback is the child's last stderr lines. `env` is
    set in the child before it starts (e.g. CUDA_VISIBLE_DEVICES). `spare` (default: on CUDA) starts the
    next trial's process now, to import IMPORTS_AHEAD on a spare CPU core while this trial runs; not on
    a CPU, where that import would share the cores this trial is timed on."""
    process = _trial_process(env, spec.device == "cuda" if spare is None else spare)
    fd, progress_path = tempfile.mkstemp(prefix="qsweep-trial-", suffix=".stages.json")
    os.close(fd)
    spec = dataclasses.replace(spec, progress_path=progress_path)
    relay = _StderrRelay(process.stderr_path)
    proc, conn = process.proc, process.conn
    result, timed_out = None, False
    relay.start()
    try:
        conn.send((spec, timeout_s))
        if conn.poll(timeout_s):
            result = conn.recv()
            proc.join(30)
        else:
            timed_out = True
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the child died before sending a result
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        conn.close()
        tail = relay.finish()
        os.unlink(process.stderr_path)
        stage, times = measure.unfinished_stages(progress_path)
        os.unlink(progress_path)
    if result is not None:
        return result
    where = f" during {stage}" if stage else ""
    if timed_out:
        return TrialResult("failed", f"timeout: trial ran longer than {timeout_s:g} s (bench.timeout_s){where}",
                           metrics=times, traceback=tail or None)
    return TrialResult("failed", death_reason(proc.exitcode) + where, metrics=times, traceback=tail or None)
