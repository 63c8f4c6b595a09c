"""Config schemas (registered in Hydra's ConfigStore), composition and validation.

Every user mistake becomes a `ConfigError` with one line naming the valid choices; the CLI prints it
without a traceback.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A user mistake in the config or on the command line."""


# The configs ship inside the package (a pip-installed qsweep runs from any directory). In a checkout,
# src/qsweep/conf is a symlink to the top-level conf/, resolved here so paths and messages name conf/.
CONF_DIR = Path(os.environ.get("QSWEEP_CONF_DIR") or Path(__file__).parent / "conf").resolve()
SEARCHPATH = "hydra.searchpath"  # the Hydra key users add their own config folders with
GROUPS = ("model", "scheme", "granularity", "compile", "bench", "eval", "tracking", "search", "select", "sweep")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TIMINGS = ("auto", "device", "e2e")
OBJECTIVES = ("speedup", "size_ratio", "peak_mem_bytes", "drift")
DRIFT_METRICS = ("auto", "accuracy_drop", "drift_kl", "drift_max_abs", "drift_cosine", "top1_agreement",
                 "drift_sqnr_db")
CHECKPOINT_FORMATS = ("auto", "safetensors", "torch")


@dataclass
class ModelConf:
    name: str = MISSING
    builder: dict[str, Any] = MISSING  # {_target_: qsweep.models.<fn>, **kwargs}
    dtype: str | None = None  # a model may insist on a dtype (LMs: bfloat16); null = top-level dtype
    quantize_filter: str | None = None  # regex on layer names that may be quantized; null = all Linear


@dataclass
class RequiresConf:
    cuda: bool = False
    min_sm: float | None = None  # CUDA compute capability, e.g. 8.9 for float8
    dtypes: list[str] | None = None
    cuda_min_batch: int | None = None  # kernels with a minimum row count on CUDA
    cuda_max_batch: int | None = None  # kernels that fall off a cliff above this row count on CUDA


@dataclass
class SchemeConf:
    name: str = MISSING
    config: dict[str, Any] | None = None  # {_target_: torchao config class, **kwargs}; null = baseline
    granularity_arg: str | None = None  # kwarg receiving the torchao granularity object
    group_size_arg: str | None = None  # kwarg receiving the integer group size (int4 kernels)
    granularities: list[str] = field(default_factory=list)  # accepted; empty = fixed by the scheme
    group_sizes: list[int] | None = None  # accepted group sizes where the kernel limits them
    bits: int | None = None
    requires: RequiresConf = field(default_factory=RequiresConf)


@dataclass
class GranularityConf:
    name: str = MISSING
    spec: dict[str, Any] = MISSING  # {_target_: torchao.quantization.PerRow, ...}


@dataclass
class CompileConf:
    name: str = "none"
    mode: str | None = None  # torch.compile mode; null = eager
    cache_dir: str | None = None  # persistent inductor/autotune cache (repeated sweeps reuse it)


@dataclass
class BenchConf:
    batch_size: int = 16
    warmup: int = 5
    repeats: int = 30
    timing: str = "auto"  # device: CUDA graphs, no launch overhead | e2e: as a user calls it | auto
    l2_flush: bool = False
    max_cv: float = 0.10  # a run noisier than this is flagged
    processes: int = 1  # independent measurements per point, each in a fresh process that compiles again
    timeout_s: float = 900.0
    decode_tokens: int = 32  # LMs: decode steps timed per repeat
    # LMs: tokens per sequence in the timed forward (latency_ms, the search's cost model). null: eval.seq_len,
    # a prefill-shaped forward; 1: a decode-shaped step, weight-bound like generation.
    tokens: int | None = None


@dataclass
class EvalConf:
    n_samples: int = 256
    batch_size: int = 64
    seq_len: int = 128
    text: str = "builtin"  # LMs: builtin | a local text file | hf:<dataset>[:<config>[:<split>]]
    drift_positions: int = 4  # LMs: positions per sample whose logits are compared with the baseline
    seed: int = 0


@dataclass
class TrackingConf:
    uri: str | None = None  # null: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db
    experiment: str = "qsweep"


SEARCH_OBJECTIVES = ("speedup", "size")
SEARCH_DRIFTS = ("accuracy_drop", "drift_kl", "drift_max_abs")  # lower-is-better metrics of qsweep.metrics


