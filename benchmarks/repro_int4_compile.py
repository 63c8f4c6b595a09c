"""The smallest reproduction of the two int4 formats that fail under torch.compile (issue 14), for upstream,
and what each int4 kernel reads per second at decode (batch 1), the evidence for where a format falls short.

    python3 benchmarks/repro_int4_compile.py [OUT]      (a CUDA GPU with mslk; `pip install 'qsweep[gpu]'`)

One bf16 Linear of the 8B's MLP shape (4096 -> 14336) quantized by torchao, run eagerly, then through
torch.compile (fullgraph, so the first break is the error). On the 8B preset in qsweep (torch 2.11.0+cu130,
torchao 0.18.0, mslk-cuda 1.1.0, H100) these compiled points were recorded `failed`:
  int4wo_preshuffled: InternalTorchDynamoError: RuntimeError: Polyfill handler <method-wrapper '__eq__' of
                      builtin_function_or_method ...> does not have a traceable function
  float8dq_int4:      TorchRuntimeError: RuntimeError when making fake tensor call
bf16, tile_packed_to_4d (tinygemm) and plain run as controls. Each case prints `ok` or its error and, where it
runs, its time at batch 1 (triton's do_bench_cudagraph) and the weight bytes it reads per microsecond; full
tracebacks go to OUT/repro_int4_compile.txt.
"""

import sys
import traceback
from pathlib import Path

import torch
from torchao.quantization import Float8DynamicActivationInt4WeightConfig, Int4WeightOnlyConfig, quantize_
from triton.testing import do_bench_cudagraph


def int4wo(packing_format: str) -> Int4WeightOnlyConfig:
    return Int4WeightOnlyConfig(group_size=64, int4_packing_format=packing_format,
                                int4_choose_qparams_algorithm="tinygemm")


CASES = {  # as conf/scheme/int4wo*.yaml and float8dq_int4.yaml build them
    "bf16 (control)": None,
    "tile_packed_to_4d (control)": int4wo("tile_packed_to_4d"),
    "plain (control)": int4wo("plain"),
    "preshuffled": int4wo("preshuffled"),
    "float8dq_int4": Float8DynamicActivationInt4WeightConfig(int4_packing_format="preshuffled"),
}


def stored_bytes(t: torch.Tensor) -> int:
    """A weight's bytes as stored: a torchao tensor's inner tensors (packed data, scales, zeros)."""
    if hasattr(t, "__tensor_flatten__"):
        return sum(stored_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def timed(fn, x: torch.Tensor, weight: torch.Tensor) -> str:
    us = do_bench_cudagraph(lambda: fn(x), rep=200) * 1e3
    return f"{us:.1f} us, {stored_bytes(weight) / us / 1e6:.2f} TB/s of weights"


def attempt(label: str, run, *args) -> None:
    """Print `label: ok, <timing>` or the error's first line; the full traceback goes to the log."""
    try:
        print(f"{label}: ok, {run(*args)}", flush=True)
    except Exception as err:
        print(f"{label}: {type(err).__name__}: {str(err).splitlines()[0][:300]}", flush=True)
        print(f"=== {label}", file=log)
        traceback.print_exc(file=log)


def compiled(linear: torch.nn.Linear, x: torch.Tensor) -> str:
    torch._dynamo.reset()
    fn = torch.compile(linear, fullgraph=True)
    fn(x)
    return timed(fn, x, linear.weight)


def quantized(linear: torch.nn.Linear, config, x: torch.Tensor) -> str:
    if config is not None:
        quantize_(linear, config)
    linear(x)
    return timed(linear, x, linear.weight)


out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
log = open(out / "repro_int4_compile.txt", "w")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", file=log)
# A decode step calls each Linear with (batch, tokens, hidden) = (1, 1, 4096); (1, 4096) is the 2-D control.
inputs = {shape: torch.randn(*shape, dtype=torch.bfloat16, device="cuda") for shape in [(1, 1, 4096), (1, 4096)]}
for name, config in CASES.items():
    linear = torch.nn.Linear(4096, 14336, bias=False, dtype=torch.bfloat16, device="cuda")
    attempt(f"{name} eager", quantized, linear, config, inputs[(1, 1, 4096)])
    for shape, x in inputs.items():
        attempt(f"{name} compiled, input {shape}", compiled, linear, x)
log.close()
