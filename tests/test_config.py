"""Every YAML composes and validates; every bad input gives one line naming the valid choices."""

from pathlib import Path

import pytest

from qsweep.cli import check_grid, main
from qsweep.config import CONF_DIR, ConfigError, choices, mlflow_uri

GROUP_FILES = sorted(p for p in CONF_DIR.rglob("*.yaml") if p.parent != CONF_DIR)


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_yaml_composes_and_validates(path: Path):
    group = path.parent.name
    override = f"+sweep={path.stem}" if group == "sweep" else f"{group}={path.stem}"
    grid = check_grid([override], multirun=(group == "sweep"))
    assert len(grid) >= 1


def test_all_groups_are_populated():
    for group in ("model", "scheme", "granularity", "compile", "bench", "eval", "tracking", "sweep"):
        assert choices(group), group
    expected = {"none", "int8wo", "int8dq", "int4wo", "float8wo", "float8dq", "float8dq_int4", "intxwo",
                "int8dq_intxw"}
    assert expected <= set(choices("scheme"))
    assert set(choices("compile")) == {"none", "default", "reduce-overhead", "max-autotune",
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
    (["device=tpu"], ["device='tpu'", "cuda"]),
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
