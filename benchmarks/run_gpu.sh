#!/usr/bin/env bash
# Everything qsweep measures on the GPU host, in order of importance, each stage into OUT_DIR/<stage>:
#   bash benchmarks/run_gpu.sh OUT_DIR [probe] [ffn] [search] [search_qwen] [lm]   (default: ffn search lm)
# ffn: benchmarks/gpu_bench.yaml (schemes x Llama-8B FFN blocks / toy, batch 1 and 256, a repeat)
# search: per-layer Optuna search on four Llama-8B layers (search_qwen: on Qwen2.5-0.5B), GPU-measured
# lm: benchmarks/lm_bench.yaml (Llama-3.1-8B-shaped decode and prefill tokens/s)
set -u
out=${1:?usage: run_gpu.sh OUT_DIR [stage ...]}; shift
stages=${*:-ffn search lm}
export PYTHONUNBUFFERED=1
python3 -c "import torch, torchao, transformers; print('torch', torch.__version__, 'torchao', torchao.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())"
for stage in $stages; do
  echo "=== $stage $(date -u +%FT%TZ)"
  case $stage in
    probe)  # the LM speed path (StaticCache decode in a CUDA graph) on a tiny model, seconds
      python3 -m qsweep run -m model=tiny_llama device=cuda bench=gpu bench.repeats=10 compile=none \
        scheme=none,int4wo granularity=per_group group_size=64 tracking.experiment=probe output_dir="$out/probe"
      grep -rh --include=trial_info.json -o '"[a-z_]*timing_mode": "[^"]*"' "$out/probe" | sort | uniq -c ;;
    ffn) python3 benchmarks/run_benchmark.py benchmarks/gpu_bench.yaml output_dir="$out/ffn" ;;
    lm) python3 benchmarks/run_benchmark.py benchmarks/lm_bench.yaml output_dir="$out/lm" ;;
    search)  # 4 Llama-8B layers, each timed as one decode-shaped step (bench.tokens=1), KL budget 0.01
      python3 -m qsweep search model=llama3_1_8b_4layers device=cuda bench=gpu compile=none \
        "search.candidates=[none,int8wo,int4wo,float8dq:per_row]" search.drift_metric=drift_kl \
        search.max_drift=0.01 search.study=llama8b_4layers-kl0.01 search.n_trials=60 \
        search.timeout_s=200 search.confirm_top_k=2 search.paired_rounds=5 bench.tokens=1 \
        eval.n_samples=16 eval.batch_size=16 tracking.experiment=search-gpu output_dir="$out/search" ;;
    search_qwen)  # the ~0.5B preset: at 16 tokens its layers were too small for quantized kernels to pay off
      python3 -m qsweep search model=qwen2_5_0_5b device=cuda bench=gpu compile=none \
        "search.candidates=[none,int8wo,int4wo,float8dq:per_row]" search.drift_metric=drift_kl \
        search.max_drift=0.02 "search.groups=['layers\.(\d+)\.(mlp|self_attn)']" search.n_trials=80 \
        search.timeout_s=420 search.confirm_top_k=3 bench.tokens=1 eval.n_samples=16 eval.batch_size=16 \
        tracking.experiment=search-gpu output_dir="$out/search_qwen" ;;
    *) echo "unknown stage '$stage' (valid: probe, ffn, search, search_qwen, lm)"; exit 2 ;;
  esac
done
echo "=== done $(date -u +%FT%TZ)"
