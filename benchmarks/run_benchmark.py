"""Run a benchmark config (grids of `qsweep run -m`) and write results with provenance.

    python benchmarks/run_benchmark.py benchmarks/gpu_bench.yaml [output_dir=outputs] [--summary-only]

Writes benchmarks/results/<experiment>.csv and <experiment>.md (device, versions, command, date),
and the runs are in MLflow (experiment named in the config) like any sweep.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from qsweep import select
from qsweep.config import ConfigError
from qsweep.sweep import versions

RESULTS = Path(__file__).parent / "results"
# torchao's published Llama-3.1-8B decode figures on an H100 (tokens/s, torchao README, compiled).
PUBLISHED_TOK_S = {"none": 126.9, "int8wo": 198.9, "int4wo": 241.4, "float8wo": 178.5, "float8dq": 154.6}
COLUMNS = ["model", "batch_size", "scheme", "granularity", "group_size", "status", "latency_ms", "latency_e2e_ms",
           "latency_cv", "latency_spread", "speedup", "size_ratio", "weights_mem_bytes", "peak_mem_bytes", "drift_sqnr_db",
           "prefill_tok_s", "decode_tok_s", "time_compile_s", "time_total_s", "timing", "reason"]


def run_grids(cfg: dict, output_dir: str) -> None:
    for grid in cfg["grids"]:
        _qsweep([*grid, f"tracking.experiment={cfg['experiment']}"], output_dir)
    for grid in cfg.get("repeat", {}).get("grids", []):  # a second, forced measurement of the same points
        _qsweep([*grid, f"tracking.experiment={cfg['repeat']['experiment']}", "force=true"], output_dir)


def _qsweep(overrides: list[str], output_dir: str) -> None:
    command = [sys.executable, "-m", "qsweep", "run", "-m", f"output_dir={output_dir}", *overrides]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=False)  # failed points are recorded; keep going


def load_runs(uri: str, experiment: str) -> pd.DataFrame:
    """The experiment's measured points (qsweep.select's reader); empty if the experiment does not exist."""
    try:
        frame = select.load_runs(uri, experiment)
    except ConfigError:
        return pd.DataFrame(columns=COLUMNS + ["run", "start_time"])
    frame = frame[frame["kind"].isin(["grid", "baseline"])].copy()
    for col in COLUMNS:
        if col not in frame:
            frame[col] = None
    frame["batch_size"] = frame["batch_size"].astype(int)
    return frame


def markdown(frame: pd.DataFrame, repeat: pd.DataFrame, command: str) -> str:
    # Provenance from the runs themselves, so a summary regenerated elsewhere still names the GPU.
    measured = frame[frame.status == "ok"]
    first = measured.iloc[0] if len(measured) else None
    device = first["device_name"] if first is not None and "device_name" in first else "unknown device"
    v = {k: first[k] for k in ("torch", "torchao")} if first is not None else versions()
    lines = [f"# GPU benchmark: {device}", "",
             f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- torch {v['torch']}, torchao {v['torchao']}",
             f"- command: `{command}`",
             "- latency_ms: median of CUDA-graph replays (launch overhead removed), L2 flushed between repeats; "
             "latency_e2e_ms: plain calls with a sync (what eager Python callers see)", ""]
    ok = frame[frame.status == "ok"]
    if not ok.empty:
        columns = ["model", "batch_size", "run", "latency_ms", "latency_e2e_ms", "latency_cv", "speedup",
                   "size_ratio", "drift_sqnr_db", "prefill_tok_s", "decode_tok_s", "time_compile_s"]
        table = ok[columns].dropna(axis="columns", how="all").sort_values(["model", "batch_size", "speedup"],
                                                                            ascending=[True, True, False])
        lines += ["## Measured points", "", table.to_markdown(index=False, floatfmt=".3g"), ""]
    other = frame[frame.status != "ok"]
    if not other.empty:
        lines += ["## Not timed (recorded with the reason)", "",
                  other[["model", "batch_size", "run", "status", "reason"]].to_markdown(index=False), ""]
    weight_bound = ok[(ok.model == "llama_ffn") & (ok.batch_size == 1)].sort_values("speedup", ascending=False)
    if not weight_bound.empty:
        ref = []
        for _, row in weight_bound.iterrows():
            published = PUBLISHED_TOK_S.get(row.scheme)
            ref.append({"run": row.run, "measured speedup": row.speedup,
                        "bytes limit (size_ratio)": row.size_ratio,
                        "torchao published 8B decode ratio": published / PUBLISHED_TOK_S["none"] if published else None})
        lines += ["## Weight-bound case (llama_ffn, batch 1) against published figures and the bytes limit", "",
                  pd.DataFrame(ref).to_markdown(index=False, floatfmt=".2f"), ""]
    decode = ok[(ok.model == "llama3_1_8b") & (ok.batch_size == 1) & ok.decode_tok_s.notna()]
    if not decode.empty:
        base = decode[decode.scheme == "none"].decode_tok_s
        rows = [{"run": row.run, "decode tok/s": row.decode_tok_s,
                 "ratio to bf16": row.decode_tok_s / base.iloc[0] if len(base) else None,
                 "torchao published tok/s": PUBLISHED_TOK_S.get(row.scheme),
                 "published ratio": PUBLISHED_TOK_S[row.scheme] / PUBLISHED_TOK_S["none"]
                 if row.scheme in PUBLISHED_TOK_S else None}
                for _, row in decode.sort_values("decode_tok_s", ascending=False).iterrows()]
        lines += ["## Llama-3.1-8B decode (batch 1) against torchao's published H100 figures", "",
                  pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f"), ""]
    if not repeat.empty:
        lines += ["## Repeatability (same points, a second run)", "", _repeatability(frame, repeat), ""]
    return "\n".join(lines)


def _repeatability(first: pd.DataFrame, second: pd.DataFrame) -> str:
    key = ["model", "batch_size", "run"]
    a = first[first.status == "ok"].sort_values("start_time").drop_duplicates(key, keep="last")
    b = second[second.status == "ok"].sort_values("start_time").drop_duplicates(key, keep="last")
    both = a.merge(b, on=key, suffixes=("_1", "_2"))
    both["diff_pct"] = 100 * (both.latency_ms_2 - both.latency_ms_1).abs() / both.latency_ms_1
    # The noise: twice the larger replay CV, or the spread of independent measurements where there were some.
    spread = both[["latency_spread_1", "latency_spread_2"]].astype(float).max(axis=1).fillna(0)
    both["noise_pct"] = 100 * pd.concat([2 * both[["latency_cv_1", "latency_cv_2"]].max(axis=1), spread],
                                        axis=1).max(axis=1)
    both["agree_within_noise"] = both.diff_pct <= both.noise_pct.clip(lower=1.0)
    return both[key + ["latency_ms_1", "latency_ms_2", "diff_pct", "noise_pct", "agree_within_noise"]].to_markdown(
        index=False, floatfmt=".3g")


def main(argv: list[str]) -> int:
    config_path = Path(argv[0]) if argv else Path(__file__).parent / "gpu_bench.yaml"
    output_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")), "outputs")
    cfg = yaml.safe_load(config_path.read_text())
    if "--summary-only" not in argv:
        run_grids(cfg, output_dir)
    uri = f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"
    frame = load_runs(uri, cfg["experiment"])
    repeat = load_runs(uri, cfg["repeat"]["experiment"]) if "repeat" in cfg else pd.DataFrame()
    RESULTS.mkdir(parents=True, exist_ok=True)
    frame[COLUMNS].to_csv(RESULTS / f"{cfg['experiment']}.csv", index=False)
    command = "python benchmarks/run_benchmark.py " + " ".join(argv)
    (RESULTS / f"{cfg['experiment']}.md").write_text(markdown(frame, repeat, command))
    print((RESULTS / f"{cfg['experiment']}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