@dataclass
class SearchConf:
    """Per-layer recipe search (qsweep search): see conf/search/default.yaml for the meaning of each key."""

    candidates: list[str] = field(default_factory=lambda: ["none", "int8wo", "intxwo_4", "intxwo_2"])
    objective: str = "speedup"  # speedup (cost model, confirmed end to end) | size (measured size_ratio)
    drift_metric: str = "accuracy_drop"
    max_drift: float = 0.01
    relative: bool = False  # max_drift is a fraction of the baseline task metric (accuracy_drop only)
    pareto: bool = False  # two objectives (objective, drift) -> a Pareto front; the budget still holds
    n_trials: int = 60  # trials the study should hold; rerun with a larger number to add trials
    timeout_s: float | None = None  # stop this worker after this many seconds
    groups: list[str] = field(default_factory=list)  # regexes: matching layers share one choice
    study: str | None = None  # null: <model>-<objective>-<drift_metric>
    storage: str | None = None  # SQLAlchemy URL; null: sqlite:///<output_dir>/optuna.db
    seed: int = 0
    sensitivity: bool = True
    seed_budgets: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])  # greedy seeds, x max_drift
    confirm_top_k: int = 3
    paired_rounds: int = 7  # confirmation: baseline and recipes timed in turn in one process, this many rounds
    exhaustive: bool = False  # also evaluate every recipe (small spaces) and compare with the search
    max_exhaustive: int = 4096
    max_retry: int = 1  # retries of a trial whose worker died (heartbeat)


@dataclass
class SelectConf:
    """`qsweep select/apply/report`: which runs, which constraints, which objective (conf/select/)."""

    experiment: str | None = None  # MLflow experiment to read; null = tracking.experiment
    name: str | None = None  # recipe name (outputs/recipes/<name>.yaml); null = the experiment's name
    recipe: str | None = None  # apply: path of the recipe file
    drift_metric: str = "auto"  # auto: accuracy_drop when the runs have it, else 1 - drift_cosine
    max_drift: float = 0.01  # upper bound on the drift cost (see drift_metric)
    relative: bool = False  # accuracy_drop as a fraction of the baseline's task metric
    objective: str = "speedup"  # speedup | size_ratio | peak_mem_bytes | drift
    min_speedup: float | None = None
    max_size_bytes: float | None = None
    max_mem_bytes: float | None = None
    model: str | None = None  # keep runs of this model / device / dtype; null = the only one present
    device: str | None = None
    dtype: str | None = None
    drift_tol: float = 0.005  # apply: |re-measured - recorded| allowed on the drift metric
    size_tol: float = 0.02  # apply: relative difference allowed on size_bytes
    checkpoint_format: str = "auto"  # auto (safetensors where torchao supports it) | safetensors | torch


@dataclass
class RootConf:
    model: ModelConf = MISSING
    scheme: SchemeConf = MISSING
    granularity: GranularityConf = MISSING
    compile: CompileConf = MISSING
    bench: BenchConf = field(default_factory=BenchConf)
    eval: EvalConf = field(default_factory=EvalConf)
    tracking: TrackingConf = field(default_factory=TrackingConf)
    search: SearchConf = field(default_factory=SearchConf)
    select: SelectConf = field(default_factory=SelectConf)
    group_size: int = 128
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    output_dir: str = "outputs"
    force: bool = False  # re-run points already finished
    isolate: bool = True  # each trial in its own child process


def register_schema() -> None:
    ConfigStore.instance().store(name="qsweep_schema", node=RootConf)


register_schema()


def choices(group: str, overrides: Sequence[str] = ()) -> list[str]:
    """The config names available in one group: <dir>/<group>/*.yaml over qsweep's conf/ and every folder
    that a `hydra.searchpath=[...]` override in `overrides` adds."""
    return sorted({p.stem for d in (CONF_DIR, *user_config_dirs(overrides)) for p in (d / group).glob("*.yaml")})


