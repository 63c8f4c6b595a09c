"""Model builders: the trained digits classifier, Hugging Face LMs (random init, presets with published
shapes, loading from a local from_pretrained directory), eval text and LM speed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from qsweep import lm
from qsweep.config import ConfigError, choices
from qsweep.models import RECIPE_BUILDERS, build_model
from qsweep.runner import TrialSpec, run_trial
from qsweep.schemes import quantizable_layers


def test_digits_mlp_trains_once_then_loads_the_cached_checkpoint(compose, tmp_path):
    builder = dict(compose("model=digits_mlp", "model.builder.epochs=5").model.builder)
    first = build_model(builder, seed=0)
    checkpoints = list((tmp_path / "models").glob("digits_mlp-*.pt"))
    assert len(checkpoints) == 1
    again = build_model(builder, seed=123)  # another seed would change a fresh init: the weights must come from disk
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    assert first.evaluate(first.model, "cpu", torch.float32)["task_metric"] > 0.9
    (x,) = first.make_inputs(7, 0)
    assert x.shape == (7, 64) and first.logits


@pytest.mark.parametrize("preset, params, linears", [
    ("llama3_1_8b", 8_030_261_248, 32 * 7),   # published: 8.03B
    ("qwen2_5_0_5b", 494_032_768, 24 * 7),    # published: 0.49B (lm_head tied to the embeddings)
])
def test_lm_presets_have_the_published_shapes_and_skip_lm_head(compose, preset, params, linears):
    from transformers import AutoConfig, AutoModelForCausalLM

    root = compose(f"model={preset}")
    assert root.model.dtype == "bfloat16" and root.model.builder["random_init"]
    fields = dict(root.model.builder["config"])
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    assert sum(p.numel() for p in model.parameters()) == params
    chosen = quantizable_layers(model, root.model.quantize_filter)
    assert len(chosen) == linears and "lm_head" not in chosen
    assert "lm_head" in quantizable_layers(model, None)  # opt-in: model.lm_head=quantize (no filter)


@pytest.fixture(scope="module")
def saved_lm(tmp_path_factory):
    """A tiny Llama and a word-level tokenizer saved with save_pretrained, as a user's local model dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_lm")
    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator([lm.builtin_text()], trainers.WordLevelTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return path, model


def test_hf_causal_lm_loads_weights_and_tokenizer_from_a_local_directory(compose, saved_lm):
    path, saved = saved_lm
    root = compose("model=hf_causal_lm", f"model.builder.name_or_path={path}", "model.dtype=float32",
                   "eval.seq_len=16", "eval.n_samples=4")
    bundle = build_model(dict(root.model.builder), seed=99)
    for name, tensor in saved.state_dict().items():
        assert torch.equal(bundle.model.state_dict()[name], tensor), name
    (ids,) = bundle.make_inputs(3, 0)
    # The saved word-level tokenizer was used (ids < 300, words not bytes): "Dataset" is one token.
    from transformers import AutoTokenizer

    word = AutoTokenizer.from_pretrained(path)("Dataset", add_special_tokens=False)["input_ids"]
    assert ids.shape == (3, 16) and ids.max() < 300 and len(word) == 1
    ppl = bundle.evaluate(bundle.model, "cpu", torch.float32)["task_metric"]
    assert 50 < ppl < 1000  # a random model is near-uniform over its 300 tokens
    assert bundle.task_higher_is_better is False and bundle.timed_inputs(2, 0)[0].shape == (2, 16)


def test_hf_causal_lm_without_a_model_fails_with_one_clear_line(compose):
    root = compose("model=hf_causal_lm", "isolate=false")
    spec = TrialSpec(model_builder=dict(root.model.builder), quant=None, device="cpu", dtype="float32",
                     batch_size=2)
    result = run_trial(spec)
    assert result.status == "failed" and "model.builder.name_or_path is required" in result.reason


def test_eval_text_sources(tmp_path):
    builtin = lm.load_text("builtin")
    assert len(builtin) > 40_000 and "handwritten digits" in builtin.lower()
    own = tmp_path / "eval.txt"
    own.write_text("abc " * 100)
    assert lm.load_text(str(own)) == "abc " * 100
    with pytest.raises(ConfigError, match="valid: builtin"):
        lm.load_text(str(tmp_path / "missing.txt"))
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ConfigError, match="needs the `datasets` package"):
            lm.load_text("hf:wikitext:wikitext-2-raw-v1:test")
    tokens = lm.tokenize("héllo", None, vocab_size=200)  # byte fallback, modulo the vocabulary
    assert tokens.tolist() == [b % 200 for b in "héllo".encode()]
    assert lm.windows(torch.arange(100), 30, 10).shape == (3, 30)
    assert lm.drift_positions(128, 4).tolist() == [31, 63, 95, 127]


