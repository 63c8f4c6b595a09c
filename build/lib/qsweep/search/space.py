"""The search space: candidate schemes, layer groups sharing one choice, and a group assignment
as a torchao FqnToConfig spec."""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass

from torch import nn

from qsweep import schemes
from qsweep.config import ConfigError, RootConf, choices, load_config

FQN_TO_CONFIG = "torchao.quantization.FqnToConfig"
NONE = "none"


# ---------------------------------------------------------------- candidates and search space

@dataclass(frozen=True)
class Candidate:
    """One scheme a layer may take: its name in the search and its torchao spec (None = unquantized)."""

    name: str
    spec: dict | None

    def fits(self, layer: nn.Linear) -> bool:
        """torchao rejects a group size that does not divide in_features; such a layer cannot take it."""
        group = schemes.group_size_of(self.spec)
        return not group or layer.in_features % group == 0


def resolve_candidates(root: RootConf, overrides: list[str], hw: schemes.Hardware, dtype: str) -> list[Candidate]:
    """search.candidates -> Candidates. `name` uses the run's granularity if the scheme accepts it, else
    the scheme's first; `name:granularity` picks one. Candidates this hardware cannot run are dropped."""
    base = [o for o in overrides if o.split("=")[0].lstrip("+~") not in ("scheme", "granularity")]
    found: list[Candidate] = []
    for text in root.search.candidates:
        name, _, gran = text.partition(":")
        if name not in choices("scheme", base):
            raise ConfigError(f"unknown search candidate {name!r}; valid schemes: {', '.join(choices('scheme', base))}")
        if gran and gran not in choices("granularity", base):
            raise ConfigError(f"unknown granularity in candidate {text!r}; valid: {', '.join(choices('granularity', base))}")
        scheme = load_config([*base, f"scheme={name}"])[0].scheme
        gran = gran or (root.granularity.name if not scheme.granularities or root.granularity.name
                        in scheme.granularities else scheme.granularities[0])
        point = load_config([*base, f"scheme={name}", f"granularity={gran}"])[0]
        skip = schemes.skip_reason(point.scheme, point.granularity, point.group_size)
        if skip:
            raise ConfigError(f"search candidate {text!r}: {skip}")
        why = schemes.unsupported_reason(point.scheme, hw, dtype, root.bench.batch_size)
        if why:
            print(f"qsweep search: dropping candidate {text}: {why}", flush=True)
            continue
        found.append(Candidate(text, schemes.quant_spec(point.scheme, point.granularity, point.group_size)))
    if len({c.name for c in found}) < 2:
        raise ConfigError("search needs at least two candidates this hardware can run; "
                          f"got {[c.name for c in found]} from {root.search.candidates}")
    return found


@dataclass
class Space:
    """Groups of layers (key -> FQNs) and the candidates each group may take."""

    groups: dict[str, list[str]]
    choices: dict[str, list[str]]

    @property
    def free(self) -> dict[str, list[str]]:
        """Groups with a real choice: the study's parameters."""
        return {k: v for k, v in self.choices.items() if len(v) > 1}

    def complete(self, params: dict[str, str]) -> dict[str, str]:
        """A full assignment (every group) from the study's parameters (free groups only)."""
        return {k: params.get(k, v[0] if v else NONE) for k, v in self.choices.items()}

    def uniform(self, name: str) -> dict[str, str]:
        """Every group takes `name` where it can (as a uniform grid point does), else stays unquantized."""
        return {k: name if name in v else (NONE if NONE in v else v[0]) for k, v in self.choices.items()}

    def size(self) -> int:
        return math.prod(len(v) for v in self.free.values())


def group_key(fqn: str, patterns: list[str]) -> str:
    """The first matching regex names the group; its capture groups split it (one choice per block)."""
    for i, pattern in enumerate(patterns):
        match = re.search(pattern, fqn)
        if match:
            return f"g{i}" + "".join(f"[{c}]" for c in match.groups())
    return fqn


def build_space(layers: dict[str, nn.Linear], candidates: list[Candidate], patterns: list[str]) -> Space:
    """Group layers by regex and keep, per group, the candidates every member can take."""
    groups: dict[str, list[str]] = {}
    for fqn in layers:
        groups.setdefault(group_key(fqn, patterns), []).append(fqn)
    allowed = {k: [c.name for c in candidates if all(c.fits(layers[f]) for f in fqns)] for k, fqns in groups.items()}
    return Space(groups, allowed)


def recipe_spec(assignment: dict[str, str], space: Space, candidates: list[Candidate]) -> dict:
    """The torchao FqnToConfig spec of a group assignment (unquantized layers map to None)."""
    by_name = {c.name: c.spec for c in candidates}
    fqn_to_config = {fqn: copy.deepcopy(by_name.get(assignment[key])) for key, fqns in space.groups.items()
                     for fqn in fqns}
    return {"_target_": FQN_TO_CONFIG, "fqn_to_config": fqn_to_config}


def counts(assignment: dict[str, str], space: Space) -> dict[str, int]:
    """Layers per scheme, e.g. {"int8wo": 2, "none": 1}: the compact param of a trial."""
    out: dict[str, int] = {}
    for key, name in assignment.items():
        out[name] = out.get(name, 0) + len(space.groups[key])
    return dict(sorted(out.items()))


def recipe_key(assignment: dict[str, str]) -> str:
    return json.dumps(assignment, sort_keys=True)
