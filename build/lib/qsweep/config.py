"""Config schemas (registered in Hydra's ConfigStore), composition and validation.

Every user mistake becomes a `ConfigError` with one line naming the valid choices; the CLI prints it
without a traceback. Values from a fixed set are Enum fields, which OmegaConf checks as the config is
composed; every other rule is a `__post_init__` check, run when the composed config becomes dataclasses
(`to_root`). Objectives and drift metrics are read from the metric schema (`qsweep.objectives`).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.resources
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_type_hints

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from qsweep import objectives


class ConfigError(ValueError):
    """A user mistake in the config or on the command line."""


# The configs ship inside the package (a pip-installed qsweep runs from any directory). In a checkout,
# src/qsweep/conf is a symlink to the top-level conf/, resolved here so paths and messages name conf/.
CONF_DIR = Path(os.environ.get("QSWEEP_CONF_DIR") or Path(__file__).parent / "conf").resolve()
SEARCHPATH = "hydra.searchpath"  # the Hydra key users add their own config folders with
GROUPS = ("model", "scheme", "granularity", "compile", "bench", "eval", "tracking", "search", "select", "sweep")
AUTO = "auto"


class Choice(str, enum.Enum):
    """A config value from a fixed set. OmegaConf checks it as the config is composed (`device=tpu` fails
    there); afterwards it is a plain string to every consumer: it compares, hashes, formats and serialises
    (JSON, YAML, MLflow params) as its value, so point hashes and recorded params are unchanged."""

    def __str__(self) -> str:
        return str(self.value)


# Recipes are written with yaml.safe_dump, which represents str but not its subclasses.
yaml.SafeDumper.add_multi_representer(Choice, lambda dumper, value: dumper.represent_str(str(value.value)))


class Device(Choice):
    auto = "auto"  # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"


class Dtype(Choice):
    auto = "auto"  # bfloat16 on CUDA, float32 on CPU
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class CompileScope(Choice):
    model = "model"    # the whole model is one compiled graph per input shape
    blocks = "blocks"  # each repeated block (an LLM's decoder layers) on its own: compiled once, the rest from cache


class Timing(Choice):
    auto = "auto"  # device on CUDA, e2e on CPU
    device = "device"  # CUDA-graph replays timed with events: no launch overhead
    e2e = "e2e"  # plain calls with a sync, as a user calls the model


class CheckpointFormat(Choice):
    auto = "auto"  # safetensors where torchao can flatten every tensor, else torch.save
    safetensors = "safetensors"
    torch = "torch"


# search.objective: one member per row of objectives.SEARCH_OBJECTIVES.
SearchObjectiveName = Choice("SearchObjectiveName", [(name, name) for name in objectives.SEARCH_OBJECTIVES],
                             module=__name__)


def _member(kind: type[Choice], value: Any, key: str) -> Choice:
    """`value` as a member of `kind`: a dataclass built in code (not composed) is checked here too."""
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(invalid(key, value, [m.value for m in kind])) from None


def invalid(key: str, value: Any, valid: Sequence[Any]) -> str:
    """The one-line message for a value outside its choices: `device='tpu' is invalid; valid: auto, cpu, cuda`."""
    return f"{key}={value!r} is invalid; valid: {', '.join(map(str, valid))}"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(key: str, value: int) -> None:
    _check(value > 0, f"{key}={value} is invalid; it must be a positive integer")


@dataclass
class ModelConf:
    name: str = MISSING
    builder: dict[str, Any] = MISSING  # {_target_: qsweep.models.<fn>, **kwargs}
    dtype: Dtype | None = None  # a model may insist on a dtype (LMs: bfloat16); null = top-level dtype
    quantize_filter: str | None = None  # regex on layer names that may be quantized; null = all Linear
    # LMs: keep (lm_head stays in the model's dtype) | quantize (lm_head too: ~1 GB of an 8B model's
    # reads per token). null: no lm_head rule. `keep` narrows quantize_filter to exclude lm_head.
    lm_head: str | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None:
            self.dtype = _member(Dtype, self.dtype, "model.dtype")
        _check(self.lm_head in (None, *LM_HEAD_POLICIES),
               f"model.lm_head={self.lm_head!r} is invalid; valid: {', '.join(LM_HEAD_POLICIES)}")
        if self.lm_head == "keep" and not (self.quantize_filter or "").startswith(KEEP_LM_HEAD):
            self.quantize_filter = KEEP_LM_HEAD + (f"(?=.*(?:{self.quantize_filter}))" if self.quantize_filter else "")


LM_HEAD_POLICIES = ("keep", "quantize")
KEEP_LM_HEAD = "^(?!lm_head$)"  # a negative lookahead on the FQN: every layer but lm_head


@dataclass
class RequiresConf:
    cuda: bool = False
    min_sm: float | None = None  # CUDA compute capability, e.g. 8.9 for float8
    dtypes: list[str] | None = None
    cuda_min_batch: int | None = None  # kernels with a minimum row count on CUDA
    cuda_max_batch: int | None = None  # kernels that fall off a cliff above this row count on CUDA
    packages: list[str] | None = None  # Python modules its kernels import (e.g. mslk): absent -> unsupported


@dataclass
class QATConf:
    """scheme.qat: fine-tuning between QATConfig's prepare and convert (flow: qat)."""

    steps: int = 100  # optimizer steps on the model bundle's training data
    lr: float = 1e-4  # AdamW learning rate
    batch_size: int = 64
    ptq_twin: bool = True  # also quantize a copy without training: its accuracy_drop is ptq_accuracy_drop

    def __post_init__(self) -> None:
        _positive("scheme.qat.steps", self.steps)
        _positive("scheme.qat.batch_size", self.batch_size)
        _check(self.lr > 0, f"scheme.qat.lr={self.lr} is invalid; it must be > 0")


