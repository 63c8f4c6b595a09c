#!/usr/bin/env bash
# Issue #15 on the GPU host: the flows that need CUDA, on the Llama FFN preset (four Llama-3.1-8B feed-forward
# blocks, bf16), beside their one-shot PTQ references, into OUT_DIR:
#   bash benchmarks/flows_gpu.sh OUT_DIR
# 2:4 sparsity alone (sparse24: cuSPARSELt/CUTLASS bf16), with float8 (sparse24_float8dq: CUTLASS, SM >= 9.0)
# and with int8 dynamic (sparse24_int8dq: dense int8 matmul, torchao 0.18 has no int8 2:4 kernel), and
# static float8 (static_float8: observer flow, torch._scaled_mm), at batch 1 (weight-bound) and 256
# (compute-bound, where 2:4 should pay), compiled (FLOW_COMPILE=none,default for eager too). Each batch
# is bounded by FLOW_TIMEOUT_S (a device call lasts 10 min). Writes OUT_DIR/flows_gpu.csv (every point,
# one table), OUT_DIR/flows_gpu_mlflow.db and OUT_DIR/flows_gpu.log; copy them to benchmarks/results/.
set -u
out=${1:?usage: flows_gpu.sh OUT_DIR}
mkdir -p "$out"
work=outputs/flows_gpu  # not under OUT: the compile cache and artifacts are thousands of files
export PYTHONUNBUFFERED=1
exec > >(tee "$out/flows_gpu.log") 2>&1
python3 -c "import torch, torchao; print('torch', torch.__version__, 'torchao', torchao.__version__,
torch.cuda.get_device_name(), 'sm', torch.cuda.get_device_capability())"
common=(model=llama_ffn bench=gpu device=cuda tracking.experiment=flows_gpu output_dir="$work")
echo "=== batch 1: 2:4 and static float8 vs bf16, float8dq $(date -u +%FT%TZ)"
timeout "${FLOW_TIMEOUT_S:-270}" python3 -m qsweep run -m "${common[@]}" bench.batch_size=1 compile="${FLOW_COMPILE:-default}" \
  scheme=none,sparse24,sparse24_float8dq,static_float8,float8dq granularity=per_row
echo "=== batch 256: 2:4 alone and combined vs their dense twins $(date -u +%FT%TZ)"
timeout "${FLOW_TIMEOUT_S:-270}" python3 -m qsweep run -m "${common[@]}" bench.batch_size=256 compile="${FLOW_COMPILE:-default}" \
  scheme=none,sparse24,sparse24_int8dq,sparse24_float8dq,static_float8,int8dq,float8dq granularity=per_row
echo "=== one table $(date -u +%FT%TZ)"
python3 - "$work" "$out/flows_gpu.csv" <<'PY'
import sys
from pathlib import Path

import pandas as pd

from qsweep.tracking import load_runs

work, target = Path(sys.argv[1]), sys.argv[2]
runs = load_runs(f"sqlite:///{work / 'mlflow.db'}", "flows_gpu")
runs = runs[runs["kind"].isin(["grid", "baseline"])]
columns = ["run", "flow", "scheme", "batch_size", "compile", "status", "speedup", "latency_ms", "latency_cv",
           "size_ratio", "drift_sqnr_db", "drift_cosine", "weight_sparsity", "calib_batches", "calib_s",
           "layers_quantized", "layers_total", "peak_mem_bytes", "device_name", "torch", "torchao", "reason"]
table = runs[[c for c in columns if c in runs]].sort_values(["batch_size", "compile", "run"])
table.to_csv(target, index=False)
with pd.option_context("display.width", 250, "display.max_columns", None, "display.float_format", "{:.4g}".format):
    print(table.drop(columns=[c for c in ("device_name", "torch", "torchao") if c in table]).to_string(index=False))
PY
cp "$work/mlflow.db" "$out/flows_gpu_mlflow.db" 2>/dev/null
echo "=== done $(date -u +%FT%TZ)"
