"""The smallest reproduction of the two int4 formats that fail under torch.compile (issue 14), for upstream.

    python3 benchmarks/repro_int4_compile.py [OUT]      (a CUDA GPU with mslk; `pip install 'qsweep[gpu]'`)

One bf16 Linear (4096 x 4096) quantized by torchao, run eagerly, then through torch.compile (fullgraph, so the
first break is the error). On the 8B preset in qsweep (torch 2.11.0+cu130, torchao 0.18.0, mslk-cuda 1.1.0, H100)
these compiled points were recorded `failed`:
  int4wo_preshuffled: InternalTorchDynamoError: RuntimeError: Polyfill handler <method-wrapper '__eq__' of
                      builtin_function_or_method ...> does not have a traceable function
  float8dq_int4:      TorchRuntimeError: RuntimeError when making fake tensor call
tile_packed_to_4d (tinygemm) and plain run as controls. Each case prints `ok` or its error; full tracebacks go
to OUT/repro_int4_compile.txt.
"""

import sys
import traceback
from pathlib import Path

import torch
from torchao.quantization import Float8DynamicActivationInt4WeightConfig, Int4WeightOnlyConfig, quantize_


def int4wo(packing_format: str) -> Int4WeightOnlyConfig:
    return Int4WeightOnlyConfig(group_size=64, int4_packing_format=packing_format,
                                int4_choose_qparams_algorithm="tinygemm")


CASES = {  # as conf/scheme/int4wo*.yaml and float8dq_int4.yaml build them
    "tile_packed_to_4d (control)": int4wo("tile_packed_to_4d"),
    "plain (control)": int4wo("plain"),
    "preshuffled": int4wo("preshuffled"),
    "float8dq_int4": Float8DynamicActivationInt4WeightConfig(int4_packing_format="preshuffled"),
}
out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
log = open(out / "repro_int4_compile.txt", "w")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", file=log)
x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
for name, config in CASES.items():
    linear = torch.nn.Linear(4096, 4096, bias=False, dtype=torch.bfloat16, device="cuda")
    for step in ("eager", "compiled"):
        try:
            if step == "eager":
                quantize_(linear, config)
                linear(x)
            else:
                torch._dynamo.reset()
                torch.compile(linear, fullgraph=True)(x)
            print(f"{name} {step}: ok", flush=True)
        except Exception as err:
            print(f"{name} {step}: {type(err).__name__}: {str(err).splitlines()[0][:300]}", flush=True)
            print(f"=== {name} {step}", file=log)
            traceback.print_exc(file=log)
            break
log.close()
