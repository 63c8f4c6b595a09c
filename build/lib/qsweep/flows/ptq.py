"""ptq: one-shot torchao `quantize_`, qsweep's behaviour before flows existed (schemes.quantize)."""

from __future__ import annotations

from torch import nn

from qsweep.flows.base import FlowResult, FlowSettings
from qsweep.models import ModelBundle
from qsweep.schemes import quantize


def run(model: nn.Module, bundle: ModelBundle, quant: dict, candidates: dict[str, nn.Linear], flow: dict,
        settings: FlowSettings) -> FlowResult:
    """quantize_ the candidates in place; per-layer recipes (FqnToConfig) name their own layers."""
    return FlowResult(model, quantize(model, quant, candidates))
