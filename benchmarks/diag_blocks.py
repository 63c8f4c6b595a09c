"""Where a per-block compiled int4 Llama spends its time (diagnostic): each step's seconds and compile phases."""
import faulthandler, os, sys, time
import torch
out = sys.argv[2]
STACKS = open(f"{out}/stacks_{sys.argv[1]}.txt", "w")
faulthandler.dump_traceback_later(10, repeat=True, file=STACKS)
if os.environ.get("NOAT"):  # no first-run benchmarking of pointwise configs, no first-call aliasing check
    import torch._functorch.config, torch._inductor.config
    torch._inductor.config.triton.autotune_pointwise = False
    torch._functorch.config.check_custom_op_aliasing = False
from torchao.quantization import Int4WeightOnlyConfig, quantize_
from qsweep import measure
from qsweep.lm import load_model, speed
from qsweep.runner import compile_model, compile_phases
cfg = dict(model_type="llama", hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
           num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024, tie_word_embeddings=False)
m = load_model(None, True, cfg, "bfloat16").cuda()
if sys.argv[1] == "int4":
    quantize_(m.model, Int4WeightOnlyConfig(group_size=64, int4_packing_format="tile_packed_to_4d"))
compile_model(m, "default", None, os.environ.get("SCOPE", "blocks"))
ids = torch.randint(0, 1024, (1, 128), device="cuda")
t0 = time.time()
def step(name, fn):
    t = time.time(); r = fn(); torch.cuda.synchronize()
    print(f"{name}: {time.time() - t:.1f} s (at {time.time() - t0:.0f} s) {compile_phases()} {getattr(r, 'mode', '')}", flush=True)
    return r
timer = lambda fn: step("  timed", lambda: measure.time_call(fn, device="cuda", warmup=2, repeats=3, timing="device"))
with torch.inference_mode():
    step("forward 1", lambda: m(ids))
    step("forward 2", lambda: m(ids))
    timer(lambda: m(ids))
    if not os.environ.get("SHORT"):
        step("speed", lambda: print(speed(m, ids[:, :16], 8, timer, {})))