@dataclass
class CalibConf:
    """scheme.calib: the batches static activation scales are observed on (flow: static, pt2e)."""

    batches: int = 8
    batch_size: int = 32

    def __post_init__(self) -> None:
        _positive("scheme.calib.batches", self.batches)
        _positive("scheme.calib.batch_size", self.batch_size)


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
    # How the config is applied (qsweep.flows): ptq = one-shot quantize_; qat, static, sparsity, pt2e,
    # eager_dynamic add a step before or after it. Every scheme has the flows' knobs (a grid may set
    # scheme.qat.steps for all its points); each flow reads its own (qat:, calib:), the others ignore them.
    flow: str = "ptq"
    qat: QATConf = field(default_factory=QATConf)
    calib: CalibConf = field(default_factory=CalibConf)

    def __post_init__(self) -> None:
        from qsweep.flows import FLOWS  # not at import: the flows import this module

        _check(self.bits is None or 1 <= self.bits <= 8,
               f"scheme.bits={self.bits} is invalid; valid: 1, 2, 3, 4, 5, 6, 7, 8")
        _check(self.flow in FLOWS, invalid("scheme.flow", self.flow, list(FLOWS)))


@dataclass
class GranularityConf:
    name: str = MISSING
    spec: dict[str, Any] = MISSING  # {_target_: torchao.quantization.PerRow, ...}


@dataclass
class CompileConf:
    name: str = "none"
    mode: str | None = None  # torch.compile mode; null = eager
    cache_dir: str | None = None  # persistent inductor/autotune cache (repeated sweeps reuse it)
    scope: CompileScope = CompileScope.model
    # Inductor options of this point, by their torch._inductor.config names (nested ones dotted:
    # +compile.inductor.dynamic_scale_rblock=false, '+compile.inductor={triton.autotune_pointwise: false}').
    inductor: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scope = _member(CompileScope, self.scope, "compile.scope")
        if not self.mode:  # an eager point compiles nothing: one eager point for a grid with an options axis
            self.inductor = {}
        if self.inductor:
            import difflib

            from torch._inductor import config as inductor_config

            for name in self.inductor:
                close = difflib.get_close_matches(name, list(inductor_config._config), 3)
                _check(name in inductor_config._config,
                       f"compile.inductor.{name} is not an Inductor option (torch._inductor.config)"
                       + (f"; did you mean: {', '.join(close)}" if close else ""))


