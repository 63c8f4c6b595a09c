"""qat: torchao's QATConfig on a base PTQ config: prepare (fake-quantize the Linear layers), fine-tune on
the model bundle's training data, convert (quantize with the base config).

Base configs torchao 0.18 can prepare: Int8DynamicActivationIntxWeightConfig and IntxWeightOnlyConfig
(unpacked_to_int8, symmetric weights, int2..int8), Int4WeightOnlyConfig (plain/preshuffled packing: CUDA),
float8 configs (CUDA). Training data is the bundle's (`train_batches`); a model with neither training data
nor a task metric (toy, ffn_stack) distils instead: the float model's outputs on fresh inputs, MSE. The PTQ twin (the same base config on an untrained copy, measured with the same
accuracy code) gives `ptq_accuracy_drop` beside the run's own `accuracy_drop`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator

import torch
from torch import nn

from qsweep.accuracy import accuracy_drop
from qsweep.config import QATConf
from qsweep.flows.base import FlowResult, FlowSettings, knobs, uniform_targets
from qsweep.measure import sync, to_device
from qsweep.models import ModelBundle
from qsweep.schemes import build, quantize


def run(model: nn.Module, bundle: ModelBundle, quant: dict, candidates: dict[str, nn.Linear], flow: dict,
        settings: FlowSettings) -> FlowResult:
    """Prepare, train `qat.steps` AdamW steps at `qat.lr` (order fixed by the seed), convert.

    Metrics: train_steps, train_s (s), train_loss (mean of the last 10 steps, nats), ptq_accuracy_drop.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    conf: QATConf = knobs(flow, "qat", QATConf)
    if bundle.train_batches is None and bundle.evaluate is not None:
        # a task model without training data: its only data is the eval split, which training must not see
        raise NotImplementedError("QAT needs training data, and this model's builder gives none "
                                  "(ModelBundle.train_batches: digits_mlp's train split, an LM's hf: text train split)")
    base = build(quant)
    targets, skipped = uniform_targets(quant, candidates, "qat")
    metrics: dict[str, float] = {}
    if conf.ptq_twin and bundle.evaluate is not None:
        metrics["ptq_accuracy_drop"] = _ptq_twin_drop(model, bundle, quant, candidates, settings)

    # no task and no training data (toy, ffn_stack): distil the float model's outputs on fresh inputs
    stream = _batches(bundle, conf, settings) if bundle.train_batches else _distillation(model, bundle, conf, settings)
    quantize_(model, QATConfig(base, step="prepare"), filter_fn=targets)
    start = time.perf_counter()
    losses = _train(model, stream, bundle.train_loss or _loss(bundle), conf, settings)
    sync(settings.device)
    metrics.update(train_steps=conf.steps, train_s=time.perf_counter() - start,
                   train_loss=sum(losses[-10:]) / len(losses[-10:]))
    # convert swaps every fake-quantized Linear back and quantizes it: no filter needed
    quantize_(model, QATConfig(base, step="convert"), filter_fn=None)
    return FlowResult(model, skipped, metrics)


def _batches(bundle: ModelBundle, conf: QATConf, settings: FlowSettings) -> Iterator:
    for inputs, targets in bundle.train_batches(conf.batch_size, settings.seed):
        yield tuple(to_device(t, settings.device, settings.dtype) for t in inputs), targets.to(settings.device)


def _distillation(model: nn.Module, bundle: ModelBundle, conf: QATConf, settings: FlowSettings) -> Iterator:
    """(inputs, float model's outputs) on fresh make_inputs draws, computed before prepare (the model is
    still float then): steps x batch outputs are held, fine for the models without data this is for."""
    batches = []
    with torch.no_grad():
        for step in range(conf.steps):
            inputs = tuple(to_device(t, settings.device, settings.dtype)
                           for t in bundle.make_inputs(conf.batch_size, settings.seed + 2000 + step))
            out = model(*inputs)
            batches.append((inputs, getattr(out, "logits", out).detach()))
    return iter(batches)


def _train(model: nn.Module, stream: Iterator, loss_fn, conf: QATConf, settings: FlowSettings) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=conf.lr, weight_decay=0.0)
    torch.manual_seed(settings.seed)
    model.train()
    losses = []
    try:
        for _ in range(conf.steps):
            inputs, targets = next(stream)
            out = model(*inputs)
            loss = loss_fn(getattr(out, "logits", out), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        model.eval()
    return losses


def _loss(bundle: ModelBundle):
    """Cross-entropy of class logits against labels, or MSE against a float teacher's outputs (distillation)."""
    if bundle.train_batches is None:
        return lambda out, teacher: nn.functional.mse_loss(out.float(), teacher.float())
    return lambda logits, labels: nn.functional.cross_entropy(logits.float(), labels)


def _ptq_twin_drop(model: nn.Module, bundle: ModelBundle, quant: dict, candidates: dict[str, nn.Linear],
                   settings: FlowSettings) -> float:
    """accuracy_drop of the base config applied one-shot to an untrained copy: the number QAT must beat."""
    names = {id(m): name for name, m in candidates.items()}
    twin = copy.deepcopy(model)
    twin_candidates = {names[id(m)]: t for m, t in zip(model.modules(), twin.modules()) if id(m) in names}
    baseline = bundle.evaluate(model, settings.device, settings.dtype)["task_metric"]
    quantize(twin, quant, twin_candidates)
    value = bundle.evaluate(twin, settings.device, settings.dtype)["task_metric"]
    del twin
    return accuracy_drop(baseline, value, bundle.task_higher_is_better)
