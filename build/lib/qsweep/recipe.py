"""The recipe: what to ship (a torchao config and the model it was measured on), one format everywhere.

Every measured config carries it: each grid point and search trial logs `recipe.json` (RECIPE_FILE) with
its own metrics, a search writes its best as one, `qsweep select` adds the selection and writes it as
YAML, and `qsweep apply` reads either form (JSON is YAML). Stores written by an older qsweep are still
read (`quant_spec.json`, a search trial's `{"groups", "quant"}`).

A recipe is data that people share and download, never code to run. Loading one checks every part
that could reach code before anything is built:
- `quant` builds only torchao configs, granularities and enums (`schemes.build`);
- `model.builder._target_` must be a builder registered with `models.recipe_builder`, and no other
  `_target_` may appear anywhere in the model section;
- keys that load code (`trust_remote_code`) may not be turned on by a recipe, only by the user's own
  model config (`qsweep apply recipe=... model=<name> model.builder.trust_remote_code=true`);
- the name becomes a safe file name, so nothing derived from it leaves the output folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from qsweep import schemes
from qsweep.config import ConfigError, first_line
from qsweep.flows import check_flow

RECIPE_FILE = "recipe.json"  # run artifact of every grid point and search trial
LEGACY_QUANT_FILE = "quant_spec.json"  # older grid points: the bare torchao spec
# Builder keys that would load or run code from the model's files; a recipe may not turn them on.
CODE_KEYS = ("trust_remote_code",)
# Builder keys naming a folder the builder writes to (a trained model's cache); apply points them into
# its own output folder so that a recipe cannot choose where files are written.
WRITE_PATH_KEYS = ("cache_dir",)


@dataclass
class Recipe:
    """What to ship: the torchao config (plain spec) and the model it was measured on, with provenance."""

    name: str
    quant: dict  # uniform spec, or {"_target_": "torchao.quantization.FqnToConfig", "fqn_to_config": {...}}
    model: dict  # {name, builder: {_target_: qsweep.models.<fn>, ...}, quantize_filter}
    dtype: str
    eval: dict  # {n_samples, batch_size, seed}: how the recorded drift was measured
    metrics: dict[str, float]
    selection: dict  # constraints, objective, drift metric, feasible, counts
    source: dict  # {experiment, run_id, run_name, kind}
    hardware: dict  # {device, device_name}
    versions: dict
    created: str
    # How quant is applied (qsweep.flows.flow_spec: name and knobs, e.g. QAT steps); None = ptq. apply replays it.
    flow: dict | None = None


def measured_recipe(name: str, quant: dict, model: dict, dtype: str, evaluation: dict, metrics: dict[str, float],
                    source: dict, hardware: dict, versions: dict, flow: dict | None = None) -> Recipe:
    """The recipe of one measured config, before any selection (what a run logs as RECIPE_FILE).

    Args:
        model: {name, builder, quantize_filter}; evaluation: {n_samples, batch_size, seed}.
    """
    return Recipe(name=safe_name(name), quant=quant, model=model, dtype=dtype, eval=evaluation,
                  metrics={k: float(v) for k, v in metrics.items()}, selection={}, source=source,
                  hardware=hardware, versions=versions,
                  created=datetime.now(timezone.utc).isoformat(timespec="seconds"), flow=flow)


def model_section(model: dict) -> dict:
    """A recipe's `model` from a model config (conf/model/*.yaml as a dict)."""
    return {"name": model["name"], "builder": dict(model["builder"]), "quantize_filter": model.get("quantize_filter")}


def eval_section(evaluation: dict, seed: int) -> dict:
    """A recipe's `eval` (how its drift was measured) from an eval config and the run's seed."""
    return {"n_samples": evaluation["n_samples"], "batch_size": evaluation["batch_size"], "seed": seed}


def to_json(recipe: Recipe) -> str:
    return json.dumps(asdict(recipe), indent=1, default=str)


