"""Hugging Face causal LMs: loading (weights or random init), eval text, perplexity, drift outputs and
prefill/decode throughput.

Imported lazily by `models.hf_causal_lm`, so sweeps over small models never pay for transformers.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qsweep.config import ConfigError
from qsweep.measure import LatencyStats

# timer(fn, path, warm_up=None): fn timed with the trial's bench settings, its seconds counted under `path`
# (see measure.StageClock.part); warm_up: see measure.time_call
Timer = Callable[..., LatencyStats]

BUILTIN_TEXT = "builtin"
BYTES = "bytes"


# ---------------------------------------------------------------- model and tokenizer

def load_model(name_or_path: str | None, random_init: bool, config: dict | None, dtype: str | None,
               trust_remote_code: bool = False) -> nn.Module:
    """A causal LM on CPU in eval mode.

    random_init builds the architecture with random weights: from `config` (the architecture's
    config.json fields, no network) or else from `name_or_path`'s config. Otherwise the weights
    come from `from_pretrained(name_or_path)`: a local directory or a hub id.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype) if dtype else torch.float32
    if random_init:
        if config:
            fields = dict(config)
            arch = AutoConfig.for_model(fields.pop("model_type"), **fields)
        elif name_or_path:
            arch = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        else:
            raise ConfigError("model.builder.random_init=true needs model.builder.config or model.builder.name_or_path")
        model = AutoModelForCausalLM.from_config(arch, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    else:
        if not name_or_path:
            raise ConfigError("model.builder.name_or_path is required: a hub id or a local directory "
                              "(or set model.builder.random_init=true)")
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype,
                                                         trust_remote_code=trust_remote_code)
        except pickle.UnpicklingError as err:  # a pytorch_model.bin that is more than weights
            from qsweep.models import unsafe_pickle

            raise unsafe_pickle(f"the weights of {name_or_path}", err) from None
    return model.eval()


def load_tokenizer(tokenizer: str, name_or_path: str | None, random_init: bool):
    """A transformers tokenizer, or None for the byte-level fallback.

    "auto": the model's own tokenizer when its weights are loaded; for random-init models the byte
    fallback, since their predictions mean nothing in any tokenizer and it needs no download.
    """
    if tokenizer == BYTES or (tokenizer == "auto" and (random_init or not name_or_path)):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path if tokenizer == "auto" else tokenizer)


def tokenize(text: str, tokenizer, vocab_size: int) -> torch.Tensor:
    """1-D int64 token ids. Byte fallback: UTF-8 bytes modulo vocab_size (ids < 256 for any real vocab)."""
    if tokenizer is None:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64) % vocab_size
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)


# ---------------------------------------------------------------- eval text

def load_text(source: str) -> str:
    """eval.text: "builtin", a local file, or hf:<dataset>[:<config>[:<split>]] (needs `datasets`)."""
    if source == BUILTIN_TEXT:
        return builtin_text()
    if source.startswith("hf:"):
        return _hf_text(*source[3:].split(":"))
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"eval.text={source!r} is not a file; valid: builtin, a local text file, "
                          "hf:<dataset>[:<config>[:<split>]]")
    return path.read_text(encoding="utf-8", errors="replace")


def builtin_text() -> str:
    """The offline default: scikit-learn's bundled dataset descriptions (~43 KB of English prose).

    scikit-learn is a qsweep dependency, so this needs no network and no file of our own.
    """
    from importlib.util import find_spec

    # Found, not imported: importing sklearn takes over a second of a trial's build (1.3 s on an H200 host).
    (package,) = find_spec("sklearn").submodule_search_locations
    descr = Path(package) / "datasets" / "descr"
    return "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(descr.iterdir(), key=lambda p: p.name)
                       if p.name.endswith(".rst"))


def _hf_text(name: str, config: str | None = None, split: str = "test", *rest: str) -> str:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"eval.text=hf:{name} needs the `datasets` package (pip install datasets); "
                          "or use eval.text=builtin or a local text file") from None
    data = datasets.load_dataset(name, config or None, split=split)
    column = "text" if "text" in data.column_names else data.column_names[0]
    return "\n\n".join(data[column])


