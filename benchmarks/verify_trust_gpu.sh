#!/usr/bin/env bash
# Issues #12/#19 re-checked on the GPU host: the gpu-marked tests, hostile recipes, a NaN point on CUDA,
# and the Llama-3.1-8B preset's whole peak memory (bf16 vs int4wo), into OUT_DIR:
#   bash benchmarks/verify_trust_gpu.sh OUT_DIR
set -u
out=${1:?usage: verify_trust_gpu.sh OUT_DIR}
work=$(mktemp -d)
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD/tests"
python3 -c "import torch, torchao; print('torch', torch.__version__, 'torchao', torchao.__version__, torch.cuda.get_device_name())"
echo "=== gpu tests and hostile recipes"
timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_recipe.py 2>&1 | tail -5
echo "=== a model whose quantized outputs are NaN, on CUDA"
timeout 200 python3 -m qsweep run model=toy model.builder._target_=fragile_models.fragile_toy \
  +model.builder.how=nan_outputs scheme=int8wo device=cuda bench=gpu bench.repeats=10 \
  output_dir="$work/nan" 2>&1 | grep -E "^toy|points:"
echo "=== Llama-3.1-8B preset, batch 1, eager: whole peak memory"
timeout 420 python3 -m qsweep run -m model=llama3_1_8b scheme=none,int4wo granularity=per_group group_size=64 \
  bench=gpu bench.batch_size=1 bench.repeats=20 compile=none eval.n_samples=16 eval.batch_size=16 \
  output_dir="$work/llama" 2>&1 | grep -vE "HYDRA|^\s*$"
mkdir -p "$out"
cp "$work"/llama/runs/*/results.csv "$out/trust_gpu_llama.csv" 2>/dev/null
cp "$work"/llama/mlflow.db "$out/trust_gpu_llama_mlflow.db" 2>/dev/null
