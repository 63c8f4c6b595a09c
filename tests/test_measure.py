"""Measurement on CPU, directly: latency statistics, timing calls, model size on disk and in memory, peak memory."""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from torch import nn

from qsweep import measure
from qsweep.schemes import quantizable_layers, quantize

INT8WO = {"_target_": "torchao.quantization.Int8WeightOnlyConfig",
          "granularity": {"_target_": "torchao.quantization.PerRow"}}


def test_summarize_on_known_samples():
    samples = [float(v) for v in range(1, 12)]  # 1..11 ms
    stats = measure.summarize(samples, "e2e")
    assert stats.median_ms == 6.0
    assert stats.p10_ms == pytest.approx(2.0) and stats.p90_ms == pytest.approx(10.0)  # inclusive deciles
    assert stats.cv == pytest.approx(statistics.pstdev(samples) / 6.0)
    assert stats.mode == "e2e" and stats.samples_ms == samples
    steady = measure.summarize([2.0] * 5, "e2e")
    assert (steady.median_ms, steady.p10_ms, steady.p90_ms, steady.cv) == (2.0, 2.0, 2.0, 0.0)


def test_time_call_on_cpu_counts_warmup_apart_and_times_each_repeat():
    calls = []

    def sleepy():
        calls.append(time.perf_counter())
        time.sleep(0.002)

    stats = measure.time_call(sleepy, device="cpu", warmup=2, repeats=5, timing="device", l2_flush=True)
    # the first call (a compile, timed as its own stage) and the warm-up calls are not samples
    assert len(calls) == 1 + 2 + 5 and len(stats.samples_ms) == 5
    assert stats.mode == "e2e (cpu wall clock)"  # "device" timing needs CUDA: a CPU is timed by wall clock
    assert all(s >= 2.0 for s in stats.samples_ms)  # ms, not seconds
    assert stats.p10_ms <= stats.median_ms <= stats.p90_ms < 1000


def test_forward_call_runs_under_inference_mode_and_to_device_keeps_integer_inputs():
    model = nn.Linear(4, 2)
    out = measure.forward_call(model, [torch.randn(3, 4)])()
    assert out.shape == (3, 2) and out.is_inference() and not out.requires_grad
    ids = torch.tensor([1, 2])
    assert measure.to_device(ids, "cpu", torch.bfloat16).dtype == torch.int64
    assert measure.to_device(torch.ones(2), "cpu", torch.bfloat16).dtype == torch.bfloat16
    assert set(measure.GRAPHED_MODES) == {"reduce-overhead", "max-autotune"}


def test_sizes_follow_parameter_counts_and_shrink_when_quantized():
    torch.manual_seed(0)
    small, big = nn.Sequential(nn.Linear(256, 256)), nn.Sequential(nn.Linear(256, 1024))
    params = 256 * 256 + 256
    assert measure.tensor_bytes(small.state_dict()) == params * 4  # float32
    small_disk = measure.model_size_bytes(small)
    assert params * 4 < small_disk < params * 4 + 4096  # the weights plus torch.save's small header
    assert measure.model_size_bytes(big) > 3.9 * small_disk
    quantize(small, INT8WO, quantizable_layers(small, None))
    int8_memory = measure.tensor_bytes(small.state_dict())  # inside the torchao tensor: int8 data + scales
    assert 256 * 256 < int8_memory < params * 4 / 3
    assert measure.model_size_bytes(small) < small_disk / 2.5


INTXWO_4 = {"_target_": "torchao.quantization.IntxWeightOnlyConfig", "weight_dtype": torch.int4,
            "granularity": {"_target_": "torchao.quantization.PerGroup", "group_size": 32}}


@pytest.mark.parametrize("scheme", [None, INT8WO, INTXWO_4, "eager_dynamic"],
                         ids=["float32", "int8wo", "intxwo_4", "eager_dynamic"])
def test_size_on_disk_is_the_saved_file_byte_for_byte(tmp_path, scheme):
    """Counted without writing or reading the tensors' bytes, and without the zip's checksums: exactly the
    file torch.save writes (its archive folder is named after the file, `archive` for a stream), torchao's
    tensor subclasses included, and PyTorch's own quantized tensors, which refuse to skip their bytes."""
    model = nn.Sequential(nn.Linear(256, 192), nn.ReLU(), nn.Linear(192, 7), nn.Embedding(50, 16))
    if scheme == "eager_dynamic":
        model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    elif scheme is not None:
        quantize(model, scheme, quantizable_layers(model, None))
    torch.save(model.state_dict(), tmp_path / "archive.pt")
    assert measure.model_size_bytes(model) == (tmp_path / "archive.pt").stat().st_size


def test_peak_memory_on_cpu_sees_an_allocation():
    with measure.PeakMemory("cpu") as peak:
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
        time.sleep(0.02)  # a few samples while it is held
        del block
    assert peak.kind == "cpu_peak_rss" and peak.peak_reserved_bytes is None
    assert peak.activation_bytes >= 32 * 1024 * 1024 and peak.peak_bytes > peak.activation_bytes


def test_a_failed_graph_capture_is_named_in_the_reason():
    from qsweep.runner import timing_fallbacks

    info = {"timing_mode": "e2e (graph capture failed: AcceleratorError: operation not permitted when stream is capturing)",
            "prefill_timing_mode": "e2e (graph capture failed: AcceleratorError: operation not permitted when stream is capturing)",
            "decode_timing_mode": "device (cuda graph, 1 calls per sample)"}
    assert timing_fallbacks(info) == ("timed e2e, not as a CUDA graph: forward, prefill (graph capture failed: "
                                      "AcceleratorError: operation not permitted when stream is capturing)")
    assert timing_fallbacks({"timing_mode": "device (cuda graph, 4 calls per sample)"}) == ""
