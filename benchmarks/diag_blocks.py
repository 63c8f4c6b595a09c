"""Where a compiled (int4) Llama's first calls spend their time, step by step (a GPU diagnostic, issue 13).

    python3 benchmarks/diag_blocks.py {none|int4} OUT        (TORCH_LOGS=recompiles adds each recompile's time)

Four Llama-3.1-8B-like layers (width 512), bf16, compile=blocks. Each step prints its seconds and Dynamo's compile
phases so far (qsweep.runner.compile_phases): a step much longer than its phases spends its time outside Dynamo
and Inductor's lowering (first runs, autotuning, capture). Python stacks go to OUT/stacks_<variant>.txt every 10 s.
    SCOPE=model     whole-model torch.compile instead of per block
    SHORT=1         only the forward path (for cProfile: python3 -m cProfile -o OUT/p.prof benchmarks/diag_blocks.py ...)
    NOAT=1          Inductor without first-run benchmarking of pointwise configs and without the first-call
                    custom-op aliasing check (the two costs the profile of int4 showed)
    TORCHINDUCTOR_DYNAMIC_SCALE_RBLOCK=0   Inductor's own switch for the halved-RBLOCK reduction candidates that
                    defeat its autotune cache (pytorch/pytorch#181789, #189121): the suspected cause of int4's
                    per-layer re-benchmarking
Results: benchmarks/results/compile_blocks_diag.log.
"""

import faulthandler
import os
import sys
import time

import torch

variant, out = sys.argv[1], sys.argv[2]
STACKS = open(f"{out}/stacks_{variant}.txt", "w")  # kept open: faulthandler writes to its descriptor
faulthandler.dump_traceback_later(10, repeat=True, file=STACKS)
if os.environ.get("NOAT"):
    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.triton.autotune_pointwise = False
    torch._functorch.config.check_custom_op_aliasing = False

from torchao.quantization import Int4WeightOnlyConfig, quantize_  # noqa: E402

from qsweep import measure  # noqa: E402
from qsweep.lm import load_model, speed  # noqa: E402
from qsweep.runner import compile_model, compile_phases  # noqa: E402

CONFIG = dict(model_type="llama", hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024, tie_word_embeddings=False)
model = load_model(None, True, CONFIG, "bfloat16").cuda()
if variant == "int4":
    quantize_(model.model, Int4WeightOnlyConfig(group_size=64, int4_packing_format="tile_packed_to_4d"))
model = compile_model(model, "default", None, os.environ.get("SCOPE", "blocks"))
ids = torch.randint(0, CONFIG["vocab_size"], (1, 128), device="cuda")
started = time.time()


def step(name, fn):
    t = time.time()
    result = fn()
    torch.cuda.synchronize()
    print(f"{name}: {time.time() - t:.1f} s (at {time.time() - started:.0f} s) {compile_phases()} "
          f"{getattr(result, 'mode', '')}", flush=True)
    return result


def timer(fn, path="forward", warm_up=None):
    return step(f"  timed {path}", lambda: measure.time_call(fn, device="cuda", warmup=2, repeats=3, timing="device",
                                                             warm_up=warm_up))


with torch.inference_mode():
    step("forward 1", lambda: model(ids))
    step("forward 2", lambda: model(ids))
    timer(lambda: model(ids))
    if not os.environ.get("SHORT"):
        step("speed", lambda: print(speed(model, ids[:, :16], 8, timer, {})))
