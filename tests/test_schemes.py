"""Every scheme YAML is applied to a real model with a forward pass, or recorded unsupported on CPU."""

import pytest
import torch

from qsweep import schemes
from qsweep.config import ConfigError, choices
from qsweep.sweep import run_point

SMALL_TOY = ["model=toy", "model.builder.in_features=256", "model.builder.hidden=256",
             "model.builder.out_features=256", "isolate=false"]
CPU_UNSUPPORTED = {"int4wo", "int4wo_hqq", "float8dq", "float8dq_int4"}


@pytest.mark.parametrize("scheme", choices("scheme"))
def test_every_scheme_runs_or_is_unsupported(scheme, compose):
    root = compose(*SMALL_TOY, f"scheme={scheme}")
    granularity = root.scheme.granularities[0] if root.scheme.granularities else "per_row"
    root = compose(*SMALL_TOY, f"scheme={scheme}", f"granularity={granularity}", "group_size=32")
    record = run_point(root)
    if scheme in CPU_UNSUPPORTED and not torch.cuda.is_available():
        assert record.status == "unsupported" and "CUDA" in record.reason
        return
    assert record.status == "ok", record.reason
    assert record.metrics["latency_ms"] > 0
    if scheme != "none":
        assert record.metrics["layers_quantized"] == 2
        assert record.metrics["size_ratio"] > 1.5  # smaller than the float32 baseline
        assert record.metrics["drift_cosine"] > 0.5


def test_ignored_dimensions_collapse_to_one_config(compose):
    per_row_32 = compose("scheme=int8wo", "granularity=per_row", "group_size=32")
    per_row_128 = compose("scheme=int8wo", "granularity=per_row", "group_size=128")
    spec = lambda r: schemes.quant_spec(r.scheme, r.granularity, r.group_size)  # noqa: E731
    assert spec(per_row_32) == spec(per_row_128)
    per_group = compose("scheme=int8wo", "granularity=per_group", "group_size=32")
    assert spec(per_group)["granularity"] == {"_target_": "torchao.quantization.PerGroup", "group_size": 32}
    f8_row, f8_group = compose("scheme=float8wo", "granularity=per_row"), compose("scheme=float8wo",
                                                                                    "granularity=per_group")
    assert spec(f8_row) == spec(f8_group)


def test_forbidden_combinations_give_a_skip_reason(compose):
    root = compose("scheme=int8dq", "granularity=per_group")
    assert "int8dq accepts granularity per_row|per_tensor, not per_group" == schemes.skip_reason(
        root.scheme, root.granularity, root.group_size)
    root = compose("scheme=int4wo", "granularity=per_group", "group_size=512")
    assert "group_size 32|64|128|256" in schemes.skip_reason(root.scheme, root.granularity, root.group_size)


def test_capability_rules(compose):
    cpu = schemes.Hardware("cpu", "x86", None)
    a100 = schemes.Hardware("cuda", "A100", 8.0)
    h100 = schemes.Hardware("cuda", "H100", 9.0)
    f8 = compose("scheme=float8dq").scheme
    assert "needs a CUDA GPU" in schemes.unsupported_reason(f8, cpu, "bfloat16", 32)
    assert ">= 8.9" in schemes.unsupported_reason(f8, a100, "bfloat16", 32)
    assert schemes.unsupported_reason(f8, h100, "bfloat16", 32) is None
    int4 = compose("scheme=int4wo").scheme
    assert "bfloat16" in schemes.unsupported_reason(int4, h100, "float32", 32)
    int8dq = compose("scheme=int8dq").scheme
    assert ">= 17" in schemes.unsupported_reason(int8dq, h100, "bfloat16", 16)
    assert schemes.unsupported_reason(int8dq, h100, "bfloat16", 32) is None


def test_build_refuses_classes_outside_torchao():
    with pytest.raises(ConfigError, match="refusing to build 'os.system'"):
        schemes.build({"_target_": "os.system", "command": "echo hacked"})
    with pytest.raises(ConfigError, match="only torchao configs"):
        schemes.build({"_target_": "torchao.quantization.quant_api.quantize_"})
    built = schemes.build({"_target_": "torchao.quantization.IntxWeightOnlyConfig", "weight_dtype": "torch.int4",
                           "granularity": {"_target_": "torchao.quantization.PerGroup", "group_size": 32}})
    assert built.weight_dtype == torch.int4 and built.granularity.group_size == 32
