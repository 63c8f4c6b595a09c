"""static: activation scales observed over `calib.batches` batches, then fixed in the quantized model.

- Int8StaticActivationInt8WeightConfig takes the activation scale as a tensor: one per layer, so each
  candidate gets its own config with the scale its input observer saw (per-tensor, symmetric, torchao's
  AffineQuantizedMinMaxObserver).
- Float8StaticActivationFloat8WeightConfig has torchao's own observer flow (step=prepare, calibrate,
  step=convert). On CUDA it needs SM >= 8.9 (torch._scaled_mm with tensor-wise float8 scales); on the CPU
  torch 2.13 runs it through its reference _scaled_mm, which shows the accuracy, not a deployment speed.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from qsweep.config import CalibConf
from qsweep.flows.base import (
    FlowResult,
    FlowSettings,
    calibration_inputs,
    knobs,
    run_batches,
    uniform_targets,
)
from qsweep.measure import sync
from qsweep.models import ModelBundle
from qsweep.schemes import build

FLOAT8 = "Float8StaticActivationFloat8WeightConfig"
INT8 = "Int8StaticActivationInt8WeightConfig"


def run(model: nn.Module, bundle: ModelBundle, quant: dict, candidates: dict[str, nn.Linear], flow: dict,
        settings: FlowSettings) -> FlowResult:
    """Observe, calibrate, quantize with fixed activation scales. Metrics: calib_batches, calib_s (s)."""
    conf: CalibConf = knobs(flow, "calib", CalibConf)
    targets, skipped = uniform_targets(quant, candidates, "static")
    batches = calibration_inputs(bundle, conf.batches, conf.batch_size, settings)
    kind = str(quant["_target_"]).rpartition(".")[2]
    start = time.perf_counter()
    if kind == FLOAT8:
        _float8(model, quant, targets, batches)
    elif kind == INT8:
        _int8(model, quant, candidates, skipped, batches)
    else:
        raise NotImplementedError(f"flow static takes {INT8} or {FLOAT8}, not {kind}")
    sync(settings.device)
    return FlowResult(model, skipped, {"calib_batches": conf.batches, "calib_s": time.perf_counter() - start})


def _float8(model: nn.Module, quant: dict, targets, batches: list) -> None:
    from torchao.quantization import quantize_

    spec = {k: v for k, v in quant.items() if k != "step"}
    quantize_(model, build({**spec, "step": "prepare"}), filter_fn=targets)
    run_batches(model, batches)
    # convert touches only the observed Linear modules prepare made
    quantize_(model, build({**spec, "step": "convert"}), filter_fn=None)


def _int8(model: nn.Module, quant: dict, candidates: dict[str, nn.Linear], skipped: dict[str, str],
          batches: list) -> None:
    from torchao.quantization import MappingType, PerTensor, quantize_
    from torchao.quantization.observer import AffineQuantizedMinMaxObserver

    chosen = {name: m for name, m in candidates.items() if name not in skipped}
    observers, hooks = {}, []
    for name, layer in chosen.items():
        # keepdim: the scale's rank must match the activation's (Int8Tensor checks scale.ndim == x.ndim)
        observer = AffineQuantizedMinMaxObserver(
            mapping_type=MappingType.SYMMETRIC, target_dtype=torch.int8, granularity=PerTensor(),
            eps=torch.finfo(torch.float32).eps, scale_dtype=torch.float32, zero_point_dtype=torch.int32,
            keepdim=True)
        observers[name] = observer
        hooks.append(layer.register_forward_pre_hook(lambda _m, args, obs=observer: obs(args[0].detach())))
    try:
        run_batches(model, batches)
    finally:
        for hook in hooks:
            hook.remove()
    config = build(quant)
    if config.act_mapping_type != MappingType.SYMMETRIC:  # the observers above are symmetric
        raise NotImplementedError(f"flow static observes symmetric int8 activation scales; "
                                  f"act_mapping_type={config.act_mapping_type.name} is not supported")
    for name, layer in chosen.items():
        scale, _ = observers[name].calculate_qparams()
        config.act_quant_scale = scale.to(layer.weight.device)  # each layer its own scale
        quantize_(model, config, filter_fn=lambda module, fqn, layer=layer: module is layer)
