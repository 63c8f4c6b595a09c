"""Test-only model builders that fail inside a trial, to prove failures are recorded, not fatal."""

import math
import os
import sys
import time

import torch
from torch import nn

from qsweep.models import ModelBundle, toy_linear


def _quantized(model: nn.Module) -> bool:
    return type(model.inner.linear1.weight.data) is not torch.Tensor


class _Fragile(nn.Module):
    """The toy model; once linear1 is quantized it fails in the way `how` names:
    raise | exit (os._exit(3)) | stderr_exit (a line on stderr, then os._exit(3)) | abort (SIGABRT) |
    hang | import_error (a kernel package missing at run time) | nan_outputs | inf_outputs (one
    output column). `nan_baseline` returns NaN quantized or not. (Not `nan`: YAML reads that as a float.)"""

    def __init__(self, inner: nn.Module, how: str):
        super().__init__()
        self.inner, self.how = inner, how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.how == "nan_baseline":
            return out * math.nan
        if not _quantized(self):
            return out
        if self.how == "raise":
            raise RuntimeError("kernel exploded on purpose")
        if self.how == "exit":
            os._exit(3)  # a hard crash: no Python exception, the process is gone
        if self.how == "stderr_exit":
            print("fragile: the kernel said goodbye", file=sys.stderr, flush=True)
            os._exit(3)
        if self.how == "abort":
            os.abort()
        if self.how == "hang":
            time.sleep(600)
        if self.how == "import_error":
            raise ImportError("No module named 'fbgemm_gpu' (on purpose)")
        if self.how == "nan_outputs":
            return out * math.nan
        if self.how == "inf_outputs":
            out = out.clone()
            out[:, 0] = math.inf
        return out


def fragile_toy(how: str = "raise", in_features: int = 64, hidden: int = 64, out_features: int = 64) -> ModelBundle:
    bundle = toy_linear(in_features, hidden, out_features)
    bundle.model = _Fragile(bundle.model, how)
    if how == "nan_task":  # outputs fine, the task metric NaN once quantized
        bundle.evaluate = lambda model, device, dtype: {"task_metric": math.nan if _quantized(model) else 0.9}
    return bundle


class _OddShapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 100)
        self.fc2 = nn.Linear(100, 36)
        self.fc3 = nn.Linear(36, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def odd_shapes() -> ModelBundle:
    """Three Linear layers with in_features 64, 100, 36: group size 64 divides only the first."""

    def make(batch_size: int, seed: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch_size, 64, generator=torch.Generator().manual_seed(seed)),)

    return ModelBundle(_OddShapes(), make)
