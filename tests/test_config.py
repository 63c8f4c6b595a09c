"""Every YAML composes and validates; every bad input gives one line naming the valid choices."""

import json
from pathlib import Path

import pytest
import yaml

from qsweep.cli import check_grid, main
from qsweep.config import CONF_DIR, BenchConf, ConfigError, Device, RootConf, choices, mlflow_uri

GROUP_FILES = sorted(p for p in CONF_DIR.rglob("*.yaml") if p.parent != CONF_DIR)


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_yaml_composes_and_validates(path: Path):
    group = path.parent.relative_to(CONF_DIR).as_posix()  # hydra/launcher: qsweep's presets of Hydra's groups
    # sweeps and grid points (conf/point) are overlays added to the defaults, not a default's choice
    override = f"+{group}={path.stem}" if group in ("sweep", "point") else f"{group}={path.stem}"
    grid = check_grid([override], multirun=(group == "sweep"))
    assert len(grid) >= 1


def test_all_groups_are_populated():
    for group in ("model", "scheme", "granularity", "compile", "bench", "eval", "tracking", "sweep"):
        assert choices(group), group
    expected = {"none", "int8wo", "int8dq", "int4wo", "float8wo", "float8dq", "float8dq_int4", "intxwo",
                "int8dq_intxw"}
    assert expected <= set(choices("scheme"))
    assert set(choices("compile")) == {"none", "default", "blocks", "reduce-overhead", "max-autotune",
                                        "max-autotune-no-cudagraphs"}


@pytest.mark.parametrize("args, must_name", [
    (["scheme=int9"], ["unknown scheme 'int9'", "int8wo", "intxwo"]),
    (["model=resnet"], ["unknown model 'resnet'", "toy"]),
    (["granularity=per_block"], ["unknown granularity", "per_row", "per_group"]),
    (["-m", "scheme=int8wo,bogus"], ["unknown scheme 'bogus'"]),
    (["group_size=0"], ["group_size=0", "power of two"]),
    (["group_size=-32"], ["group_size=-32", "power of two"]),
    (["group_size=48"], ["group_size=48", "power of two"]),
    (["schem=int8wo"], ["unknown key 'schem'", "scheme"]),
    (["bench.repats=3"], ["unknown key 'bench.repats'", "repeats"]),
    (["scheme=intxwo", "scheme.bits=9"], ["scheme.bits=9", "1, 2"]),
    (["device=tpu"], ["device='tpu' is invalid; valid: auto, cpu, cuda"]),
    (["dtype=fp8"], ["dtype='fp8' is invalid; valid: auto, float32, bfloat16, float16"]),
    (["bench.timing=gpu"], ["bench.timing='gpu' is invalid; valid: auto, device, e2e"]),
    (["select.checkpoint_format=zip"], ["select.checkpoint_format='zip'", "safetensors, torch"]),
    (["search.objective=latency"], ["search.objective='latency' is invalid; valid: speedup, size"]),
    (["select.objective=latency_ms"], ["select.objective='latency_ms'", "speedup", "drift"]),
    (["eval.seq_len=0"], ["eval.seq_len=0", "positive integer"]),
    (["bench.processes=x"], ["bench.processes=x", "could not be converted to Integer"]),
])
def test_bad_input_is_one_clear_line(args, must_name, capsys):
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for text in must_name:
        assert text in err


def test_grid_expansion_counts_every_point():
    grid = check_grid(["scheme=int8wo,int8dq,intxwo", "granularity=per_row,per_group", "group_size=32,128",
                       "compile=none,default"], multirun=True)
    assert len(grid) == 3 * 2 * 2 * 2
    assert len(check_grid(["+sweep=quickstart"], multirun=True)) == 18
    llama8b = check_grid(["+sweep=llama8b"], multirun=True)  # 9 points x batch 1, 8 x compile none, blocks
    assert len(llama8b) == 36 and {"compile=blocks", "compile=none"} <= {a for p in llama8b for a in p}


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "valid: run, ui" in capsys.readouterr().err


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_tracking_store_precedence(compose, monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_uri(compose()) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/env.db")
    assert mlflow_uri(compose()) == "sqlite:////elsewhere/env.db"
    assert mlflow_uri(compose("tracking.uri=sqlite:////x/cli.db")) == "sqlite:////x/cli.db"


def test_checks_run_when_a_schema_is_built_in_code_too():
    with pytest.raises(ConfigError, match="bench.timing='gpu' is invalid"):
        BenchConf(timing="gpu")
    with pytest.raises(ConfigError, match="bench.repeats must be >= 3"):
        BenchConf(repeats=1)
    assert BenchConf(timing="e2e").timing == "e2e"


def test_choices_are_plain_strings_downstream(compose):
    """Enum fields must not change point hashes, MLflow params or recipe files: they are their value."""
    root = compose("device=cpu", "dtype=float32", "bench.timing=e2e")
    assert isinstance(root, RootConf) and root.device is Device.cpu
    assert root.device == "cpu" and f"{root.device}/{root.dtype}" == "cpu/float32" and str(root.bench.timing) == "e2e"
    assert json.dumps({"device": root.device, "bench": vars(root.bench)}) == json.dumps(
        {"device": "cpu", "bench": {**vars(root.bench), "timing": "e2e"}})
    assert yaml.safe_dump({"dtype": root.dtype}) == "dtype: float32\n"
    assert {"cpu": 1}[root.device] == 1


def test_a_bad_choice_in_a_yaml_file_names_the_file(tmp_path, capsys):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "mine.yaml").write_text("batch_size: 4\ntiming: gpu\n")
    assert main(["run", "bench=mine", f"hydra.searchpath=[file://{tmp_path}]", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "qsweep: error: bench/mine.yaml: bench.timing='gpu' is invalid; valid: auto, device, e2e"
