"""GPU measurement fidelity (CUDA only; skipped on CPU)."""

import pytest
import torch

from qsweep import measure, schemes
from qsweep.sweep import run_point

pytestmark = pytest.mark.gpu


def test_device_timing_removes_launch_overhead():
    # 64 tiny matmuls: a few microseconds of GPU work behind 64 Python launches.
    layers = torch.nn.Sequential(*[torch.nn.Linear(64, 64, device="cuda") for _ in range(64)])
    x = torch.randn(1, 64, device="cuda")
    device = measure.time_call(lambda: layers(x), device="cuda", warmup=5, repeats=50, timing="device")
    e2e = measure.time_call(lambda: layers(x), device="cuda", warmup=5, repeats=50, timing="e2e")
    assert device.mode.startswith("device (cuda graph")
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


def independent_latency_ms(compose, scheme: str, granularity: str, group_size: int = 64) -> float:
    """Triton's do_bench_cudagraph on the same model as the grid point builds it: many calls captured
    in one CUDA graph, replayed and timed as a whole (median, ms per call)."""
    from triton.testing import do_bench_cudagraph

    from qsweep.models import build_model

    root = compose("device=cuda", "model=llama_ffn", f"scheme={scheme}", f"granularity={granularity}",
                   f"group_size={group_size}")
    with torch.device("cuda"):
        bundle = build_model(dict(root.model.builder), root.seed)
    model = bundle.model.to(torch.bfloat16)
    if scheme != "none":
        layers = schemes.quantizable_layers(model, None)
        schemes.quantize(model, schemes.quant_spec(root.scheme, root.granularity, root.group_size), layers)
    compiled = torch.compile(model, mode="default", dynamic=False)
    x = bundle.make_inputs(1, root.seed)[0].to("cuda", torch.bfloat16)
    with torch.inference_mode():
        compiled(x)
        return do_bench_cudagraph(lambda: compiled(x), rep=200, return_mode="median")


def test_latency_agrees_with_triton_do_bench_cudagraph(compose):
    """Four Llama-8B FFN blocks, batch 1, compiled: qsweep's latency_ms within 3% of an independent
    timer, and so the speedup (issue 14: one call per replay once read 5-10% high)."""
    ours, theirs = {}, {}
    for scheme, granularity in (("none", "per_row"), ("int4wo", "per_group")):
        record = run_point(compose("device=cuda", "model=llama_ffn", "bench=gpu", "compile=default",
                                   f"scheme={scheme}", f"granularity={granularity}", "group_size=64"))
        assert record.status == "ok", record.reason
        ours[scheme] = record.metrics["latency_ms"]
        theirs[scheme] = independent_latency_ms(compose, scheme, granularity)
        # the agreement table of benchmarks/results (pytest -s shows it)
        print(f"| {scheme} | {ours[scheme]:.4f} | {theirs[scheme]:.4f} | {ours[scheme] / theirs[scheme] - 1:+.2%} |")
        assert abs(ours[scheme] / theirs[scheme] - 1) <= 0.03, (scheme, ours[scheme], theirs[scheme])
    speedup, reference = ours["none"] / ours["int4wo"], theirs["none"] / theirs["int4wo"]
    print(f"| int4wo speedup | {speedup:.3f} | {reference:.3f} | {speedup / reference - 1:+.2%} |")
    assert abs(speedup / reference - 1) <= 0.03, (speedup, reference)


def test_an_uncapturable_call_is_timed_e2e_and_says_why():
    x = torch.ones(4, device="cuda")
    stats = measure.time_call(lambda: x.sum().item(), device="cuda", warmup=2, repeats=5, timing="device")
    assert stats.mode.startswith("e2e (graph capture failed: "), stats.mode
    assert len(stats.mode) > len("e2e (graph capture failed: AcceleratorError)")  # the error's message too


def test_per_block_compiled_llm_is_timed_as_cuda_graphs(compose):
    # transformers builds an explicit attention mask when it sees a capture; the compiled blocks once
    # recompiled for it inside the capture, which failed, and forward and prefill were timed e2e.
    # bf16: the capture problem is the attention mask's, and an int4 point per block compiles for minutes.
    root = compose("device=cuda", "model=tiny_llama", "bench=gpu", "compile=blocks", "eval.n_samples=4",
                   "scheme=none", "bench.batch_size=1")
    record = run_point(root)
    assert record.status == "ok" and "timed e2e" not in record.reason, record.reason
    import mlflow

    tags = mlflow.MlflowClient(f"sqlite:///{root.output_dir}/mlflow.db").get_run(record.run_id).data.tags
    for path in ("timing_mode", "prefill_timing_mode", "decode_timing_mode"):
        assert tags[path].startswith("device (cuda graph"), (path, tags[path])


def test_compiled_int8_weight_only_runs_cublas_not_int8pack_mm_on_cuda():
    """torch's CUDA _weight_int8pack_mm took 16.6 ms where bf16 takes 46 us at 128 rows (H100)."""
    from torch._inductor.utils import run_and_get_code
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from qsweep.runner import compile_model

    linear = torch.nn.Linear(4096, 1024, bias=False, device="cuda", dtype=torch.bfloat16)
    quantize_(linear, Int8WeightOnlyConfig(set_inductor_config=False))
    x = torch.randn(128, 4096, device="cuda", dtype=torch.bfloat16)
    out, code = run_and_get_code(compile_model(linear, "default", None), x)
    assert "_weight_int8pack_mm" not in "\n".join(code)
    torch.testing.assert_close(out, linear(x), rtol=2e-2, atol=2e-2)
