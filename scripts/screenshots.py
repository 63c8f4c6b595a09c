"""The README's MLflow screenshots, taken as a new user sees the dashboard: `qsweep ui` on a store, and a
fresh headless Chromium profile (no stored UI settings) per page, opening the links `qsweep ui` prints.

    python scripts/screenshots.py [docs] output_dir=outputs      # after `make demo`; needs `chromium`

Writes to the folder (default docs/):
  mlflow_experiment.png  the runs link: runs sorted by the objective, speedup/size ratio/drift as columns
  mlflow_charts.png      the charts link: objectives against drift, then one chart per metric
  mlflow_sweep.png       the last sweep's parent run: its report (plots and every point)
  mlflow_point.png       one point's run page (the best by the objective): params, metrics, its sweep
  mlflow_compare.png     the compare link: the best runs side by side

The server listens on 127.0.0.2: on localhost MLflow opens its AI-assistant panel over a third of the page
on a browser's first visit, which every fresh profile is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

HOST = "127.0.0.2"  # Linux routes all of 127/8 to loopback
# name -> (link printed by `qsweep ui`, window height in CSS pixels)
PAGES = {"mlflow_experiment.png": ("runs", 1000), "mlflow_charts.png": ("charts", 1500),
         "mlflow_sweep.png": ("its report", 1500), "mlflow_point.png": ("point", 1100),
         "mlflow_compare.png": ("compare", 1300)}
SCALE = 0.7  # device pixels per CSS pixel: the 1600-pixel-wide page fits a README column


def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise SystemExit("chromium not found; apt-get install chromium")
    return found


def free_port(host: str = HOST) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_ui(overrides: list[str], port: int, log: Path, wait_s: float = 180) -> tuple[subprocess.Popen, dict[str, str]]:
    """`qsweep ui` on HOST:port, its output (and its server's) in `log`; returns the process and its links
    (label -> url, the most recent experiment's) once it has printed them."""
    with open(log, "w") as out:  # a file, not a pipe: the server logs every request and must never block
        proc = subprocess.Popen([sys.executable, "-m", "qsweep", "ui", "--host", HOST, "--port", str(port),
                                 "--no-browser", *overrides], stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    deadline = time.monotonic() + wait_s
    while "Ctrl-C" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise SystemExit(f"qsweep ui printed no links:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.3)
    links: dict[str, str] = {}
    for line in log.read_text(errors="replace").splitlines():
        found = re.match(r"\s+([a-z ]+):\s+(http\S+)", line)
        if found:
            links.setdefault(found[1], found[2])  # the first experiment printed is the most recent
    if "runs" not in links:
        stop(proc)
        raise SystemExit("qsweep ui printed no links: is there a sweep in this store?")
    return proc, links


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # qsweep ui ends its server on SIGTERM
        proc.wait(30)


def chromium(url: str, *args: str, height: int = 1000) -> subprocess.CompletedProcess:
    """One page in a fresh profile; `args` say what to do with it (--screenshot=..., --dump-dom)."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               f"--user-data-dir={profile}", f"--window-size=1600,{height}",
                               "--virtual-time-budget=40000", *args, url],
                              capture_output=True, text=True, timeout=180, check=True)


def blank(png: Path) -> bool:
    """Whether the page's main area (right of the side bar, below the title) is empty."""
    import matplotlib.image

    image = matplotlib.image.imread(png)
    height, width = image.shape[:2]
    return float(image[height // 5:height * 4 // 5, width * 2 // 5:].std()) < 0.05


def point_url(links: dict[str, str]) -> str:
    """The page of the best run by the objective: the first run of the compare link."""
    query = urllib.parse.parse_qs(links["compare"].split("?", 1)[1])
    experiment, run = json.loads(query["experiments"][0])[0], json.loads(query["runs"][0])[0]
    return links["runs"].split("#")[0] + f"#/experiments/{experiment}/runs/{run}?workflowType=machine_learning"


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv and "=" not in argv[0] else Path("docs")
    overrides = [a for a in argv if "=" in a]
    log = Path(tempfile.mkdtemp()) / "ui.log"
    proc, links = start_ui(overrides, free_port(), log)
    links["point"] = point_url(links)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, (label, height) in PAGES.items():
            for _ in range(3):  # an artifact's frame now and then renders after the capture: try again
                chromium(links[label], f"--screenshot={folder / name}", f"--force-device-scale-factor={SCALE}",
                         height=height)
                if not blank(folder / name):
                    break
            print(folder / name)
    finally:
        stop(proc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
