"""Model builders: one function per model, named by `builder._target_` in conf/model/*.yaml.

A builder returns a `ModelBundle`: the model (on CPU, float32, eval mode, fixed seed) and how to
make its inputs. Task metrics (accuracy, perplexity) plug in through `evaluate`.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class ModelBundle:
    model: nn.Module
    make_inputs: Callable[[int, int], tuple[torch.Tensor, ...]]  # (batch_size, seed) -> CPU inputs
    # Task metric seam: (model, device, dtype) -> {"task_metric": value, ...}; higher_is_better tells
    # how to turn a change into accuracy_drop.
    evaluate: Callable[[nn.Module, str, torch.dtype], dict[str, float]] | None = None
    task_higher_is_better: bool = True
    logits: bool = False  # outputs are class/vocab logits: drift adds KL and top-1 agreement
    # Drift seam: (model, inputs) -> the outputs compared with the baseline; None = model(*inputs).
    # LMs keep logits at a few positions only (full logits are samples x seq x vocab floats).
    drift_outputs: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor] | None = None
    # Extra speed metrics: (model, inputs, timer, info) -> {"prefill_tok_s": ..., "decode_tok_s": ...};
    # timer(fn, path, warm_up=None) times fn with the trial's bench settings (lm.Timer).
    extra_speed: Callable[[nn.Module, tuple[torch.Tensor, ...], Callable, dict[str, Any]],
                          dict[str, float]] | None = None
    # Inputs of the timed forward, (batch_size, seed) -> CPU inputs; None: make_inputs. LMs time a
    # bench.tokens-long forward while drift and the prefill prompt keep eval.seq_len.
    speed_inputs: Callable[[int, int], tuple[torch.Tensor, ...]] | None = None
    # Training data seam (QAT fine-tuning, calibration; qsweep.flows): (batch_size, seed) -> an endless
    # iterator of (CPU inputs, targets) from the model's training data, never its eval split; None: none.
    train_batches: Callable[[int, int], Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]] | None = None
    # (outputs, targets) -> scalar training loss; None: cross-entropy of class logits against labels.
    train_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def timed_inputs(self, batch_size: int, seed: int) -> tuple[torch.Tensor, ...]:
        return (self.speed_inputs or self.make_inputs)(batch_size, seed)


# The builders a recipe file may name (`builder._target_`), by their full dotted name. A recipe is shared
# data, so it may not name just any callable, nor one found by a name prefix (a module's imports are
# reachable under its name): only functions registered here with @recipe_builder.
RECIPE_BUILDERS: dict[str, Callable[..., ModelBundle]] = {}


def recipe_builder(fn: Callable[..., ModelBundle]) -> Callable[..., ModelBundle]:
    """Register a model builder as one that recipe files may name."""
    RECIPE_BUILDERS[f"{fn.__module__}.{fn.__name__}"] = fn
    return fn


def build_model(builder: dict, seed: int) -> ModelBundle:
    """Call the builder named by `builder["_target_"]` with the remaining keys, under a fixed seed."""
    import importlib

    module_name, _, fn_name = builder["_target_"].rpartition(".")
    fn = getattr(importlib.import_module(module_name), fn_name)
    torch.manual_seed(seed)
    bundle = fn(**{k: v for k, v in builder.items() if k != "_target_"})
    bundle.model.eval()
    return bundle


def load_weights(path, device: str = "cpu") -> dict:
    """A state_dict saved with torch.save, loaded with weights_only=True: a file holding Python objects
    (a pickle that could run code) is refused with one line naming it."""
    import pickle

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise unsafe_pickle(path, err) from None


def unsafe_pickle(path, err: Exception) -> Exception:
    """The one-line refusal of a torch file that holds more than tensors (torch's own message is 10 lines)."""
    from qsweep.config import ConfigError

    why = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), "not plain tensors")
    return ConfigError(f"refusing to load {path}: it holds Python objects, not just weights ({why})")


def _gaussian_inputs(*shape: int) -> Callable[[int, int], tuple[torch.Tensor, ...]]:
    def make(batch_size: int, seed: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(batch_size, *shape, generator=gen),)

    return make


class ToyLinearModel(nn.Module):
    """torchao's quick-start model."""

    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.linear1 = nn.Linear(in_features, hidden, bias=False)
        self.linear2 = nn.Linear(hidden, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.linear1(x))


@recipe_builder
def toy_linear(in_features: int = 1024, hidden: int = 1024, out_features: int = 1024) -> ModelBundle:
    return ModelBundle(ToyLinearModel(in_features, hidden, out_features), _gaussian_inputs(in_features))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + GELU MLP, the shape of one LM layer in miniature."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


@recipe_builder
def transformer_block(dim: int = 256, heads: int = 4, mlp_ratio: int = 4, seq_len: int = 16) -> ModelBundle:
    return ModelBundle(TransformerBlock(dim, heads, mlp_ratio), _gaussian_inputs(seq_len, dim))


