"""Reports people look at: every point of an experiment as a table, and the trade-offs as pictures.

    qsweep report experiment=<name>   -> <output_dir>/reports/<name>/{points.csv,points.md,report.html,*.png}

The same files are logged as artifacts of a run tagged qsweep.role=report in the experiment, so they
show on its MLflow page; at the end of a sweep they are logged to the sweep's parent run instead
(qsweep.dashboard.SweepReview). Selection columns (drift cost, feasible, Pareto) use the select.* settings.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from qsweep.config import ConfigError, SelectConf, load_config, mlflow_uri  # noqa: E402
from qsweep.objectives import pareto_front  # noqa: E402
from qsweep.recipe import safe_name  # noqa: E402
from qsweep.select import (  # noqa: E402
    Selection,
    artifact_text,
    experiment_name,
    load_runs,
    select,
    select_overrides,
)
from qsweep.tracking import (  # noqa: E402
    OK,
    REPORT_FILE,
    ROLE_REPORT,
    ROLE_SWEEP,
    ROLE_TAG,
    SENSITIVITY_FILE,
    Tracker,
    open_client,
)

COLUMNS = ["model", "run", "kind", "status", "scheme", "granularity", "group_size", "compile", "speedup", "size_ratio",
           "size_bytes", "peak_mem_bytes", "latency_ms", "accuracy_drop", "drift_sqnr_db", "drift_cosine",
           "drift_kl", "cost", "feasible", "pareto", "selected", "reason", "run_id"]
KIND_STYLE = {"grid": dict(marker="o", color="tab:blue"), "search": dict(marker="^", color="tab:green", alpha=0.6)}


def report_table(frame: pd.DataFrame, selection: Selection | None) -> pd.DataFrame:
    """All measured points and why others were not (skipped/unsupported/failed), with the selection's
    drift cost, feasibility and Pareto membership; ok points first, by speedup."""
    table = frame[frame["kind"] != "parent"].copy()
    for column in ("cost", "feasible", "pareto"):
        table[column] = selection.table[column].reindex(table.index) if selection is not None else np.nan
    for column in COLUMNS:
        if column not in table:
            table[column] = np.nan
    table.loc[table["granularity"] != "per_group", "group_size"] = np.nan  # unused by these points
    order = table["status"].ne(OK).astype(int)
    table = table.assign(_order=order).sort_values(["_order", "speedup"], ascending=[True, False])
    return table[COLUMNS].reset_index(drop=True)


def write_tables(table: pd.DataFrame, directory: Path) -> list[Path]:
    """points.csv (every column, full precision) and points.md (rounded, for reading)."""
    csv, md = directory / "points.csv", directory / "points.md"
    table.to_csv(csv, index=False)
    shown = table.drop(columns=["run_id"]).dropna(axis="columns", how="all")
    shown["reason"] = shown["reason"].fillna("").astype(str).str.slice(0, 60)
    for column in ("feasible", "pareto", "selected"):
        if column in shown:
            shown[column] = shown[column].map(lambda v: "yes" if v is True or v == 1 else "")
    shown = shown.astype(object).where(shown.notna(), None)  # tabulate blanks None, not NaN
    md.write_text(shown.to_markdown(index=False, floatfmt=".4g", missingval="") + "\n")
    return [csv, md]


def plot_pareto(table: pd.DataFrame, cost_label: str, sel: SelectConf, path: Path) -> Path:
    """Speedup vs drift and size ratio vs drift; the 2-D front of each panel drawn as a line, the
    4-D Pareto set ringed, the pick starred, the infeasible drift region shaded."""
    points = table[table["status"].eq(OK) & table["kind"].isin(["grid", "search"]) & table["cost"].notna()]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, metric in zip(axes, ("speedup", "size_ratio")):
        _pareto_panel(ax, points, metric, cost_label, sel)
    fig.suptitle(f"{len(points)} measured configs; Pareto front over speedup, size, memory and drift")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pareto_panel(ax, points: pd.DataFrame, metric: str, cost_label: str, sel: SelectConf) -> None:
    for kind, style in KIND_STYLE.items():
        part = points[points["kind"] == kind]
        if len(part):
            ax.scatter(part["cost"], part[metric], s=36, label=kind, zorder=3, **style)
    front = points[pareto_front(points, {metric: True, "cost": False})].sort_values("cost")
    ax.step(front["cost"], front[metric], where="post", color="tab:red", lw=1.5, label="front (this panel)", zorder=2)
    ringed = points[points["pareto"].fillna(False).astype(bool)]
    ax.scatter(ringed["cost"], ringed[metric], s=140, facecolors="none", edgecolors="tab:red",
               label="Pareto (all 4 dims)", zorder=4)
    chosen = points[points["selected"].fillna(False).astype(bool)]
    ax.scatter(chosen["cost"], chosen[metric], s=320, marker="*", color="gold", edgecolors="black",
               label="selected", zorder=5)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.scatter([0], [1.0], marker="s", color="black", s=30, label="baseline", zorder=3)
    ax.axvline(sel.max_drift, color="tab:orange", ls="--", lw=1, label=f"max_drift {sel.max_drift:g}")
    ax.axvspan(sel.max_drift, max(points["cost"].max(), sel.max_drift) * 1.05 + 1e-9, color="tab:orange", alpha=0.07)
    if len(points) <= 40:  # names stay readable up to a few dozen points
        for row in points[points["kind"] == "grid"].itertuples():
            ax.annotate(row.run, (row.cost, getattr(row, metric)), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
    ax.set_xlabel(f"drift cost: {cost_label} (lower is better)")
    ax.set_ylabel(f"{metric} (x vs baseline, higher is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def plot_schemes(table: pd.DataFrame, cost_label: str, path: Path) -> Path:
    """Per scheme: best speedup, best size ratio and lowest drift cost among its measured points."""
    points = table[table["status"].eq(OK) & table["kind"].isin(["grid", "search"])].copy()
    points["group"] = np.where(points["kind"] == "search", "per-layer search", points["scheme"].astype(str))
    best = points.groupby("group").agg(speedup=("speedup", "max"), size_ratio=("size_ratio", "max"),
                                       cost=("cost", "min")).sort_values("speedup")
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.45 * len(best) + 1.8), sharey=True)
    for ax, (column, title) in zip(axes, (("speedup", "best speedup (x)"), ("size_ratio", "best size ratio (x)"),
                                          ("cost", f"lowest {cost_label}"))):
        ax.barh(best.index, best[column], color="tab:blue" if column != "cost" else "tab:orange")
        if column != "cost":
            ax.axvline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sensitivity(sensitivity: pd.DataFrame, path: Path, title: str) -> Path:
    """Heat map: rows = layers, columns = candidate schemes, colour = drift when only that layer is quantized."""
    fig, ax = plt.subplots(figsize=(1.4 * sensitivity.shape[1] + 4, 0.35 * sensitivity.shape[0] + 2))
    image = ax.imshow(sensitivity.to_numpy(dtype=float), aspect="auto", cmap="magma_r")
    ax.set_xticks(range(sensitivity.shape[1]), sensitivity.columns, rotation=30, ha="right")
    ax.set_yticks(range(sensitivity.shape[0]), sensitivity.index, fontsize=7)
    for (i, j), value in np.ndenumerate(sensitivity.to_numpy(dtype=float)):
        ax.text(j, i, "n/a" if np.isnan(value) else f"{value:.3g}", ha="center", va="center", fontsize=7,
                color="tab:cyan")  # n/a: the layer cannot take that scheme (e.g. group size)
    fig.colorbar(image, ax=ax, label="drift (layer alone quantized)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def find_sensitivity(client, frame: pd.DataFrame) -> tuple[pd.DataFrame, str] | None:
    """The newest sensitivity table logged by a search (parent runs), with the run's name; None if none."""
    searches = frame[(frame["kind"] == "parent") & (frame["role"] != ROLE_SWEEP)]
    for row in searches.sort_values("start_time", ascending=False).itertuples():
        text = artifact_text(client, row.run_id, SENSITIVITY_FILE)
        if text is not None:
            return sensitivity_matrix(pd.read_csv(io.StringIO(text), dtype={"group": str})), row.run
    return None


