"""Apply a recipe: quantize its model, save the checkpoint, reload it into a fresh model and verify it.

    qsweep apply recipe=<output_dir>/recipes/<name>.yaml        -> <output_dir>/checkpoints/<name>/

The checkpoint is written to a staging folder and moved into place only after verification passes,
so a failed apply never replaces a verified checkpoint; every path written stays inside output_dir.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from qsweep.accuracy import NonFiniteError
from qsweep.config import ConfigError, SelectConf, load_config, mlflow_uri
from qsweep.measure import model_size_bytes, to_device
from qsweep.metrics import METRICS
from qsweep.objectives import resolve_drift_metric
from qsweep.recipe import WRITE_PATH_KEYS, Recipe, check_model, load_recipe, unmatched_fqns
from qsweep.select import drift_cost, select_overrides
from qsweep.sweep import resolve_device, versions


@dataclass
class Applied:
    checkpoint: Path
    fmt: str  # "safetensors" | "torch"
    metrics: dict[str, float]  # re-measured on the reloaded model
    verification: dict[str, Any]


def apply_recipe(recipe: Recipe, device: str, directory: Path, sel: SelectConf | None = None) -> Applied:
    """Quantize the recipe's model, save the checkpoint in `directory`, reload it into a fresh model and
    re-measure it.

    The reloaded model is compared with the in-memory quantized one (outputs must match exactly) and
    its drift and size with the recipe's recorded metrics, within sel.drift_tol and sel.size_tol.
    """
    from qsweep.flows import FLOWS, FlowSettings, flow_name, run_flow
    from qsweep.models import build_model
    from qsweep.schemes import quantizable_layers

    if not FLOWS[flow_name(recipe.flow)].checkpoint:
        raise ConfigError(f"recipe {recipe.name}: flow {flow_name(recipe.flow)} makes a graph or torch.ao modules, "
                          "not a state_dict of the model's own modules; apply saves and verifies only those")
    dtype = getattr(torch, recipe.dtype)
    bundle = build_model(recipe.model["builder"], recipe.eval["seed"])
    model = bundle.model.to(dtype).to(device)
    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    unmatched = unmatched_fqns(recipe.quant, names)
    if unmatched:
        raise ConfigError(f"recipe {recipe.name}: {len(unmatched)} layer name(s) match no module of model "
                          f"{recipe.model['name']}: {', '.join(unmatched[:5])}")
    # the recipe's flow replayed: QAT trains the recorded steps, static calibrates on the recorded batches
    model = run_flow(recipe.flow, model, bundle, recipe.quant, quantizable_layers(model, recipe.model.get("quantize_filter")),
                     FlowSettings(device, dtype, recipe.eval["seed"])).model
    sel = sel or SelectConf()
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint, fmt = save_checkpoint(model.state_dict(), directory, sel.checkpoint_format)

    fresh = build_model(recipe.model["builder"], recipe.eval["seed"])
    fresh.model = fresh.model.to(dtype).to(device)
    fresh.model.load_state_dict(load_checkpoint(checkpoint, device), assign=True)
    try:
        metrics = remeasure(recipe, fresh, device)
    except NonFiniteError as err:  # NaN/Inf outputs: nothing to compare, the checkpoint is not usable
        return Applied(checkpoint, fmt, {}, {"ok": False, "finite": {"ok": False, "reason": str(err)}})
    metrics["size_bytes"] = float(model_size_bytes(fresh.model))
    inputs = fresh.make_inputs(recipe.eval["batch_size"], recipe.eval["seed"] + 1)
    reload_diff = _max_diff(model, fresh.model, inputs, device, dtype)
    return Applied(checkpoint, fmt, metrics, verify(recipe, metrics, reload_diff, sel))


def save_checkpoint(state_dict: dict, directory: Path, fmt: str = "auto") -> tuple[Path, str]:
    """Save a quantized state_dict: safetensors through torchao's flatten helper where it supports every
    tensor type (fmt=auto|safetensors), else torch.save (fmt=auto|torch). Returns (path, format)."""
    if fmt in ("auto", "safetensors"):
        from safetensors.torch import save_file
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        try:
            tensors, metadata = flatten_tensor_state_dict(state_dict)
        except ValueError as err:  # a tensor subclass torchao cannot flatten yet
            if fmt == "safetensors":
                raise ConfigError(f"safetensors cannot hold this checkpoint: {err}") from None
        else:
            path = directory / "model.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
            return path, "safetensors"
    path = directory / "model.pt"
    torch.save(state_dict, path)
    return path, "torch"


def load_checkpoint(path: Path, device: str = "cpu") -> dict:
    """The state_dict of a checkpoint written by save_checkpoint (tensor subclasses rebuilt, weights only)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        state, leftover = unflatten_tensor_state_dict(load_file(str(path), device=device), metadata)
        if leftover:
            raise ValueError(f"{path}: tensors without metadata: {sorted(leftover)[:5]}")
        return state
    from qsweep.models import load_weights

    return load_weights(path, device)