def test_static_cache_decode_matches_a_full_forward_and_speed_is_measured(compose):
    from qsweep import measure

    root = compose("model=tiny_llama", "eval.seq_len=24")
    model = build_model(dict(root.model.builder), seed=0).model
    ids = torch.randint(512, (2, 24), generator=torch.Generator().manual_seed(0))
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=24 + 5)
    with torch.inference_mode():
        first = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
        decoded = lm.greedy_decode(model, cache, first, 5)
        lm.rewind(cache, 24)  # what each timed repeat does
        again = lm.greedy_decode(model, cache, first, 5)
        full = model(torch.cat([ids, first, decoded[:, :-1]], 1)).logits[:, 24:].argmax(-1)
    assert torch.equal(decoded, full) and torch.equal(again, full)
    with torch.inference_mode():  # as on CUDA, where the counters are moved (made) under inference_mode
        cache = StaticCache(config=model.config, max_cache_len=24 + 5)
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    lm.rewind(cache, 0)  # a timed repeat rewinds from outside inference_mode
    assert all(layer.cumulative_length.item() == 0 for layer in cache.layers)

    def timer(fn, path, warm_up=None):
        return measure.time_call(fn, device="cpu", warmup=1, repeats=3, timing="e2e", warm_up=warm_up)

    for static in (True, False):
        info: dict = {}
        speed = lm.speed(model, ids, 4, timer, info, static_cache=static)
        assert speed["prefill_tok_s"] > 0 and speed["decode_tok_s"] > 0
        assert info["kv_cache"].startswith("StaticCache" if static else "DynamicCache")


def test_bench_tokens_sets_the_timed_forward_of_an_lm_not_its_drift_inputs(compose):
    root = compose("model=tiny_llama", "eval.seq_len=24", "bench.tokens=1")
    bundle = build_model(dict(root.model.builder), seed=0)
    assert bundle.timed_inputs(3, 0)[0].shape == (3, 1)  # a decode-shaped, weight-bound forward
    assert bundle.make_inputs(3, 0)[0].shape == (3, 24)  # drift windows and the prefill prompt keep eval.seq_len
    default = build_model(dict(compose("model=tiny_llama", "eval.seq_len=24").model.builder), seed=0)
    assert default.timed_inputs(3, 0)[0].shape == (3, 24)


# hf_causal_lm is the template that needs a path (tested on a saved model above); its presets build here.
@pytest.mark.parametrize("name", [m for m in choices("model") if m != "hf_causal_lm"])
def test_every_model_yaml_builds_and_can_be_named_by_a_recipe(compose, name):
    """Every conf/model YAML builds (on the meta device: no memory, so the 8B preset costs seconds) through
    a builder that recipes may name, and its model has Linear layers to quantize."""
    builder = dict(compose(f"model={name}", "model.builder.epochs=1" if name == "digits_mlp" else "seed=0").model.builder)
    assert builder["_target_"] in RECIPE_BUILDERS
    with torch.device("meta"):
        bundle = build_model(builder, seed=0)
    assert quantizable_layers(bundle.model, None)
    assert sum(p.numel() for p in bundle.model.parameters()) > 0
