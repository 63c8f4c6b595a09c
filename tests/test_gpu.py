"""GPU measurement fidelity (CUDA only; skipped on CPU)."""

import pytest
import torch

from qsweep import measure
from qsweep.sweep import run_point

pytestmark = pytest.mark.gpu


def test_device_timing_removes_launch_overhead():
    # 64 tiny matmuls: a few microseconds of GPU work behind 64 Python launches.
    layers = torch.nn.Sequential(*[torch.nn.Linear(64, 64, device="cuda") for _ in range(64)])
    x = torch.randn(1, 64, device="cuda")
    device = measure.time_call(lambda: layers(x), device="cuda", warmup=5, repeats=50, timing="device")
    e2e = measure.time_call(lambda: layers(x), device="cuda", warmup=5, repeats=50, timing="e2e")
    assert device.mode == "device (cuda graph)"
    assert device.median_ms < 0.5 * e2e.median_ms


def test_peak_memory_is_the_whole_peak_and_the_growth_is_apart():
    keep = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MiB held before
    held = torch.cuda.memory_allocated()  # with whatever earlier tests left in this process
    with measure.PeakMemory("cuda") as peak:
        tmp = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
        del tmp
    assert held + 64 * 2**20 <= peak.peak_bytes < held + 80 * 2**20  # what is held plus the block's temporaries
    assert 64 * 2**20 <= peak.activation_bytes < 80 * 2**20
    assert peak.peak_reserved_bytes >= peak.peak_bytes
    del keep


def test_int4_and_float8_run_on_cuda(compose):
    for scheme, granularity in (("int4wo", "per_group"), ("float8dq", "per_row"), ("int8dq", "per_row")):
        record = run_point(compose("device=cuda", f"scheme={scheme}", f"granularity={granularity}",
                                   "bench.batch_size=32", "bench.timing=device"))
        assert record.status == "ok", record.reason
        assert record.metrics["layers_quantized"] == 2
        assert record.metrics["size_ratio"] > 1.7  # bf16 -> 8 or 4 bits
        assert record.metrics["latency_e2e_ms"] >= record.metrics["latency_ms"] * 0.8
        m = record.metrics
        assert m["peak_mem_bytes"] >= m["weights_mem_bytes"] > 0 and m["activation_peak_bytes"] <= m["peak_mem_bytes"]


def test_int8dq_small_batch_is_unsupported_not_garbage(compose):
    record = run_point(compose("device=cuda", "scheme=int8dq", "bench.batch_size=1"))
    assert record.status == "unsupported" and "17" in record.reason


def test_lm_speed_path_runs_on_cuda_and_says_how_it_timed_decode(compose):
    # The StaticCache's buffers become inference tensors on CUDA; rewinding them between repeats once
    # failed there ("Inplace update to inference tensor outside InferenceMode") and never on CPU.
    root = compose("device=cuda", "model=tiny_llama", "bench=gpu", "bench.repeats=10", "eval.n_samples=4",
                   "scheme=int4wo", "granularity=per_group", "group_size=64", "isolate=false")
    record = run_point(root)
    assert record.status == "ok", record.reason
    assert record.metrics["decode_tok_s"] > 0 and record.metrics["prefill_tok_s"] > 0
    import mlflow

    run = mlflow.MlflowClient(f"sqlite:///{root.output_dir}/mlflow.db").get_run(record.run_id)
    assert run.data.tags["decode_timing_mode"].startswith(("device", "e2e (graph capture failed"))
