"""Where an 8B trial's build and first calls go (issue 13), on the GPU:
    python benchmarks/diag_build.py OUT
1. a fresh interpreter times each import, CUDA's start and the model's construction, and says whether
   importing transformers/torchao starts CUDA (what a fork server may preload without breaking its children);
2. one eager trial of the llama8b grid (bf16, batch 1) in this process under cProfile: its stage times and
   the functions its time went to, written to OUT/diag_build.txt.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import subprocess
import sys
import tempfile
from pathlib import Path

FRESH = r"""
import time
t = time.perf_counter()
def lap(what):
    global t
    now = time.perf_counter(); print(f"{what:<46} {now - t:7.2f} s", flush=True); t = now
import torch; lap("import torch")
import qsweep.runner; lap("import qsweep.runner (the fork server's preload)")
import transformers; lap("import transformers")
from transformers.models.llama import modeling_llama; lap("import modeling_llama")
import sys; print("  torchao imported by transformers:", "torchao" in sys.modules, "| cuda initialized:", torch.cuda.is_initialized())
import torchao, torchao.quantization; lap("import torchao.quantization")
print("  cuda initialized after torchao:", torch.cuda.is_initialized())
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize(); lap("CUDA context")
from qsweep.config import load_config
root, _ = load_config(["+sweep=llama8b", "+point=llama8b-none", "compile=none", "bench.batch_size=1"]); lap("compose config")
from qsweep.models import build_model
with torch.device("cuda"):
    bundle = build_model(dict(root.model.builder), 0)
torch.cuda.synchronize(); lap("build_model 8B on cuda (first)")
del bundle; torch.cuda.empty_cache()
with torch.device("cuda"):
    bundle = build_model(dict(root.model.builder), 0)
torch.cuda.synchronize(); lap("build_model 8B on cuda (second)")
"""


def main(out: str) -> None:
    report = Path(out) / "diag_build.txt"
    fresh = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, timeout=240)
    lines = ["## fresh interpreter", fresh.stdout, fresh.stderr[-3000:] if fresh.returncode else ""]

    from qsweep.config import load_config
    from qsweep.runner import run_trial
    from qsweep.sweep import Point

    root, _ = load_config(["+sweep=llama8b", "+point=llama8b-none", "compile=none", "bench.batch_size=1"])
    point = Point(root)
    spec = point.spec(None, Path(tempfile.mkdtemp()) / "ref.pt", is_baseline=True)
    profile = cProfile.Profile()
    result = profile.runcall(run_trial, spec)
    lines += ["## one eager trial under cProfile", f"status {result.status} {result.reason}",
              *(f"{k} {v:.2f}" for k, v in result.metrics.items() if k.startswith("time_")),
              f"stage parts {result.info.get('stage_parts')}"]
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(70)
    lines.append(text.getvalue())
    report.write_text("\n".join(lines))
    print("\n".join(lines[:30]))


if __name__ == "__main__":
    main(sys.argv[1])
