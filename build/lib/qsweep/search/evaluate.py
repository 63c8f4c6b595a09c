"""What one recipe costs: its drift and size on a deep copy of the model built once per process
(`Evaluator`), and its latency predicted from cached single-layer microbenchmarks (`CostModel`)."""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import time
from pathlib import Path

import torch
from torch import nn

from qsweep import measure
from qsweep.accuracy import NonFiniteError, check_metrics, check_outputs, drift_metrics, eval_outputs
from qsweep.config import ConfigError, RootConf
from qsweep.measure import GRAPHED_MODES, forward_call, to_device
from qsweep.models import build_model
from qsweep.objectives import SEARCH_OBJECTIVES
from qsweep.schemes import is_quantized, quantizable_layers, quantize
from qsweep.search.space import NONE, Candidate, Space

# ---------------------------------------------------------------- accuracy evaluation

class Evaluator:
    """The model built once per process, its baseline outputs and task metric; `measure` evaluates a
    quantized deep copy with the grid's drift metrics (same eval inputs as runner trials).

    NaN/Inf anywhere fails loudly: a non-finite baseline is a ConfigError (nothing to search against),
    a non-finite recipe raises NonFiniteError, so its trial is failed and can never meet the budget.
    """

    def __init__(self, root: RootConf, device: str, dtype: str):
        self.root, self.device, self.dtype = root, device, getattr(torch, dtype)
        with torch.device(device):  # initialise on the device, as runner trials do (big LMs)
            self.bundle = build_model(dict(root.model.builder), root.seed)
        self.model = self.bundle.model.to(self.dtype).to(device)
        self.layers = quantizable_layers(self.model, root.model.quantize_filter)
        self.inputs = self.bundle.make_inputs(root.eval.n_samples, root.seed + 1)
        self.base_task = self._task(self.model)
        self.reference = {"outputs": self._outputs(self.model), "task": self.base_task}
        try:
            check_outputs(self.reference["outputs"])
            check_metrics(self.base_task)
        except NonFiniteError as err:
            raise ConfigError(f"baseline failed: {err} (model {root.model.name}); nothing to search against") from None
        self.base_size = measure.model_size_bytes(self.model)

    def _outputs(self, model: nn.Module) -> torch.Tensor:
        return eval_outputs(model, self.bundle, self.inputs, self.device, self.dtype, self.root.eval.batch_size)

    def _task(self, model: nn.Module) -> dict[str, float]:
        return self.bundle.evaluate(model, self.device, self.dtype) if self.bundle.evaluate else {}

    def measure(self, quant: dict | None) -> dict[str, float]:
        """Drift, task metric and size of the model quantized with `quant` (a torchao spec)."""
        model = copy.deepcopy(self.model)
        layers = quantizable_layers(model, self.root.model.quantize_filter)
        start = time.perf_counter()
        if quant is not None:
            quantize(model, quant, layers)
        metrics = {"time_quantize_s": time.perf_counter() - start, "layers_total": len(layers),
                   "layers_quantized": sum(is_quantized(m) for m in layers.values())}
        size = measure.model_size_bytes(model)
        metrics.update(size_bytes=size, size_ratio=self.base_size / size)
        outputs = self._outputs(model)
        try:
            check_outputs(outputs)
            metrics.update(drift_metrics(self.reference, outputs, self._task(model), self.bundle))
            check_metrics(metrics)
        finally:
            del model
            free_device_memory(self.device)
        return metrics


def free_device_memory(device: str) -> None:
    if device == "cuda":  # a collection costs ~0.3 s with MLflow and Optuna loaded: only where memory is scarce
        gc.collect()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- latency cost model