def remeasure(recipe: Recipe, bundle, device: str) -> dict[str, float]:
    """Drift and task metrics of a model vs a freshly built baseline, with the recipe's eval settings."""
    from qsweep.accuracy import accuracy_metrics
    from qsweep.models import build_model

    dtype = getattr(torch, recipe.dtype)
    settings = dict(device=device, dtype=dtype, samples=recipe.eval["n_samples"],
                    batch_size=recipe.eval["batch_size"], seed=recipe.eval["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        reference = Path(tmp) / "reference.pt"
        base = build_model(recipe.model["builder"], recipe.eval["seed"])
        base.model = base.model.to(dtype).to(device)
        accuracy_metrics(base.model, base, reference_path=reference, is_baseline=True, **settings)
        return accuracy_metrics(bundle.model, bundle, reference_path=reference, is_baseline=False, **settings)


def _max_diff(a: torch.nn.Module, b: torch.nn.Module, inputs, device: str, dtype) -> float:
    moved = [to_device(t, device, dtype) for t in inputs]
    with torch.inference_mode():
        out_a, out_b = a(*moved), b(*moved)
    out_a, out_b = (getattr(o, "logits", o) for o in (out_a, out_b))
    return (out_a.float() - out_b.float()).abs().max().item()


def verify(recipe: Recipe, metrics: dict[str, float], reload_diff: float, sel: SelectConf | None = None) -> dict:
    """Compare re-measured metrics with the recorded ones: drift cost within drift_tol, size within size_tol,
    and the reloaded model's outputs identical to the quantized model's."""
    sel = sel or SelectConf()
    # A run's own recipe.json has no selection yet: its drift is checked on the metric select would use.
    metric = recipe.selection.get("drift_metric") or resolve_drift_metric("auto", set(recipe.metrics))
    relative = recipe.selection.get("relative", False)
    recorded = drift_cost(pd.DataFrame([_with_schema(recipe.metrics)]), metric, relative)[0].iloc[0]
    measured, label = drift_cost(pd.DataFrame([_with_schema(metrics)]), metric, relative)
    measured = measured.iloc[0]
    size_rec, size_new = recipe.metrics.get("size_bytes", math.nan), metrics.get("size_bytes", math.nan)
    size_rel = abs(size_new - size_rec) / size_rec if size_rec else math.nan
    checks = {
        "drift": {"metric": recipe.selection.get("cost_label", label), "recorded": float(recorded), "measured": float(measured),
                  "abs_diff": float(abs(measured - recorded)), "tolerance": sel.drift_tol,
                  "ok": bool(abs(measured - recorded) <= sel.drift_tol)},
        "size_bytes": {"recorded": size_rec, "measured": size_new, "rel_diff": size_rel, "tolerance": sel.size_tol,
                       "ok": bool(size_rel <= sel.size_tol)},
        "reload": {"max_abs_output_diff": reload_diff, "ok": reload_diff == 0.0},
    }
    info = {k: {"recorded": recipe.metrics.get(k), "measured": metrics.get(k)}
            for k in ("drift_sqnr_db", "drift_cosine", "task_metric") if k in metrics}
    return {"ok": all(c["ok"] for c in checks.values()), **checks, "info": info}


def _with_schema(values: dict[str, float]) -> dict[str, float]:
    return {m.name: values.get(m.name, math.nan) for m in METRICS}


# ---------------------------------------------------------------- the command and its folders

def inside(root: Path, path: Path) -> Path:
    """`path` resolved; ConfigError unless it lies inside `root` (nothing apply writes may leave it)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ConfigError(f"refusing to write {resolved}: outside output_dir {root.resolve()}")
    return resolved


def publish(staging: Path, final: Path) -> None:
    """Move a verified staging folder to `final`, replacing what was there only once the new one is whole."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def apply_command(args: list[str]) -> int:
    """`qsweep apply recipe=<path> [model=<name>]`: quantize, save, reload, verify, log to MLflow.

    Exit code 0 when verified; 1 when verification fails (the earlier checkpoint, if any, is kept and the
    rejected one is left in checkpoints/<name>.failed/ for inspection).
    """
    from qsweep.tracking import FAILED, MODEL_TAG, OK, ROLE_APPLY, ROLE_TAG, Tracker

    root, _ = load_config(select_overrides(args))
    if not root.select.recipe:
        raise ConfigError("qsweep apply needs recipe=<path of a recipe file>")
    recipe = load_recipe(root.select.recipe)
    recipe_text = Path(root.select.recipe).read_text()
    output_dir = Path(root.output_dir).resolve()
    if any(a.startswith("model=") for a in args):  # the user's own model config: trusted, may name any builder
        recipe.model = {"name": root.model.name, "builder": dict(root.model.builder),
                        "quantize_filter": root.model.quantize_filter}
    else:
        check_model(recipe.model, root.select.recipe)
        for key in WRITE_PATH_KEYS:
            if key in recipe.model["builder"]:
                recipe.model["builder"][key] = str(output_dir / "models")
    if not recipe.selection.get("feasible", True):
        print("warning: this recipe is a best-effort pick that violates the selection constraints")
    device = resolve_device(root)
    final = inside(output_dir, output_dir / "checkpoints" / recipe.name)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{recipe.name}.", dir=final.parent))
    try:
        applied = apply_recipe(recipe, device, staging, root.select)
        (staging / "recipe.yaml").write_text(recipe_text)
        (staging / "verification.json").write_text(json.dumps(applied.verification, indent=1))
        ok = applied.verification["ok"]
        target = final if ok else inside(output_dir, final.with_name(final.name + ".failed"))
        publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    applied.checkpoint = target / applied.checkpoint.name
    tracker = Tracker(mlflow_uri(root), recipe.source.get("experiment") or root.tracking.experiment)
    tracker.record(f"apply-{recipe.name}", OK if ok else FAILED,
                   "" if ok else f"verification failed: {_failed_checks(applied.verification)}",
                   _apply_params(recipe, applied, device), applied.metrics,
                   {ROLE_TAG: ROLE_APPLY, MODEL_TAG: recipe.model["name"], "verified": str(ok).lower()},
                   {"recipe.yaml": recipe_text, "verification.json": json.dumps(applied.verification, indent=1)})
    print(describe_verification(applied))
    if not ok:
        kept = f"; the verified checkpoint in {final} is unchanged" if final.exists() else ""
        print(f"rejected checkpoint left in {target}{kept}")
    return 0 if ok else 1


def _failed_checks(verification: dict) -> str:
    return ", ".join(name + (f" ({check['reason']})" if "reason" in check else "")
                     for name, check in verification.items() if isinstance(check, dict) and check.get("ok") is False)


def _apply_params(recipe: Recipe, applied: Applied, device: str) -> dict[str, Any]:
    return {"recipe": recipe.name, "source_run_id": recipe.source.get("run_id"), "source_run": recipe.source.get("run_name"),
            "model": recipe.model["name"], "device": device, "dtype": recipe.dtype,
            "flow": (recipe.flow or {}).get("name", "ptq"),
            "checkpoint": str(applied.checkpoint), "checkpoint_format": applied.fmt, **versions()}


def describe_verification(applied: Applied) -> str:
    v = applied.verification
    if "finite" in v:
        return f"checkpoint: {applied.checkpoint}\n{v['finite']['reason']}\nVERIFICATION FAILED"
    drift, size = v["drift"], v["size_bytes"]
    return "\n".join([
        f"checkpoint: {applied.checkpoint} ({applied.fmt}, {applied.checkpoint.stat().st_size} bytes)",
        f"drift {drift['metric']}: recorded {drift['recorded']:.5g}, re-measured {drift['measured']:.5g} "
        f"(|diff| {drift['abs_diff']:.2g} <= {drift['tolerance']:g}: {drift['ok']})",
        f"size_bytes: recorded {size['recorded']:.0f}, re-measured {size['measured']:.0f} "
        f"(rel diff {size['rel_diff']:.2%} <= {size['tolerance']:.0%}: {size['ok']})",
        f"reloaded vs quantized outputs: max |diff| {v['reload']['max_abs_output_diff']:.3g}",
        "verified" if v["ok"] else "VERIFICATION FAILED",
    ])
