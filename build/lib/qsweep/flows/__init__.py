"""Flows: how a scheme's config gets into the model. One seam for every established way beyond one-shot
`quantize_`, so each sweeps on the same grid, with the same metrics, MLflow schema, select/apply/report.

A scheme YAML names its flow (`flow: qat`; default `ptq`) and the flow's knobs beside it (`qat:`, `calib:`).
A flow is one function, `(model, bundle, quant, candidates, flow, settings) -> FlowResult`, in one module
per family; the runner and `qsweep apply` call it through `run_flow`, and the flow spec (`flow_spec`: the
name and the knobs it reads) travels with the trial, the run's params, its point hash and its recipe, so
apply replays a QAT or static recipe exactly (same steps, batches and seed).

| flow | module | what runs | knobs |
|---|---|---|---|
| ptq | ptq | `quantize_` (qsweep's behaviour before flows) | - |
| qat | qat | QATConfig prepare -> fine-tune -> convert | qat.steps, qat.lr, qat.batch_size, qat.ptq_twin |
| static | static | observe activation scales, then static int8/float8 configs | calib.batches, calib.batch_size |
| sparsity | sparsity | magnitude prune to 2:4 -> `sparsify_` (CUDA) | - |
| pt2e | pt2e | torch.export -> prepare_pt2e (X86 Inductor) -> calibrate -> convert -> compile (CPU) | calib.* |
| eager_dynamic | pt2e | torch.ao quantize_dynamic (CPU) | - |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from qsweep.config import CalibConf, ConfigError, QATConf, SchemeConf, invalid
from qsweep.flows import pt2e, ptq, qat, sparsity, static
from qsweep.flows.base import Flow, FlowResult, FlowSettings, Replaced
from qsweep.models import ModelBundle

__all__ = ["FLOWS", "FlowResult", "FlowSettings", "Replaced", "check_flow", "flow_name", "flow_spec", "run_flow"]


@dataclass(frozen=True)
class FlowEntry:
    run: Flow
    knobs: tuple[str, ...] = ()  # the scheme sections the flow reads (`qat`, `calib`)
    checkpoint: bool = True  # its model saves as a state_dict of the original modules (qsweep apply)


KNOB_TYPES: dict[str, type] = {"qat": QATConf, "calib": CalibConf}
FLOWS: dict[str, FlowEntry] = {
    "ptq": FlowEntry(ptq.run),
    "qat": FlowEntry(qat.run, ("qat",)),
    "static": FlowEntry(static.run, ("calib",)),
    "sparsity": FlowEntry(sparsity.run),
    "pt2e": FlowEntry(pt2e.run_pt2e, ("calib",), checkpoint=False),
    "eager_dynamic": FlowEntry(pt2e.run_eager_dynamic, checkpoint=False),
}
PTQ = "ptq"


def flow_spec(scheme: SchemeConf) -> dict[str, Any] | None:
    """The flow of a scheme as plain data, `{"name": "qat", "qat": {...}}` with only the knobs the flow
    reads; None for ptq, so a PTQ point's hash, params and recipe are what they were before flows."""
    if scheme.flow == PTQ or scheme.config is None:
        return None
    entry = _entry(scheme.flow)
    spec: dict[str, Any] = {"name": scheme.flow}
    for section in entry.knobs:
        value = getattr(scheme, section, None)
        spec[section] = asdict(value if value is not None else KNOB_TYPES[section]())
    return spec


def flow_name(flow: dict | None) -> str:
    """The name of a flow spec (ptq for None)."""
    return PTQ if not flow else str(flow.get("name"))


def check_flow(flow: Any) -> None:
    """Raise ConfigError unless `flow` is a flow spec this qsweep can run (a recipe's flow is data from a
    file): a known name and known knobs of the right kind."""
    if flow is None:
        return
    if not isinstance(flow, dict):
        raise ConfigError(f"flow must be a mapping like {{name: qat, qat: {{steps: 100}}}}, not {flow!r}")
    entry = _entry(flow.get("name"))
    extra = set(flow) - {"name", *entry.knobs}
    if extra:
        raise ConfigError(f"flow {flow['name']}: unknown keys {sorted(extra)}; valid: name, {', '.join(entry.knobs)}")
    for section in entry.knobs:
        _knob_section(flow, section)


def run_flow(flow: dict | None, model: nn.Module, bundle: ModelBundle, quant: dict,
             candidates: dict[str, nn.Linear], settings: FlowSettings) -> FlowResult:
    """Apply a torchao config spec to `model` (on its device) through its flow; None is ptq.

    Returns the flow's result with `layers` filled: what stands now at each candidate's name, for the
    count of quantized layers (QAT and static float8 replace the Linear modules they convert).

    Raises:
        ConfigError: an unknown flow or knob. NotImplementedError/ImportError: this hardware or torch cannot
            run the flow (the runner records `unsupported` with the reason).
    """
    check_flow(flow)
    entry = FLOWS[flow_name(flow)]
    result = entry.run(model, bundle, quant, candidates, flow or {"name": PTQ}, settings)
    if result.layers is None:
        result.layers = {name: _module_at(result.model, name, layer) for name, layer in candidates.items()}
    return result


def _module_at(model: nn.Module, name: str, old: nn.Module) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return old


def _entry(name: Any) -> FlowEntry:
    if name not in FLOWS:
        raise ConfigError(invalid("flow", name, list(FLOWS)))
    return FLOWS[name]


def _knob_section(flow: dict, section: str) -> Any:
    from qsweep.flows.base import knobs

    return knobs(flow, section, KNOB_TYPES[section])
