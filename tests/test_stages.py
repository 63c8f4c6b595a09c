"""Where a trial's time goes (issue 13): every stage is recorded and together they account for the
trial; a warm rerun (same compile cache) compiles less than the first run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from qsweep.config import ConfigError
from qsweep.measure import STAGES, StageClock
from qsweep.runner import (
    TrialSpec,
    compile_model,
    keep_cuda_int8_weights_off_int8pack_mm,
    repeated_blocks,
    run_isolated,
)


def test_parts_count_each_stage_once_and_leave_inner_parts_out():
    clock = StageClock()
    with clock.stage("measure"), clock.part("prefill"):
        time.sleep(0.05)
        with clock.stage("compile"):
            time.sleep(0.1)
        with clock.part("decode"):
            time.sleep(0.05)
    parts = clock.parts
    assert set(parts) == {"measure_prefill", "compile_prefill", "measure_decode"}, parts
    assert 0.05 <= parts["measure_prefill"] < 0.09 and 0.05 <= parts["measure_decode"] < 0.09, parts
    assert 0.1 <= parts["compile_prefill"] < 0.14, parts
    m = clock.metrics()
    assert abs(sum(parts.values()) - m["time_measure_s"] - m["time_compile_s"]) < 1e-3


def test_nested_stages_never_count_twice():
    clock = StageClock()
    with clock.stage("measure"):
        time.sleep(0.05)
        with clock.stage("compile"):  # a first call inside a timing loop is compile, not measure
            time.sleep(0.1)
        time.sleep(0.05)
    m = clock.metrics()
    assert 0.1 <= m["time_compile_s"] < 0.15
    assert 0.1 <= m["time_measure_s"] < 0.15
    assert m["time_total_s"] >= m["time_compile_s"] + m["time_measure_s"]


def test_stage_times_sum_to_the_trial_and_a_warm_rerun_compiles_less(compose, tmp_path):
    root = compose("model=tiny_llama", "compile=default", "eval.n_samples=8", "eval.batch_size=8")
    trial = TrialSpec(model_builder=dict(root.model.builder), quant=None, device="cpu", dtype="float32",
                      batch_size=1, compile_mode="default", compile_cache_dir=str(tmp_path / "inductor"),
                      warmup=1, repeats=3, eval_samples=8, eval_batch_size=8,
                      reference_path=str(tmp_path / "ref.pt"), is_baseline=True)
    # spare=True (the default on CUDA only): the warm run's process imports torchao and transformers while
    # the cold one runs, and starts its build with them loaded.
    cold = run_isolated(trial, timeout_s=600, spare=True)
    assert cold.status == "ok", cold.reason
    stages = {f"time_{s}_s" for s in STAGES}
    assert stages | {"time_total_s"} <= set(cold.metrics)
    accounted = sum(cold.metrics[k] for k in stages)
    assert accounted >= 0.95 * cold.metrics["time_total_s"], cold.metrics
    assert cold.metrics["time_compile_s"] > 0 and cold.metrics["time_build_s"] > 0
    assert cold.metrics["time_quantize_s"] < 0.5  # a baseline quantizes nothing
    parts = cold.info["stage_parts"]  # where measure and compile went, each timed path on its own
    assert {f"measure_{p}" for p in ("sizes", "forward", "prefill", "decode")} <= set(parts), parts
    assert {f"compile_{p}" for p in ("forward", "prefill", "decode")} <= set(parts), parts
    for stage in ("measure", "compile"):  # the parts account for it (a few ms of rounding aside)
        spent, in_parts = cold.metrics[f"time_{stage}_s"], sum(v for k, v in parts.items() if k.startswith(stage))
        assert abs(in_parts - spent) <= 0.05 * spent + 0.005, (stage, parts, spent)

    warm = run_isolated(trial, timeout_s=600, spare=True)  # a fresh process: only the on-disk cache is shared
    assert warm.status == "ok", warm.reason
    assert warm.info["imports_ahead_s"] > 0
    assert warm.metrics["time_build_s"] < cold.metrics["time_build_s"], (warm.metrics, cold.metrics)
    assert sum(warm.metrics[k] for k in stages) >= 0.95 * warm.metrics["time_total_s"], warm.metrics
    assert warm.info["compile_cache"]["fxgraph_cache_hit"] > 0, warm.info["compile_cache"]
    assert warm.metrics["time_compile_s"] < 0.7 * cold.metrics["time_compile_s"], (
        warm.metrics["time_compile_s"], cold.metrics["time_compile_s"])


def test_blocks_scope_compiles_one_graph_per_path_for_all_layers(compose, tmp_path):
    """compile=blocks on a 4-layer Llama: every layer runs the same compiled graph, so a path (the timed
    forward, prefill, decode: each a new input shape) costs one Dynamo trace and one Inductor lowering,
    whatever the depth."""
    root = compose("model=tiny_llama", "compile=blocks", "model.builder.config.num_hidden_layers=4",
                   "eval.n_samples=8", "eval.batch_size=8")
    assert root.compile.scope == "blocks" and root.compile.mode == "default"
    trial = TrialSpec(model_builder=dict(root.model.builder), quant=None, device="cpu", dtype="float32",
                      batch_size=1, compile_mode="default", compile_cache_dir=str(tmp_path / "inductor"),
                      compile_scope="blocks", warmup=1, repeats=3, eval_samples=8, eval_batch_size=8,
                      reference_path=str(tmp_path / "ref.pt"), is_baseline=True)
    result = run_isolated(trial, timeout_s=600)
    assert result.status == "ok", result.reason
    # One graph per path, not per layer and path; the KV cache is allocated before the prefill compiles,
    # so the prefill does not compile twice (with and without the allocation) either.
    assert result.info["compile_phases"]["frames"] == 3, result.info["compile_phases"]
    assert result.info["compile_phases"]["inductor_s"] > 0


def test_blocks_share_one_graph_and_keep_their_own_kv_cache():
    """The shared graph runs each layer as layer 0 of a view of its own cache layer: logits, decoded
    tokens and every layer's cached keys equal the eager model's."""
    import torch
    from transformers import StaticCache

    from qsweep.lm import _prefill, greedy_decode, load_model
    from qsweep.runner import compile_phases

    config = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    eager = load_model(None, True, config, "float32")
    compiled = load_model(None, True, config, "float32")
    compiled.load_state_dict(eager.state_dict())
    compile_model(compiled, "default", None, scope="blocks")
    ids = torch.randint(0, 256, (2, 12))
    frames_before = compile_phases()["frames"]
    runs = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        cache = StaticCache(config=model.config, max_cache_len=20)
        logits = _prefill(model, ids, cache)
        tokens = greedy_decode(model, cache, logits.argmax(-1), 6)
        runs[name] = logits, tokens, [layer.keys.clone() for layer in cache.layers]
    (logits, tokens, keys), (c_logits, c_tokens, c_keys) = runs["eager"], runs["compiled"]
    torch.testing.assert_close(c_logits, logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(c_tokens, tokens)
    for layer, (k, c_k) in enumerate(zip(keys, c_keys)):
        assert k.abs().sum() > 0, f"layer {layer} wrote nothing"
        torch.testing.assert_close(c_k, k, atol=1e-4, rtol=1e-4, msg=f"layer {layer}'s cache")
    assert compile_phases()["frames"] - frames_before == 2  # prefill and decode, for all three layers
    assert [m.self_attn.layer_idx for m in compiled.model.layers] == [0, 1, 2]


class _ScaledBlock(nn.Module):
    """A block whose layer index means more than a cache slot: its output depends on it."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx, self.linear = layer_idx, nn.Linear(8, 8)

    def forward(self, x, past_key_values=None):
        keys, _ = past_key_values.update(self.linear(x), x, self.layer_idx)
        return keys * (self.layer_idx + 1)


