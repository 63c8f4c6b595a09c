"""CPU deployment flows outside quantize_: PT2E with the X86 Inductor quantizer, and torch.ao eager dynamic
quantization.

pt2e: torch.export (batch dimension dynamic) -> prepare_pt2e with torchao's X86InductorQuantizer on the
candidate layers -> calibrate on `calib.batches` batches -> convert_pt2e -> torch.compile with inductor's
freezing (which lowers the quantize/dequantize pattern to oneDNN int8 kernels). The scheme's `config` holds
the quantizer's settings as data: `is_dynamic` (dynamic activation scales: no calibration needed),
`reduce_range` (7-bit activations for CPUs without VNNI). Drift is measured on the compiled model, which is
what gets deployed; compiling is timed as `flow_compile_s`.

eager_dynamic: `torch.ao.quantization.quantize_dynamic` (int8 weights, activation scales per batch,
fbgemm/oneDNN kernels), which torch deprecates: where the installed torch has it no more, `unsupported`.
Both are CPU flows: on a GPU they are `unsupported`.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from qsweep.config import CalibConf
from qsweep.flows.base import (
    FlowResult,
    FlowSettings,
    Replaced,
    calibration_inputs,
    knobs,
    run_batches,
    uniform_targets,
)
from qsweep.models import ModelBundle
from qsweep.schemes import build

QUANTIZER_KEYS = ("is_dynamic", "reduce_range")


def run_pt2e(model: nn.Module, bundle: ModelBundle, quant: dict, candidates: dict[str, nn.Linear], flow: dict,
             settings: FlowSettings) -> FlowResult:
    """Export, quantize with the X86 Inductor quantizer, calibrate, convert, compile.

    Metrics: calib_batches, calib_s (s; export, prepare, calibrate and convert), flow_compile_s (s).
    """
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    _cpu_only("PT2E with the X86 Inductor quantizer (oneDNN int8 kernels)", settings)
    conf: CalibConf = knobs(flow, "calib", CalibConf)
    options = build(quant)
    unknown = set(options) - set(QUANTIZER_KEYS)
    if unknown:
        raise NotImplementedError(f"pt2e quantizer settings {sorted(unknown)} are unknown; valid: {', '.join(QUANTIZER_KEYS)}")
    _, skipped = uniform_targets(quant, candidates, "pt2e")
    chosen = [name for name in candidates if name not in skipped]
    quantizer = x86.X86InductorQuantizer()
    qconfig = x86.get_default_x86_inductor_quantization_config(**options)
    for name in chosen:
        quantizer.set_module_name_qconfig(name, qconfig)
    batches = calibration_inputs(bundle, conf.batches, conf.batch_size, settings)

    start = time.perf_counter()
    batch = torch.export.Dim.AUTO  # any batch size: eval, timing and calibration batches differ
    shapes = tuple({0: batch} for _ in batches[0])
    graph = torch.export.export(model, batches[0], dynamic_shapes=shapes).module()
    prepared = prepare_pt2e(graph, quantizer)
    run_batches(prepared, batches)
    converted = convert_pt2e(prepared)
    _drop_unused(converted)
    calib_s = time.perf_counter() - start

    start = time.perf_counter()
    # freezing: inductor folds the int8 weights and lowers q/dq + linear to oneDNN int8 kernels. One dynamic
    # compile, in this config, so that no later batch size recompiles without it.
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        compiled = torch.compile(converted, dynamic=True)
        compiled(*batches[0])
    flow_compile_s = time.perf_counter() - start
    quantized = quantized_linears(converted)
    layers = {name: Replaced("int8 linear in the PT2E graph") if name in quantized else candidates[name]
              for name in candidates}
    return FlowResult(compiled, skipped, {"calib_batches": conf.batches, "calib_s": calib_s,
                                          "flow_compile_s": flow_compile_s}, layers)


def quantized_linears(graph: torch.fx.GraphModule) -> set[str]:
    """Names of the modules whose linear op takes a dequantized (int8) weight in a converted PT2E graph."""
    found = set()
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        weight = node.args[1]
        if isinstance(weight, torch.fx.Node) and "dequantize" in str(weight.target):
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                found.add(list(stack.values())[-1][0])
    return found


def _drop_unused(graph: torch.fx.GraphModule) -> None:
    """Delete the float weights convert_pt2e leaves behind once their int8 copies (`_frozen_param*`) replace
    them in the graph: kept, they would count in the model's size and memory."""
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name in [n for n, _ in [*graph.named_parameters(), *graph.named_buffers()] if n not in used]:
        owner, _, leaf = name.rpartition(".")
        module = graph.get_submodule(owner) if owner else graph
        module._parameters.pop(leaf, None)
        module._buffers.pop(leaf, None)


def run_eager_dynamic(model: nn.Module, bundle: ModelBundle, quant: dict, candidates: dict[str, nn.Linear],
                      flow: dict, settings: FlowSettings) -> FlowResult:
    """torch.ao.quantization.quantize_dynamic on the candidates; the scheme's config gives `dtype`
    (torch.qint8, or torch.float16 weights)."""
    _cpu_only("torch.ao eager dynamic quantization (fbgemm/oneDNN kernels)", settings)
    try:
        from torch.ao.quantization import default_dynamic_qconfig, float16_dynamic_qconfig, quantize_dynamic
    except ImportError as err:
        raise ImportError(f"torch {torch.__version__} has no torch.ao.quantization.quantize_dynamic "
                          f"(removed after its deprecation): {err}") from None
    if settings.dtype != torch.float32:
        raise NotImplementedError(f"torch.ao dynamic quantization takes float32 models, not {settings.dtype}")
    dtype = build(quant).get("dtype", torch.qint8)
    qconfig = float16_dynamic_qconfig if dtype == torch.float16 else default_dynamic_qconfig
    _, skipped = uniform_targets(quant, candidates, "eager_dynamic")
    spec = {name: qconfig for name in candidates if name not in skipped}
    quantize_dynamic(model, spec, dtype=dtype, inplace=True)
    layers = {name: _replaced_or(model, name, layer) for name, layer in candidates.items()}
    return FlowResult(model, skipped, {}, layers)


def _replaced_or(model: nn.Module, name: str, layer: nn.Linear) -> nn.Module:
    now = model.get_submodule(name)
    return layer if now is layer else Replaced(type(now).__name__)


def _cpu_only(what: str, settings: FlowSettings) -> None:
    if settings.device != "cpu":
        raise NotImplementedError(f"{what} is a CPU deployment path; running on {settings.device}")
