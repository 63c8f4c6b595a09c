"""One trial (runner.run_trial / run_isolated): NaN/Inf is failed, what a crash leaves behind, which
errors are failed and which unsupported, memory metrics, and layers a uniform scheme leaves alone."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from qsweep import measure, schemes
from qsweep.accuracy import NonFiniteError, check_metrics
from qsweep.metrics import BY_NAME, non_finite
from qsweep.runner import TrialSpec, death_reason, run_isolated, run_trial
from qsweep.sweep import run_point

FRAGILE = "fragile_models.fragile_toy"


def quant(compose, *overrides: str) -> dict:
    """The torchao spec of a scheme as a grid point builds it."""
    root = compose(*overrides)
    return schemes.quant_spec(root.scheme, root.granularity, root.group_size)


def spec(tmp_path: Path, builder: dict, quant: dict | None = None, **kw) -> TrialSpec:
    """A small CPU trial; the baseline's reference outputs live in tmp_path."""
    return TrialSpec(model_builder=builder, quant=quant, device="cpu", dtype="float32", batch_size=4, warmup=1,
                     repeats=3, eval_samples=16, eval_batch_size=16, reference_path=str(tmp_path / "ref.pt"),
                     is_baseline=quant is None, **kw)


def baseline_then(tmp_path: Path, builder: dict, quant: dict):
    base = run_trial(spec(tmp_path, builder))
    assert base.status == "ok", base.reason
    return run_trial(spec(tmp_path, builder, quant))


# ---------------------------------------------------------------- NaN/Inf (issue 12.1)

def test_nan_outputs_of_a_quantized_model_fail_the_trial(compose, tmp_path):
    result = baseline_then(tmp_path, {"_target_": FRAGILE, "how": "nan_outputs"}, quant(compose, "scheme=int8wo"))
    assert result.status == "failed"
    assert result.reason == "non-finite outputs: 100% NaN"
    assert "speedup" not in result.metrics and "latency_ms" not in result.metrics


def test_inf_outputs_name_the_fraction(compose, tmp_path):
    result = baseline_then(tmp_path, {"_target_": FRAGILE, "how": "inf_outputs"}, quant(compose, "scheme=int8wo"))
    assert result.status == "failed" and result.reason == "non-finite outputs: 1.56% Inf"  # 1 of 64 columns


def test_a_nan_task_metric_fails_the_trial(compose, tmp_path):
    result = baseline_then(tmp_path, {"_target_": FRAGILE, "how": "nan_task"}, quant(compose, "scheme=int8wo"))
    assert result.status == "failed" and result.reason == "non-finite metric: task_metric=nan"


def test_a_baseline_with_nan_outputs_fails_and_leaves_no_reference(tmp_path):
    result = run_trial(spec(tmp_path, {"_target_": FRAGILE, "how": "nan_baseline"}))
    assert result.status == "failed" and result.reason == "non-finite outputs: 100% NaN"
    assert not (tmp_path / "ref.pt").exists()  # never a reference for drift


def test_a_nan_baseline_fails_every_point_of_its_context(compose):
    record = run_point(compose(f"model.builder._target_={FRAGILE}", "+model.builder.how=nan_baseline",
                               "scheme=int8wo", "isolate=false"))
    assert record.status == "failed" and record.reason == "baseline failed: non-finite outputs: 100% NaN"


def test_a_stale_nan_reference_is_blamed_on_the_baseline(compose, tmp_path):
    torch.save({"outputs": torch.full((16, 64), math.nan), "task": {}}, tmp_path / "ref.pt")  # from an older qsweep
    toy = {"_target_": "qsweep.models.toy_linear", "in_features": 64, "hidden": 64, "out_features": 64}
    result = run_trial(spec(tmp_path, toy, quant(compose, "scheme=int8wo")))
    assert result.status == "failed"
    assert result.reason == f"baseline reference {tmp_path / 'ref.pt'}: non-finite outputs: 100% NaN"


def test_non_finite_metrics_are_named_and_only_sqnr_may_be_infinite():
    assert non_finite({"drift_sqnr_db": math.inf, "latency_ms": 1.0, "size_bytes": 10}) == {}
    bad = {"drift_kl": math.nan, "latency_ms": math.inf, "drift_sqnr_db": -math.inf, "size_ratio": 2.0}
    assert set(non_finite(bad)) == {"drift_kl", "latency_ms", "drift_sqnr_db"}  # -inf SQNR: zero signal
    with pytest.raises(NonFiniteError, match=r"^non-finite metric: drift_kl=nan, latency_ms=inf"):
        check_metrics(bad)
    assert [m.name for m in BY_NAME.values() if m.allows_inf] == ["drift_sqnr_db"]


# ---------------------------------------------------------------- peak memory (issue 12.7)

