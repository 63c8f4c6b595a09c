"""Command line: `qsweep run` (Hydra's CLI, one job per grid point), `search`, `select`, `apply`, `report`, `ui`.

Before Hydra starts a sweep, every grid point is composed and checked, and the output folder and the
tracking store are checked too, so a typo fails at once with one line naming the valid choices instead of
after hours of trials (or, worse, after the trials with nothing recorded).
"""

from __future__ import annotations

import errno
import os
import signal
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
    RootConf,
    check_outputs,
    check_tracking_uri,
    check_writable,
    choices,
    compose_config,
    first_line,
    load_config,
    mlflow_uri,
    to_root,
    with_config_dirs,
)

USAGE = """usage: qsweep <command> [hydra overrides]      (qsweep <command> --help: its keys and examples)

commands:
  run      quantize, measure and track one point, or a grid with -m
           qsweep run model=toy scheme=int8wo
           qsweep run -m scheme=int8wo,int8dq,intxwo granularity=per_row,per_group group_size=32,128
           qsweep run -m +sweep=quickstart          (named grids live in sweeps/)
           qsweep run --help | --cfg job             (Hydra's own flags work)
  search   per-layer recipe search (Optuna) under a drift budget
  select   pick the best measured run under constraints and export it as a recipe
  apply    quantize a model with a recipe, save, reload and verify it
  report   tables and plots of an experiment
  ui       open the MLflow dashboard on the project's store (qsweep ui [output_dir=...] [--port 5000])

Your own configs (a model or scheme YAML outside qsweep): put them in <dir>/model/, <dir>/scheme/, ... and
add --config-dir <dir> or hydra.searchpath=[file:///abs/dir] to any command.
"""
# Hydra flags that print or inspect instead of running: leave them to Hydra untouched.
INSPECT_FLAGS = {"-h", "--help", "--hydra-help", "-c", "--cfg", "--info", "-i", "--resolve", "--version",
                 "-sc", "--shell-completion", "-p", "--package"}
HELP_FLAGS = {"-h", "--help"}
CONFIG_DIR_FLAGS = ("--config-dir", "-cd")  # Hydra's flag for an extra config folder
# Hydra flags that change the primary config or replay a pickled one: qsweep's checks compose
# conf/config.yaml with the command line's overrides, so they step aside.
UNCHECKED_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--experimental-rerun"}
# `qsweep select/apply/report` shorthands for select.* keys (see conf/select/default.yaml)
SHORTHANDS = ("experiment", "recipe", "name")
EXAMPLE_DIR = "file:///abs/path/my_confs"

COMMON_KEYS = f"""common keys and options:
  output_dir=outputs     everything qsweep writes (mlflow.db, optuna.db, recipes/, reports/, checkpoints/)
  tracking.uri=null      the MLflow store; null: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db
  model=<name> device=auto|cpu|cuda dtype=auto|float32|bfloat16|float16   (any `qsweep run` key)
  --config-dir DIR | hydra.searchpath=[{EXAMPLE_DIR}]   add your own config folders (DIR/model/*.yaml, ...)"""

