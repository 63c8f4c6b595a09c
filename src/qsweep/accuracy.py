"""Drift of a quantized model's outputs against the baseline's outputs on the same inputs."""

from __future__ import annotations

import math

import torch


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
