"""Why int8 weight-only is slow compiled at prefill (issue 13): its 8B 128-token forward took 2.0 s per
block-compiled call on the H100 (bf16: 7.8 ms), with or without torchao's Inductor options.

    python3 benchmarks/diag_int8wo.py OUT      (a CUDA GPU)

One bf16 Linear of the 8B's MLP shape (4096 -> 14336), int8wo per-row (as conf/scheme/int8wo.yaml builds it,
set_inductor_config=False), at 1, 8, 128 and 1024 rows: eager and torch.compile (mode default), each timed with
triton's do_bench_cudagraph, beside bf16. Then the compiled 128-row case again with torchao's options
(coordinate-descent tuning). Inductor's generated code for each compiled case goes to OUT/diag_int8wo_<case>.py.
Results: benchmarks/results/diag_int8wo.txt (before and after qsweep's fix, which compile_model applies here too).
"""

import sys
import time
from pathlib import Path

import torch
from torchao.quantization import Int8WeightOnlyConfig, quantize_
from triton.testing import do_bench_cudagraph

from qsweep.runner import compile_model

out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)


def linear(config) -> torch.nn.Module:
    m = torch.nn.Linear(4096, 14336, bias=False, device="cuda", dtype=torch.bfloat16)
    if config is not None:
        quantize_(m, config)
    return m


def generated_code(fn, x) -> str:
    from torch._inductor.utils import run_and_get_code
    _, codes = run_and_get_code(fn, x)
    return "\n".join(codes)


def case(label: str, m: torch.nn.Module, rows: int, compiled: bool) -> None:
    torch._dynamo.reset()
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    fn = compile_model(m, "default", None) if compiled else m
    begun = time.perf_counter()
    if compiled:
        code = generated_code(fn, x)
        (out / f"diag_int8wo_{label.replace(' ', '_')}_{rows}.py").write_text(code)
        kernels = sorted({line.split("(")[0].strip() for line in code.splitlines()
                          if "extern_kernels." in line or (".run(" in line and "triton_" in line)})
    else:
        fn(x)
        kernels = []
    first_s = time.perf_counter() - begun
    us = do_bench_cudagraph(lambda: fn(x), rep=100) * 1e3
    print(f"{label:>22} rows={rows:5d} {'compiled' if compiled else 'eager':>8}: {us:9.1f} us  "
          f"(first call {first_s:5.1f} s) {' '.join(kernels)[:300]}", flush=True)


bf16 = linear(None)
int8wo = linear(Int8WeightOnlyConfig(set_inductor_config=False))
for rows in (1, 8, 128, 1024):
    for compiled in (False, True):
        case("bf16", bf16, rows, compiled)
        case("int8wo", int8wo, rows, compiled)
with torch._inductor.config.patch(coordinate_descent_tuning=True, coordinate_descent_check_all_directions=True):
    for rows in (1, 128):
        case("int8wo torchao-options", int8wo, rows, True)
