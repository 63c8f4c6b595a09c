"""Drift of a quantized model's outputs against the baseline's outputs on the same inputs: the eval
outputs, the baseline's reference file, and the drift and task metrics computed from them."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from qsweep.measure import to_device
from qsweep.metrics import describe_non_finite, non_finite

if TYPE_CHECKING:
    from qsweep.models import ModelBundle


class NonFiniteError(ValueError):
    """NaN/Inf outputs or metrics: the measurement means nothing, so the point is failed, never ranked.
    The message is the whole reason, e.g. `non-finite outputs: 100% NaN`."""


def non_finite_outputs(outputs: torch.Tensor) -> str | None:
    """How much of `outputs` is NaN or Inf (`100% NaN`, `0.2% NaN, 1.5% Inf`), or None if all finite."""
    if not outputs.is_floating_point() or outputs.numel() == 0:
        return None
    t = outputs.detach()
    parts = []
    for label, count in (("NaN", torch.isnan(t).sum().item()), ("Inf", torch.isinf(t).sum().item())):
        if count:
            parts.append(f"{100 * count / t.numel():.3g}% {label}")
    return ", ".join(parts) or None


def check_outputs(outputs: torch.Tensor) -> None:
    """Raise NonFiniteError if any output is NaN or Inf."""
    bad = non_finite_outputs(outputs)
    if bad:
        raise NonFiniteError(f"non-finite outputs: {bad}")


def check_metrics(metrics: dict[str, float]) -> None:
    """Raise NonFiniteError if a metric is NaN, or infinite where the schema gives that no meaning."""
    bad = non_finite(metrics)
    if bad:
        raise NonFiniteError(f"non-finite metric: {describe_non_finite(bad)}")


def output_drift(reference: torch.Tensor, output: torch.Tensor) -> dict[str, float]:
    """SQNR (dB, higher is better), max abs error, and mean per-sample cosine similarity.

    Both tensors are [samples, ...]; computed in float64 so bf16 noise is not amplified by the metric.
    """
    ref = reference.detach().double().flatten(1)
    out = output.detach().double().flatten(1)
    noise = (ref - out).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf
    cosine = torch.nn.functional.cosine_similarity(ref, out, dim=1).mean().item()
    return {"drift_sqnr_db": sqnr, "drift_max_abs": (ref - out).abs().max().item(), "drift_cosine": cosine}


def logits_drift(reference: torch.Tensor, output: torch.Tensor) -> dict[str, float]:
    """For classifiers and LMs (last dim = classes/vocab): mean KL(baseline || trial) and top-1 agreement."""
    ref = reference.detach().float().flatten(0, -2)
    out = output.detach().float().flatten(0, -2)
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    agree = (ref.argmax(-1) == out.argmax(-1)).double().mean()
    return {"drift_kl": kl.item(), "top1_agreement": agree.item()}


def accuracy_drop(baseline: float, trial: float, higher_is_better: bool) -> float:
    """Task cost as one number where larger is worse: accuracy points lost, or relative increase
    of a lower-is-better metric such as perplexity."""
    if higher_is_better:
        return baseline - trial
    return (trial - baseline) / baseline


def eval_outputs(model: nn.Module, bundle: ModelBundle, inputs: tuple[torch.Tensor, ...], device: str,
                 dtype: torch.dtype, batch_size: int) -> torch.Tensor:
    """The outputs drift is measured on, float32 on the CPU (LMs: logits at a few positions, see
    ModelBundle.drift_outputs)."""
    outs = []
    with torch.inference_mode():
        for start in range(0, inputs[0].shape[0], batch_size):
            chunk = tuple(to_device(t[start:start + batch_size], device, dtype) for t in inputs)
            out = bundle.drift_outputs(model, chunk) if bundle.drift_outputs else model(*chunk)
            outs.append((out.logits if hasattr(out, "logits") else out).float().cpu())
    return torch.cat(outs)


def drift_metrics(reference: dict, outputs: torch.Tensor, task: dict[str, float],
                  bundle: ModelBundle) -> dict[str, float]:
    """Output drift and task-metric change against a baseline reference {"outputs", "task"}."""
    metrics = output_drift(reference["outputs"], outputs)
    if bundle.logits:
        metrics.update(logits_drift(reference["outputs"], outputs))
    if "task_metric" in task and "task_metric" in reference["task"]:
        base, value = reference["task"]["task_metric"], task["task_metric"]
        metrics.update(task, task_metric_delta=value - base,
                       accuracy_drop=accuracy_drop(base, value, bundle.task_higher_is_better))
        if base:  # no relative change from zero; a NaN here would fail the point for nothing
            metrics["task_metric_delta_rel"] = (value - base) / base
    return metrics


def accuracy_metrics(model: nn.Module, bundle: ModelBundle, *, device: str, dtype: torch.dtype, samples: int,
                     batch_size: int, seed: int, reference_path: str | Path, is_baseline: bool) -> dict[str, float]:
    """Drift and task metrics of `model` on `samples` eval inputs (seed + 1) against the baseline reference
    at `reference_path`. A baseline (`is_baseline`) writes that reference instead and returns its task metric.

    Measured on the eager model: drift belongs to the quantization, not to compile. NaN/Inf outputs or task
    metric raise NonFiniteError, before a baseline writes them as a reference.
    """
    inputs = bundle.make_inputs(samples, seed + 1)
    outputs = eval_outputs(model, bundle, inputs, device, dtype, batch_size)
    check_outputs(outputs)
    task = bundle.evaluate(model, device, dtype) if bundle.evaluate else {}
    check_metrics(task)
    if is_baseline:
        # Atomic: a concurrent sweep (force=true) may read the reference while this one rewrites it.
        partial = Path(f"{reference_path}.{os.getpid()}.tmp")
        torch.save({"outputs": outputs, "task": task}, partial)
        os.replace(partial, reference_path)
        return dict(task)
    reference = torch.load(reference_path, weights_only=True)
    try:  # a reference written before NaN baselines were failed: blame the baseline, not this trial
        check_outputs(reference["outputs"])
    except NonFiniteError as err:
        raise NonFiniteError(f"baseline reference {reference_path}: {err}") from None
    return drift_metrics(reference, outputs, task, bundle)
