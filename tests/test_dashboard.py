"""The MLflow dashboard: qsweep's saved views (columns, sort by each objective), the links `qsweep ui`
prints, and (where Chromium is installed) the page the printed link opens, rendered by a fresh browser."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import mlflow
import pytest

from known_runs import record_known_runs
from qsweep import dashboard
from qsweep.objectives import selection_objectives

TESTS = Path(__file__).parent
MEASURED = {"speedup", "size_ratio", "peak_mem_bytes", "accuracy_drop", "drift_cosine", "drift_sqnr_db", "latency_ms"}


def _state(views: dict[str, str], objective: str) -> dict:
    envelope = json.loads(views[dashboard.VIEW_PREFIX + objective])
    return {"name": envelope["name"], **json.loads(envelope["state"])}


def test_a_saved_view_per_objective_shows_the_objectives_and_drift_sorted_by_it():
    views = dashboard.saved_views(MEASURED)
    assert set(views) == {dashboard.VIEW_PREFIX + o for o in selection_objectives()}
    speedup = _state(views, "speedup")
    assert (speedup["orderByKey"], speedup["orderByAsc"]) == ("metrics.`speedup`", False)  # highest first
    memory = _state(views, "peak_mem_bytes")
    assert (memory["orderByKey"], memory["orderByAsc"]) == ("metrics.`peak_mem_bytes`", True)  # lowest first
    drift = _state(views, "drift")  # selection's drift metric (accuracy_drop where the runs have it), best first
    assert (drift["orderByKey"], drift["orderByAsc"], drift["name"]) == (
        "metrics.`accuracy_drop`", True, "qsweep: by accuracy_drop (drift)")
    columns = speedup["selectedColumns"]
    assert columns[:4] == ["attributes.`Duration`", "metrics.`speedup`", "metrics.`size_ratio`",
                           "metrics.`peak_mem_bytes`"]
    assert columns.index("metrics.`accuracy_drop`") < columns.index("metrics.`drift_cosine`")
    assert {"params.`scheme`", "tags.`status`", "tags.`reason`"} <= set(columns)
    assert speedup["runsHiddenMode"] == "SHOW_ALL"  # every run in the charts, not MLflow's first 10
    scatter = [c for c in speedup["compareRunCharts"] if c["type"] == "SCATTER"]
    assert {(c["xaxis"]["key"], c["yaxis"]["key"]) for c in scatter} == {("accuracy_drop", "speedup"),
                                                                       ("accuracy_drop", "size_ratio")}
    # Without a task metric, drift is 1 - cosine (as `qsweep select` ranks it): highest cosine first.
    cosine = _state(dashboard.saved_views(MEASURED - {"accuracy_drop"}), "drift")
    assert (cosine["orderByKey"], cosine["orderByAsc"]) == ("metrics.`drift_cosine`", False)


def test_links_open_the_model_training_runs_in_the_view_and_compare_the_best(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ids = record_known_runs(uri, "known")
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("known").experiment_id
    links = dashboard.experiment_links(uri, "http://127.0.0.2:5123", experiment, "known", "speedup")
    tags = client.get_experiment(experiment).tags
    assert json.loads(tags["mlflow.sharedViewState.qsweep-speedup"])["name"] == "qsweep: by speedup"
    route, query = links.runs.split("#", 1)[1].split("?")
    assert route == f"/experiments/{experiment}/runs"
    # A link that carried sort or filter parameters would make MLflow ignore the view: only these two.
    assert urllib.parse.parse_qs(query) == {"workflowType": ["machine_learning"], "viewStateShareKey": ["qsweep-speedup"]}
    assert links.charts == links.runs + "&compareRunsMode=CHART"
    compared = json.loads(urllib.parse.parse_qs(links.compare.split("?", 1)[1])["runs"][0])
    # measured runs, fastest first: not the failed run (5x) nor the search's parent
    assert compared[:3] == [ids["int4wo-g128-max-autotune"], ids["trial-3"], ids["float8dq-per_row-max-autotune"]]
    assert ids["int4wo-g32-max-autotune"] not in compared and ids["search-digits_mlp"] not in compared
    assert links.sweep is None and links.lines()[0] == "known:"


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _dom(url: str) -> str:
    """The page as a fresh headless Chromium profile renders it."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu",
                               "--no-first-run", "--disable-background-networking", "--disable-sync",
                               f"--user-data-dir={profile}", "--window-size=1600,1000", "--virtual-time-budget=40000",
                               "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True).stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs the chromium package (apt-get install chromium)")
def test_the_printed_link_shows_the_runs_sorted_with_the_metric_columns(tmp_path):
    record_known_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "known")
    host = "127.0.0.2"  # loopback; on 127.0.0.1 MLflow opens its assistant panel over the table
    log = tmp_path / "ui.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)}
    env.pop("MLFLOW_TRACKING_URI", None)
    port = _free_port(host)
    with open(log, "w") as out:  # a file, not a pipe: the server logs every request
        ui = subprocess.Popen([sys.executable, "-m", "qsweep", "ui", f"output_dir={tmp_path}", "--host", host,
                               "--port", str(port), "--no-browser"], stdout=out, stderr=subprocess.STDOUT,
                              text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C" not in log.read_text() and ui.poll() is None and time.monotonic() < deadline:
            time.sleep(0.3)
        printed = log.read_text()
        link = next((line.split()[1] for line in printed.splitlines() if line.strip().startswith("runs:")), None)
        assert link and link.startswith(f"http://{host}:"), printed[-3000:]
        page = _dom(link)
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGTERM)  # qsweep ui stops its server on SIGTERM
        ui.wait(60)
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert ui.returncode == 0 and f"--port {port} " not in processes  # its server ended with it
    for column in ("speedup", "size_ratio", "accuracy_drop"):  # visible with no stored UI settings
        assert f'data-testid="sort-header-{column}"' in page, column
    # the runs, fastest first
    order = [page.find(name) for name in ("int4wo-g128-max-autotune", "float8dq-per_row-max-autotune",
                                          "int8wo-per_row-max-autotune", "int8dq-per_row-max-autotune")]
    assert -1 not in order and order == sorted(order)
