#!/usr/bin/env bash
# The LLM work on one GPU (issues 13 and 14). Runs live in outputs/gpu (kept between calls on a warm
# machine, so a rerun finds its compile cache); the MLflow store and logs are copied to OUT:
#   bash benchmarks/llm_gpu.sh OUT [timer] [grid] [int4]
# timer: gpu-marked tests, qsweep's latency_ms vs triton's do_bench_cudagraph on four Llama-8B FFN blocks
# grid:  sweeps/llama8b.yaml (GRID_ARGS narrow or extend it: "+point=llama8b-none bench.batch_size=1
#        compile=blocks"; add force=true to measure a warm rerun)
# int4:  sweeps/llama8b_int4.yaml (every int4 kernel; INT4_ARGS narrow it) in the same experiment
# diag:  benchmarks/diag_blocks.py, bf16 and int4 per block, then int4 with each suspected cause of its slow
#        first runs switched off (Inductor's halved-RBLOCK candidates; pointwise autotuning), DIAG_S s each;
#        DIAG_VARIANTS picks some: "int4 TORCHINDUCTOR_DYNAMIC_SCALE_RBLOCK=0;int4 NOAT=1"
# repro: benchmarks/repro_int4_compile.py, the int4 formats that fail under torch.compile, on one Linear
# start: the grid stage detached (setsid), so it runs on across device calls on the warm machine (a call
#        lasts 10 minutes, the whole grid longer) and no point is cut at a call's end; log in outputs/gpu
# wait:  follow the detached grid for up to STAGE_S s; prints its wall time once it has ended
# Each stage is bounded by STAGE_S seconds (a device call lasts 10 minutes); a trial by 60 s less (unless the
# args set bench.timeout_s), so a slow point is recorded `failed ... during <stage>` before the stage is cut.
set -u
out=${1:?usage: llm_gpu.sh OUT [stage ...]}; shift
export work=outputs/gpu  # exported: each stage runs under `timeout bash -c`
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1
python3 -c "import torch, torchao, transformers, importlib.util as u; print('torch', torch.__version__, 'torchao',
torchao.__version__, 'transformers', transformers.__version__, 'mslk', u.find_spec('mslk') is not None, torch.cuda.get_device_name())"
run() { python3 -m qsweep run -m output_dir="$work" "$@"; }
trial_limit() { [[ "$1" == *bench.timeout_s=* ]] || echo "bench.timeout_s=$(( ${STAGE_S:-560} - 60 ))"; }
for stage in ${*:-timer grid}; do
  echo "=== $stage $(date -u +%FT%TZ)"
  start=$(date +%s)
  case $stage in
    timer) timeout "${STAGE_S:-300}" python3 -m pytest -q -s -m gpu tests/test_gpu.py ${TIMER_ARGS:-} > "$out/timer.log" 2>&1
           grep "^|\|passed\|failed" "$out/timer.log" ;;
    grid) timeout "${STAGE_S:-560}" bash -c "$(declare -f run); run +sweep=llama8b $(trial_limit "${GRID_ARGS:-}") ${GRID_ARGS:-}" ;;
    int4) timeout "${STAGE_S:-560}" bash -c "$(declare -f run); run +sweep=llama8b_int4 tracking.experiment=llama8b $(trial_limit "${INT4_ARGS:-}") ${INT4_ARGS:-}" ;;
    diag) IFS=';' read -ra variants <<< "${DIAG_VARIANTS:-none;int4;int4 TORCHINDUCTOR_DYNAMIC_SCALE_RBLOCK=0;int4 NOAT=1}"
          for variant in "${variants[@]}"; do
            set -- $variant; echo "--- $variant"; begun=$(date +%s)
            env "${@:2}" timeout "${DIAG_S:-150}" python3 benchmarks/diag_blocks.py "$1" "$out" 2>>"$out/diag.err" | grep -v "^\s*$"
            echo "--- $variant took $(( $(date +%s) - begun )) s"
          done ;;
    repro) timeout "${STAGE_S:-120}" python3 benchmarks/repro_int4_compile.py "$out" 2>/dev/null ;;
    start) date +%s > "$work/grid.started"; rm -f "$work/grid.ended"
           setsid nohup bash -c "$(declare -f run); run +sweep=llama8b ${GRID_ARGS:-}; date +%s > $work/grid.ended" \
             > "$work/grid.log" 2>&1 < /dev/null & ;;
    wait)  until [ -e "$work/grid.ended" ] || (( $(date +%s) - start >= ${STAGE_S:-560} )); do sleep 5; done
           grep -a "^\[[0-9]*/[0-9]*\]\|^[0-9]* points:\|^time by stage" "$work/grid.log" | tail -n 40
           [ -e "$work/grid.ended" ] && echo "grid wall time: $(( $(cat $work/grid.ended) - $(cat $work/grid.started) )) s"
           cp "$work/grid.log" "$out/grid_$(cat "$work/grid.started").log" ;;
    *) echo "unknown stage '$stage'"; exit 2 ;;
  esac
  echo "=== $stage took $(( $(date +%s) - start )) s"
done
python3 -c "import sqlite3, sys; sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))" \
  "$work/mlflow.db" "$out/llm_mlflow.db" 2>/dev/null  # a consistent copy while a detached grid writes
for times in "$work"/runs/*/stage_times.jsonl; do  # one file per sweep: a warm rerun is a sweep of its own
  [ -e "$times" ] && cp "$times" "$out/stage_times_$(basename "$(dirname "$times")").jsonl"
done
du -sh "$work/cache" 2>/dev/null
echo "=== done $(date -u +%FT%TZ)"
