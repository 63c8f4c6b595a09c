"""Latency, memory and size measurement.

GPU timing pitfalls this module handles: a small model timed call by call measures Python launch
overhead, not kernels, so `device` timing replays a captured CUDA graph; the first calls compile
and autotune, so they are timed apart as warm-up; weights that fit in L2 make weight-bound layers
look faster than in a real model, so an optional flush evicts L2 between repeats.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from qsweep.config import first_line


@dataclass
class LatencyStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    cv: float  # std / mean of the repeats
    mode: str  # how it was timed: "device (cuda graph)", "e2e", ...
    samples_ms: list[float]


def summarize(samples_ms: list[float], mode: str) -> LatencyStats:
    """Statistics of latency samples in ms: median, 10th/90th percentiles (inclusive) and CV (pstdev / mean)."""
    qs = statistics.quantiles(samples_ms, n=10, method="inclusive")
    mean = statistics.fmean(samples_ms)
    cv = statistics.pstdev(samples_ms) / mean if mean > 0 else 0.0
    return LatencyStats(statistics.median(samples_ms), qs[0], qs[-1], cv, mode, samples_ms)


# The stages of a trial: every second of it belongs to one (`time_<stage>_s` metrics).
STAGES = ("build", "quantize", "compile", "measure", "eval")


class StageClock:
    """Seconds spent per trial stage. Stages nest: entering one pauses the enclosing one, so the first
    (compiling) call inside a timing loop counts as compile, not measure, and nothing counts twice.

    `started` (time.time(), seconds since the epoch) is when the trial process started: `time_total_s`
    counts from there.
    """

    def __init__(self, started: float | None = None, progress_path: str | None = None):
        self.started = time.time() if started is None else started
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self._stack: list[list] = []  # [stage, start of its current slice]
        self.parts: dict[str, float] = {}  # "<stage>_<part>": seconds by timed path (see part)
        self._open_parts: list[dict[str, float]] = []
        # Written at every stage change, so a trial killed by a timeout or a crash still says where it was.
        self.progress_path = progress_path

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        now = time.perf_counter()
        if self._stack:
            outer = self._stack[-1]
            self.seconds[outer[0]] += now - outer[1]
        self._stack.append([name, now])
        self._save()
        try:
            yield
        finally:
            now = time.perf_counter()
            inner = self._stack.pop()
            self.seconds[inner[0]] += now - inner[1]
            if self._stack:
                self._stack[-1][1] = now
            self._save()

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Count the seconds each stage spends inside under `<stage>_<name>` (compile_decode, measure_forward):
        which timed path (sizes, forward, prefill, decode) a stage's time went to. Parts nest as stages
        do: an inner part's seconds are not counted again in the outer one."""
        before = {stage: self._so_far(stage) for stage in STAGES}
        self._open_parts.append(inner := dict.fromkeys(STAGES, 0.0))  # seconds of the parts inside this one
        try:
            yield
        finally:
            self._open_parts.pop()
            for stage, seconds in before.items():
                spent = self._so_far(stage) - seconds
                if self._open_parts:
                    self._open_parts[-1][stage] += spent
                if spent - inner[stage] > 0:
                    key = f"{stage}_{name}"
                    self.parts[key] = self.parts.get(key, 0.0) + spent - inner[stage]

    def _so_far(self, stage: str) -> float:
        running = self._stack[-1] if self._stack and self._stack[-1][0] == stage else None
        return self.seconds[stage] + (time.perf_counter() - running[1] if running else 0.0)

    def _save(self) -> None:
        if self.progress_path:
            stage = self._stack[-1][0] if self._stack else None
            Path(self.progress_path).write_text(json.dumps({"stage": stage, "started": self.started,
                                                            **self.metrics()}))

    def metrics(self) -> dict[str, float]:
        """`time_<stage>_s` for every stage and `time_total_s` (since `started`)."""
        out = {f"time_{name}_s": s for name, s in self.seconds.items()}
        out["time_total_s"] = time.time() - self.started
        return out


def unfinished_stages(progress_path: str) -> tuple[str | None, dict[str, float]]:
    """What a trial process that died or was killed had done: the stage it was in and its stage times
    up to now (the time since its last stage change is the stage it was in)."""
    try:
        saved = json.loads(Path(progress_path).read_text())
    except (OSError, ValueError):
        return None, {}
    stage = saved.pop("stage", None)
    saved["time_total_s"] = time.time() - saved.pop("started")
    if stage:
        saved[f"time_{stage}_s"] += saved["time_total_s"] - sum(saved[f"time_{s}_s"] for s in STAGES)
    return stage, saved


# torch.compile modes that capture their own CUDA graphs: time them as they are, without another graph.
GRAPHED_MODES = ("reduce-overhead", "max-autotune")


def forward_call(model: torch.nn.Module, inputs: list[torch.Tensor], compile_mode: str | None = None,
                 ) -> Callable[[], Any]:
    """model(*inputs) under inference_mode, compiled with `compile_mode` (None: as given). The first
    call compiles."""
    runnable = torch.compile(model, mode=compile_mode) if compile_mode else model

    def call():
        with torch.inference_mode():
            return runnable(*inputs)

    return call


