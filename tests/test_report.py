"""Reports: table rows and columns, plots written and logged to MLflow, graceful without measured runs.
(The MLflow UI itself is tested in test_dashboard.py.)"""

from __future__ import annotations

import matplotlib.image
import mlflow
import numpy as np
import pandas as pd

from known_runs import GRID, SENSITIVITY, record_known_runs
from qsweep.cli import main
from qsweep.config import SelectConf
from qsweep.report import build_report
from qsweep.tracking import Tracker


def test_report_writes_table_and_plots(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record_known_runs(uri, "known")
    assert main(["select", f"output_dir={tmp_path}", "model=digits_mlp", "experiment=known"]) == 0
    assert main(["report", f"output_dir={tmp_path}", "experiment=known"]) == 0
    directory = tmp_path / "reports" / "known"
    assert (tmp_path / "mlartifacts" / "known").is_dir()  # artifacts beside the SQLite store, not in the cwd
    table = pd.read_csv(directory / "points.csv")
    assert list(table.columns[:2]) == ["model", "run"] and set(table["model"]) == {"digits_mlp"}  # model first
    table = table.set_index("run")
    # every point but the search's parent: baseline, the grid, the failed run, the search trial
    assert set(table.index) == {"none-max-autotune", *GRID, "int4wo-g32-max-autotune", "trial-3"}
    assert table.loc["int4wo-g32-max-autotune", "status"] == "failed"
    assert table.loc["trial-3", ["kind", "cost", "feasible", "pareto", "selected"]].tolist() == [
        "search", 0.008, True, True, True]
    assert not table.loc["int8dq-per_row-max-autotune", "pareto"]
    assert list(table.index[:2]) == ["int4wo-g128-max-autotune", "trial-3"]  # ok points first, fastest first
    markdown = (directory / "points.md").read_text()
    assert markdown.count("\n") == len(table) + 2 and "| trial-3 " in markdown
    assert markdown.split("|")[1].strip() == "model"
    for name in ("pareto", "schemes", "sensitivity"):
        height, width, _ = matplotlib.image.imread(directory / f"{name}.png").shape
        assert height > 200 and width > 400
    assert "data:image/png;base64," in (directory / "report.html").read_text()
    client = mlflow.MlflowClient(tracking_uri=uri)
    report = client.search_runs([client.get_experiment_by_name("known").experiment_id],
                                "tags.`qsweep.role` = 'report'")[0]
    assert {f.path for f in client.list_artifacts(report.info.run_id)} == {
        "points.csv", "points.md", "pareto.png", "schemes.png", "sensitivity.png", "report.html"}
    assert "logged as MLflow run" in capsys.readouterr().out


def test_sensitivity_table_is_read_from_the_search_parent(tmp_path):
    from qsweep.report import find_sensitivity
    from qsweep.select import load_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record_known_runs(uri, "known")
    table, run = find_sensitivity(mlflow.MlflowClient(tracking_uri=uri), load_runs(uri, "known"))
    assert run == "search-digits_mlp"
    pd.testing.assert_frame_equal(table, SENSITIVITY, check_index_type=False, check_dtype=False)


def test_report_without_measured_runs_still_explains(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(uri, "empty").record("int4wo-g128-none", "unsupported", "int4wo needs a CUDA GPU; running on cpu",
                                 {"model": "toy", "scheme": "int4wo"}, {}, {"model": "toy"})
    files, table = build_report(uri, "empty", SelectConf(), tmp_path / "out")
    assert sorted(p.name for p in files) == ["points.csv", "points.md", "report.html"]
    assert table["reason"].tolist() == ["int4wo needs a CUDA GPU; running on cpu"]
    assert "no measured (status=ok) quantized runs" in capsys.readouterr().out


def test_sensitivity_long_form_becomes_a_matrix():
    from qsweep.report import sensitivity_matrix

    long = pd.DataFrame({"group": ["0", "0", "2", "2"], "candidate": ["int8wo", "intxwo_4"] * 2,
                         "drift": [0.001, 0.006, 0.0005, float("nan")], "status": ["ok", "ok", "ok", "failed"]})
    matrix = sensitivity_matrix(long)
    assert matrix.loc["0", "intxwo_4"] == 0.006 and matrix.loc["2", "int8wo"] == 0.0005
    assert np.isnan(matrix.loc["2"].get("intxwo_4", np.nan))
