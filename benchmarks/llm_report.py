"""Report an LLM grid from its MLflow store: decode tokens/s beside torchao's published H100 figures,
ratios to bf16 and the bytes-read limit, and where each trial's time went.

    python benchmarks/llm_report.py MLFLOW_DB EXPERIMENT OUT.md [--log SWEEP_LOG] [--note TEXT]

The bytes-read limit of a point is baseline weight_read_bytes / its weight_read_bytes: the speedup a
weight-bound decode step would get if it ran at the same fraction of memory bandwidth as bf16.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import pandas as pd
from run_benchmark import PUBLISHED_TOK_S  # benchmarks/ is this script's folder, first on sys.path

from qsweep.measure import STAGES
from qsweep.tracking import load_runs

STAGE_COLUMNS = [f"time_{s}_s" for s in STAGES] + ["time_total_s"]


def published(row: pd.Series) -> float | None:
    """torchao's figure for exactly this point (int4wo: g64; float8dq: per-row), else None."""
    if row.scheme == "int4wo" and str(row.group_size) != "64":
        return None
    if row.scheme == "float8dq" and row.granularity != "per_row":
        return None
    return PUBLISHED_TOK_S.get(row.scheme)


def decode_table(ok: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (batch, compile_), group in ok.groupby(["batch_size", "compile"]):
        base = group[group.scheme == "none"]
        base_tok = base.decode_tok_s.iloc[0] if len(base) else None
        base_bytes = base.weight_read_bytes.iloc[0] if len(base) and "weight_read_bytes" in base else None
        for _, row in group.sort_values("decode_tok_s", ascending=False).iterrows():
            ref = published(row) if int(batch) == 1 else None
            rows.append({"batch": int(batch), "compile": compile_, "run": row.run,
                         "decode tok/s": row.decode_tok_s,
                         "ratio to bf16": row.decode_tok_s / base_tok if base_tok else None,
                         "bytes-read limit": base_bytes / row.weight_read_bytes
                         if base_bytes and row.get("weight_read_bytes") else None,
                         "torchao tok/s": ref,
                         "torchao ratio": ref / PUBLISHED_TOK_S["none"] if ref else None,
                         "prefill tok/s": row.prefill_tok_s, "latency_ms": row.latency_ms,
                         "drift_kl": row.get("drift_kl"), "size_ratio": row.size_ratio})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db")
    parser.add_argument("experiment")
    parser.add_argument("out")
    parser.add_argument("--log", help="the sweep's console log: its summary lines are quoted")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    frame = load_runs(f"sqlite:///{Path(args.db).resolve()}", args.experiment)
    frame = frame[frame.kind.isin(["grid", "baseline"])].copy()
    frame["batch_size"] = frame["batch_size"].astype(int)
    ok = frame[frame.status == "ok"].sort_values("start_time", ascending=False).drop_duplicates(["run", "batch_size"])
    device = ok.device_name.iloc[0] if len(ok) else "unknown device"
    first = ok.iloc[0] if len(ok) else {}
    lines = [f"# {args.experiment}: {device}", "",
             f"- written {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC} from `{Path(args.db).name}`; "
             f"torch {first.get('torch')}, torchao {first.get('torchao')}",
             "- decode tok/s: batch x bench.decode_tokens greedy tokens (StaticCache) / median time of the whole loop, replayed "
             "as one CUDA graph; torchao's figures are its README's Llama-3.1-8B H100 table (batch 1, compiled)",
             "- bytes-read limit: bf16 weight_read_bytes / the point's (weights a decode step reads, embeddings "
             "excluded): the ratio to bf16 a weight-bound step would reach at bf16's bandwidth efficiency", ""]
    if args.note:
        lines += [args.note, ""]
    if len(ok):
        lines += ["## Decode against torchao's published H100 figures", "",
                  decode_table(ok).to_markdown(index=False, floatfmt=".3g"), ""]
        times = ok[["run", "batch_size", "compile", *[c for c in STAGE_COLUMNS if c in ok]]].copy()
        times["accounted"] = times[[c for c in STAGE_COLUMNS[:-1] if c in times]].sum(axis=1) / times.time_total_s
        lines += ["## Where each trial's time went (s)", "", times.to_markdown(index=False, floatfmt=".3g"), "",
                  "Totals over these trials: " + ", ".join(f"{c[5:-2]} {ok[c].sum():.0f} s" for c in STAGE_COLUMNS
                                                           if c in ok), ""]
    other = frame[frame.status != "ok"].sort_values("start_time", ascending=False).drop_duplicates(["run", "batch_size"])
    if len(other):
        lines += ["## Not measured (recorded with the reason)", "",
                  other[["run", "batch_size", "status", "reason"]].to_markdown(index=False), ""]
    if args.log and Path(args.log).exists():
        summary = [line for line in Path(args.log).read_text().splitlines()
                   if line.startswith(("time by stage", "qsweep:", "===")) or " points: " in line]
        lines += ["## Console summary", "", "```", *summary, "```", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
