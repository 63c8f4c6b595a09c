#!/usr/bin/env bash
# One grid on one GPU, then spread over every GPU of the host (hydra/launcher=gpus: joblib, one job per GPU,
# each trial pinned to a free GPU), each into a fresh output_dir (nothing reused, every compile cold), then
# a markdown comparison: wall times, and each point's figures on 1 GPU against N GPUs with their noise.
#   bash benchmarks/multi_gpu.sh OUT_DIR [grid overrides ...]     (needs 2+ GPUs; CUDA_VISIBLE_DEVICES picks them)
# Writes OUT_DIR/one_gpu/, OUT_DIR/all_gpus/ (each a qsweep output_dir with its mlflow.db), OUT_DIR/*.log and
# OUT_DIR/multi_gpu.md.
set -euo pipefail
out=${1:?usage: multi_gpu.sh OUT_DIR [grid overrides ...]}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
export PYTHONUNBUFFERED=1
# The default grid: 10 points of compiled Llama-8B FFN blocks at batch 1 and 256, a minute or so each.
grid=("$@")
if [[ ${#grid[@]} -eq 0 ]]; then
  grid=(model=llama_ffn bench=gpu compile=default "bench.batch_size=1,256" "scheme=none,int8wo,int4wo,float8wo,float8dq"
        granularity=per_row group_size=64)
fi

gpus=$("$PY" -c "from qsweep.gpus import visible_gpus; print(','.join(visible_gpus()))")
n=$(awk -F, '{print NF}' <<<"$gpus")
[[ -n "$gpus" && $n -ge 2 ]] || { echo "multi_gpu.sh: needs 2 or more GPUs; this host shows '${gpus}'" >&2; exit 2; }
first=${gpus%%,*}
echo "GPUs: $gpus ($n); grid: ${grid[*]}"
"$PY" -c "import torch, torchao; print('torch', torch.__version__, 'torchao', torchao.__version__, torch.cuda.get_device_name())" \
  | tee "$out/versions.txt"

run() {  # name, then the command's arguments; records its wall time (s) in $out/<name>.wall_s
  local name=$1; shift
  local start end
  start=$(date +%s.%N)
  "$@" 2>&1 | tee "$out/$name.log"
  end=$(date +%s.%N)
  awk -v a="$start" -v b="$end" 'BEGIN {printf "%.1f\n", b - a}' >"$out/$name.wall_s"
}

echo "=== 1 GPU ($first) $(date -u +%FT%TZ)"
CUDA_VISIBLE_DEVICES=$first run one_gpu "$PY" -m qsweep run -m device=cuda "${grid[@]}" \
  output_dir="$out/one_gpu" tracking.experiment=multi_gpu || true
echo "=== $n GPUs ($gpus) $(date -u +%FT%TZ)"
CUDA_VISIBLE_DEVICES=$gpus run all_gpus "$PY" -m qsweep run -m hydra/launcher=gpus device=cuda "${grid[@]}" \
  output_dir="$out/all_gpus" tracking.experiment=multi_gpu || true

"$PY" - "$out" "$n" "$gpus" <<'EOF'
import math
import sys
from pathlib import Path

import mlflow
import pandas as pd

out, n, gpus = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]


def points(name: str) -> pd.DataFrame:
    """Every measured point of one run: the MLflow runs (params, metrics) of its store."""
    client = mlflow.MlflowClient(f"sqlite:///{out / name / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("multi_gpu")
    rows = []
    for r in client.search_runs([experiment.experiment_id], max_results=1000):
        if r.data.tags.get("qsweep.role") == "sweep":
            continue
        rows.append({"run": r.info.run_name, "status": r.data.tags.get("status"),
                     "device_index": r.data.params.get("device_index", ""), **r.data.metrics})
    return pd.DataFrame(rows).set_index("run")


one, all_ = points("one_gpu"), points("all_gpus")
wall = {name: float((out / f"{name}.wall_s").read_text()) for name in ("one_gpu", "all_gpus")}
lines = [f"# The same grid on 1 GPU and on {n} GPUs ({gpus})", "",
         f"`{(out / 'versions.txt').read_text().strip()}`", "",
         "| | GPUs | wall time (s) | points | ok |", "|---|---|---|---|---|"]
for name, frame, gpu_count in (("one_gpu", one, 1), ("all_gpus", all_, n)):
    lines.append(f"| {name} | {gpu_count} | {wall[name]:.1f} | {len(frame)} | {(frame['status'] == 'ok').sum()} |")
lines += ["", f"Wall-time speedup: **{wall['one_gpu'] / wall['all_gpus']:.2f}x** on {n} GPUs (ideal {n}x; "
          "a sweep's start, the baseline every point waits for and the slowest point bound it).", ""]

# A point agrees when its latency differs by no more than its noise: twice the two runs' replay CVs
# added (each a relative standard deviation), and never less than 3% (run-to-run drift of one GPU).
lines += ["| point | status | latency_ms 1 GPU | latency_ms N GPUs | ratio | tolerance | within noise | "
          "speedup 1 / N | size_ratio 1 / N | GPU (N) |", "|---|---|---|---|---|---|---|---|---|---|"]
agree = total = 0
for run in sorted(set(one.index) | set(all_.index)):
    a = one.loc[run] if run in one.index else None
    b = all_.loc[run] if run in all_.index else None
    if a is None or b is None or a["status"] != "ok" or b["status"] != "ok":
        status = f"{'-' if a is None else a['status']} / {'-' if b is None else b['status']}"
        lines.append(f"| {run} | {status} | | | | | | | | {'' if b is None else b['device_index']} |")
        continue
    ratio = b["latency_ms"] / a["latency_ms"]
    cv = [0.0 if pd.isna(x.get("latency_cv")) else float(x["latency_cv"]) for x in (a, b)]
    tol = max(2 * sum(cv), 0.03)
    ok = abs(ratio - 1) <= tol
    agree, total = agree + ok, total + 1

    def pair(key: str) -> str:
        x, y = a.get(key, math.nan), b.get(key, math.nan)
        return f"{x:.3g} / {y:.3g}"

    lines.append(f"| {run} | ok | {a['latency_ms']:.4g} | {b['latency_ms']:.4g} | {ratio:.3f} | ±{tol:.1%} | "
                 f"{'yes' if ok else '**no**'} | {pair('speedup')} | {pair('size_ratio')} | {b['device_index']} |")
lines += ["", f"**{agree} of {total}** measured points agree within their noise.",
          "Per GPU (N-GPU run): " + ", ".join(f"GPU {g}: {c} runs" for g, c in
                                             all_["device_index"].value_counts().sort_index().items())]
(out / "multi_gpu.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "=== done $(date -u +%FT%TZ): $out/multi_gpu.md"
