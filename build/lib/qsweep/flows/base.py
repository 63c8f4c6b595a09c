"""What every flow shares: the settings it gets, what it returns, the layers a uniform scheme takes, and
the data it calibrates or trains on.

A flow must not import torchao at module level: the runner (and so this package) is preloaded in the
trial fork server, which must not hold a CUDA context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from qsweep.config import ConfigError
from qsweep.measure import to_device
from qsweep.models import ModelBundle
from qsweep.schemes import group_size_of, is_per_layer


@dataclass(frozen=True)
class FlowSettings:
    """The trial's settings a flow needs: where and in which dtype the model runs, and the seed that fixes
    its training order and calibration batches (a recipe replays them with the same seed)."""

    device: str
    dtype: torch.dtype
    seed: int = 0


@dataclass
class FlowResult:
    """A flow's output.

    Attributes:
        model: the quantized model (the same object, or a new one: an exported graph).
        skipped: candidate layers left alone on purpose, name -> why.
        metrics: the flow's own metrics (names from qsweep.metrics: train_s, calib_batches, ...).
        layers: candidate name -> what stands at that name now, for counting what was quantized; None: the
            modules at the candidates' names in `model` (QAT and static float8 swap the Linear modules).
    """

    model: nn.Module
    skipped: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    layers: dict[str, nn.Module] | None = None


Flow = Callable[[nn.Module, ModelBundle, dict, dict[str, nn.Linear], dict, FlowSettings], FlowResult]


class Replaced(nn.Module):
    """Stands, in the runner's count of quantized layers, for a candidate Linear that a flow turned into
    something other than a Linear with a torchao weight: a torch.ao quantized module, or quantized ops in
    an exported graph. `schemes.is_quantized` reads its `qsweep_replaced` mark."""

    qsweep_replaced = True

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def extra_repr(self) -> str:
        return self.what


def uniform_targets(quant: dict, candidates: dict[str, nn.Linear], flow: str
                    ) -> tuple[Callable[[nn.Module, str], bool], dict[str, str]]:
    """The filter_fn of a uniform scheme over the candidates, and the candidates it leaves alone (in_features
    not divisible by the group size), as schemes.quantize does. Flows other than ptq take uniform schemes only."""
    if is_per_layer(quant):
        raise ConfigError(f"flow {flow} applies one scheme to every layer; a per-layer recipe (FqnToConfig) "
                          "is applied with flow ptq")
    group = group_size_of(quant)
    skipped = {name: f"in_features {m.in_features} not divisible by group_size {group}"
               for name, m in candidates.items() if group and m.in_features % group}
    chosen = {id(m) for name, m in candidates.items() if name not in skipped}
    return (lambda module, fqn: id(module) in chosen), skipped


def calibration_inputs(bundle: ModelBundle, batches: int, batch_size: int, settings: FlowSettings
                       ) -> list[tuple[torch.Tensor, ...]]:
    """Inputs to observe activations on, on the trial's device: the bundle's training data when it has some
    (never its eval split), else fresh `make_inputs` draws at seeds the eval (seed + 1) and timing (seed)
    do not use."""
    if bundle.train_batches is not None:
        stream = bundle.train_batches(batch_size, settings.seed + 2)
        raw = [next(stream)[0] for _ in range(batches)]
    else:
        raw = [bundle.make_inputs(batch_size, settings.seed + 1000 + i) for i in range(batches)]
    return [tuple(to_device(t, settings.device, settings.dtype) for t in inputs) for inputs in raw]


def run_batches(model: nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> None:
    """Forward every batch without gradients (calibration)."""
    with torch.no_grad():
        for inputs in batches:
            model(*inputs)


def knobs(flow: dict, section: str, kind: type) -> object:
    """A flow spec's knob section as its schema dataclass (defaults filled, values checked): a recipe's flow
    is data from a file, checked like the composed config."""
    values = flow.get(section) or {}
    try:
        return kind(**values)
    except TypeError as err:
        valid = ", ".join(kind.__dataclass_fields__)
        raise ConfigError(f"flow {flow.get('name')}: bad {section} keys {sorted(values)}; valid: {valid}") from err
