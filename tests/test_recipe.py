"""A recipe is data, never code: hostile recipes are refused with one line and run nothing (checked by
whether a marker file appears, not only by the message)."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import yaml

from qsweep import schemes
from qsweep.cli import main
from qsweep.config import ConfigError
from qsweep.recipe import load_recipe, safe_name, unmatched_fqns

INT8WO = {"_target_": "torchao.quantization.Int8WeightOnlyConfig"}


def recipe_dict(**changes) -> dict:
    recipe = {"name": "r", "quant": INT8WO,
              "model": {"name": "toy", "builder": {"_target_": "qsweep.models.toy_linear", "in_features": 64,
                                                   "hidden": 64, "out_features": 64}},
              "dtype": "float32", "eval": {"n_samples": 8, "batch_size": 8, "seed": 0}, "metrics": {},
              "selection": {"drift_metric": "drift_cosine", "relative": False, "cost_label": "1 - drift_cosine"},
              "source": {"experiment": "x", "run_id": "0", "run_name": "r", "kind": "grid"},
              "hardware": {}, "versions": {}, "created": "2026-11-23"}
    recipe.update(changes)
    return recipe


def apply_refused(tmp_path, capsys, recipe: dict | str, *extra: str) -> str:
    """Run `qsweep apply` on a recipe; assert exit 2 and one line without traceback; return the line."""
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    assert main(["apply", f"recipe={path}", f"output_dir={tmp_path / 'out'}", "device=cpu", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qsweep: error:") and "\n" not in err and "Traceback" not in err
    return err


class Evil:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_nested_target_under_an_allowed_builder_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    builder = {"_target_": "qsweep.models.build_model", "seed": 0,
               "builder": {"_target_": "os.system", "command": f"touch {marker}"}}
    err = apply_refused(tmp_path, capsys, recipe_dict(model={"name": "toy", "builder": builder}))
    assert "refusing model builder 'qsweep.models.build_model'" in err and not marker.exists()
    # a registered builder with a callable hidden in its keys
    builder = {"_target_": "qsweep.models.toy_linear", "hidden": {"_target_": "os.system", "command": f"touch {marker}"}}
    err = apply_refused(tmp_path, capsys, recipe_dict(model={"name": "toy", "builder": builder}))
    assert "refusing builder.hidden._target_" in err and not marker.exists()


def test_recipe_cannot_turn_on_trust_remote_code(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    builder = {"_target_": "qsweep.models.hf_causal_lm", "name_or_path": str(folder), "trust_remote_code": True}
    err = apply_refused(tmp_path, capsys, recipe_dict(model={"name": "evil", "builder": builder}))
    assert "trust_remote_code=true: a recipe may not load code" in err and "model=<name>" in err
    assert not marker.exists()


@pytest.mark.parametrize("target", ["torchao.quantization.pt2e.fake_quantize.Module",  # torch.nn.Module
                                    "torchao.quantization.quant_api.quantize_", "os.system",
                                    "torchao.quantization.quant_api.torch", "torchao.quantization.nonexistent.X"])
def test_only_torchao_configs_are_built(target):
    with pytest.raises(ConfigError, match="refusing to build"):
        schemes.build({"_target_": target})


def test_torchao_configs_granularities_and_dtypes_still_build():
    built = schemes.build({"_target_": "torchao.quantization.IntxWeightOnlyConfig", "weight_dtype": "torch.int4",
                           "granularity": {"_target_": "torchao.quantization.PerGroup", "group_size": 32}})
    assert built.weight_dtype == torch.int4 and built.granularity.group_size == 32


def test_yaml_tags_and_non_yaml_are_one_line(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    tagged = f"name: !!python/object/apply:os.system ['touch {marker}']\n"
    assert "refusing YAML tag" in apply_refused(tmp_path, capsys, tagged) and not marker.exists()
    assert "is not a YAML recipe file" in apply_refused(tmp_path, capsys, "a: [unclosed\n  b: {")
    (tmp_path / "binary.yaml").write_bytes(b"\x80\x81\xff" * 10)
    assert main(["apply", f"recipe={tmp_path / 'binary.yaml'}", f"output_dir={tmp_path}"]) == 2
    assert "is not a YAML recipe file" in capsys.readouterr().err


def test_pickled_model_cache_is_refused_in_one_line(tmp_path, capsys):
    """digits_mlp caches its trained weights; a cache file holding a pickle that runs code is refused."""
    marker, cache = tmp_path / "MARKER", tmp_path / "out" / "models"
    cache.mkdir(parents=True)
    from qsweep.models import build_model

    build_model({"_target_": "qsweep.models.digits_mlp", "hidden": 32, "depth": 2, "epochs": 1,
                 "cache_dir": str(cache)}, seed=0)
    (cached,) = cache.glob("digits_mlp-*.pt")
    torch.save({"x": Evil(marker)}, cached)  # the cached weights replaced by a pickle that runs code
    builder = {"_target_": "qsweep.models.digits_mlp", "hidden": 32, "depth": 2, "epochs": 1,
               "cache_dir": "/somewhere/else"}  # apply points the cache into its own output_dir
    err = apply_refused(tmp_path, capsys, recipe_dict(model={"name": "digits_mlp", "builder": builder}))
    assert "refusing to load" in err and cached.name in err and "posix.system" in err
    assert not marker.exists()


def test_pickled_hf_weights_are_refused_in_one_line(tmp_path, capsys):
    from transformers import LlamaConfig

    marker, folder = tmp_path / "MARKER", tmp_path / "hf"
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=300).save_pretrained(folder)
    torch.save({"model.embed_tokens.weight": Evil(marker)}, folder / "pytorch_model.bin")
    builder = {"_target_": "qsweep.models.hf_causal_lm", "name_or_path": str(folder), "tokenizer": "bytes"}
    err = apply_refused(tmp_path, capsys, recipe_dict(model={"name": "hf", "builder": builder}))
    assert f"refusing to load the weights of {folder}" in err and not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # the stop itself is torch's weights_only, as it should be
        torch.load(folder / "pytorch_model.bin", weights_only=True)


def test_names_become_safe_file_names(tmp_path):
    assert safe_name("../../escaped") == "escaped" and safe_name("toy/int8wo-per_row") == "toy_int8wo-per_row"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(name="../../../etc/x")))
    assert load_recipe(path).name == "etc_x"


def test_unmatched_layer_names_are_listed():
    quant = {"_target_": "torchao.quantization.FqnToConfig",
             "fqn_to_config": {"linear1": INT8WO, "linear9": INT8WO, "re:linear[12]": None, "re:nope.*": None,
                               "linear2.weight": INT8WO}}
    names = {"", "linear1", "linear2", "linear1.weight", "linear2.weight"}
    assert unmatched_fqns(quant, names) == ["linear9", "re:nope.*"]
    assert unmatched_fqns(INT8WO, names) == []


@pytest.mark.parametrize("field, value, message", [
    ("quant", {"_target_": "os.system", "command": "true"}, "refusing to build 'os.system'"),
    ("quant", {"_target_": "torchao.quantization.quant_api.quantize_"}, "refusing to build"),
    ("builder", {"_target_": "subprocess.run", "args": ["true"]}, "refusing model builder 'subprocess.run'"),
])
def test_recipe_outside_allowlist_is_refused(tmp_path, capsys, field, value, message):
    recipe = recipe_dict()
    if field == "quant":
        recipe["quant"] = value
    else:
        recipe["model"]["builder"] = value
    assert message in apply_refused(tmp_path, capsys, recipe)