def sensitivity_matrix(table: pd.DataFrame) -> pd.DataFrame:
    """Layers x candidates drift matrix from a sensitivity table: long form (group, candidate, drift[, status])
    as `qsweep search` writes it, or already wide (first column = layer)."""
    if {"group", "candidate", "drift"} <= set(table.columns):
        ok = table[table["status"] == OK] if "status" in table else table
        return ok.pivot_table(index="group", columns="candidate", values="drift", aggfunc="first",
                              sort=False).rename_axis(index=None, columns=None)
    wide = table.set_index(table.columns[0])
    wide.index = wide.index.astype(str).rename(None)  # FQNs such as "0" are names, not numbers
    return wide


def write_html(table: pd.DataFrame, images: list[Path], path: Path, title: str) -> Path:
    """One self-contained page (images inlined) that opens anywhere, MLflow's artifact viewer included."""
    figures = "".join(f'<h2>{p.stem}</h2><img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}" '
                      'style="max-width:100%">' for p in images)
    body = table.drop(columns=["run_id"]).to_html(index=False, na_rep="", float_format="{:.4g}".format)
    path.write_text(f"<html><head><meta charset='utf-8'><title>{title}</title><style>body{{font-family:sans-serif}}"
                    "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}"
                    f"</style></head><body><h1>{title}</h1>{figures}<h2>points</h2>{body}</body></html>")
    return path