def to_device(t: torch.Tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Move an input; only floating-point tensors take the model's dtype (token ids stay integers)."""
    return t.to(device, dtype) if t.is_floating_point() else t.to(device)


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so a host clock times it."""
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], *, device: str, warmup: int, repeats: int, timing: str,
              l2_flush: bool = False, graphed_already: bool = False, clock: StageClock | None = None,
              weights_bytes: int | None = None, warm_up: Callable[[], Any] | None = None) -> LatencyStats:
    """Median latency of `fn()` in ms.

    Args:
        timing: "device" replays a CUDA graph of `fn` (launch overhead removed; falls back to e2e
            if capture fails, and says so in `mode`); "e2e" times each call with a sync, as a
            user would see it. On CPU both are wall-clock per call.
        graphed_already: fn runs its own CUDA graphs (torch.compile reduce-overhead/max-autotune),
            which cannot be captured again; it is then timed with CUDA events.
        clock: the first call (which compiles a new path) and graph capture count as its `compile`
            stage, the rest as `measure`.
        weights_bytes: the model's weights. Device timing puts several calls in one sample (see
            calls_per_sample); with l2_flush and weights that fit in L2, the calls after the first
            would read them warm, so such a sample holds one call.
        warm_up: a shorter call that runs every kernel and graph fn runs (one step of a decode loop whose
            steps are alike), warming up a capture in place of a whole call of fn.
    """
    clock = clock or StageClock()  # no trial's clock: the stages are counted and dropped
    captured = device == "cuda" and timing == "device" and not graphed_already
    if not captured:  # the first call compiles a new path; a captured path's first call is its capture warm-up
        with clock.stage("compile"):
            fn()
            sync(device)
    with clock.stage("measure"):
        if device != "cuda":
            return _time_host(fn, warmup, repeats, sync=lambda: None, mode="e2e (cpu wall clock)")
        flush = _l2_flusher() if l2_flush else None
        one_call = flush is not None and (weights_bytes is None or weights_bytes < 2 * _l2_bytes())
        if timing == "device" and graphed_already:
            calls = 1 if one_call else calls_per_sample(fn)
            return _time_events(_repeat(fn, calls), warmup, repeats, flush, calls,
                                mode=f"device (torch.compile cuda graphs, {calls} calls per sample)")
        if timing == "device":
            try:
                with clock.stage("compile"):
                    graph = _capture(fn, warm_up)
                    calls = 1 if one_call else calls_per_sample(graph.replay)
                    if calls > 1:
                        del graph
                        graph = _capture(_repeat(fn, calls), warmed=True)
            except Exception as err:  # some kernels are not capturable; say so rather than fail
                stats = _time_host(fn, warmup, repeats, torch.cuda.synchronize, mode="e2e")
                stats.mode = f"e2e (graph capture failed: {type(err).__name__}: {first_line(err)[:200]})"
                return stats
            return _time_events(graph.replay, warmup, repeats, flush, calls,
                                mode=f"device (cuda graph, {calls} calls per sample)")
        return _time_host(fn, warmup, repeats, torch.cuda.synchronize, mode="e2e", flush=flush)


# What one timed sample costs besides the calls (event records, a graph launch): a few microseconds.
# A sample holds enough calls that this is under 1% of it, or a speedup is compressed.
SAMPLE_OVERHEAD_S = 10e-6
MAX_CALLS_PER_SAMPLE = 64


def calls_per_sample(fn: Callable[[], Any], probes: int = 3) -> int:
    """How many calls of fn one timed sample holds so that a sample's fixed cost stays below 1%.
    fn is a graph replay (or runs its own graphs), so CUDA events see its GPU time, not launches.
    A call long enough on its own (an LLM's decode loop: half a second) is probed once, not `probes` times."""
    fn()
    per_call_s = _event_seconds(fn, 1)
    if per_call_s < 100 * SAMPLE_OVERHEAD_S:
        per_call_s = _event_seconds(fn, probes)
    return max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(100 * SAMPLE_OVERHEAD_S / max(per_call_s, 1e-9))))


