"""Per-layer search: FqnToConfig recipes, grouping, beats-or-matches uniform, resume, crashing trials."""

import json
import math

import mlflow
import optuna
import pytest
import torch

from qsweep.config import ConfigError, mlflow_uri
from qsweep.models import build_model
from qsweep.recipe import load_recipe
from qsweep.schemes import Hardware, build, quantizable_layers, quantize
from qsweep.search.command import default_study_name, run_search
from qsweep.search.space import build_space, recipe_spec, resolve_candidates
from qsweep.search.study import default_storage

SMALL_DIGITS = ["model=digits_mlp", "model.builder.hidden=64", "model.builder.epochs=20"]


def candidates(root, *overrides):
    return resolve_candidates(root, list(overrides), Hardware.detect("cpu"), "float32")


def nested_runs(root, study: str) -> list:
    client = mlflow.MlflowClient(mlflow_uri(root))
    exp = client.get_experiment_by_name(root.tracking.experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`qsweep.study` = '{study}'")


def test_recipe_is_an_fqn_to_config_that_quantizes_only_its_layers(compose):
    over = ("model.builder.in_features=64", "model.builder.hidden=64", "model.builder.out_features=64",
            "search.candidates=[none,int8wo,intxwo_4:per_axis]")
    root = compose(*over)
    model = build_model(dict(root.model.builder), 0).model
    cands = candidates(root, *over)
    space = build_space(quantizable_layers(model, None), cands, [])
    spec = recipe_spec({"linear1": "intxwo_4:per_axis", "linear2": "none"}, space, cands)
    assert type(build(spec)).__name__ == "FqnToConfig"
    quantize(model, spec, quantizable_layers(model, None))
    assert type(model.linear1.weight.data).__name__ == "IntxUnpackedToInt8Tensor"
    assert type(model.linear2.weight.data) is torch.Tensor
    assert model(torch.randn(2, 64)).shape == (2, 64)


def test_groups_share_a_choice_and_group_size_limits_choices(compose):
    over = ("model=mlp_block", "search.candidates=[none,int8wo,intxwo_4]", "granularity=per_group", "group_size=512",
            r"search.groups=['qkv|proj','fc(\d)']")
    root = compose(*over)
    model = build_model(dict(root.model.builder), 0).model
    space = build_space(quantizable_layers(model, None), candidates(root, *over), root.search.groups)
    assert space.groups == {"g0": ["qkv", "proj"], "g1[1]": ["fc1"], "g1[2]": ["fc2"]}
    # group size 512 divides only fc2's 1024 input features; int8wo (per_group too) follows the same rule
    assert space.choices["g0"] == ["none"] and space.choices["g1[1]"] == ["none"]
    assert space.choices["g1[2]"] == ["none", "int8wo", "intxwo_4"]
    assert list(space.free) == ["g1[2]"] and space.size() == 3


def test_bad_search_config_is_one_line(compose):
    with pytest.raises(ConfigError, match="valid schemes: .*int8wo"):
        root = compose("search.candidates=[none,int9wo]")
        candidates(root, "search.candidates=[none,int9wo]")
    with pytest.raises(ConfigError, match="valid: accuracy_drop, drift_kl"):
        compose("search.drift_metric=sqnr")
    with pytest.raises(ConfigError, match="needs search.drift_metric=accuracy_drop"):
        compose("search.relative=true", "search.drift_metric=drift_kl")


def test_search_beats_or_matches_best_uniform_and_resume_adds_trials(compose, tmp_path, capsys):
    over = [*SMALL_DIGITS, "search.candidates=[none,int8wo,intxwo_4:per_axis,intxwo_2:per_axis]",
            "search.objective=size", "search.max_drift=0.02", "search.exhaustive=true", "search.confirm_top_k=1",
            "isolate=false"]
    root = compose(*over, "search.n_trials=10")
    first = run_search(root, over)
    assert first["trials_total"] == 10 and first["trials_this_run"] == 10
    best, uniform = first["best"], first["best_uniform"]
    assert best["drift"] <= 0.02 and uniform["drift"] <= 0.02
    assert best["value"] >= uniform["value"]  # the uniform recipes are seeded, so the search can only do better
    assert first["exhaustive"]["recipes"] == 64
    assert best["value"] <= first["exhaustive"]["optimum"] + 1e-12
    assert first["confirmed"][0]["status"] == "ok" and first["confirmed"][0]["size_ratio"] > 1
    assert first["measured_by"] == "bytes on disk" and first["confirmed"][0]["paired_speedup"] > 0

    capsys.readouterr()
    second = run_search(compose(*over, "search.n_trials=14"), over)  # same storage and study: resume
    assert "sensitivity table reused" in capsys.readouterr().out
    assert second["trials_total"] == 14 and second["trials_this_run"] == 4
    assert second["best"]["value"] >= best["value"]
    study = optuna.load_study(study_name=default_study_name(root), storage=default_storage(root))
    assert len(study.trials) == 14

    runs = nested_runs(root, default_study_name(root))
    parents = [r for r in runs if r.data.tags["qsweep.role"] == "search-study"]
    trials = [r for r in runs if r.data.tags["qsweep.role"] == "search-trial"]
    assert len(parents) == 1  # the resumed worker nests under the same parent run
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in trials)
    distinct = {json.dumps(t.params, sort_keys=True) for t in study.trials}
    assert len(trials) == len(distinct)  # one nested run per recipe evaluated; repeats reuse it
    assert {"size_ratio", "accuracy_drop", "drift_kl", "predicted_speedup"} <= set(trials[0].data.metrics)
    assert json.loads(trials[0].data.params["recipe_counts"])
    artifacts = {a.path for a in mlflow.MlflowClient(mlflow_uri(root)).list_artifacts(parents[0].info.run_id)}
    assert {"sensitivity.csv", "sensitivity.png", "pareto.png", "trials.csv", "best_recipe.json"} <= artifacts
    saved = load_recipe(tmp_path / "search" / default_study_name(root) / "best_recipe.json")  # one format
    assert type(build(saved.quant)).__name__ == "FqnToConfig" and saved.source["kind"] == "search"
    assert saved.model["name"] == root.model.name and saved.metrics


