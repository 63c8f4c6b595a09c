"""Test-only model builders that fail inside a trial, to prove failures are recorded, not fatal."""

import os

import torch
from torch import nn

from qsweep.models import ModelBundle, toy_linear


class _Fragile(nn.Module):
    def __init__(self, inner: nn.Module, how: str):
        super().__init__()
        self.inner, self.how = inner, how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantized = type(self.inner.linear1.weight.data) is not torch.Tensor
        if quantized and self.how == "raise":
            raise RuntimeError("kernel exploded on purpose")
        if quantized and self.how == "exit":
            os._exit(3)  # a hard crash: no Python exception, the process is gone
        return self.inner(x)


def fragile_toy(how: str = "raise", in_features: int = 64, hidden: int = 64, out_features: int = 64) -> ModelBundle:
    bundle = toy_linear(in_features, hidden, out_features)
    bundle.model = _Fragile(bundle.model, how)
    return bundle