def user_config_dirs(overrides: Sequence[str]) -> list[Path]:
    """The folders that a `hydra.searchpath=[file:///a,pkg://b.c,...]` override adds, as paths.

    Raises ConfigError when one of them is not a directory: Hydra itself would only warn and then report
    the user's config as unknown.
    """
    found = [o for o in overrides if o.partition("=")[0].lstrip("+") == SEARCHPATH]
    if not found:
        return []
    try:
        entries = OverridesParser.create().parse_overrides(found[-1:])[0].value()
    except Exception as err:
        raise ConfigError(f"cannot parse {found[-1]!r}: {first_line(err)}") from None
    if not isinstance(entries, list):
        raise ConfigError(f"{SEARCHPATH} must be a list, e.g. {SEARCHPATH}=[file:///my/confs]; got {found[-1]!r}")
    dirs = []
    for entry in map(str, entries):
        scheme, sep, rest = entry.partition("://")
        if not sep:
            scheme, rest = "file", entry
        if scheme == "file":
            path = Path(rest)
        elif scheme == "pkg":
            try:
                path = Path(str(importlib.resources.files(rest.replace("/", "."))))
            except (ImportError, TypeError):
                raise ConfigError(f"{SEARCHPATH}: no package {rest!r} (from {entry!r})") from None
        else:
            continue  # structured:// and plugin schemes list no files here
        if not path.is_dir():
            raise ConfigError(f"{SEARCHPATH}: {entry!r} is not a directory")
        dirs.append(path)
    return dirs


def with_config_dirs(overrides: Sequence[str], dirs: Sequence[str]) -> list[str]:
    """`overrides` with `dirs` (Hydra's --config-dir values) added to its `hydra.searchpath` override."""
    if not dirs:
        return list(overrides)
    for d in dirs:
        if not Path(d).is_dir():
            raise ConfigError(f"--config-dir {d!r} is not a directory")
    rest = [o for o in overrides if o.partition("=")[0].lstrip("+") != SEARCHPATH]
    paths = [*map(Path, dirs), *(user_config_dirs(overrides) if len(rest) < len(overrides) else [])]
    return [*rest, f"{SEARCHPATH}=[{','.join(f'file://{p.resolve()}' for p in paths)}]"]


def to_root(cfg: DictConfig) -> RootConf:
    """Turn a composed config into checked dataclasses; raise ConfigError on any bad value."""
    try:
        root: RootConf = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except Exception as err:  # OmegaConf's messages are multi-line; keep the first
        raise ConfigError(first_line(err)) from None
    _check(root.device in DEVICES, f"device={root.device!r} is invalid; valid: {', '.join(DEVICES)}")
    _check(root.dtype in DTYPES, f"dtype={root.dtype!r} is invalid; valid: {', '.join(DTYPES)}")
    _check(root.bench.timing in TIMINGS, f"bench.timing={root.bench.timing!r} is invalid; valid: {', '.join(TIMINGS)}")
    gs = root.group_size
    _check(isinstance(gs, int) and gs > 0 and gs & (gs - 1) == 0,
           f"group_size={gs} is invalid; torchao needs a positive power of two, e.g. 32, 64, 128, 256")
    bits = root.scheme.bits
    _check(bits is None or 1 <= bits <= 8, f"scheme.bits={bits} is invalid; valid: 1, 2, 3, 4, 5, 6, 7, 8")
    _check(root.bench.repeats >= 3 and root.bench.warmup >= 0,
           "bench.repeats must be >= 3 (a median needs repeats) and bench.warmup >= 0")
    for name, value in (("bench.batch_size", root.bench.batch_size), ("eval.n_samples", root.eval.n_samples),
                        ("eval.batch_size", root.eval.batch_size), ("eval.seq_len", root.eval.seq_len),
                        ("eval.drift_positions", root.eval.drift_positions)):
        _check(value > 0, f"{name}={value} is invalid; it must be a positive integer")
    _check_search(root.search)
    _check_select(root.select)
    return root


def _check_search(s: SearchConf) -> None:
    _check(s.objective in SEARCH_OBJECTIVES,
           f"search.objective={s.objective!r} is invalid; valid: {', '.join(SEARCH_OBJECTIVES)}")
    _check(s.drift_metric in SEARCH_DRIFTS,
           f"search.drift_metric={s.drift_metric!r} is invalid; valid: {', '.join(SEARCH_DRIFTS)}")
    _check(not s.relative or s.drift_metric == "accuracy_drop",
           "search.relative=true needs search.drift_metric=accuracy_drop (a baseline's KL is 0)")
    _check(s.max_drift >= 0, f"search.max_drift={s.max_drift} is invalid; it must be >= 0")
    _check(s.n_trials > 0 and s.confirm_top_k >= 0, "search.n_trials must be > 0 and search.confirm_top_k >= 0")
    _check(len(s.candidates) >= 2, "search.candidates needs at least two schemes, e.g. [none,int8wo]")
    for pattern in s.groups:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"search.groups: {pattern!r} is not a regex: {err}") from None