def test_a_budget_that_rules_out_uniform_int8_leaves_a_mixed_recipe_strictly_best(compose):
    # On CPU every quantized scheme stores int8 weights, so uniform int8wo is the smallest recipe; once the
    # budget is tighter than its drift, only a per-layer recipe can still shrink the model.
    over = [*SMALL_DIGITS, "search.candidates=[none,int8wo]", "search.objective=size", "search.drift_metric=drift_kl",
            "search.exhaustive=true", "search.confirm_top_k=1", "search.paired_rounds=0", "search.n_trials=8",
            "isolate=false"]
    loose = run_search(compose(*over, "search.max_drift=1", "search.study=loose"), over)
    assert loose["best"]["uniform"] == "int8wo"
    budget = 0.8 * loose["best"]["drift"]
    tight = run_search(compose(*over, f"search.max_drift={budget:.6e}", "search.study=tight"), over)
    assert tight["best_uniform"]["uniform"] == "none" and tight["best_uniform"]["value"] == 1.0
    assert tight["best"]["uniform"] is None and tight["best"]["drift"] <= budget
    assert tight["best"]["value"] > 1.05 and tight["mixed_beats_uniform"]
    assert tight["best"]["value"] == pytest.approx(tight["exhaustive"]["optimum"])
    assert tight["measured_by"] == "bytes on disk" and tight["measured_mixed_beats_uniform"]
    assert tight["measured_best"]["value"] == pytest.approx(tight["best"]["value"])


def test_a_crashing_trial_is_failed_and_the_search_goes_on(compose):
    over = ["model.builder._target_=fragile_models.fragile_toy", "+model.builder.how=raise",
            "search.candidates=[none,int8wo]", "search.drift_metric=drift_max_abs", "search.max_drift=10",
            "search.sensitivity=false", "search.confirm_top_k=0", "search.n_trials=8", "search.pareto=true"]
    root = compose(*over)
    result = run_search(root, over)
    states = result["trial_states"]
    assert states.get("FAIL", 0) >= 1 and states.get("COMPLETE", 0) >= 1  # uniform int8wo is seeded and raises
    assert sum(states.values()) == 8
    assert result["best"]["recipe"]["inner.linear1"] == "none"  # linear1 quantized is what explodes
    failed = [r for r in nested_runs(root, default_study_name(root)) if r.data.tags["status"] == "failed"]
    assert failed and "kernel exploded on purpose" in failed[0].data.tags["reason"]

    # With the sensitivity pass, the failing (layer, scheme) pair is found first and left out of the space.
    again = run_search(compose(*over, "search.sensitivity=true", "search.study=with-sensitivity"), over)
    assert again["trial_states"] == {"COMPLETE": 8}
    assert again["search_space"] == 2