def _event_seconds(fn: Callable[[], Any], calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls / 1e3


def _repeat(fn: Callable[[], Any], calls: int) -> Callable[[], None]:
    if calls == 1:
        return fn

    def run() -> None:
        for _ in range(calls):
            fn()

    return run


def _time_host(fn, warmup, repeats, sync, mode, flush=None) -> LatencyStats:
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        if flush:
            flush()
            sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return summarize(samples, mode)


def _time_events(fn, warmup, repeats, flush, calls, mode) -> LatencyStats:
    """CUDA-event time of `fn` (which makes `calls` calls) per call, in ms."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        if flush:
            flush()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return summarize([s.elapsed_time(e) / calls for s, e in zip(starts, ends)], mode)


def _capture(fn, warm_up: Callable[[], Any] | None = None, warmed: bool = False) -> torch.cuda.CUDAGraph:
    """A CUDA graph of fn() after one warm-up call on a side stream, as torch.cuda.graph requires (lazy init,
    compiling, autotuning), run as if captured (see _seen_as_captured). The warm-up is `warm_up()` where
    given (a decode step instead of the whole loop: an eager 8B loop is a second or more), else fn(); none
    if `warmed` (fn's parts were captured just before). Where a capture fails after it, it is tried once
    more after two calls of fn."""
    try:
        return _capture_after(fn, [] if warmed else [warm_up or fn])
    except Exception:
        if warmed:
            raise
        return _capture_after(fn, [fn, fn])


def _capture_after(fn, warm_ups: list[Callable[[], Any]]) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), _seen_as_captured():
        for call in warm_ups:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


@contextlib.contextmanager
def _seen_as_captured():
    """Eager code that asks whether it is being captured takes its capture branch (transformers then
    builds an explicit attention mask), so the compiled blocks it calls (compile.scope=blocks) see the
    inputs they will see in the capture and compile for them now: compiling inside a capture fails."""
    real = torch.cuda.is_current_stream_capturing
    torch.cuda.is_current_stream_capturing = lambda: True
    try:
        yield
    finally:
        torch.cuda.is_current_stream_capturing = real


def _l2_bytes() -> int:
    return torch.cuda.get_device_properties(0).L2_cache_size


def _l2_flusher() -> Callable[[], None]:
    buffer = torch.empty(max(2 * _l2_bytes(), 1 << 20), dtype=torch.uint8, device="cuda")
    return lambda: buffer.zero_()


class PeakMemory:
    """Peak memory during a `with` block (one inference), in bytes.

    `peak_bytes` is the whole peak, what a user sizes a machine by: CUDA `max_memory_allocated` after
    `reset_peak_memory_stats` (weights + KV cache + activations, nothing subtracted); CPU the peak RSS
    of this process, sampled every millisecond. `activation_bytes` is the growth over what was held at
    entry (activations, KV cache, workspaces). `peak_reserved_bytes`: CUDA `max_memory_reserved`
    (whole; None on CPU). `kind` says which was measured.
    """

    def __init__(self, device: str):
        self.device = device
        self.kind = "cuda_max_allocated" if device == "cuda" else "cpu_peak_rss"
        self.peak_bytes = 0
        self.activation_bytes = 0
        self.peak_reserved_bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._proc = psutil.Process(os.getpid())
            self._base = self._proc.memory_info().rss
            self._max_rss = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._max_rss = max(self._max_rss, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
            self.peak_reserved_bytes = torch.cuda.max_memory_reserved()
        else:
            self._stop.set()
            self._thread.join()
            self._max_rss = max(self._max_rss, self._proc.memory_info().rss)
            self.peak_bytes = self._max_rss
        self.activation_bytes = max(self.peak_bytes - self._base, 0)


def tensor_bytes(tensors: Any) -> int:
    """Bytes held by tensors, looking inside torchao tensor subclasses (int data + scales)."""
    if isinstance(tensors, dict):
        return sum(tensor_bytes(t) for t in tensors.values())
    if not isinstance(tensors, torch.Tensor):
        return 0
    data = tensors.data if isinstance(tensors, torch.nn.Parameter) else tensors
    if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):
        names, _ = data.__tensor_flatten__()
        return sum(tensor_bytes(getattr(data, name)) for name in names)
    return data.numel() * data.element_size()


def saved_size(state_dict: dict, path: Path) -> int:
    """Bytes on disk of `torch.save(state_dict)`."""
    torch.save(state_dict, path)
    return path.stat().st_size


def weight_read_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers one decode step reads: all of them (quantized data and scales as
    stored) except embedding tables, which a step only gathers a row of; a weight tied to an output
    projection is read there, once. The bytes-read bound of a weight-bound step: its time is at least
    this over the memory bandwidth."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor_bytes(tensor)
    return total


class _ByteCounter(io.RawIOBase):
    """A stream that keeps only its length: torch.save's exact file size without writing the file. It
    seeks, as a file does, past the tensors' bytes that skip_data leaves unwritten."""

    def __init__(self):
        self.size = 0
        self.position = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence] + offset
        return self.position

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self.position += n
        self.size = max(self.size, self.position)
        return n


def model_size_bytes(model: torch.nn.Module) -> int:
    """Bytes on disk of the model's state_dict saved with torch.save, counted as it is serialized."""
    state = model.state_dict()
    try:
        return _saved_bytes(state, skip_data=True)
    except RuntimeError:  # PyTorch's own quantized tensors (eager dynamic quantization) refuse skip_data
        return _saved_bytes(state, skip_data=False)


def _saved_bytes(state: dict, skip_data: bool) -> int:
    from torch.utils.serialization import config

    counter = _ByteCounter()
    # Only the count is kept, so the tensors' bytes need not be read: skip_data leaves their space (no copy
    # of a GPU model to the host, 16 GB for an 8B model in bf16), and the zip's CRC32 fields have a fixed
    # size. The count is the saved file's, byte for byte (tests/test_measure.py).
    skipping = torch.serialization.skip_data() if skip_data else contextlib.nullcontext()
    with skipping, config.patch({"save.compute_crc32": False}):
        torch.save(state, counter)
    return counter.size
