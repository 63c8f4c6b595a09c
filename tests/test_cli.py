"""The command line: --help of every command, one-line errors for bad input, user config folders, quiet
trials, and a wheel installed into a fresh venv running a point from an unrelated directory."""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import pytest

from qsweep import cli, quiet
from qsweep.config import CONF_DIR, ConfigError, SearchConf, SelectConf, choices, load_config

ROOT = Path(__file__).resolve().parents[1]
POINT = ["model=toy", "scheme=int8wo", "device=cpu", "bench=fast"]
SCARY = ("Failed to load", "_C_mxfp8", "_C_cutlass_90a", "Detected no triton", "_pytree", "register_constant",
         "_stable_hash_for_caching")
MY_MODEL = """# a user's model, outside qsweep's conf/
name: my_toy
builder:
  _target_: qsweep.models.toy_linear
  in_features: 256
  hidden: 128
  out_features: 64
"""


def run_qsweep(args: list[str], cwd: Path, python: str = sys.executable, timeout: float = 300,
               ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "QSWEEP_CONF_DIR", "PYTHONPATH")}
    return subprocess.run([python, "-m", "qsweep", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def user_confs(tmp_path) -> Path:
    """A config folder outside the repo with one model YAML, as a user would write it."""
    folder = tmp_path / "my_confs"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "my_toy.yaml").write_text(MY_MODEL)
    return folder


# --- item 5: --help of every command, one line for every bad input ---

@pytest.mark.parametrize("command,expected", [
    ("search", ["usage: qsweep search", "search.max_drift: 0.01", "search.candidates:"]),
    ("select", ["usage: qsweep select", "select.max_drift: 0.01", "select.objective: speedup", "experiment="]),
    ("apply", ["usage: qsweep apply recipe=<path>", "select.drift_tol: 0.005", "select.checkpoint_format:"]),
    ("report", ["usage: qsweep report", "select.experiment: null"]),
    ("ui", ["usage: qsweep ui", "--port N", "--host H"]),
])
def test_every_command_answers_help(command, expected, capsys):
    for flag in ("--help", "-h"):
        assert cli.main([command, flag]) == 0
        out = capsys.readouterr().out
        for text in [*expected, "examples:", "--config-dir", "hydra.searchpath"]:
            assert text in out, (command, text)
    assert cli.main(["help", command]) == 0
    assert f"usage: qsweep {command}" in capsys.readouterr().out


@pytest.mark.parametrize("command,group,schema", [("search", "search", SearchConf), ("select", "select", SelectConf)])
def test_help_shows_every_key_with_its_default(command, group, schema, capsys):
    cli.main([command, "--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(schema):
        assert f"  {group}.{f.name}: " in out, f.name


def test_ui_takes_port_and_host_in_both_forms(tmp_path):
    out = f"output_dir={tmp_path}"
    assert cli.ui_options([out])[:2] == (5000, "127.0.0.1")
    assert cli.ui_options(["--port", "5001", out])[:2] == (5001, "127.0.0.1")
    assert cli.ui_options(["--port=5002", "--host", "0.0.0.0", out])[:2] == (5002, "0.0.0.0")
    port, host, uri = cli.ui_options(["port=8080", "host=localhost", out])
    assert (port, host) == (8080, "localhost") and uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    for bad in (["--port", "abc"], ["port=0"], ["--port"], ["--foo", "1"]):
        with pytest.raises(ConfigError):
            cli.ui_options([*bad, out])


def test_bad_input_is_one_line_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    cases = [
        (["run", *POINT, f"output_dir={out}", "tracking.uri=bogus://x"], "bogus://x"),
        (["run", "-m", *POINT, "scheme=int8wo,int8dq", "output_dir=/proc/forbidden"], "/proc/forbidden"),
        (["run", *POINT, f"output_dir={out}", "tracking.uri=sqlite:////proc/forbidden/mlflow.db"], "/proc/forbidden"),
        (["run", *POINT, f"output_dir={out}", "model=nosuch"], "valid choices: digits_mlp"),
        (["run", "--config-dir", str(tmp_path / "nowhere"), *POINT], "is not a directory"),
        (["run", *POINT, "hydra.searchpath=[file:///no/such/dir]"], "is not a directory"),
        (["search", f"output_dir={out}", "tracking.uri=bogus://x"], "bogus://x"),
        (["search", "output_dir=/proc/forbidden"], "/proc/forbidden"),
        (["search", f"output_dir={out}", "search.storage=bogus://y"], "search.storage"),
        (["search", "--port", "5001"], "unknown option '--port'"),
        (["select", f"output_dir={out}", "tracking.uri=bogus://x"], "bogus://x"),
        (["apply", "recipe=x.yaml", "output_dir=/proc/forbidden"], "/proc/forbidden"),
        (["report", "--cfg", "job"], "unknown option '--cfg'"),
        (["ui", "--port", "99999"], "1..65535"),
        (["ui", "tracking.uri=bogus://x"], "bogus://x"),
        (["nosuch"], "valid: run, ui, search"),
    ]
    for args, expected in cases:
        assert cli.main(args) == 2, args
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qsweep: error: ") and expected in lines[0], (args, lines)
        assert "Traceback" not in captured.out + captured.err
    assert not (out / "runs").exists() and not (out / "mlflow.db").exists()


def test_error_inside_a_hydra_job_ends_the_run_in_one_line(tmp_path, monkeypatch, capsys):
    """A bad tracking URI that gets past the up-front check still exits non-zero with one line."""
    monkeypatch.setattr(cli, "check_grid", lambda overrides, multirun: [overrides])
    args = [*POINT, f"output_dir={tmp_path}", "tracking.uri=bogus://x", "hydra/job_logging=disabled",
            "hydra/hydra_logging=disabled"]
    for multirun in ([], ["-m"]):
        assert cli.main(["run", *multirun, *args]) == 2
        captured = capsys.readouterr()
        assert "Traceback" not in captured.out + captured.err
        errors = [line for line in captured.err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith("qsweep: error: ") and "bogus://x" in errors[0], errors
    assert not list(tmp_path.rglob("mlflow.db"))


# --- item 4: the user's own config folders ---

def test_user_config_folder_adds_choices_everywhere(user_confs, tmp_path, capsys):
    searchpath = f"hydra.searchpath=[file://{user_confs}]"
    assert "my_toy" in choices("model", [searchpath]) and "my_toy" not in choices("model")
    assert set(choices("model")) <= set(choices("model", [searchpath]))
    grid = cli.check_grid(["model=my_toy", "scheme=int8wo", f"output_dir={tmp_path}", searchpath], False)
    assert len(grid) == 1
    root, _ = load_config(["model=my_toy", searchpath])
    assert root.model.name == "my_toy" and root.model.builder["in_features"] == 256
    # --config-dir is the same folder for the commands that compose outside Hydra's run
    overrides = cli.prepare_command("select", ["--config-dir", str(user_confs), "model=my_toy",
                                               f"output_dir={tmp_path}"])
    assert load_config(overrides)[0].model.name == "my_toy"
    # and an unknown name lists the user's models too
    assert cli.main(["run", "model=my_toyx", searchpath]) == 2
    assert "my_toy" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown model"):
        cli.check_grid(["model=my_toy", f"output_dir={tmp_path}"], False)


# --- item 6: no scary library warnings ---

def test_quiet_filters_only_the_known_messages():
    quiet.install()
    quiet.install()  # idempotent: one filter per logger

    def shown(logger: str, msg: str, *args) -> bool:
        record = logging.LogRecord(logger, logging.WARNING, "x.py", 1, msg, args, None)
        return logging.getLogger(logger).filter(record)

    lib = "/venv/lib/python3.11/site-packages/torchao"
    assert not shown("torchao", f"Failed to load {lib}/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load")
    assert not shown("torchao", f"Failed to load {lib}/_C_cutlass_90a.abi3.so: Could not load this library")
    assert shown("torchao", f"Failed to load {lib}/_C.abi3.so: undefined symbol")  # qsweep's CPU kernels: real
    assert shown("torchao", "Skipping import of cpp extensions due to incompatible torch version")
    assert not shown("torchao.kernel.intmm", "Warning: Detected no triton, on systems without Triton ...")
    from torchao.quantization.quantize_.common import KernelPreference

    enum_msg = "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type."
    assert not shown("torch.utils._pytree", enum_msg, KernelPreference)
    assert shown("torch.utils._pytree", enum_msg, logging.Formatter)  # someone else's class: real
    assert sum(isinstance(f, quiet._Drop) for f in logging.getLogger("torchao").filters) == 1

    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # pytest's ini ignores UserWarning; inside this block only qsweep's filter
        quiet.install()
        warnings.simplefilter("always", append=True)
        for text in ("Int8Tensor does not implement _stable_hash_for_caching. For PT2-compatible tensor "
                     "subclasses, it is recommended ...", "something else went wrong"):
            warnings.warn_explicit(text, UserWarning, "autograd_cache.py", 1,
                                   module="torch._functorch._aot_autograd.autograd_cache")
    assert [str(w.message) for w in caught] == ["something else went wrong"]


@pytest.mark.slow
def test_a_cpu_run_prints_no_scary_warnings_and_errors_leave_runs_untouched(tmp_path):
    out = tmp_path / "out"
    done = run_qsweep(["run", *POINT, "compile=default", f"output_dir={out}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout + done.stderr
    assert "ok" in text and not [s for s in SCARY if s in text], text[-3000:]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    for args in (["run", *POINT, f"output_dir={out}", "tracking.uri=bogus://x"], ["search", "--help"],
                 ["ui", "--port", "0", f"output_dir={out}"]):
        bad = run_qsweep(args, cwd=tmp_path)
        if args[1] == "--help":
            assert bad.returncode == 0 and "search.max_drift" in bad.stdout and not bad.stderr
            continue
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and not bad.stdout, bad.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


# --- item 4: a real wheel, installed in a fresh venv, run from an unrelated directory ---

@pytest.mark.slow
def test_installed_wheel_runs_from_anywhere_with_user_configs(tmp_path, user_confs):
    source = tmp_path / "clone"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("src", "conf", "sweeps"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=skip)  # symlinks as in a clone
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("qsweep-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
                              "-q", str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        text=True).strip())
    # the dependencies come from this venv; its editable qsweep does not (a .pth line adds a path, and the
    # .pth files found there are not run)
    (site / "_qsweep_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")

    conf = site / "qsweep" / "conf"
    assert not conf.is_symlink() and (conf / "config.yaml").is_file()
    assert (conf / "model" / "toy.yaml").is_file() and (conf / "sweep" / "quickstart.yaml").is_file()
    assert {p.stem for p in (conf / "scheme").glob("*.yaml")} == {p.stem for p in (CONF_DIR / "scheme").glob("*.yaml")}

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([python, "-c", "import qsweep, qsweep.config as c; print(qsweep.__file__); "
                            "print(c.CONF_DIR)"], cwd=elsewhere, capture_output=True, text=True)
    module, conf_dir = where.stdout.split()
    assert Path(module).is_relative_to(venv) and Path(conf_dir).is_relative_to(venv), where.stdout

    out = tmp_path / "out"
    done = subprocess.run([str(venv / "bin" / "qsweep"), "run", "-m", "model=toy,my_toy", "scheme=int8wo",
                           "device=cpu", "bench=fast", f"output_dir={out}", f"hydra.searchpath=[file://{user_confs}]"],
                          cwd=elsewhere, capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert (out / "mlflow.db").is_file()
    (results,) = out.glob("runs/*/results.csv")
    rows = list(csv.DictReader(results.open()))
    assert sorted(r["status"] for r in rows) == ["ok", "ok"], rows
    assert "my_toy" in results.read_text()
    assert not (elsewhere / "outputs").exists()  # nothing written where the user stood