def test_nan_recipes_are_failed_and_never_meet_the_budget(compose):
    # Quantizing linear1 makes every output NaN. NaN compares False with any budget, but the trial must
    # be FAIL (never a feasible, selectable "ok" run), in the study, its MLflow run and exhaustive alike.
    over = ["model.builder._target_=fragile_models.fragile_toy", "+model.builder.how=nan_outputs",
            "search.candidates=[none,int8wo]", "search.drift_metric=drift_max_abs", "search.max_drift=1e9",
            "search.sensitivity=false", "search.confirm_top_k=0", "search.n_trials=6", "search.exhaustive=true"]
    root = compose(*over)
    result = run_search(root, over)
    assert result["trial_states"].get("FAIL", 0) >= 1  # uniform int8wo is seeded
    assert result["best"]["recipe"]["inner.linear1"] == "none" and math.isfinite(result["best"]["drift"])
    runs = nested_runs(root, default_study_name(root))
    failed = [r for r in runs if r.data.tags["status"] == "failed"]
    assert failed and all(r.data.tags["reason"] == "non-finite outputs: 100% NaN" for r in failed)
    for run in runs:
        if run.data.tags["qsweep.role"] == "search-trial" and run.data.tags["status"] == "ok":
            assert math.isfinite(run.data.metrics["drift_max_abs"])
    assert result["exhaustive"]["recipes"] == 4
    assert json.loads(result["exhaustive"]["optimum_counts"])["none"] >= 1

    # The sensitivity pass finds the NaN (layer, scheme) first and leaves it out of the space.
    again = run_search(compose(*over, "search.sensitivity=true", "search.study=with-sensitivity"), over)
    assert again["trial_states"] == {"COMPLETE": 6} and again["search_space"] == 2


def test_a_baseline_with_nan_outputs_stops_the_search_in_one_line(compose):
    over = ["model.builder._target_=fragile_models.fragile_toy", "+model.builder.how=nan_baseline",
            "search.candidates=[none,int8wo]", "search.drift_metric=drift_max_abs"]
    with pytest.raises(ConfigError, match=r"^baseline failed: non-finite outputs: 100% NaN"):
        run_search(compose(*over), over)


def test_measured_verdict_overrides_the_prediction():
    import pandas as pd

    from qsweep.search.confirm import measured_verdict

    confirmed = pd.DataFrame([
        {"trial": 5, "uniform": "", "counts": '{"int8dq": 1}', "status": "ok", "speedup": 0.92, "accuracy_drop": 0.0},
        {"trial": 7, "uniform": "", "counts": '{"int8wo": 3}', "status": "ok", "speedup": 2.0, "accuracy_drop": 0.5},
        {"trial": 2, "uniform": "int8dq", "counts": '{"int8dq": 3}', "status": "ok", "speedup": 1.31,
         "accuracy_drop": 0.0},
    ])
    verdict = measured_verdict(confirmed, "accuracy_drop", 0.01)
    assert verdict["measured_best"]["trial"] == 2  # trial 7 is faster but over budget
    assert verdict["measured_mixed_beats_uniform"] is False
    confirmed.loc[0, "speedup"] = 1.4
    assert measured_verdict(confirmed, "accuracy_drop", 0.01)["measured_mixed_beats_uniform"] is True
    # 7% ahead is no win when the latency CV is 5% (noise 10%) ...
    confirmed["latency_cv"] = [0.05, 0.01, 0.01]
    noisy = measured_verdict(confirmed, "accuracy_drop", 0.01)
    assert noisy["measured_best"]["trial"] == 5 and noisy["measured_mixed_beats_uniform"] is False
    assert noisy["measured_noise"] == pytest.approx(0.10)
    # ... nor when re-measuring the unquantized model strays 12% from its own baseline.
    confirmed["latency_cv"] = 0.01
    confirmed.loc[3] = {"trial": 0, "uniform": "none", "counts": '{"none": 3}', "status": "ok", "speedup": 0.88,
                        "accuracy_drop": 0.0, "latency_cv": 0.01}
    assert measured_verdict(confirmed, "accuracy_drop", 0.01)["measured_mixed_beats_uniform"] is False
    confirmed.loc[3, "speedup"] = 0.99
    assert measured_verdict(confirmed, "accuracy_drop", 0.01)["measured_mixed_beats_uniform"] is True
    # Paired timings, where present, decide, with their own spread as the noise.
    confirmed["paired_speedup"], confirmed["paired_noise"] = [1.2, 3.0, 1.5, 1.0], 0.02
    paired = measured_verdict(confirmed, "accuracy_drop", 0.01)
    assert paired["measured_by"] == "paired timing" and paired["measured_best"]["trial"] == 2
    assert paired["measured_mixed_beats_uniform"] is False  # uniform int8dq is fastest when paired


def test_paired_timing_cancels_a_drifting_host():
    from qsweep.search.confirm import paired_ratio

    # The host ran at half speed in round 2: separate timings would disagree by 2x, the ratios do not.
    steady = paired_ratio([10.0, 20.0, 10.0], [5.0, 10.0, 5.0])
    assert steady == {"paired_speedup": 2.0, "paired_noise": 0.0}
    jittery = paired_ratio([10.0, 10.0, 10.0], [5.0, 10.0, 8.0])  # ratios 2, 1, 1.25
    assert jittery["paired_speedup"] == 1.25 and jittery["paired_noise"] == pytest.approx(0.4)
