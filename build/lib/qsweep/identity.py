"""Model identity: what makes two builds from one builder config the same model, so that a changed
builder (its code, the classes it uses, its weight files) means a new baseline and new measurements."""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

from qsweep.config import first_line


def stable_hash(payload: Any) -> str:
    """A short hash of JSON-able data, the same in every process (point and config keys)."""
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Builder keys that name pretrained weights (a file, a folder or a hub id).
WEIGHT_KEYS = ("name_or_path", "weights", "checkpoint", "pretrained")


def model_identity(builder: dict) -> str:
    """What makes two builds from the same builder config the same model: the builder's code and, for
    pretrained weights, the weight files. Part of every point's hash, so editing a builder (or a class or
    helper of its package it uses) or replacing the weights means a new baseline and new measurements.

    Code: the source of the builder function and, transitively, of the functions and classes of its own
    top-level package that it references (the model class with its forward, helpers), plus the versions
    of the third-party packages that code imports (transformers defines an HF model's layers). This is
    what fixes parameter shapes and dtypes for a given config; the model is not built here (building on
    the meta device would still run builders that train or download on first use).
    Weights: name, size and mtime of the files under a builder key in WEIGHT_KEYS (a hub id: the commit
    cached locally), unless `random_init` is set.
    """
    return stable_hash({"code": _code_identity(str(builder.get("_target_", ""))), "weights": weights_identity(builder)})


@functools.cache
def _code_identity(target: str) -> str:
    try:
        module_name, _, name = target.rpartition(".")
        fn = getattr(importlib.import_module(module_name), name)
        sources, imports = _code_closure(fn)
    except Exception as err:  # an unimportable builder: the trial reports it; a later fix changes the hash
        return f"unresolved {target}: {type(err).__name__}: {first_line(err)}"
    # Sorted: the walk's order follows set iteration, which differs between processes.
    return stable_hash({"sources": sorted(sources), "packages": {p: _version(p) for p in sorted(imports)}})


def _code_closure(fn: Any) -> tuple[list[str], set[str]]:
    """Sources of `fn` and of the functions/classes of its top-level package (and of qsweep, whose builders
    a user's builder may call) that it references, transitively; and the third-party top-level packages
    those sources import."""
    fn = inspect.unwrap(fn)
    packages = {fn.__module__.split(".")[0], __name__.split(".")[0]}
    sources: list[str] = []
    imports: set[str] = set()
    seen: set[int] = set()
    todo = [fn]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        try:
            source = inspect.getsource(obj)
        except (OSError, TypeError):
            continue
        sources.append(source)
        imports.update(re.findall(r"^\s*(?:from|import)\s+(\w+)", source, re.M))
        names = _referenced_names(obj)
        module = sys.modules.get(obj.__module__)
        scopes = [module] + [v for v in vars(module).values() if inspect.ismodule(v) and _in(v, packages)] \
            if module else []
        scopes += [m for p in packages for n in names if (m := _submodule(p, n)) is not None]
        for scope in scopes:
            for name in names:
                ref = getattr(scope, name, None)
                if (inspect.isfunction(ref) or inspect.isclass(ref)) and _in(ref, packages):
                    todo.append(ref)
    known = set(sys.stdlib_module_names) | {"torch"} | packages  # torch's version is in every context already
    return sources, {m for m in imports - known if _importable(m)}


def _importable(name: str) -> bool:
    from importlib.util import find_spec

    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _in(value: Any, packages: set[str]) -> bool:
    """A module, function or class defined in one of the (top-level) packages."""
    name = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
    return isinstance(name, str) and name.split(".")[0] in packages


def _submodule(package: str, name: str) -> Any:
    """`package.name` when it is a module of the package (`from qsweep import lm` inside a builder)."""
    from importlib.util import find_spec

    full = f"{package}.{name}"
    try:
        return importlib.import_module(full) if full in sys.modules or find_spec(full) else None
    except Exception:  # not a package, or a module that does not import: the trial will say so
        return None


def _referenced_names(obj: Any) -> set[str]:
    """Global and attribute names used by a function's code (nested code included) or a class's methods."""
    if inspect.isclass(obj):
        members = [getattr(m, "__func__", m) for m in vars(obj).values()]
        members += [m.fget for m in vars(obj).values() if isinstance(m, property) and m.fget]
        names = {b.__name__ for b in obj.__bases__}
        for member in members:
            if inspect.isfunction(member):
                names |= _referenced_names(member)
        return names
    names: set[str] = set()
    codes = [obj.__code__] if hasattr(obj, "__code__") else []
    while codes:
        code = codes.pop()
        names.update(code.co_names)
        codes.extend(c for c in code.co_consts if inspect.iscode(c))
    return names


@functools.cache
def _version(package: str) -> str | None:
    """The installed version of an import name (`sklearn` -> scikit-learn's), without importing it."""
    from importlib import metadata

    for dist in [package, *metadata.packages_distributions().get(package, [])]:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def weights_identity(builder: dict) -> dict[str, Any]:
    """Name, size and mtime of the pretrained weight files a builder config names (see model_identity)."""
    if builder.get("random_init"):
        return {}
    found: dict[str, Any] = {}
    for key in WEIGHT_KEYS:
        value = builder.get(key)
        if isinstance(value, str) and value:
            found[key] = _path_identity(value, builder.get("revision"))
    return found


def _path_identity(value: str, revision: str | None) -> Any:
    path = Path(value).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)[:2000]
    else:  # a hub id: the commit cached locally (no network here); the trial downloads what it needs
        try:
            from huggingface_hub.constants import HF_HUB_CACHE

            ref = Path(HF_HUB_CACHE) / f"models--{value.replace('/', '--')}" / "refs" / (revision or "main")
            return {"hub": value, "commit": ref.read_text().strip() if ref.is_file() else revision}
        except ImportError:
            return {"hub": value, "commit": revision}
    return [(str(p.relative_to(path)) if p != path else p.name, p.stat().st_size, p.stat().st_mtime_ns)
            for p in files]
