"""Every scheme YAML is applied to a real model with a forward pass, or recorded unsupported on CPU; torchao
enum fields are written by member name and a bad one is a one-line error."""

import pytest
import torch
from torchao.quantization import MappingType

from qsweep import schemes
from qsweep.cli import main
from qsweep.config import ConfigError, choices
from qsweep.sweep import run_point

SMALL_TOY = ["model=toy", "model.builder.in_features=256", "model.builder.hidden=256",
             "model.builder.out_features=256", "isolate=false"]
INTX = "torchao.quantization.IntxWeightOnlyConfig"


@pytest.mark.parametrize("scheme", choices("scheme"))
def test_every_scheme_runs_or_is_unsupported(scheme, compose):
    root = compose(*SMALL_TOY, f"scheme={scheme}")
    granularity = root.scheme.granularities[0] if root.scheme.granularities else "per_row"
    root = compose(*SMALL_TOY, f"scheme={scheme}", f"granularity={granularity}", "group_size=32")
    record = run_point(root)
    if root.scheme.requires.cuda and not torch.cuda.is_available():  # what the YAML's `requires` says
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


def test_the_cuda_only_schemes_are_the_ones_the_yaml_marks(compose):
    """The list the test above derives from `requires: {cuda: true}` (int4wo_hqq inherits it from int4wo)."""
    cuda_only = {name for name in choices("scheme") if compose(f"scheme={name}").scheme.requires.cuda}
    assert {"int4wo", "int4wo_hqq", "float8dq", "float8dq_int4"} <= cuda_only
    assert not cuda_only & {"none", "int8wo", "int8dq", "intxwo", "float8wo"}


def test_enum_fields_take_member_names():
    for text in ("MappingType.ASYMMETRIC", "ASYMMETRIC"):
        built = schemes.build({"_target_": INTX, "weight_dtype": "torch.int4", "mapping_type": text})
        assert built.mapping_type is MappingType.ASYMMETRIC
    int4 = schemes.build({"_target_": "torchao.quantization.Int4WeightOnlyConfig",
                          "int4_packing_format": "tile_packed_to_4d"})  # a string-valued enum by its value
    assert int4.int4_packing_format.name == "TILE_PACKED_TO_4D"
    explicit = schemes.build({"_target_": INTX, "mapping_type": {"_target_": "torchao.quantization.MappingType",
                                                                  "value": MappingType.ASYMMETRIC.value}})
    assert explicit.mapping_type is MappingType.ASYMMETRIC


def test_a_bad_enum_member_is_a_config_error_naming_the_members(compose):
    with pytest.raises(ConfigError, match=r"IntxWeightOnlyConfig.mapping_type='ASYMETRIC' is invalid; valid: "
                                          r"MappingType.SYMMETRIC, MappingType.SYMMETRIC_NO_CLIPPING_ERR"):
        schemes.build({"_target_": INTX, "mapping_type": "ASYMETRIC"})
    root = compose("scheme=intxwo", "granularity=per_group", "+scheme.config.mapping_type=ASYMETRIC")
    with pytest.raises(ConfigError, match="MappingType.ASYMMETRIC"):  # not a `skipped` point
        schemes.skip_reason(root.scheme, root.granularity, root.group_size)


def test_a_bad_enum_member_ends_the_run_in_one_line(tmp_path, capsys):
    code = main(["run", "scheme=intxwo", "granularity=per_group", "+scheme.config.mapping_type=ASYMETRIC",
                 "device=cpu", "bench=fast", f"output_dir={tmp_path}", "hydra/job_logging=disabled",
                 "hydra/hydra_logging=disabled"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert code == 2 and len(err) == 1 and err[0].startswith("qsweep: error: ") and "MappingType.SYMMETRIC" in err[0]


def test_quantizing_leaves_inductor_options_as_they_were():
    """torchao's configs would switch on coordinate-descent tuning for the whole process as they quantize
    (set_inductor_config); built by qsweep they do not, per-layer recipes included, so a point compiles under
    the same Inductor options as its baseline. Asking torchao for it names the one place to set them."""
    from torch._inductor import config as inductor_config

    def options() -> dict:  # the plain values: an earlier test's pass objects are new ones in each copy
        return {k: v for k, v in inductor_config.get_config_copy().items() if isinstance(v, (bool, int, float, str))}

    int8wo = {"_target_": "torchao.quantization.Int8WeightOnlyConfig"}
    per_layer = {"_target_": "torchao.quantization.FqnToConfig", "fqn_to_config": {"0": int8wo}}
    with inductor_config.patch(coordinate_descent_tuning=False, coordinate_descent_check_all_directions=False):
        before = options()
        for spec in (int8wo, per_layer):
            model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
            schemes.quantize(model, spec, {"0": model[0], "1": model[1]})
            assert schemes.is_quantized(model[0])
            assert options() == before
            assert not inductor_config.coordinate_descent_tuning
    with pytest.raises(ConfigError, match=r"Int8WeightOnlyConfig.set_inductor_config=true .* compile.inductor"):
        schemes.build({**int8wo, "set_inductor_config": True})
