"""Drift of a quantized model's outputs against the baseline's outputs on the same inputs."""

from __future__ import annotations

import math

import torch

from qsweep.metrics import describe_non_finite, non_finite


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
