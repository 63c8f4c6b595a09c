"""Scheme config -> torchao config object, grid-point normalisation, hardware capability checks, and
quantizing a model's Linear layers with it.

A scheme's torchao config travels as a plain dict (`{"_target_": "torchao.quantization.X", ...}`):
it is hashed to find duplicate grid points, sent to the trial's child process, and written into
recipe files. `build` is the only place that turns such a dict into objects, and it only builds
classes from torchao's quantization namespace (a recipe is data, never code to run). An enum field of a
torchao config is written as its member's name, `mapping_type: MappingType.ASYMMETRIC` (or `ASYMMETRIC`;
a string-valued enum also takes its value, `int4_packing_format: tile_packed_to_4d`).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import importlib.util
import re
import typing
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from qsweep.config import ConfigError, GranularityConf, SchemeConf, first_line

ALLOWED_MODULES = ("torchao.quantization", "torchao.sparsity")  # sparsity: SemiSparseWeightConfig


@dataclass(frozen=True)
class Hardware:
    device: str  # "cpu" | "cuda"
    name: str  # e.g. "NVIDIA H100 80GB HBM3" or the CPU's name
    sm: float | None  # CUDA compute capability, None on CPU

    @staticmethod
    def detect(device: str) -> Hardware:
        if device == "cuda":
            major, minor = torch.cuda.get_device_capability()
            return Hardware("cuda", torch.cuda.get_device_name(), major + minor / 10)
        import platform

        return Hardware("cpu", platform.processor() or platform.machine(), None)


def quant_spec(scheme: SchemeConf, granularity: GranularityConf, group_size: int) -> dict | None:
    """The torchao config of one grid point as a plain dict, or None for the baseline.

    Only the dimensions the scheme uses enter the dict, so points that differ only in an ignored
    dimension (group size under per-row, granularity of float8wo) produce the same dict.
    """
    if scheme.config is None:
        return None
    spec = _plain(scheme.config)
    if scheme.granularity_arg:
        spec[scheme.granularity_arg] = _plain(granularity.spec)
    if scheme.group_size_arg:
        spec[scheme.group_size_arg] = group_size
    return spec


def skip_reason(scheme: SchemeConf, granularity: GranularityConf, group_size: int) -> str | None:
    """Why this grid point is not a valid torchao config (skipped, not run), or None."""
    if scheme.config is None or not scheme.granularities:
        return None
    if granularity.name not in scheme.granularities:
        return (f"{scheme.name} accepts granularity {'|'.join(scheme.granularities)}, "
                f"not {granularity.name}")
    if granularity.name == "per_group" and scheme.group_sizes and group_size not in scheme.group_sizes:
        return f"{scheme.name} accepts group_size {'|'.join(map(str, scheme.group_sizes))}, not {group_size}"
    try:
        build(quant_spec(scheme, granularity, group_size))
    except ConfigError:  # a mistake in the YAML (a bad enum member), not a combination torchao rejects
        raise
    except (ValueError, AssertionError, TypeError) as err:  # torchao validates in __post_init__
        return f"torchao rejects {scheme.name} with {granularity.name}: {first_line(err)}"
    return None


def unsupported_reason(scheme: SchemeConf, hw: Hardware, dtype: str, batch_size: int) -> str | None:
    """Why this hardware/dtype/batch cannot run the scheme (recorded as unsupported), or None."""
    req = scheme.requires
    if req.cuda and hw.device != "cuda":
        return f"{scheme.name} needs a CUDA GPU; running on {hw.device}"
    if req.min_sm and hw.device == "cuda" and (hw.sm or 0) < req.min_sm:
        return f"{scheme.name} needs CUDA compute capability >= {req.min_sm}; {hw.name} has {hw.sm}"
    if req.dtypes and dtype not in req.dtypes:
        return f"{scheme.name} needs dtype {'|'.join(req.dtypes)}; got {dtype}"
    if req.cuda_min_batch and hw.device == "cuda" and batch_size < req.cuda_min_batch:
        return f"{scheme.name} on CUDA needs batch rows >= {req.cuda_min_batch}; got {batch_size}"
    missing = [name for name in req.packages or [] if importlib.util.find_spec(name) is None]
    if missing:
        return (f"{scheme.name} needs the {', '.join(missing)} package (kernels; pip install 'qsweep[gpu]', "
                "built for this torch); not installed")
    if req.cuda_max_batch and hw.device == "cuda" and batch_size > req.cuda_max_batch:
        return (f"{scheme.name} on CUDA is a small-batch kernel: above {req.cuda_max_batch} rows it falls off "
                f"a cliff (measured below 0.01x of bf16 at 256 rows on an H100); got {batch_size}")
    return None


def build(spec: Any) -> Any:
    """Build torchao objects from a plain dict spec.

    `_target_` must name a class in torchao.quantization; strings `torch.<dtype>` become torch
    dtypes, and a string given to an enum field of a torchao config becomes that enum's member (by
    name: `MappingType.ASYMMETRIC` or `ASYMMETRIC`). Raises ConfigError for anything else, a string
    that names no member included.
    """
    if isinstance(spec, list):
        return [build(item) for item in spec]
    if isinstance(spec, str) and spec.startswith("torch."):
        value = getattr(torch, spec.removeprefix("torch."), None)
        if not isinstance(value, torch.dtype):
            raise ConfigError(f"{spec!r} is not a torch dtype")
        return value
    if not isinstance(spec, dict):
        return spec
    kwargs = {k: build(v) for k, v in spec.items() if k != "_target_"}
    if "_target_" not in spec:
        return kwargs
    cls = _allowed_class(spec["_target_"])
    if issubclass(cls, enum.Enum):  # the explicit form, {_target_: ...MappingType, value: 3}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError):
            raise ConfigError(f"{spec!r} is no {cls.__name__}; valid: {', '.join(cls.__members__)}") from None
    return cls(**_without_inductor_side_effects(cls, {key: _as_member(cls, key, value) for key, value in kwargs.items()}))


def _without_inductor_side_effects(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """torchao's configs default to set_inductor_config=True: quantizing then switches on Inductor options
    for the whole process (coordinate-descent tuning in every direction). A point would compile under other
    settings than its baseline, and its kernels' first runs tune for minutes (75-215 s of an 8B trial on an
    H100). Inductor options have one home, compile.inductor, which applies to the baseline too."""
    if not dataclasses.is_dataclass(cls) or "set_inductor_config" not in {f.name for f in dataclasses.fields(cls)}:
        return kwargs
    if kwargs.get("set_inductor_config"):
        raise ConfigError(f"{cls.__name__}.set_inductor_config=true would change Inductor options for this point "
                          "alone; set them in compile.inductor (e.g. +compile.inductor.coordinate_descent_tuning=true), "
                          "where they apply to the baseline too")
    return {**kwargs, "set_inductor_config": False}


def _as_member(cls: type, key: str, value: Any) -> Any:
    """A string given to an enum field of a torchao config, as the member it names; other values as given.

    Without this, torchao keeps a plain string (or rejects it in an assert, and the point would be
    recorded `skipped` for a typo).
    """
    kinds = _enum_types(cls).get(key)
    if not kinds or not isinstance(value, str):
        return value
    for kind in kinds:
        name = value.removeprefix(f"{kind.__name__}.")
        if name in kind.__members__:
            return kind[name]
        for member in kind:  # a string-valued enum by its value, e.g. Int4PackingFormat's "tile_packed_to_4d"
            if member.value == value:
                return member
    valid = ", ".join(f"{kind.__name__}.{name}" for kind in kinds for name in kind.__members__)
    raise ConfigError(f"{cls.__name__}.{key}={value!r} is invalid; valid: {valid}")


def _enum_types(cls: type) -> dict[str, list[type[enum.Enum]]]:
    """Field name -> the enum types its annotation admits (through Optional and Union), for a dataclass."""
    if not dataclasses.is_dataclass(cls):
        return {}
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a forward reference torchao's module cannot resolve: the raw annotations
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
    found = {}
    for name, hint in hints.items():
        kinds = [t for t in (hint, *typing.get_args(hint)) if isinstance(t, type) and issubclass(t, enum.Enum)]
        if kinds:
            found[name] = kinds
    return found


def _allowed_class(target: Any) -> type:
    """A class a spec may build: a torchao config, granularity or enum, defined in torchao itself.

    The name must be reached through torchao.quantization, and the class's own module and base class are
    checked too: torchao's modules re-export torch classes (`...pt2e.fake_quantize.Module` is
    torch.nn.Module), which a name rule alone would admit.
    """
    from torchao.core.config import AOBaseConfig
    from torchao.quantization.granularity import Granularity

    module_name, _, attr = str(target).rpartition(".")
    refusal = ConfigError(f"refusing to build {target!r}: only torchao configs, granularities and enums "
                          f"reached through {', '.join(ALLOWED_MODULES)} are allowed")
    if not module_name.startswith(ALLOWED_MODULES) or not re.fullmatch(r"[A-Z]\w*", attr):
        raise refusal
    try:
        cls = getattr(importlib.import_module(module_name), attr, None)
    except ImportError:
        raise refusal from None
    if not (isinstance(cls, type) and cls.__module__.startswith("torchao.")
            and issubclass(cls, (AOBaseConfig, Granularity, enum.Enum))):
        raise refusal
    return cls


# ---------------------------------------------------------------- quantizing a model

def quantizable_layers(model: nn.Module, pattern: str | None) -> dict[str, nn.Linear]:
    """Linear layers (by fully-qualified name) that may be quantized: all, or those `pattern` matches."""
    regex = re.compile(pattern) if pattern else None
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (regex is None or regex.search(name))}


def quantize(model: nn.Module, quant: dict, candidates: dict[str, nn.Linear]) -> dict[str, str]:
    """Apply a torchao config spec in place. Per-layer recipes (FqnToConfig) name their own layers;
    a uniform scheme goes to every candidate whose in_features the group size divides (torchao
    rejects the others; skipping them matches what users expect and is counted).

    Returns:
        The candidates skipped on purpose, name -> why (empty for a per-layer recipe).
    """
    from torchao.quantization import quantize_  # not at import: the trial fork server must not load torchao

    config = build(quant)
    if is_per_layer(quant):
        quantize_(model, config, filter_fn=None)
        return {}
    group = group_size_of(quant)
    skipped = {name: f"in_features {m.in_features} not divisible by group_size {group}"
               for name, m in candidates.items() if group and m.in_features % group}
    chosen = {id(m) for name, m in candidates.items() if name not in skipped}
    quantize_(model, config, filter_fn=lambda module, fqn: id(module) in chosen)
    return skipped


def is_per_layer(quant: dict) -> bool:
    """A per-layer recipe (FqnToConfig) rather than one scheme for every candidate."""
    return str(quant.get("_target_", "")).endswith("FqnToConfig")  # pt2e's quantizer settings have no _target_


def group_size_of(spec: Any) -> int | None:
    """The group size a torchao config spec uses (searched through nested granularities), or None."""
    if isinstance(spec, dict):
        if isinstance(spec.get("group_size"), int):
            return spec["group_size"]
        for value in spec.values():
            found = group_size_of(value)
            if found:
                return found
    return None


def is_quantized(layer: nn.Linear) -> bool:
    """torchao replaced the layer's weight with one of its tensor subclasses, or a flow replaced the whole
    layer (`qsweep.flows.base.Replaced`: a torch.ao quantized module, quantized ops in an exported graph)."""
    if getattr(layer, "qsweep_replaced", False):
        return True
    return type(layer.weight.data) is not torch.Tensor


def describe(spec: dict | None) -> str:
    """Short human name of a built config, e.g. `IntxWeightOnlyConfig(weight_dtype=torch.int2, ...)`."""
    if spec is None:
        return "none"
    built = build(spec)
    if type(built).__repr__ is object.__repr__:  # not a dataclass (SemiSparseWeightConfig): no address in a param
        return f"{type(built).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(built).items())})"
    return repr(built)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else _copy(node)


def _copy(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_copy(v) for v in node]
    return node