def from_artifact(name: str, text: str) -> dict:
    """The recipe fields a run artifact holds: a whole recipe (RECIPE_FILE), or, from older stores, only
    {"quant": spec} (quant_spec.json, or a search trial's {"groups", "quant"} recipe.json)."""
    data = json.loads(text)
    if name == LEGACY_QUANT_FILE:
        return {"quant": data}
    return {k: data[k] for k in Recipe.__dataclass_fields__ if k in data}


def safe_name(text: str) -> str:
    """A file name from an experiment, run or user-given name: no separators, no leading dots."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "recipe"


def export_recipe(recipe: Recipe, path: Path) -> Path:
    """Write a recipe as readable YAML (block style, keys in a fixed order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# qsweep recipe: {recipe.source['run_name']} from experiment {recipe.source['experiment']}\n"
              f"# apply: qsweep apply recipe={path}\n")
    path.write_text(header + yaml.safe_dump(asdict(recipe), sort_keys=False, default_flow_style=False))
    return path


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe file; anything that could run code raises ConfigError with one line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.constructor.ConstructorError as err:  # !!python/object and friends
        raise ConfigError(f"recipe {path}: refusing YAML tag {err.problem.split()[-1] if err.problem else ''}"
                          " (a recipe is plain data; tags that build Python objects are not read)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"recipe {path} is not a YAML recipe file: {first_line(err)}") from None
    keys = list(Recipe.__dataclass_fields__)
    optional = {"flow"}  # recipes written before flows existed are ptq
    missing = [k for k in keys if k not in optional and (not isinstance(data, dict) or k not in data)]
    if missing:
        raise ConfigError(f"recipe {path} lacks {', '.join(missing)}")
    recipe = Recipe(**{k: data[k] for k in keys if k in data})
    recipe.name = safe_name(recipe.name)
    schemes.build(recipe.quant)  # raises ConfigError on any class outside the allowlist
    check_flow(recipe.flow)  # a known flow with known knobs: data, never code
    check_model(recipe.model, path)
    return recipe


def check_model(model: Any, origin: Path | str) -> None:
    """A recipe's model section may name one registered builder and plain values, nothing that runs code."""
    from qsweep.models import RECIPE_BUILDERS

    builder = model.get("builder") if isinstance(model, dict) else None
    target = builder.get("_target_") if isinstance(builder, dict) else None
    if target not in RECIPE_BUILDERS:
        raise ConfigError(f"recipe {origin}: refusing model builder {target!r}; a recipe may name only "
                          f"{', '.join(sorted(RECIPE_BUILDERS))} (your own builder: apply with model=<your config>)")
    nested = [k for k in _targets(model) if k != "builder._target_"]
    if nested:
        raise ConfigError(f"recipe {origin}: refusing {nested[0]}: only model.builder._target_ may name a callable")
    for key in CODE_KEYS:
        if builder.get(key):
            raise ConfigError(f"recipe {origin} sets model.builder.{key}=true: a recipe may not load code; to trust "
                              f"this model's code, use your own config: model=<name> model.builder.{key}=true")


def _targets(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every `_target_` key in a nested dict/list."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if key == "_target_":
                found.append(path)
            found += _targets(value, path + ".")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _targets(value, f"{prefix}{i}.")
    return found


def unmatched_fqns(quant: dict, names: set[str]) -> list[str]:
    """Keys of a per-layer recipe that match no module or parameter name (torchao would ignore them)."""
    import re

    if not str(quant.get("_target_", "")).endswith("FqnToConfig"):
        return []
    missing = []
    for fqn in quant.get("fqn_to_config") or {}:
        if fqn == "_default":
            continue
        if fqn.startswith("re:"):
            if not any(re.fullmatch(fqn[3:], name) for name in names):
                missing.append(fqn)
        elif fqn not in names:
            missing.append(fqn)
    return missing