class _Cache:
    def __init__(self, layers: int):
        self.layers = [None] * layers

    def update(self, keys, values, layer_idx):
        return keys, values


def test_blocks_that_use_their_layer_index_keep_their_own_graphs():
    """Running such a block as layer 0 of a cache view would compute layer 0's function: each block
    compiles on its own instead."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    from qsweep.runner import _layer_idx_only_indexes_the_cache

    blocks = nn.ModuleList([_ScaledBlock(i) for i in range(3)])
    assert not _layer_idx_only_indexes_the_cache(blocks[0])
    assert _layer_idx_only_indexes_the_cache(LlamaAttention(LlamaConfig(hidden_size=64, num_attention_heads=4), 0))
    x = torch.randn(2, 8)
    expected = [block(x, past_key_values=_Cache(3)) for block in blocks]
    compile_model(nn.Sequential(blocks), "default", None, scope="blocks")
    for block, want in zip(blocks, expected):
        torch.testing.assert_close(block(x, past_key_values=_Cache(3)), want)


def test_repeated_blocks_are_the_largest_list_of_one_class():
    layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
    model = nn.Sequential(nn.Embedding(8, 4), nn.ModuleDict({"layers": layers,
                                                             "mixed": nn.ModuleList([nn.ReLU(), nn.Tanh()])}))
    assert repeated_blocks(model) == list(layers)
    assert repeated_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU())) == []
    with pytest.raises(ValueError, match="no repeated blocks .* use compile.scope=model"):
        compile_model(nn.Sequential(nn.Linear(4, 4)), "default", None, scope="blocks")


def test_a_compile_scope_outside_the_choices_names_them(compose):
    with pytest.raises(ConfigError, match="compile.scope='layer' is invalid.*model.*blocks"):
        compose("compile=default", "compile.scope=layer")


def test_per_block_and_whole_model_points_never_share_records(compose):
    from qsweep.sweep import Point

    whole, blocks = Point(compose("compile=default")), Point(compose("compile=blocks"))
    assert blocks.baseline_key != whole.baseline_key and blocks.point_key != whole.point_key
    assert whole.context["compile"] == "default"  # a whole-model point keeps the key it had before scopes
    assert blocks.params()["compile"] == "blocks" and blocks.name.endswith("-blocks")


def test_inductor_options_apply_while_compiling_and_are_part_of_the_point(compose, tmp_path):
    from qsweep.sweep import Point, run_point

    plain = compose("model=toy", "scheme=none", "compile=default")
    uncached = compose("model=toy", "scheme=none", "compile=default", "+compile.inductor.fx_graph_cache=false")
    assert uncached.compile.inductor == {"fx_graph_cache": False}
    point, other = Point(uncached), Point(plain)
    assert point.baseline_key != other.baseline_key and point.point_key != other.point_key
    assert other.context["compile"] == "default"  # points without options keep their keys
    assert point.name == "toy/none-default+fx_graph_cache=False"
    assert point.params()["inductor"] == '{"fx_graph_cache": false}'
    eager = Point(compose("model=toy", "scheme=none", "compile=none", "+compile.inductor.fx_graph_cache=false"))
    assert eager.point_key == Point(compose("model=toy", "scheme=none", "compile=none")).point_key

    def fx_lookups(root) -> int:
        record = run_point(root)
        assert record.status == "ok", record.reason
        import mlflow

        client = mlflow.MlflowClient(f"sqlite:///{root.output_dir}/mlflow.db")
        info = json.loads(Path(client.download_artifacts(record.run_id, "trial_info.json")).read_text())
        return info["compile_cache"]["fxgraph_cache_hit"] + info["compile_cache"]["fxgraph_cache_miss"]

    assert fx_lookups(plain) > 0 and fx_lookups(uncached) == 0  # Inductor compiled under the option


def test_an_unknown_inductor_option_is_one_line_with_the_close_names(compose):
    with pytest.raises(ConfigError, match=r"compile.inductor.dynamic_scale_rblok is not an Inductor option "
                                          r"\(torch._inductor.config\); did you mean: dynamic_scale_rblock"):
        compose("compile=default", "+compile.inductor.dynamic_scale_rblok=false")
    with pytest.raises(ConfigError, match=r"add a key with \+compile.inductor.coordinate_descent_tuning=<value>"):
        compose("compile.inductor.coordinate_descent_tuning=true")


def test_the_sweep_summary_says_where_compile_time_went(tmp_path):
    from qsweep.sweep import STAGE_TIMES_FILE, describe_stage_times

    row = {"run": "p", "status": "ok", "time_build_s": 10.0, "time_quantize_s": 1.0, "time_compile_s": 100.0,
           "time_measure_s": 20.0, "time_eval_s": 2.0, "time_total_s": 135.0, "compile_frames": 96,
           "compile_dynamo_trace_s": 20.0, "compile_backend_s": 50.0, "compile_inductor_s": 10.0,
           "compile_forward_s": 30.0, "compile_decode_s": 70.0}
    eager = ({k: v for k, v in row.items() if not k.startswith("compile_")}
             | {"time_compile_s": 5.0, "compile_forward_s": 1.0, "compile_decode_s": 4.0})
    (tmp_path / STAGE_TIMES_FILE).write_text(f"{json.dumps(row)}\n{json.dumps(eager)}\n")
    line = describe_stage_times(tmp_path)
    assert line.startswith("time by stage over 2 trials: build 20 s (7%) · quantize 2 s (1%) · compile 105 s (39%)")
    assert ("; compile: 96 graphs, Dynamo 20 s, backend 50 s (Inductor 10 s), "
            "the rest (first runs, autotuning, capture) 35 s; compile by path: decode 74 s, forward 31 s") in line


def _woq_int8_rewrites():
    from torch._inductor.fx_passes import post_grad
    return [entry for patterns in post_grad.pass_patterns for entries in patterns.patterns.values()
            for entry in entries if getattr(getattr(entry, "handler", None), "__name__", "") == "woq_int8"]


def test_int8_weight_only_is_kept_off_int8pack_mm_on_cuda_and_left_to_it_on_cpu():
    from types import SimpleNamespace

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    keep_cuda_int8_weights_off_int8pack_mm()
    rewrites = _woq_int8_rewrites()
    assert len(rewrites) >= 1  # torch's rewrite is still there to switch off: else this guard is dead code

    def check(device: str) -> list[bool]:
        with FakeTensorMode():
            tensors = {"x": torch.empty(128, 64, dtype=torch.bfloat16, device=device),
                       "weight": torch.empty(32, 64, dtype=torch.int8, device=device),
                       "scales": torch.empty(32, dtype=torch.bfloat16, device=device)}
        match = SimpleNamespace(kwargs={k: SimpleNamespace(meta={"val": t}) for k, t in tensors.items()})
        return [entry.extra_check(match) for entry in rewrites]

    assert not any(check("cuda"))
    assert all(check("cpu"))
    # and on the CPU the compiled int8wo linear still runs the op (a tuned kernel there)
    from torch._inductor.utils import run_and_get_code

    linear = nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)
    quantize_(linear, Int8WeightOnlyConfig(set_inductor_config=False))
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    out, code = run_and_get_code(compile_model(linear, "default", None), x)
    assert "_weight_int8pack_mm" in "\n".join(code)
    torch.testing.assert_close(out, linear(x), rtol=2e-2, atol=2e-2)
