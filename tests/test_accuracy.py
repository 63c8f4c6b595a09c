"""Accuracy drift on real models: the trained digits classifier and a tiny random-init LM, run end to end
through sweep.run_point (real torchao, real MLflow in tmp)."""

from __future__ import annotations

import math

import pytest
import torch

from qsweep import sweep
from qsweep.accuracy import (
    NonFiniteError,
    accuracy_drop,
    accuracy_metrics,
    check_outputs,
    logits_drift,
    non_finite_outputs,
    output_drift,
)
from qsweep.models import build_model
from qsweep.schemes import quantizable_layers, quantize


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("digits_models")  # train the classifier once for this module


def _metrics(compose, *overrides: str) -> dict[str, float]:
    record = sweep.run_point(compose("isolate=false", *overrides))
    assert record.status == "ok", record.reason
    return record.metrics


def test_digits_sweep_int8_keeps_accuracy_and_2bit_loses_it(compose, digits_cache):
    # 2-bit with one scale per output row (per_axis): about 7 points lost. With per_group g32 the
    # 2-bit model keeps its accuracy on this small MLP, so that setting would show nothing.
    model = ["model=digits_mlp", f"model.builder.cache_dir={digits_cache}", "eval.n_samples=256"]
    base = _metrics(compose, *model, "scheme=none")
    int8 = _metrics(compose, *model, "scheme=int8wo", "granularity=per_row")
    int2 = _metrics(compose, *model, "scheme=intxwo_2", "granularity=per_axis")

    assert base["task_metric"] >= 0.9
    assert abs(int8["task_metric"] - base["task_metric"]) <= 0.005  # within half a point
    assert int2["accuracy_drop"] >= 0.03 and int2["task_metric"] < int8["task_metric"]
    assert int2["task_metric_delta"] == pytest.approx(int2["task_metric"] - base["task_metric"])
    assert int2["task_metric_delta_rel"] == pytest.approx(int2["task_metric_delta"] / base["task_metric"])
    assert int2["accuracy_drop"] == pytest.approx(-int2["task_metric_delta"])
    # Output drift orders the same way.
    assert int8["drift_sqnr_db"] > 30 > int2["drift_sqnr_db"]
    assert int8["drift_kl"] < int2["drift_kl"] and int8["top1_agreement"] > int2["top1_agreement"]
    assert int8["layers_quantized"] == int2["layers_quantized"] == int8["layers_total"] == 3


def test_tiny_lm_sweep_logs_perplexity_kl_top1_and_tokens_per_s(compose):
    lm = ["model=tiny_llama", "eval.seq_len=32", "eval.n_samples=16", "eval.batch_size=8", "bench.batch_size=2"]
    base = _metrics(compose, *lm, "scheme=none")
    int8 = _metrics(compose, *lm, "scheme=int8wo", "granularity=per_row")
    int2 = _metrics(compose, *lm, "scheme=intxwo_2", "granularity=per_axis")

    # Random weights, byte tokens, vocab 512: perplexity near the vocabulary size.
    assert 300 < base["task_metric"] < 700
    for m in (int8, int2):
        assert m["accuracy_drop"] == pytest.approx(m["task_metric"] / base["task_metric"] - 1)
        assert m["task_metric_delta_rel"] == pytest.approx(m["accuracy_drop"])
        assert m["layers_quantized"] == m["layers_total"] == 14  # 2 layers x 7 Linear; lm_head left alone
        assert m["prefill_tok_s"] > 0 and m["decode_tok_s"] > 0
    assert int8["drift_kl"] < int2["drift_kl"]
    assert int8["top1_agreement"] > 0.9 > int2["top1_agreement"]
    assert int8["drift_sqnr_db"] > int2["drift_sqnr_db"]
    assert abs(int8["accuracy_drop"]) < 0.01


def test_lm_head_is_quantized_only_on_request(compose):
    lm = ["model=tiny_llama", "eval.seq_len=16", "eval.n_samples=4", "eval.batch_size=4", "bench.batch_size=1",
          "scheme=int8wo", "granularity=per_row", "model.lm_head=quantize"]
    m = _metrics(compose, *lm)
    assert m["layers_quantized"] == m["layers_total"] == 15


def test_drift_functions_on_known_values():
    ref = torch.tensor([[3.0, 4.0]])
    drift = output_drift(ref, ref * 1.1)  # noise power 0.01 x signal: 20 dB
    assert drift["drift_sqnr_db"] == pytest.approx(20.0)
    assert drift["drift_cosine"] == pytest.approx(1.0) and drift["drift_max_abs"] == pytest.approx(0.4)
    assert output_drift(ref, ref)["drift_sqnr_db"] == math.inf
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])
    same = logits_drift(logits, logits)
    assert same["drift_kl"] == pytest.approx(0.0, abs=1e-7) and same["top1_agreement"] == 1.0
    flipped = logits_drift(logits, logits.flip(-1))
    assert flipped["top1_agreement"] == 0.0 and flipped["drift_kl"] > 1.0
    assert accuracy_drop(0.97, 0.90, higher_is_better=True) == pytest.approx(0.07)
    assert accuracy_drop(10.0, 12.0, higher_is_better=False) == pytest.approx(0.2)


def test_non_finite_outputs_say_which_and_how_much():
    assert non_finite_outputs(torch.ones(2, 2)) is None
    assert non_finite_outputs(torch.full((2, 2), math.nan)) == "100% NaN"
    mixed = torch.tensor([[1.0, math.nan], [math.inf, -math.inf]])
    assert non_finite_outputs(mixed) == "25% NaN, 50% Inf"
    assert non_finite_outputs(torch.tensor([1, 2])) is None  # integer outputs cannot be NaN
    with pytest.raises(NonFiniteError, match=r"^non-finite outputs: 25% NaN, 50% Inf$"):
        check_outputs(mixed)


def test_accuracy_metrics_write_the_reference_then_measure_drift_against_it(tmp_path):
    """Directly, without a trial: the baseline writes the reference, a quantized copy is measured against it."""
    builder = {"_target_": "qsweep.models.toy_linear", "in_features": 64, "hidden": 64, "out_features": 32}
    settings = dict(device="cpu", dtype=torch.float32, samples=32, batch_size=8, seed=0,
                    reference_path=tmp_path / "ref.pt")
    base = build_model(builder, 0)
    assert accuracy_metrics(base.model, base, is_baseline=True, **settings) == {}  # no task metric: nothing
    assert (tmp_path / "ref.pt").exists() and not list(tmp_path.glob("*.tmp"))
    same = accuracy_metrics(build_model(builder, 0).model, base, is_baseline=False, **settings)
    assert same["drift_sqnr_db"] == math.inf and same["drift_max_abs"] == 0.0
    int2 = build_model(builder, 0)
    quantize(int2.model, {"_target_": "torchao.quantization.IntxWeightOnlyConfig", "weight_dtype": "torch.int2",
                          "granularity": {"_target_": "torchao.quantization.PerAxis", "axis": 0}},
             quantizable_layers(int2.model, None))
    drift = accuracy_metrics(int2.model, int2, is_baseline=False, **settings)
    assert 0 < drift["drift_sqnr_db"] < 30 and drift["drift_cosine"] < 1.0
