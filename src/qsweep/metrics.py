"""The one metric schema: names, units and direction, used by the runner, MLflow, reports and selection."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    higher_is_better: bool | None  # None: informational, no better direction
    doc: str
    # NaN is never a valid value; +inf is only where it has a meaning (SQNR of identical outputs).
    allows_inf: bool = False
    # A selection objective (`select.objective=<name>`) and a dimension of the Pareto front.
    objective: bool = False
    # A drift measure that selection (`select.drift_metric`) and, if lower is better, the search budget.
    drift: bool = False
    # The value of identical outputs, for a higher-is-better drift metric: its cost is `ideal - value`
    # (None: the cost is `-value`).
    ideal: float | None = None


METRICS: tuple[Metric, ...] = (
    # size
    Metric("size_bytes", "bytes", False, "quantized state_dict saved with torch.save, bytes on disk"),
    Metric("size_ratio", "x", True, "baseline size_bytes / trial size_bytes", objective=True),
    # memory
    Metric("weights_mem_bytes", "bytes", False, "device memory held by the model's parameters and buffers"),
    Metric("peak_mem_bytes", "bytes", False,
           "whole peak during one inference (weights + KV cache + activations): CUDA max_memory_allocated "
           "after a reset, nothing subtracted; CPU: peak RSS of the trial process (sampled every ms)",
           objective=True),
    Metric("activation_peak_bytes", "bytes", False,
           "growth during one inference over what was held before it (activations, KV cache, workspaces): "
           "CUDA max_memory_allocated minus memory_allocated at the start; CPU: peak RSS minus RSS at the start"),
    Metric("peak_mem_reserved_bytes", "bytes", False,
           "CUDA: max_memory_reserved during one inference, whole (absent on CPU)"),
    # speed
    Metric("latency_ms", "ms", False, "median latency of one forward pass over the repeats, after warm-up"),
    Metric("latency_ms_p10", "ms", False, "10th percentile latency"),
    Metric("latency_ms_p90", "ms", False, "90th percentile latency"),
    Metric("latency_cv", "ratio", False, "coefficient of variation (std/mean) of the repeats: the noise figure"),
    Metric("latency_spread", "ratio", False,
           "(max - min) / median of latency_ms over bench.processes independent measurements, each in a fresh "
           "process with its own compile: the run-to-run noise a replay CV does not see"),
    Metric("latency_e2e_ms", "ms", False,
           "median latency of plain calls with a sync, launch overhead included (= latency_ms on CPU)"),
    Metric("throughput", "samples/s", True, "batch_size / latency"),
    Metric("speedup", "x", True, "baseline latency_ms / trial latency_ms, same compile mode and batch",
           objective=True),
    Metric("weight_read_bytes", "bytes", False,
           "bytes of weights one decode step reads (quantized data and scales; embedding tables, which a step "
           "gathers one row of, excluded): baseline / trial is the bytes-read bound of a weight-bound speedup"),
    # where a trial's time goes: the stages sum to time_total_s but for bookkeeping between them
    Metric("time_build_s", "s", False, "model construction (random init on the device or weights loaded) and move"),
    Metric("time_quantize_s", "s", False,
           "torchao quantize_, or the scheme's whole flow: QAT training, calibration (and freeing temporaries)"),
    Metric("time_compile_s", "s", False,
           "all compilation: first calls of every timed path (forward, prefill, decode), CUDA-graph capture, "
           "autotuning; 0 without torch.compile but for eager first calls and graph capture"),
    Metric("time_measure_s", "s", False, "timed repeats, memory peak and size"),
    Metric("time_eval_s", "s", False, "drift against the baseline and the task metric"),
    Metric("time_total_s", "s", False, "the trial from its start (its spec reaching its process) to its result"),
    # per-layer search: predicted by the cost model (per-layer microbenchmarks), not measured end to end
    Metric("predicted_latency_ms", "ms", False,
           "baseline latency_ms minus the per-layer latency saved, from cached single-layer microbenchmarks"),
    Metric("predicted_speedup", "x", True, "baseline latency_ms / predicted_latency_ms"),
    # language models (tokens/s)
    Metric("prefill_tok_s", "tokens/s", True,
           "LM: bench.batch_size x eval.seq_len prompt tokens / median time to fill the KV cache"),
    Metric("decode_tok_s", "tokens/s", True,
           "LM: bench.batch_size x bench.decode_tokens / median time of the greedy decode loop (StaticCache)"),
    # output drift against the baseline on the same inputs
    Metric("drift_sqnr_db", "dB", True,
           "signal-to-quantization-noise ratio of the outputs vs baseline (+inf: identical outputs)", allows_inf=True,
           drift=True),
    Metric("drift_max_abs", "abs", False, "max absolute output difference vs baseline", drift=True),
    Metric("drift_cosine", "ratio", True, "mean cosine similarity of outputs vs baseline (1 = identical)",
           drift=True, ideal=1.0),
    Metric("drift_kl", "nats", False,
           "classifier/LM: mean KL(baseline || trial) of the output distributions (LM: next-token, per position)",
           drift=True),
    Metric("top1_agreement", "ratio", True, "LM/classifier: fraction of positions whose argmax matches baseline",
           drift=True, ideal=1.0),
    # task-level accuracy
    Metric("task_metric", "task", None, "task metric of the quantized model (accuracy, or perplexity for LMs)"),
    Metric("task_metric_delta", "task", None, "task_metric - baseline task_metric"),
    Metric("task_metric_delta_rel", "ratio", None, "(task_metric - baseline) / baseline"),
    Metric("accuracy_drop", "ratio", False,
           "task cost of quantization, >= 0 is worse: accuracy lost (abs) or relative perplexity increase", drift=True),
    # coverage
    Metric("layers_quantized", "count", None, "Linear layers whose weight torchao replaced"),
    Metric("layers_total", "count", None, "Linear layers that were candidates"),
    # flows beyond one-shot quantize_ (qsweep.flows; their time is inside time_quantize_s)
    Metric("train_steps", "count", None, "QAT: optimizer steps between prepare and convert (scheme.qat.steps)"),
    Metric("train_s", "s", False, "QAT: wall time of the fine-tuning steps"),
    Metric("train_loss", "loss", None,
           "QAT: mean training loss of the last 10 steps (cross-entropy in nats; distillation: MSE)"),
    Metric("ptq_accuracy_drop", "ratio", False,
           "QAT: accuracy_drop of its PTQ twin (the same base config, one-shot, untrained): what QAT recovers "
           "is ptq_accuracy_drop - accuracy_drop"),
    Metric("calib_batches", "count", None, "static, pt2e: batches the activation scales were observed on"),
    Metric("calib_s", "s", False, "static, pt2e: wall time of calibration (pt2e: export, prepare, calibrate, convert)"),
    Metric("flow_compile_s", "s", False, "pt2e: torch.compile of the converted graph (lowering to int8 kernels)"),
    Metric("weight_sparsity", "ratio", None, "sparsity: fraction of zero weights in the pruned layers (2:4 = 0.5)"),
)

BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}
STATUSES = ("ok", "failed", "skipped", "unsupported")


def non_finite(values: dict) -> dict[str, float]:
    """The metrics whose value is NaN, or infinite where the schema gives infinity no meaning (a
    measurement that cannot be trusted: the point is failed, never ranked). Names outside the
    schema are checked too."""
    bad = {}
    for name, value in values.items():
        if not isinstance(value, numbers.Real) or math.isfinite(value):
            continue
        metric = BY_NAME.get(name)
        if math.isnan(value) or not (metric and metric.allows_inf and value > 0):
            bad[name] = float(value)
    return bad


def describe_non_finite(bad: dict[str, float]) -> str:
    """`drift_kl=nan, latency_ms=inf`: the offending metrics as a reason."""
    return ", ".join(f"{name}={value}" for name, value in bad.items())


def only_metrics(values: dict) -> dict[str, float]:
    """Keep the schema's metrics with a finite-or-inf numeric value; unknown names are a bug, so raise."""
    unknown = set(values) - set(BY_NAME)
    if unknown:
        raise KeyError(f"metrics outside the schema: {sorted(unknown)}")
    return {k: float(v) for k, v in values.items() if v is not None}