def build_report(uri: str, experiment: str, sel: SelectConf, directory: Path,
                 quiet: bool = False) -> tuple[list[Path], pd.DataFrame]:
    """Write the table and plots for one experiment; returns (files, table). Prints why there is no
    selection (nothing measured yet), unless quiet."""
    frame = load_runs(uri, experiment)
    selection = _try_select(frame, sel, quiet)
    cost_label = selection.cost_label if selection else "drift"
    table = report_table(frame, selection)
    directory.mkdir(parents=True, exist_ok=True)
    files = write_tables(table, directory)
    images = []
    if selection is not None:
        images += [plot_pareto(table, cost_label, sel, directory / "pareto.png"),
                   plot_schemes(table, cost_label, directory / "schemes.png")]
    found = find_sensitivity(open_client(uri), frame)
    if found is not None:
        images.append(plot_sensitivity(found[0], directory / "sensitivity.png", f"per-layer sensitivity ({found[1]})"))
    files += images
    files.append(write_html(table, images, directory / REPORT_FILE, f"qsweep report: {experiment}"))
    return files, table


def _try_select(frame: pd.DataFrame, sel: SelectConf, quiet: bool = False) -> Selection | None:
    try:
        return select(frame, sel)
    except ConfigError as err:  # e.g. nothing measured yet: the table still explains why
        if not quiet:
            print(f"note: no selection columns or trade-off plots: {err}")
        return None


def log_report(uri: str, experiment: str, files: list[Path], sel: SelectConf, points: int) -> str:
    """A run tagged qsweep.role=report holding the files as artifacts; returns its id."""
    tracker = Tracker(uri, experiment)
    params = {"experiment": experiment, "points": points, "drift_metric": sel.drift_metric,
              "max_drift": sel.max_drift, "objective": sel.objective}
    return tracker.record(ROLE_REPORT, OK, "", params, {}, {ROLE_TAG: ROLE_REPORT}, files=files)


def report_command(args: list[str]) -> int:
    """`qsweep report experiment=<name>`: table + plots under <output_dir>/reports/<name>/, and in MLflow."""
    root, _ = load_config(select_overrides(args))
    experiment, uri = experiment_name(root), mlflow_uri(root)
    directory = Path(root.output_dir) / "reports" / safe_name(experiment)
    files, table = build_report(uri, experiment, root.select, directory)
    run_id = log_report(uri, experiment, files, root.select, len(table))
    print(f"{len(table)} points ({int(table['status'].eq(OK).sum())} ok) -> {directory}")
    for path in files:
        print(f"  {path.name}")
    print(f"logged as MLflow run {run_id} ({ROLE_TAG}={ROLE_REPORT}) in experiment {experiment}")
    return 0