def _digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 handwritten digits (no download): 80/20 stratified split, pixels / 16."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data / 16.0, data.target, test_size=0.2, random_state=seed, stratify=data.target)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return as_x(x_train), torch.tensor(y_train), as_x(x_test), torch.tensor(y_test)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@recipe_builder
def digits_mlp(hidden: int = 512, depth: int = 3, epochs: int = 40, cache_dir: str = "outputs/models",
               seed: int = 0) -> ModelBundle:
    """An MLP classifier trained on the digits data on first use (seconds on CPU), then cached.

    The held-out 20% gives the task metric (top-1 accuracy); drift inputs are held-out images.
    """
    from pathlib import Path

    x_train, y_train, x_test, y_test = _digits_split(seed)
    model = _mlp([64] + [hidden] * (depth - 1) + [10])
    # The training code is part of the name: weights cached by an older _train are not reused.
    code = hashlib.sha1((inspect.getsource(_train) + inspect.getsource(_mlp)).encode()).hexdigest()[:8]
    checkpoint = Path(cache_dir) / f"digits_mlp-h{hidden}-d{depth}-e{epochs}-s{seed}-{code}.pt"
    if checkpoint.exists():
        model.load_state_dict(load_weights(checkpoint))
    else:
        _train(model, x_train, y_train, epochs, seed)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint.with_suffix(".tmp")  # atomic: parallel trials may train at once
        torch.save(model.state_dict(), tmp)
        tmp.replace(checkpoint)

    def make_inputs(batch_size: int, input_seed: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(input_seed)
        return (x_test[torch.randint(len(x_test), (batch_size,), generator=gen)],)

    def evaluate(m: nn.Module, device: str, dtype: torch.dtype) -> dict[str, float]:
        with torch.inference_mode():
            predicted = m(x_test.to(device, dtype)).argmax(-1).cpu()
        return {"task_metric": (predicted == y_test).double().mean().item()}

    def train_batches(batch_size: int, batch_seed: int) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        return shuffled_batches(x_train, y_train, batch_size, batch_seed)

    return ModelBundle(model, make_inputs, evaluate, task_higher_is_better=True, logits=True,
                       train_batches=train_batches)


def shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int
                     ) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """Endless ((inputs,), targets) batches of (x, y), reshuffled every epoch; the order is fixed by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            yield (x[idx],), y[idx]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


class GatedFFN(nn.Module):
    """Llama's SwiGLU feed-forward: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


@recipe_builder
def ffn_stack(dim: int = 4096, hidden: int = 14336, layers: int = 4) -> ModelBundle:
    """Residual stack of Llama feed-forward blocks: the weight-bound part of an LM, without attention."""

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(GatedFFN(dim, hidden) for _ in range(layers))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = x + block(x)
            return x

    return ModelBundle(Stack(), _gaussian_inputs(dim))
@recipe_builder
def hf_causal_lm(name_or_path: str | None = None, random_init: bool = False, config: dict | None = None,
                 tokenizer: str = "auto", dtype: str | None = None, trust_remote_code: bool = False,
                 text: str = "builtin", seq_len: int = 128, n_samples: int = 256, batch_size: int = 8,
                 drift_positions: int = 4, decode_tokens: int = 32, speed_tokens: int | None = None) -> ModelBundle:
    """Any Hugging Face causal LM: real weights (`name_or_path`: hub id or local directory) or the same
    architecture with random weights (`random_init`, shapes from `config` without network).

    Task metric: perplexity (lower is better) of the first `n_samples` windows of `seq_len` tokens of
    the eval text. Drift inputs are windows of the same text at seeded random offsets; drift compares
    logits at `drift_positions` positions per window. Speed adds prefill and decode tokens/s; the
    timed forward (latency_ms) is `speed_tokens` long (default seq_len).
    """
    from qsweep import lm

    model = lm.load_model(name_or_path, random_init, config, dtype, trust_remote_code)
    tok = lm.load_tokenizer(tokenizer, name_or_path, random_init)
    tokens = lm.tokenize(lm.load_text(text), tok, model.config.get_text_config().vocab_size)
    ppl_windows = lm.windows(tokens, seq_len, n_samples)
    positions = lm.drift_positions(seq_len, drift_positions)

    def make_inputs(batch: int, seed: int) -> tuple[torch.Tensor, ...]:
        return (lm.random_windows(tokens, seq_len, batch, seed),)

    def evaluate(m: nn.Module, device: str, _dtype: torch.dtype) -> dict[str, float]:
        return {"task_metric": lm.perplexity(m, ppl_windows, device, batch_size)}

    def drift_outputs(m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return lm.logits_at(m, inputs[0], positions)

    def extra_speed(m: nn.Module, inputs: tuple[torch.Tensor, ...], timer: Callable,
                    info: dict[str, Any]) -> dict[str, float]:
        return lm.speed(m, inputs[0], decode_tokens, timer, info)

    def speed_inputs(batch: int, seed: int) -> tuple[torch.Tensor, ...]:
        return (lm.random_windows(tokens, speed_tokens, batch, seed),)

    def train_batches(batch: int, seed: int) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        # the eval text's training split, loaded on first use (QAT, calibration): hf texts only
        source = train_text_source(text)
        train_tokens = lm.tokenize(lm.load_text(source), tok, model.config.get_text_config().vocab_size)
        for step in itertools.count():
            ids = lm.random_windows(train_tokens, seq_len, batch, seed + step)
            yield (ids,), ids

    return ModelBundle(model, make_inputs, evaluate, task_higher_is_better=False, logits=True,
                       train_batches=train_batches if train_text_source(text) else None, train_loss=next_token_loss,
                       drift_outputs=drift_outputs, extra_speed=extra_speed,
                       speed_inputs=speed_inputs if speed_tokens else None)


def train_text_source(text: str) -> str | None:
    """The training split of an `hf:<dataset>[:<config>[:<split>]]` eval text; None for builtin or a local
    file, which have no split to train on (training on the eval text would leak into perplexity)."""
    if not text.startswith("hf:"):
        return None
    name, config = (text[3:].split(":") + [""])[:2]
    return f"hf:{name}:{config}:train"


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Causal LM training loss: cross-entropy of each position's logits against the next token (nats)."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