@dataclass
class BenchConf:
    batch_size: int = 16
    warmup: int = 5
    repeats: int = 30
    timing: Timing = Timing.auto
    l2_flush: bool = False
    max_cv: float = 0.10  # a run noisier than this is flagged
    processes: int = 1  # independent measurements per point, each in a fresh process that compiles again
    timeout_s: float = 900.0
    decode_tokens: int = 32  # LMs: decode steps timed per repeat
    # LMs: tokens per sequence in the timed forward (latency_ms, the search's cost model). null: eval.seq_len,
    # a prefill-shaped forward; 1: a decode-shaped step, weight-bound like generation.
    tokens: int | None = None

    def __post_init__(self) -> None:
        self.timing = _member(Timing, self.timing, "bench.timing")
        _check(self.repeats >= 3 and self.warmup >= 0,
               "bench.repeats must be >= 3 (a median needs repeats) and bench.warmup >= 0")
        _positive("bench.batch_size", self.batch_size)


@dataclass
class EvalConf:
    n_samples: int = 256
    batch_size: int = 64
    seq_len: int = 128
    text: str = "builtin"  # LMs: builtin | a local text file | hf:<dataset>[:<config>[:<split>]]
    drift_positions: int = 4  # LMs: positions per sample whose logits are compared with the baseline
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_samples", "batch_size", "seq_len", "drift_positions"):
            _positive(f"eval.{name}", getattr(self, name))


@dataclass
class TrackingConf:
    uri: str | None = None  # null: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db
    experiment: str = "qsweep"


@dataclass
class SearchConf:
    """Per-layer recipe search (qsweep search): see conf/search/default.yaml for the meaning of each key."""

    candidates: list[str] = field(default_factory=lambda: ["none", "int8wo", "intxwo_4", "intxwo_2"])
    objective: SearchObjectiveName = SearchObjectiveName("speedup")  # a row of objectives.SEARCH_OBJECTIVES
    drift_metric: str = "accuracy_drop"  # a lower-is-better drift metric of the schema
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
    n_workers: int = 1  # worker processes on the study at once (one per GPU on CUDA): qsweep.search.parallel

    def __post_init__(self) -> None:
        self.objective = _member(SearchObjectiveName, self.objective, "search.objective")
        drifts = objectives.search_drift_metrics()
        _check(self.drift_metric in drifts, invalid("search.drift_metric", self.drift_metric, drifts))
        _check(not self.relative or self.drift_metric == "accuracy_drop",
               "search.relative=true needs search.drift_metric=accuracy_drop (a baseline's KL is 0)")
        _check(self.max_drift >= 0, f"search.max_drift={self.max_drift} is invalid; it must be >= 0")
        _check(self.n_trials > 0 and self.confirm_top_k >= 0,
               "search.n_trials must be > 0 and search.confirm_top_k >= 0")
        _check(len(self.candidates) >= 2, "search.candidates needs at least two schemes, e.g. [none,int8wo]")
        _positive("search.n_workers", self.n_workers)
        for pattern in self.groups:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"search.groups: {pattern!r} is not a regex: {err}") from None