def _check_select(sel: SelectConf) -> None:
    _check(sel.objective in OBJECTIVES, f"select.objective={sel.objective!r} is invalid; valid: {', '.join(OBJECTIVES)}")
    _check(sel.drift_metric in DRIFT_METRICS,
           f"select.drift_metric={sel.drift_metric!r} is invalid; valid: {', '.join(DRIFT_METRICS)}")
    _check(sel.checkpoint_format in CHECKPOINT_FORMATS,
           f"select.checkpoint_format={sel.checkpoint_format!r} is invalid; valid: {', '.join(CHECKPOINT_FORMATS)}")
    _check(not sel.relative or sel.drift_metric in ("auto", "accuracy_drop"),
           "select.relative=true applies to drift_metric accuracy_drop (or auto) only")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def first_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def mlflow_uri(root: RootConf) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else SQLite under output_dir."""
    if root.tracking.uri:
        return root.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(root.output_dir).resolve() / 'mlflow.db'}"


def check_outputs(root: RootConf) -> None:
    """Check, before any trial, that qsweep can write output_dir and open the tracking store.

    Raises ConfigError (one line): otherwise each trial would fail only after its measurement, with
    nothing recorded.
    """
    check_writable(Path(root.output_dir), "output_dir")
    check_tracking_uri(mlflow_uri(root))


def check_writable(directory: Path, what: str) -> None:
    """Create `directory` if needed and write a temporary file in it; ConfigError naming `what` if not."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise ConfigError(f"{what} {str(directory)!r} is not writable: {err.strerror or err}") from None


def check_tracking_uri(uri: str, write: bool = True) -> None:
    """Check that MLflow has a store for the URI's scheme and, for a local store (sqlite, file), that its
    folder is writable. Does not create the store: that happens once, in qsweep.tracking."""
    from urllib.parse import urlparse

    # MLflow has no public "is this URI valid" call; MlflowClient(uri) would create and migrate a SQLite
    # store as a side effect. The registry resolves the scheme only.
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry as registry

    try:
        registry.get_store_builder(uri)
    except Exception:
        valid = sorted(f"{s}://" for s in getattr(registry, "_registry", {}) if s)
        raise ConfigError(f"tracking URI {uri!r} (tracking.uri or $MLFLOW_TRACKING_URI) names no MLflow store; "
                          f"valid schemes: {', '.join(valid)} or a local path") from None
    if not write:
        return
    scheme = urlparse(uri).scheme
    if scheme == "sqlite":
        path = uri[len("sqlite:///"):].split("?")[0] if uri.startswith("sqlite:///") else ""
        if path and path != ":memory:":
            check_writable(Path(path).parent, "the folder of tracking URI")
    elif scheme in ("", "file"):
        check_writable(Path(urlparse(uri).path if scheme else uri), "tracking URI")


def load_config(overrides: list[str]) -> tuple[RootConf, DictConfig]:
    """Compose conf/config.yaml with overrides (outside a Hydra run) and validate it."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose_config(overrides)
    return to_root(cfg), cfg


def compose_config(overrides: list[str], hydra_config: bool = False) -> DictConfig:
    try:
        return compose("config", overrides=overrides, return_hydra_config=hydra_config)
    except Exception as err:
        raise ConfigError(_explain(err, overrides)) from None


def _explain(err: Exception, overrides: list[str]) -> str:
    text = str(err)
    key = re.search(r"full_key: (\S+)", text) or re.search(r"Could not override '([^']+)'", text)
    if key and ("not in struct" in text or "Could not override" in text):
        name = key.group(1)
        parent = name.rpartition(".")[0]
        base = compose("config", overrides=[o for o in overrides
                                            if o.split("=")[0].lstrip("+~") in (*GROUPS, SEARCHPATH)])
        node = OmegaConf.select(base, parent) if parent else base
        valid = ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else "?"
        return f"unknown key {name!r}; valid keys{' under ' + parent if parent else ''}: {valid}"
    if err.__cause__ is not None:  # a bad value: Hydra's own line only names the override
        return f"{first_line(err)}: {first_line(err.__cause__)}"
    return first_line(err)
