"""sparsity: magnitude pruning to 2:4, then torchao's `sparsify_` with the scheme's config.

Pruning keeps, in every group of 4 consecutive weights along the input dimension, the 2 of largest
magnitude and zeroes the other 2. The scheme's `config` then says what the pruned weights become:
- `torchao.sparsity.sparse_api.SemiSparseWeightConfig`: 2:4 semi-structured storage and kernels (cuSPARSELt/CUTLASS,
  CUDA SM >= 8.0, fp16/bf16);
- `Float8DynamicActivationFloat8WeightConfig` with `packing_format: sparse_2d_data_2d_metadata`: float8
  activations and 2:4 float8 weights, torchao's CUTLASS kernel (SM >= 9.0);
- `Int8DynamicActivationInt8WeightConfig`: int8 dynamic on the pruned weights. torchao 0.18 has no int8 2:4
  layout any more (SemiSparseLayout left with version 1 of that config), so its matmul is dense: the row
  shows what 2:4 pruning costs int8's accuracy, not a sparse kernel's speed.
The sparse kernels exist only on CUDA; elsewhere the flow raises NotImplementedError (`unsupported`).
"""

from __future__ import annotations

import torch
from torch import nn

from qsweep.flows.base import FlowResult, FlowSettings, uniform_targets
from qsweep.models import ModelBundle
from qsweep.schemes import build


def run(model: nn.Module, bundle: ModelBundle, quant: dict, candidates: dict[str, nn.Linear], flow: dict,
        settings: FlowSettings) -> FlowResult:
    """Prune the candidates to 2:4, then sparsify_ them. Metric: weight_sparsity (zeros / weights pruned)."""
    from torchao.sparsity import sparsify_

    if settings.device != "cuda":
        raise NotImplementedError("2:4 semi-structured sparse kernels (cuSPARSELt/CUTLASS) need a CUDA GPU "
                                  f"(SM >= 8.0); running on {settings.device}")
    targets, skipped = uniform_targets(quant, candidates, "sparsity")
    skipped.update({name: f"in_features {m.in_features} not divisible by 4 (2:4 groups)"
                    for name, m in candidates.items() if m.in_features % 4 and name not in skipped})
    chosen = {name: m for name, m in candidates.items() if name not in skipped}
    for layer in chosen.values():
        prune_2_4(layer.weight)
    zeros = sum(int((m.weight == 0).sum()) for m in chosen.values())
    total = sum(m.weight.numel() for m in chosen.values())
    ids = {id(m) for m in chosen.values()}
    sparsify_(model, build(quant), filter_fn=lambda module, fqn: id(module) in ids)
    return FlowResult(model, skipped, {"weight_sparsity": zeros / total if total else 0.0})


@torch.no_grad()
def prune_2_4(weight: torch.Tensor) -> None:
    """Zero, in place, the 2 smallest-magnitude weights of every group of 4 along the input (last) dimension.

    Exactly 2 of each 4 are zeroed (ties broken by position), so the mask is 2:4 even where weights repeat.
    """
    out_features, in_features = weight.shape
    groups = weight.detach().reshape(out_features, in_features // 4, 4)
    smallest = groups.abs().float().topk(2, dim=-1, largest=False).indices
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, smallest, False)
    weight.mul_(keep.reshape(weight.shape))