def test_peak_memory_is_the_whole_peak_and_the_growth_is_apart(tmp_path):
    result = run_trial(spec(tmp_path, {"_target_": "qsweep.models.toy_linear", "in_features": 256, "hidden": 256,
                                       "out_features": 256}))
    m = result.metrics
    assert result.status == "ok", result.reason
    assert {"peak_mem_bytes", "activation_peak_bytes", "weights_mem_bytes"} <= set(m)
    assert m["peak_mem_bytes"] >= m["weights_mem_bytes"] and m["peak_mem_bytes"] >= m["activation_peak_bytes"]
    assert result.info["peak_mem_kind"] == "cpu_peak_rss"
    assert "activation_peak_bytes" in BY_NAME and BY_NAME["activation_peak_bytes"].unit == "bytes"


def test_cpu_peak_memory_sees_an_allocation_inside_the_block():
    with measure.PeakMemory("cpu") as peak:
        held = torch.ones(64 * 2**20, dtype=torch.uint8)  # pages touched: resident
        del held
    assert peak.activation_bytes >= 48 * 2**20
    assert peak.peak_bytes >= peak.activation_bytes + 48 * 2**20  # the process's own RSS comes on top


# ---------------------------------------------------------------- failed vs unsupported (issue 19.11)

def test_a_missing_builder_module_is_failed_not_unsupported(tmp_path):
    result = run_trial(spec(tmp_path, {"_target_": "no_such_module.build"}))
    assert result.status == "failed"
    assert "no_such_module" in result.reason and "cannot build model" in result.reason
    assert "ModuleNotFoundError" in result.traceback


def test_a_kernel_package_missing_at_run_time_stays_unsupported(compose, tmp_path):
    result = baseline_then(tmp_path, {"_target_": FRAGILE, "how": "import_error"}, quant(compose, "scheme=int8wo"))
    assert result.status == "unsupported" and "fbgemm_gpu" in result.reason


# ---------------------------------------------------------------- crashes and timeouts (issue 19.14)

def test_an_abort_names_the_signal_and_keeps_the_stack(compose, tmp_path):
    builder = {"_target_": FRAGILE, "how": "abort"}
    assert run_trial(spec(tmp_path, builder)).status == "ok"
    result = run_isolated(spec(tmp_path, builder, quant(compose, "scheme=int8wo")), timeout_s=120)
    assert result.status == "failed" and result.reason == "trial process killed by SIGABRT during eval"
    assert "Fatal Python error: Aborted" in result.traceback and "fragile_models.py" in result.traceback


def test_an_exit_keeps_the_child_stderr_and_names_the_code(compose, tmp_path, capfd):
    builder = {"_target_": FRAGILE, "how": "stderr_exit"}
    assert run_trial(spec(tmp_path, builder)).status == "ok"
    result = run_isolated(spec(tmp_path, builder, quant(compose, "scheme=int8wo")), timeout_s=120)
    assert result.status == "failed" and "exit code 3" in result.reason
    assert "fragile: the kernel said goodbye" in result.traceback
    assert "fragile: the kernel said goodbye" in capfd.readouterr().err  # also passed through live


def test_a_timeout_keeps_where_the_child_hung(compose, tmp_path):
    builder = {"_target_": FRAGILE, "how": "hang"}
    assert run_trial(spec(tmp_path, builder)).status == "ok"
    result = run_isolated(spec(tmp_path, builder, quant(compose, "scheme=int8wo")), timeout_s=20)
    assert result.status == "failed" and result.reason.startswith("timeout: trial ran longer than 20 s")
    assert "fragile_models.py" in result.traceback and "forward" in result.traceback
    assert "qsweep: near the timeout: compile {'frames': 0, " in result.traceback
    # It hung in its first quantized forward, the drift's: the reason and the stage times say so (issue 13).
    assert result.reason.endswith("during eval"), result.reason
    assert result.metrics["time_eval_s"] > 15 and result.metrics["time_total_s"] >= 19.5


def test_death_reasons():
    assert death_reason(-6) == "trial process killed by SIGABRT"
    assert death_reason(-9).startswith("trial process killed by SIGKILL (likely out of memory")
    assert death_reason(-11) == "trial process killed by SIGSEGV"
    assert "exit code 3" in death_reason(3)


# ---------------------------------------------------------------- partly quantized (issue 19.15)

def test_a_partly_quantized_point_says_which_layers_were_left_and_why(compose, tmp_path):
    builder = {"_target_": "fragile_models.odd_shapes"}
    result = baseline_then(tmp_path, builder, quant(compose, "scheme=intxwo_4", "granularity=per_group",
                                                    "group_size=64"))
    assert result.status == "ok"
    assert result.reason == ("2 of 3 layers left unquantized: 'fc2' (in_features 100 not divisible by group_size 64), "
                             "'fc3' (in_features 36 not divisible by group_size 64)")
    assert result.metrics["layers_quantized"] == 1 and result.metrics["layers_total"] == 3
    assert result.info["quantized_layers"] == ["fc1"]
    assert set(result.info["unquantized_layers"]) == {"fc2", "fc3"}


def test_a_fully_quantized_point_has_no_reason(compose, tmp_path):
    result = baseline_then(tmp_path, {"_target_": "fragile_models.odd_shapes"},
                           quant(compose, "scheme=int8wo", "granularity=per_row"))
    assert result.status == "ok" and result.reason == ""
    assert result.metrics["layers_quantized"] == result.metrics["layers_total"] == 3