@dataclass
class SelectConf:
    """`qsweep select/apply/report`: which runs, which constraints, which objective (conf/select/)."""

    experiment: str | None = None  # MLflow experiment to read; null = tracking.experiment
    name: str | None = None  # recipe name (outputs/recipes/<name>.yaml); null = the experiment's name
    recipe: str | None = None  # apply: path of the recipe file
    drift_metric: str = AUTO  # a drift metric of the schema; auto: accuracy_drop when the runs have it, else drift_cosine
    max_drift: float = 0.01  # upper bound on the drift cost (see drift_metric)
    relative: bool = False  # accuracy_drop as a fraction of the baseline's task metric
    objective: str = "speedup"  # an objective metric of the schema (objectives.selection_objectives) or drift
    min_speedup: float | None = None
    max_size_bytes: float | None = None
    max_mem_bytes: float | None = None
    model: str | None = None  # keep runs of this model / device / dtype; null = the only one present
    device: str | None = None
    dtype: str | None = None
    drift_tol: float = 0.005  # apply: |re-measured - recorded| allowed on the drift metric
    size_tol: float = 0.02  # apply: relative difference allowed on size_bytes
    checkpoint_format: CheckpointFormat = CheckpointFormat.auto

    def __post_init__(self) -> None:
        # Read from the schema when checked, not fixed at import: a new objective metric is valid at once.
        goals, drifts = list(objectives.selection_objectives()), [AUTO, *objectives.drift_metrics()]
        _check(self.objective in goals, invalid("select.objective", self.objective, goals))
        _check(self.drift_metric in drifts, invalid("select.drift_metric", self.drift_metric, drifts))
        self.checkpoint_format = _member(CheckpointFormat, self.checkpoint_format, "select.checkpoint_format")
        _check(not self.relative or self.drift_metric in (AUTO, "accuracy_drop"),
               "select.relative=true applies to drift_metric accuracy_drop (or auto) only")


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
    device: Device = Device.auto
    dtype: Dtype = Dtype.auto
    seed: int = 0
    output_dir: str = "outputs"
    force: bool = False  # re-run points already finished
    isolate: bool = True  # each trial in its own child process

    def __post_init__(self) -> None:
        self.device = _member(Device, self.device, "device")
        self.dtype = _member(Dtype, self.dtype, "dtype")
        gs = self.group_size
        _check(isinstance(gs, int) and gs > 0 and gs & (gs - 1) == 0,
               f"group_size={gs} is invalid; torchao needs a positive power of two, e.g. 32, 64, 128, 256")


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
    """Turn a composed config into checked dataclasses (each one's `__post_init__` checks its values);
    raise ConfigError on any bad value."""
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except ConfigError:
        raise
    except Exception as err:  # OmegaConf's messages are multi-line; keep the first
        raise ConfigError(first_line(err)) from None



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
    elif scheme in ("http", "https"):
        check_server(uri)


def check_server(uri: str, timeout_s: float = 10.0) -> None:
    """ConfigError (one line) when nothing answers at a tracking server's URI: otherwise every point would
    be measured and then fail to record. Any HTTP answer counts (a proxy may not route /health)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise ConfigError(f"tracking server {uri} does not answer ({reason}); start it (`make services`, README "
                          "\"Scaling out\") or fix tracking.uri / $MLFLOW_TRACKING_URI") from None


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
        if isinstance(node, DictConfig) and node._metadata.object_type is dict:  # a free-form mapping
            return f"unknown key {name!r} (keys under {parent}: {valid or 'none'}); add a key with +{name}=<value>"
        return f"unknown key {name!r}; valid keys{' under ' + parent if parent else ''}: {valid}"
    # A bad value on the command line is the cause; one in a YAML file (`In 'bench/mine': ...`) the context.
    cause = err.__cause__ or (err.__context__ if isinstance(err.__context__, ValidationError) else None)
    kind = _choice_type(cause) if isinstance(cause, ValidationError) else None
    if kind is not None:  # OmegaConf checked an Enum field: name the key and its members in qsweep's words
        source = re.match(r"In '([^']+)'", text)
        return (f"{source.group(1)}.yaml: " if source else "") + invalid(
            str(cause.full_key), cause.value, [m.value for m in kind])
    if cause is not None:  # a bad value: Hydra's own line only names the override or the file
        return f"{first_line(err).rstrip(':')}: {first_line(cause)}"
    return first_line(err)


def _choice_type(err: ValidationError) -> type[Choice] | None:
    """The Choice type of the schema field that a validation error is about, or None."""
    owner, leaf = err.object_type, str(err.full_key).rpartition(".")[2]
    if not (isinstance(owner, type) and dataclasses.is_dataclass(owner)):
        return None
    hint = get_type_hints(owner).get(leaf)
    for kind in (hint, *get_args(hint)):
        if isinstance(kind, type) and issubclass(kind, Choice):
            return kind
    return None
