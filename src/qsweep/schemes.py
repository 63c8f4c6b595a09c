"""Scheme config -> torchao config object, grid-point normalisation and hardware capability checks.

A scheme's torchao config travels as a plain dict (`{"_target_": "torchao.quantization.X", ...}`):
it is hashed to find duplicate grid points, sent to the trial's child process, and written into
recipe files. `build` is the only place that turns such a dict into objects, and it only builds
classes from torchao's quantization namespace (a recipe is data, never code to run).
"""

from __future__ import annotations

import enum
import importlib
import re
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf

from qsweep.config import ConfigError, GranularityConf, SchemeConf, first_line

ALLOWED_MODULES = ("torchao.quantization",)


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
    if req.cuda_max_batch and hw.device == "cuda" and batch_size > req.cuda_max_batch:
        return (f"{scheme.name} on CUDA is a small-batch kernel: above {req.cuda_max_batch} rows it falls off "
                f"a cliff (measured below 0.01x of bf16 at 256 rows on an H100); got {batch_size}")
    return None


def build(spec: Any) -> Any:
    """Build torchao objects from a plain dict spec.

    `_target_` must name a class in torchao.quantization; strings `torch.<dtype>` become torch
    dtypes. Raises ConfigError for anything else.
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
    return _allowed_class(spec["_target_"])(**kwargs)


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


def describe(spec: dict | None) -> str:
    """Short human name of a built config, e.g. `IntxWeightOnlyConfig(weight_dtype=torch.int2, ...)`."""
    return "none" if spec is None else repr(build(spec))


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else _copy(node)


def _copy(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_copy(v) for v in node]
    return node
