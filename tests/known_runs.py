"""A known set of runs in a real MLflow store, recorded through qsweep's Tracker with realistic values
(an H100-like grid plus one per-layer search), so selection results can be asserted exactly. Their specs
are in the artifact an older qsweep wrote (quant_spec.json): older stores must stay readable."""

from __future__ import annotations

import json

import pandas as pd

from qsweep.recipe import LEGACY_QUANT_FILE
from qsweep.tracking import Tracker

BASE_TASK = 0.5  # baseline accuracy: makes relative and absolute drift limits pick different runs
INT8WO = {"_target_": "torchao.quantization.Int8WeightOnlyConfig", "granularity": {"_target_": "torchao.quantization.PerRow"}}
PER_LAYER = {"_target_": "torchao.quantization.FqnToConfig",
             "fqn_to_config": {"0": INT8WO, "2": {"_target_": "torchao.quantization.IntxWeightOnlyConfig",
                                                  "weight_dtype": "torch.int4",
                                                  "granularity": {"_target_": "torchao.quantization.PerGroup",
                                                                  "group_size": 32}},
                               "4": None}}
# name -> (scheme, granularity, speedup, size_ratio, peak_mem_bytes, accuracy_drop)
GRID = {
    "int8wo-per_row-max-autotune": ("int8wo", "per_row", 1.8, 1.9, 100e6, 0.002),
    "int4wo-g128-max-autotune": ("int4wo", "per_group", 2.6, 3.5, 60e6, 0.015),
    "float8dq-per_row-max-autotune": ("float8dq", "per_row", 2.2, 1.9, 90e6, 0.004),
    "intxwo_2-g32-max-autotune": ("intxwo_2", "per_group", 1.2, 6.0, 50e6, 0.09),
    "int8dq-per_row-max-autotune": ("int8dq", "per_row", 1.5, 1.8, 110e6, 0.005),  # dominated by float8dq
}
SEARCH_TRIAL = ("trial-3", 2.4, 2.8, 70e6, 0.008)
SENSITIVITY = pd.DataFrame({"int8wo": [0.001, 0.0005, 0.002], "intxwo_4": [0.006, 0.003, 0.02]},
                           index=["0", "2", "4"])


def params(scheme: str, granularity: str, device: str = "cuda") -> dict:
    return {"model": "digits_mlp", "scheme": scheme, "granularity": granularity, "group_size": 128,
            "compile": "max-autotune", "dtype": "bfloat16", "device": device, "device_name": "NVIDIA H100 80GB HBM3",
            "torch": "2.11.0+cu130", "torchao": "0.18.0"}


def metrics(speedup: float, size_ratio: float, peak: float, drop: float) -> dict:
    return {"speedup": speedup, "size_ratio": size_ratio, "size_bytes": 1.2e6 / size_ratio, "peak_mem_bytes": peak,
            "latency_ms": 1.0 / speedup, "accuracy_drop": drop, "task_metric": BASE_TASK - drop,
            "task_metric_delta": -drop, "drift_cosine": 1 - drop / 10, "drift_sqnr_db": 40 - 100 * drop}


def record_known_runs(uri: str, experiment: str) -> dict[str, str]:
    """Record the known set; returns run name -> run id."""
    tracker = Tracker(uri, experiment)
    ids = {"none-max-autotune": tracker.record(
        "none-max-autotune", "ok", "", params("none", "per_row"), metrics(1.0, 1.0, 120e6, 0.0),
        {"qsweep.role": "baseline", "model": "digits_mlp"})}
    for name, (scheme, gran, speedup, size, peak, drop) in GRID.items():
        ids[name] = tracker.record(name, "ok", "", params(scheme, gran), metrics(speedup, size, peak, drop),
                                   {"model": "digits_mlp"}, {LEGACY_QUANT_FILE: json.dumps(INT8WO)})
    ids["int4wo-g32-max-autotune"] = tracker.record(  # failed runs are never candidates, whatever they logged
        "int4wo-g32-max-autotune", "failed", "CUDA out of memory", params("int4wo", "per_group"),
        metrics(5.0, 8.0, 1e6, 0.0), {"model": "digits_mlp"})
    parent = tracker.record("search-digits_mlp", "ok", "", params("search", "per_layer"), {}, {"model": "digits_mlp"},
                            {"sensitivity.csv": SENSITIVITY.to_csv()})
    name, speedup, size, peak, drop = SEARCH_TRIAL
    ids[name] = tracker.record(name, "ok", "", {"trial": 3}, metrics(speedup, size, peak, drop),
                               {"model": "digits_mlp"}, {LEGACY_QUANT_FILE: json.dumps(PER_LAYER)}, parent_run_id=parent)
    ids["search-digits_mlp"] = parent
    return ids
