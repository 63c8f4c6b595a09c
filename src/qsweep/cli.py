"""Command line: `qsweep run` (Hydra's CLI, one job per grid point) and `qsweep ui`.

Before Hydra starts a sweep, every grid point is composed and checked, so a typo fails at once with
one line naming the valid choices instead of after hours of trials.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import hydra
from hydra import initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from qsweep.config import (
    CONF_DIR,
    GROUPS,
    ConfigError,
    choices,
    compose_config,
    first_line,
    load_config,
    mlflow_uri,
    to_root,
)

USAGE = """usage: qsweep <command> [hydra overrides]

commands:
  run      quantize, measure and track one point, or a grid with -m
           qsweep run model=toy scheme=int8wo
           qsweep run -m scheme=int8wo,int8dq,intxwo granularity=per_row,per_group group_size=32,128
           qsweep run -m +sweep=quickstart          (named grids live in sweeps/)
           qsweep run --help | --cfg job             (Hydra's own flags work)
  ui       open the MLflow dashboard on the project's store (qsweep ui [output_dir=...] [port=5000])
"""
# Hydra flags that print or inspect instead of running: leave them to Hydra untouched.
INSPECT_FLAGS = {"-h", "--help", "--hydra-help", "-c", "--cfg", "--info", "-i", "--resolve", "--version",
                 "-sc", "--shell-completion", "-p", "--package"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    commands = {"run": run_command, "ui": ui_command, "search": _lazy("qsweep.search.command:search_command"),
                "select": _lazy("qsweep.select:select_command"), "apply": _lazy("qsweep.select:apply_command"),
                "report": _lazy("qsweep.report:report_command")}
    try:
        if command not in commands:
            raise ConfigError(f"unknown command {command!r}; valid: {', '.join(commands)}")
        return commands[command](rest)
    except ConfigError as err:
        print(f"qsweep: error: {err}", file=sys.stderr)
        return 2


def _lazy(target: str):
    """Import a command's module only when it runs (keeps `qsweep run` start-up light)."""
    def command(args: list[str]) -> int:
        import importlib

        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)(args)

    return command


def run_command(args: list[str]) -> int:
    multirun = "-m" in args or "--multirun" in args
    if not INSPECT_FLAGS & set(args):
        overrides = [a for a in args if not a.startswith("-")]
        print(f"qsweep: checked {len(check_grid(overrides, multirun))} grid point(s)", flush=True)
    # argparse cannot take a flag between overrides (`run a=1 -m b=2,3`); put -m first.
    flags = [a for a in args if a in ("-m", "--multirun")]
    sys.argv = ["qsweep run", *flags, *[a for a in args if a not in flags]]
    try:
        _hydra_entry()
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def check_grid(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Compose and validate every grid point; raise ConfigError with one line on the first problem."""
    from qsweep.sweep import expand_grid

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:
        raise ConfigError(f"cannot parse overrides: {first_line(err)}") from None
    for o in parsed:
        group = o.key_or_group
        if group in GROUPS and o.package is None and not o.is_delete():
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            for value in values:
                if value not in choices(group):
                    raise ConfigError(f"unknown {group} {value!r}; valid choices: {', '.join(choices(group))}")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        head = [_first_choice(o) for o in parsed]
        params = compose_config(head, hydra_config=True).hydra.sweeper.params or {}
        grid = expand_grid(overrides, dict(params)) if multirun else [overrides]
        for point in grid:
            to_root(compose_config(point))
    return grid


def _first_choice(o) -> str:
    if o.is_sweep_override():
        return f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
    return o.input_line


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_entry(cfg: DictConfig) -> None:
    from qsweep.sweep import PLAN_FILE, append_record, resolved_yaml, run_point

    root = to_root(cfg)
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        directory = Path(hc.sweep.dir)
        plan = directory / PLAN_FILE
        total = OmegaConf.load(plan).total if plan.exists() else "?"
        progress = f"[{hc.job.num + 1}/{total}] "
    else:
        directory, progress = Path(hc.runtime.output_dir), ""
    record = run_point(root, resolved_yaml(cfg), progress)
    directory.mkdir(parents=True, exist_ok=True)
    append_record(directory, record)


def ui_command(args: list[str]) -> int:
    """`mlflow ui` on the store a run with the same overrides would write to."""
    port = next((a.split("=", 1)[1] for a in args if a.startswith("port=")), "5000")
    overrides = [a for a in args if not a.startswith("port=")]
    uri = mlflow_uri(load_config(overrides)[0])
    print(f"MLflow UI on http://127.0.0.1:{port}  (store: {uri})")
    return subprocess.call([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--port", port])


if __name__ == "__main__":
    sys.exit(main())
