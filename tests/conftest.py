"""Shared fixtures: the real Hydra config composed with compose(), CPU, small sizes, stores in tmp."""

from __future__ import annotations

import pytest
import torch

from qsweep.config import RootConf, load_config

FAST = ["device=cpu", "bench=fast", "eval.n_samples=64", "eval.batch_size=32"]


@pytest.fixture
def compose(tmp_path):
    """compose("scheme=int8wo", ...) -> RootConf writing everything (MLflow, baselines) under tmp_path."""

    def _compose(*overrides: str) -> RootConf:
        root, _ = load_config([f"output_dir={tmp_path}", *FAST, *overrides])
        return root

    return _compose


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
