"""Latency, memory and size measurement.

GPU timing pitfalls this module handles: a small model timed call by call measures Python launch
overhead, not kernels, so `device` timing replays a captured CUDA graph; the first calls compile
and autotune, so they are timed apart as warm-up; weights that fit in L2 make weight-bound layers
look faster than in a real model, so an optional flush evicts L2 between repeats.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch


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
              l2_flush: bool = False, graphed_already: bool = False) -> LatencyStats:
    """Median latency of `fn()` in ms.

    Args:
        timing: "device" replays a CUDA graph of `fn` (launch overhead removed; falls back to e2e
            if capture fails, and says so in `mode`); "e2e" times each call with a sync, as a
            user would see it. On CPU both are wall-clock per call.
        graphed_already: fn runs its own CUDA graphs (torch.compile reduce-overhead/max-autotune),
            which cannot be captured again; it is then timed with CUDA events per call.
    """
    if device != "cuda":
        return _time_host(fn, warmup, repeats, sync=lambda: None, mode="e2e (cpu wall clock)")
    flush = _l2_flusher() if l2_flush else None
    if timing == "device" and graphed_already:
        return _time_events(fn, warmup, repeats, flush, mode="device (torch.compile cuda graphs)")
    if timing == "device":
        try:
            graph = _capture(fn, warmup)
        except Exception as err:  # some kernels are not capturable; say so rather than fail
            stats = _time_host(fn, warmup, repeats, torch.cuda.synchronize, mode="e2e")
            stats.mode = f"e2e (graph capture failed: {type(err).__name__})"
            return stats
        return _time_events(graph.replay, warmup, repeats, flush, mode="device (cuda graph)")
    return _time_host(fn, warmup, repeats, torch.cuda.synchronize, mode="e2e", flush=flush)


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


def _time_events(fn, warmup, repeats, flush, mode) -> LatencyStats:
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
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)], mode)


def _capture(fn, warmup) -> torch.cuda.CUDAGraph:
    # Warm up on a side stream first, as torch.cuda.graph requires (lazy init, autotuning).
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(max(warmup, 2)):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def _l2_flusher() -> Callable[[], None]:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    buffer = torch.empty(max(2 * l2, 1 << 20), dtype=torch.uint8, device="cuda")
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


def model_size_bytes(model: torch.nn.Module) -> int:
    """Bytes on disk of the model's state_dict saved with torch.save (written to a temp dir)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return saved_size(model.state_dict(), Path(tmp) / "model.pt")