# command -> (usage, what it does, (group, keys shown or None for all), examples)
COMMAND_HELP: dict[str, tuple[str, str, tuple[str, tuple[str, ...] | None] | None, list[str]]] = {
    "search": ("qsweep search [overrides]",
               "Per-layer recipe search: every layer (or group) picks one candidate scheme; Optuna maximizes the\n"
               "objective under the drift budget; the best recipes are confirmed end to end. Rerun to resume.",
               ("search", None),
               ["qsweep search model=digits_mlp search.max_drift=0.01",
                "qsweep search model=tiny_llama search.candidates=[none,int8wo,intxwo_4] search.drift_metric=drift_kl",
                "qsweep search model=digits_mlp search.n_trials=120      (adds trials to the same study)"]),
    "select": ("qsweep select [experiment=<name>] [overrides]",
               "Pick the best measured run of an experiment under the constraints; write it as a recipe\n"
               "(<output_dir>/recipes/<name>.yaml) and tag the Pareto front in MLflow.\n"
               "experiment=, name= and recipe= are shorthands for select.experiment, select.name, select.recipe.",
               ("select", None),
               ["qsweep select experiment=digits_mlp select.max_drift=0.01 select.objective=speedup",
                "qsweep select experiment=toy select.drift_metric=drift_cosine select.objective=size_ratio"]),
    "apply": ("qsweep apply recipe=<path> [model=<name>] [overrides]",
              "Quantize a model with a recipe, save the checkpoint under <output_dir>/checkpoints/<name>/, reload\n"
              "it, re-measure, verify against the recorded run and log the result to MLflow (exit 1 if it differs).",
              ("select", ("recipe", "drift_tol", "size_tol", "checkpoint_format")),
              ["qsweep apply recipe=outputs/recipes/digits_mlp.yaml",
               "qsweep apply recipe=outputs/recipes/digits_mlp.yaml select.checkpoint_format=torch device=cpu"]),
    "report": ("qsweep report [experiment=<name>] [overrides]",
               "Results table and plots of an experiment under <output_dir>/reports/<name>/, also logged to MLflow.",
               ("select", ("experiment", "drift_metric", "max_drift", "relative", "objective", "model", "device",
                           "dtype")),
               ["qsweep report experiment=digits_mlp", "qsweep report experiment=toy output_dir=/data/qsweep"]),
    "ui": ("qsweep ui [output_dir=DIR] [tracking.uri=URI] [--port N | port=N] [--host H | host=H] [--no-browser]",
           "The MLflow dashboard (`mlflow ui`) on the store that `qsweep run` with the same keys writes to.\n"
           "Prints, for each recent experiment, links to its runs sorted by select.objective with speedup, size\n"
           "ratio and drift as columns, to the same as charts, to the best runs side by side and to the last\n"
           "sweep's parent run; opens the first in a browser where there is a graphical one.\n"
           "  --port N, port=N     port to listen on (default 5000)\n"
           "  --host H, host=H     interface to bind (default 127.0.0.1; 0.0.0.0 to reach it from other hosts)\n"
           "  --no-browser         only print the links",
           ("select", ("objective", "drift_metric")),
           ["qsweep ui", "qsweep ui --port 5001 select.objective=size_ratio",
            "qsweep ui output_dir=/data/qsweep port=8080 host=0.0.0.0 --no-browser"]),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["help"] and argv[1:2] and argv[1] in COMMAND_HELP:  # `qsweep help search`
        argv = [argv[1], "--help"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command in COMMAND_HELP and HELP_FLAGS & set(rest):
        print(command_help(command))
        return 0
    commands = {"run": run_command, "ui": ui_command, "search": _lazy("qsweep.search.command:search_command"),
                "select": _lazy("qsweep.select:select_command"), "apply": _lazy("qsweep.apply:apply_command"),
                "report": _lazy("qsweep.report:report_command")}
    try:
        if command not in commands:
            raise ConfigError(f"unknown command {command!r}; valid: {', '.join(commands)}")
        if command not in ("run", "ui"):
            rest = prepare_command(command, rest)
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


def command_help(command: str) -> str:
    """`qsweep <command> --help`: usage, what it does, its keys with their defaults (read from the YAML
    that sets them, comments included), the common keys and examples."""
    usage, what, keys, examples = COMMAND_HELP[command]
    lines = [f"usage: {usage}", "", what]
    if keys:
        group, only = keys
        lines += ["", f"{group}.* keys (defaults: conf/{group}/default.yaml):", *group_keys(group, only)]
    lines += ["", COMMON_KEYS, "", "examples:", *(f"  {e}" for e in examples)]
    return "\n".join(lines)


def group_keys(group: str, only: tuple[str, ...] | None = None) -> list[str]:
    """The lines of conf/<group>/default.yaml as `group.key: default  # meaning` (all keys, or `only`)."""
    lines, keep = [], False
    for line in (CONF_DIR / group / "default.yaml").read_text().splitlines():
        if not line.strip() or line.startswith("#"):  # the file's header says what the group is for
            continue
        if line[0].isspace():  # a comment continued from the key above
            if keep:
                lines.append(" " * (len(group) + 3) + line)
            continue
        keep = only is None or line.partition(":")[0] in only
        if keep:
            lines.append(f"  {group}.{line}")
    return lines


def split_flags(command: str, args: list[str], valued: tuple[str, ...],
                switches: tuple[str, ...] = ()) -> tuple[dict[str, list[str]], list[str]]:
    """Separate options from Hydra overrides: `--flag value` / `--flag=value` for those in `valued`,
    a bare `--flag` for those in `switches`.

    Raises ConfigError (one line) on an option the command does not take or a flag without its value.
    """
    flags: dict[str, list[str]] = {}
    overrides: list[str] = []
    it = iter(args)
    for arg in it:
        if not arg.startswith("-"):
            overrides.append(arg)
            continue
        name, eq, value = arg.partition("=")
        if name in switches and not eq:
            flags.setdefault(name, []).append("")
            continue
        if name not in valued:
            valid = ", ".join([*switches, *valued, "--help"])
            raise ConfigError(f"{command}: unknown option {arg!r}; valid: {valid}")
        if not eq:
            value = next(it, None)
            if value is None or value.startswith("-"):
                raise ConfigError(f"{command}: {name} needs a value")
        flags.setdefault(name, []).append(value)
    return flags, overrides


def prepare_command(command: str, args: list[str]) -> list[str]:
    """search/select/apply/report: turn --config-dir into hydra.searchpath, then check up front (before any
    work) that the config composes, output_dir is writable and the tracking store can be opened."""
    flags, overrides = split_flags(command, args, CONFIG_DIR_FLAGS)
    overrides = with_config_dirs(overrides, [d for f in CONFIG_DIR_FLAGS for d in flags.get(f, [])])
    root = load_config([o for o in overrides if o.partition("=")[0] not in SHORTHANDS])[0]
    check_outputs(root)
    if command == "search" and root.search.storage:
        check_storage_url(root.search.storage)
    return overrides


def check_storage_url(url: str) -> None:
    """search.storage must be a SQLAlchemy URL with an installed dialect (Optuna's RDBStorage)."""
    from sqlalchemy.engine import make_url

    if url.startswith("journal:"):  # Optuna's journal file (qsweep.search.parallel), on a shared file system
        from qsweep.search.parallel import journal_path

        check_writable(Path(journal_path(url) or ".").resolve().parent, "the folder of search.storage")
        return
    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except Exception as err:
        raise ConfigError(f"search.storage {url!r} is not a usable SQLAlchemy URL (e.g. sqlite:////abs/optuna.db, "
                          f"postgresql://user@host/db): {first_line(err)}") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        check_writable(Path(parsed.database).parent, "the folder of search.storage")


def run_command(args: list[str]) -> int:
    multirun = "-m" in args or "--multirun" in args
    if not (INSPECT_FLAGS | UNCHECKED_FLAGS) & {a.partition("=")[0] for a in args}:
        flags, overrides = split_flags("run", args, CONFIG_DIR_FLAGS, ("-m", "--multirun"))
        overrides = with_config_dirs(overrides, [d for f in CONFIG_DIR_FLAGS for d in flags.get(f, [])])
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
    """Compose and validate every grid point, and check that each point's output_dir is writable and its
    tracking store can be opened; raise ConfigError with one line on the first problem.

    Args:
        overrides: Hydra overrides; a `hydra.searchpath=[...]` among them adds the user's config folders,
            whose names count as valid choices.
        multirun: expand sweeps (`a=1,2`, hydra.sweeper.params of a named sweep) into points.

    Returns:
        The grid points, each a list of overrides.
    """
    from qsweep.sweep import expand_grid

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:
        raise ConfigError(f"cannot parse overrides: {first_line(err)}") from None
    for o in parsed:
        group = o.key_or_group
        if group in GROUPS and o.package is None and not o.is_delete():
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            valid = choices(group, overrides)
            for value in values:
                if value not in valid:
                    raise ConfigError(f"unknown {group} {value!r}; valid choices: {', '.join(valid)}")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        head = [_first_choice(o) for o in parsed]
        params = compose_config(head, hydra_config=True).hydra.sweeper.params or {}
        grid = expand_grid(overrides, dict(params)) if multirun else [overrides]
        roots = [to_root(compose_config(point)) for point in grid]
    from qsweep.schemes import skip_reason

    for root in roots:  # builds each torchao config: a bad enum member is one line now, not in the first job
        skip_reason(root.scheme, root.granularity, root.group_size)
    for output_dir in {root.output_dir for root in roots}:
        check_outputs(next(r for r in roots if r.output_dir == output_dir))
    return grid


def _first_choice(o) -> str:
    if o.is_sweep_override():
        return f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
    return o.input_line


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_entry(cfg: DictConfig) -> None:
    try:
        _run_job(cfg)
    except ConfigError as err:
        # Hydra would print a traceback and go on with the next job; a user mistake ends the sweep in one line.
        print(f"qsweep: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _run_job(cfg: DictConfig) -> None:
    from qsweep.sweep import PLAN_FILE, append_record, resolved_yaml, run_point

    root = to_root(cfg)
    check_outputs(root)  # checked before the sweep too; this guards a job started some other way
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
    """`mlflow ui` on the store a run with the same overrides would write to (see COMMAND_HELP["ui"]):
    prints the links to each recent experiment's runs (sorted by select.objective, qsweep's columns
    visible), charts, the best runs side by side and the last sweep, and opens the first in a browser."""
    from qsweep.dashboard import dashboard_links

    port, host, uri, root, browser = _ui_settings(args)
    if not _port_free(host, port):
        raise ConfigError(f"ui: {host}:{port} is in use (another `qsweep ui`?); choose another, e.g. --port "
                          f"{port % 65535 + 1}")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # a bind-all server, reached locally
    base = f"http://{shown}:{port}"
    print(f"MLflow UI on {base}  (store: {uri})", flush=True)
    try:
        links = dashboard_links(uri, base, root.select.objective, root.select.drift_metric)
    except Exception as err:  # the server is still worth starting: MLflow's own pages work
        print(f"qsweep: no dashboard links: {type(err).__name__}: {first_line(err)[:300]}", flush=True)
        links = []
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--port", str(port), "--host", host,
               "--workers", "1"]  # one reader of a local store; each worker is a process importing mlflow
    if host not in ("localhost", "127.0.0.1", "::1", "0.0.0.0", "::"):
        # MLflow answers only localhost by default: name this address, and let its pages write (select runs).
        command += ["--allowed-hosts", f"{shown}:{port},{shown}", "--cors-allowed-origins", base]
    # MLflow's job runner (GenAI judges, trace roll-ups) is a dozen processes polling the store that the
    # sweeps write to; qsweep's pages need none of it.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    server = subprocess.Popen(command, start_new_session=True, env=env)
    # A plain kill of `qsweep ui` ends the server too (the finally below), as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if not _wait_for_server(f"{base}/health", server):
            return server.wait() or 1
        for experiment in links:
            print("\n".join(experiment.lines()), flush=True)
        if not links:
            print("no runs in this store yet: `qsweep run -m +sweep=quickstart` records some", flush=True)
        if links and browser and _has_browser():
            import webbrowser

            webbrowser.open(links[0].runs)
        print("Ctrl-C stops the server.", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server's own group: mlflow ui starts worker children
            server.wait(30)


def _wait_for_server(url: str, server: subprocess.Popen, wait_s: float = 120) -> bool:
    """True once the server answers `url`; False if it exits first or takes longer than wait_s."""
    import time
    import urllib.request

    deadline = time.monotonic() + wait_s
    while server.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return True
        except OSError:
            time.sleep(0.3)
    return False


def _has_browser() -> bool:
    """A graphical browser can open here (a console one would take over the terminal the server logs to)."""
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _port_free(host: str, port: int) -> bool:
    """Whether the server can listen there (otherwise another server would answer qsweep's links)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.bind((host, port))
    except OSError as err:
        return err.errno != errno.EADDRINUSE  # another error (a name this check cannot bind): mlflow will say
    return True


def ui_options(args: list[str]) -> tuple[int, str, str]:
    """Port, host and tracking URI of `qsweep ui`: `--port N`, `--port=N` or `port=N` (same for host)."""
    return _ui_settings(args)[:3]


def _ui_settings(args: list[str]) -> tuple[int, str, str, RootConf, bool]:
    """ui_options, the composed config (select.objective orders the links) and whether to open a browser."""
    flags, overrides = split_flags("ui", args, ("--port", "--host", *CONFIG_DIR_FLAGS), ("--no-browser",))
    for key in ("port", "host"):
        flags.setdefault(f"--{key}", []).extend(o.partition("=")[2] for o in overrides if o.startswith(f"{key}="))
    overrides = [o for o in overrides if not o.startswith(("port=", "host="))]
    text = (flags["--port"] or ["5000"])[-1]
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"ui: port {text!r} is invalid; give an integer in 1..65535, e.g. --port 5001")
    host = (flags["--host"] or ["127.0.0.1"])[-1]
    if not host:
        raise ConfigError("ui: host is empty; e.g. --host 127.0.0.1 or --host 0.0.0.0")
    overrides = with_config_dirs(overrides, [d for f in CONFIG_DIR_FLAGS for d in flags.get(f, [])])
    root = load_config(overrides)[0]
    uri = mlflow_uri(root)
    check_tracking_uri(uri, write=False)
    return int(text), host, uri, root, "--no-browser" not in flags


if __name__ == "__main__":
    sys.exit(main())