class CostModel:
    """Latency of each unique (layer shape, input shape, scheme) measured once in isolation and cached
    in JSON; a recipe's latency is the baseline's minus the per-layer time saved.

    Timings honour the run's compile mode and bench settings, so they answer the same question as a
    grid trial; torch._dynamo is reset around each compiled microbenchmark because hundreds of Linear
    modules would otherwise exhaust the recompile limit and silently fall back to eager.
    """

    def __init__(self, root: RootConf, evaluator: Evaluator, timing: str, context: dict):
        self.root, self.ev, self.timing = root, evaluator, timing
        self.path = Path(root.output_dir) / "cache" / "latency.json"
        self.context = context
        self.cache: dict[str, dict] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.shapes = self._input_shapes()
        self.base_ms = self._cached({"what": "model", "builder": dict(root.model.builder)}, self._bench_model)["ms"]

    def _input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each layer's input shape on the bench batch (a hook on one eager forward)."""
        shapes: dict[str, tuple[int, ...]] = {}

        def hook(fqn: str):
            def record(module, args) -> None:  # a pre-hook that returns a value would replace the inputs
                shapes.setdefault(fqn, tuple(args[0].shape))
            return record

        hooks = [m.register_forward_pre_hook(hook(fqn)) for fqn, m in self.ev.layers.items()]
        try:
            with torch.inference_mode():
                self.ev.model(*self._bench_inputs())
        finally:
            for hook in hooks:
                hook.remove()
        return shapes

    def _bench_inputs(self) -> list[torch.Tensor]:
        raw = self.ev.bundle.timed_inputs(self.root.bench.batch_size, self.root.seed)
        return [to_device(t, self.ev.device, self.ev.dtype) for t in raw]

    def _cached(self, what: dict, bench) -> dict:
        key = hashlib.sha1(json.dumps({**self.context, **what}, sort_keys=True, default=str).encode()).hexdigest()
        if key not in self.cache:
            self.cache[key] = {**bench(), "what": json.dumps(what, default=str)[:300]}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{id(self)}.tmp")  # atomic: several workers share the cache
            tmp.write_text(json.dumps(self.cache, indent=1))
            tmp.replace(self.path)
        return self.cache[key]

    def layer(self, fqn: str, cand: Candidate) -> dict:
        """{"ms": latency of this layer alone with `cand`, "bytes": its weights in memory}."""
        m = self.ev.layers[fqn]
        shape = (m.in_features, m.out_features, m.bias is not None, self.shapes.get(fqn))
        return self._cached({"what": "layer", "shape": shape, "quant": cand.spec},
                            lambda: self._bench_layer(shape, cand.spec))

    def _time(self, module: nn.Module, inputs: list[torch.Tensor]) -> float:
        mode = self.root.compile.mode
        if mode:
            torch._dynamo.reset()
        call = forward_call(module, inputs, mode)
        call()
        bench = self.root.bench
        stats = measure.time_call(call, device=self.ev.device, warmup=bench.warmup, repeats=bench.repeats,
                                  timing=self.timing, l2_flush=bench.l2_flush,
                                  graphed_already=mode in GRAPHED_MODES)
        if mode:
            torch._dynamo.reset()
        # p10, not the median: a cost model wants the layer's own cost, and on a shared host other
        # processes only ever add time (CUDA-graph timings barely differ between the two).
        return stats.p10_ms

    def _bench_layer(self, shape: tuple, spec: dict | None) -> dict:
        in_f, out_f, bias, in_shape = shape
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(in_f, out_f, bias=bias)).to(self.ev.device, self.ev.dtype).eval()
        if spec is not None:
            quantize(module, spec, {"0": module[0]})
        x = torch.randn(*(in_shape or (self.root.bench.batch_size, in_f)), device=self.ev.device, dtype=self.ev.dtype)
        out = {"ms": self._time(module, [x]), "bytes": measure.tensor_bytes(module.state_dict())}
        del module
        free_device_memory(self.ev.device)
        return out

    def _bench_model(self) -> dict:
        return {"ms": self._time(self.ev.model, self._bench_inputs())}

    def predict_ms(self, assignment: dict[str, str], space: Space, cands: dict[str, Candidate]) -> float:
        """Baseline latency minus the time each quantized layer saves (negative savings slow it down)."""
        saved = sum(self.layer(f, cands[NONE]).get("ms", 0) - self.layer(f, cands[name])["ms"]
                    for key, name in assignment.items() if name != NONE for f in space.groups[key])
        return max(self.base_ms - saved, 1e-6)

    def gain(self, key: str, name: str, space: Space, cands: dict[str, Candidate], objective: str) -> float:
        """What quantizing one group with `name` saves, in the objective's per-layer cost (`ms`, `bytes`)."""
        if name == NONE:
            return 0.0
        unit = SEARCH_OBJECTIVES[objective].layer_cost
        return sum(self.layer(f, cands[NONE])[unit] - self.layer(f, cands[name])[unit] for f in space.groups[key])