def windows(tokens: torch.Tensor, seq_len: int, n: int) -> torch.Tensor:
    """The first n non-overlapping windows [n, seq_len] (fewer if the text is short)."""
    count = min(n, len(tokens) // seq_len)
    if count == 0:
        raise ConfigError(f"eval text has {len(tokens)} tokens, fewer than eval.seq_len={seq_len}")
    return tokens[:count * seq_len].view(count, seq_len)


def random_windows(tokens: torch.Tensor, seq_len: int, n: int, seed: int) -> torch.Tensor:
    """n windows [n, seq_len] at random offsets, reproducible from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(tokens) - seq_len + 1, (n,), generator=gen)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


# ---------------------------------------------------------------- accuracy

def perplexity(model: nn.Module, ids: torch.Tensor, device: str, batch_size: int) -> float:
    """exp(mean next-token cross-entropy) over every position of every window (nats -> ppl)."""
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for chunk in ids.split(batch_size):
            chunk = chunk.to(device)
            logits = model(chunk).logits[:, :-1]
            nll = nn.functional.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum")
            total_nll += nll.item()
            total_tokens += chunk[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def drift_positions(seq_len: int, k: int) -> torch.Tensor:
    """k evenly spaced positions ending at the last one: logits kept for drift (short and long context)."""
    k = max(1, min(k, seq_len))
    return torch.tensor([seq_len - 1 - i * (seq_len // k) for i in reversed(range(k))])


def logits_at(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits [batch, len(positions), vocab]. Full-vocab logits for every position would be
    samples x seq_len x vocab floats (GBs for a 128k vocab), so drift keeps a few positions."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return model(ids, logits_to_keep=positions.to(ids.device)).logits
    return model(ids).logits[:, positions.to(ids.device)]


# ---------------------------------------------------------------- speed

def speed(model: nn.Module, ids: torch.Tensor, decode_tokens: int, timer: Timer, info: dict[str, Any],
          static_cache: bool = True) -> dict[str, float]:
    """prefill_tok_s and decode_tok_s (tokens/s over the whole batch) for prompts `ids` [batch, prompt_len].

    Prefill fills a KV cache and computes the last position's logits (as generation does). Decode
    runs `decode_tokens` greedy steps of one token after that prompt, with a StaticCache where the
    model supports it: fixed shapes and buffers, so torch.compile and CUDA graphs apply, and a repeat
    only rewinds the cache's length counter. Otherwise (or with static_cache=False) decode starts
    from a copy of the prefilled DynamicCache, the copy inside the timing; `info["kv_cache"]` says which.
    """
    from transformers import StaticCache

    batch, prompt_len = ids.shape
    if static_cache:
        cache = StaticCache(config=model.config, max_cache_len=prompt_len + decode_tokens)
        try:
            # Allocate the cache's buffers in an eager call: a compiled first prefill would trace the
            # allocation, and every later call (cache allocated) would compile the prefill again.
            with torch.compiler.set_stance("force_eager"):
                _prefill(model, ids, cache)
            # the timer's first call compiles the prefill path
            prefill_stats = timer(lambda: _prefill(model, ids, cache), "prefill")
        except Exception:  # an architecture without static-cache support
            return speed(model, ids, decode_tokens, timer, info, static_cache=False)
        first = _prefill(model, ids, cache).argmax(-1)  # [batch, 1]: decode starts from a real token

        def decode(steps: int = decode_tokens) -> torch.Tensor:
            rewind(cache, prompt_len)
            return greedy_decode(model, cache, first, steps)
    else:
        prefilled, first = _dynamic_prefill(model, ids)
        prefill_stats = timer(lambda: _dynamic_prefill(model, ids), "prefill")

        def decode(steps: int = decode_tokens) -> torch.Tensor:
            return greedy_decode(model, copy.deepcopy(prefilled), first, steps)

    # Every step runs the same kernels on the same shapes (a static cache's are fixed): one step warms
    # up the whole loop's capture.
    decode_stats = timer(decode, "decode", warm_up=functools.partial(decode, 1))
    info.update(kv_cache="StaticCache" if static_cache else "DynamicCache (copied per repeat)",
                prefill_timing_mode=prefill_stats.mode, decode_timing_mode=decode_stats.mode)
    return {"prefill_tok_s": batch * prompt_len / (prefill_stats.median_ms / 1e3),
            "decode_tok_s": batch * decode_tokens / (decode_stats.median_ms / 1e3)}


def _prefill(model: nn.Module, ids: torch.Tensor, cache) -> torch.Tensor:
    rewind(cache, 0)
    with torch.inference_mode():
        return model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits


def _dynamic_prefill(model: nn.Module, ids: torch.Tensor):
    with torch.inference_mode():
        out = model(ids, use_cache=True, logits_to_keep=1)
    return out.past_key_values, out.logits.argmax(-1)


def greedy_decode(model: nn.Module, cache, token: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` greedy decode steps from `token` [batch, 1] on a prefilled cache; returns [batch, steps]."""
    tokens = []
    with torch.inference_mode():
        for _ in range(steps):
            token = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
            tokens.append(token)
    return torch.cat(tokens, dim=1)


def rewind(cache, length: int) -> None:
    """Set a StaticCache's length to `length` tokens: its buffers are fixed, only the per-layer
    counters move (in place, so a captured CUDA graph replays it). Entries past `length` are
    masked out and overwritten by the next steps. The buffers were created under inference_mode
    (inference tensors on CUDA), so they may only be written under it."""
    with torch.inference_mode():
        for layer in cache.layers:
            if layer.is_initialized:
                layer.cumulative_length.fill_(length)

