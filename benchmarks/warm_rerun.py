"""A grid's first run against its warm rerun (`force=true`, same machine, compile cache kept), from the two
sweeps' stage_times.jsonl: seconds per stage, compile split into the compiled points' and the eager points'
(compile=none: first calls and CUDA-graph captures, which no cache shortens) and by timed path, and the
warm/cold ratio of each.

    python benchmarks/warm_rerun.py COLD_STAGE_TIMES WARM_STAGE_TIMES [OUT.md]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qsweep.measure import STAGES

ROWS = [*(f"time_{s}_s" for s in STAGES), "time_total_s", "compile_dynamo_trace_s", "compile_backend_s",
        "compile_forward_s", "compile_prefill_s", "compile_decode_s"]


def totals(path: str) -> dict[str, dict[str, float]]:
    """{"all" | "compiled" | "eager": {key: seconds summed over the trials}}, and each group's trial count."""
    trials = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    groups = {"all": trials, "compiled": [t for t in trials if t.get("compile_frames")],
              "eager": [t for t in trials if not t.get("compile_frames")]}
    return {name: {"trials": len(rows), **{key: sum(t.get(key, 0.0) for t in rows) for key in ROWS}}
            for name, rows in groups.items()}


def table(cold: dict, warm: dict) -> str:
    lines = ["| seconds | cold: all | warm: all | warm/cold | cold: compiled | warm: compiled | warm/cold "
             "| cold: eager | warm: eager |", "|:--|" + "--:|" * 8]
    for key in ["trials", *ROWS]:
        cells = []
        for group in ("all", "compiled", "eager"):
            c, w = cold[group][key], warm[group][key]
            cells += [f"{c:.0f}", f"{w:.0f}"] + ([f"{w / c:.0%}" if c else "-"] if group != "eager" else [])
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    text = table(totals(sys.argv[1]), totals(sys.argv[2]))
    if len(sys.argv) > 3:
        Path(sys.argv[3]).write_text(text + "\n")
    print(text)
