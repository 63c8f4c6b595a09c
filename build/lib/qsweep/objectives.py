"""What "better" means: selection and search objectives, drift as a cost, and the Pareto front, all read
from the metric schema (`qsweep.metrics`).

A metric with `objective=True` is a `select.objective` and a dimension of the Pareto front, ranked in its
`higher_is_better` direction. A metric with `drift=True` is a `select.drift_metric` (a higher-is-better one
becomes a cost through its `ideal` value) and, when lower is better, a `search.drift_metric`. A new
objective is therefore one metric entry; the two tables below hold only what the schema cannot say:
`drift`, the selection objective that ranks by the drift cost, and how the search scores a recipe.

The schema is read on every call (not copied at import), so choices and messages follow it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qsweep import metrics

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

COST = "cost"  # selection's drift cost column: the chosen drift metric as a cost, lower is better
DRIFT = "drift"  # the selection objective that ranks by that cost


def schema_metric(name: str) -> metrics.Metric:
    """The schema's entry for `name`; KeyError if the schema has none."""
    for m in metrics.METRICS:
        if m.name == name:
            return m
    raise KeyError(f"{name!r} is not a metric of qsweep.metrics")


def higher_is_better(name: str) -> bool:
    """The schema's direction of an objective metric; ValueError for an informational one (no direction)."""
    direction = schema_metric(name).higher_is_better
    if direction is None:
        raise ValueError(f"metric {name!r} has no better direction (higher_is_better=None): not an objective")
    return direction


# ---------------------------------------------------------------- selection

def selection_objectives() -> dict[str, tuple[str, bool]]:
    """`select.objective` choices -> (column ranked, higher is better): every objective metric, and `drift`."""
    found = {m.name: (m.name, higher_is_better(m.name)) for m in metrics.METRICS if m.objective}
    return {**found, DRIFT: (COST, False)}


def pareto_dims() -> dict[str, bool]:
    """Column -> higher is better: the dimensions of selection's Pareto front (one per objective)."""
    return dict(selection_objectives().values())


def drift_metrics() -> list[str]:
    """`select.drift_metric` choices (besides `auto`): every drift metric of the schema."""
    return sorted(m.name for m in metrics.METRICS if m.drift)


def resolve_drift_metric(configured: str, measured: set[str]) -> str:
    """The drift metric a cost is computed from: the configured one, or for `auto` accuracy_drop where the
    runs measured it (task models), else drift_cosine (every run has it)."""
    if configured != "auto":
        return configured
    return "accuracy_drop" if "accuracy_drop" in measured else "drift_cosine"


def as_cost(metric: str) -> tuple[str, Callable[[Any], Any]]:
    """How a drift metric becomes a cost, lower is better: (label, function of the values).

    Lower-is-better metrics are their own cost; a higher-is-better one costs `ideal - value`
    (`1 - drift_cosine`), or `-value` where identical outputs have no finite value (`-drift_sqnr_db`).
    """
    m = schema_metric(metric)
    if not m.drift:
        raise ValueError(f"metric {metric!r} is not a drift metric")
    if not m.higher_is_better:
        return metric, lambda v: v
    if m.ideal is not None:
        ideal = m.ideal
        return f"{ideal:g} - {metric}", lambda v: ideal - v
    return f"-{metric}", lambda v: -v


# ---------------------------------------------------------------- search

@dataclass(frozen=True)
class SearchObjective:
    """How the per-layer search scores recipes for one `search.objective`. The search maximizes, so `value`
    and `measured` must be higher-is-better metrics of the schema.

    Attributes:
        value: the metric a trial is ranked by (predicted by the cost model, or measured on the model copy).
        layer_cost: what the cost model saves per quantized layer, `ms` or `bytes` (greedy seeds).
        measured: the metric that confirmation measures end to end for the verdict.
        measured_by: how `measured` is measured, as the verdict reports it.
        paired: `measured` timed in turn with the baseline in one process (its spread is the noise), or
            None for a metric without timing noise.
    """

    value: str
    layer_cost: str
    measured: str
    measured_by: str
    paired: str | None = None

    def __post_init__(self) -> None:
        for name in (self.value, self.measured):
            if not higher_is_better(name):
                raise ValueError(f"search objectives are maximized; {name!r} is lower-is-better in the schema")


SEARCH_OBJECTIVES: dict[str, SearchObjective] = {
    "speedup": SearchObjective("predicted_speedup", "ms", "speedup", "isolated timing", paired="paired_speedup"),
    "size": SearchObjective("size_ratio", "bytes", "size_ratio", "bytes on disk"),
}


def search_drift_metrics() -> list[str]:
    """`search.drift_metric` choices: the drift metrics where lower is better (the budget bounds the value)."""
    return sorted(m.name for m in metrics.METRICS if m.drift and m.higher_is_better is False)


# ---------------------------------------------------------------- ranking

def score(rows: pd.DataFrame, column: str, higher: bool) -> np.ndarray:
    """A column as a score where higher is better; a missing value (or column) is the worst, -inf."""
    import numpy as np

    if column not in rows:
        return np.full(len(rows), -np.inf)
    values = rows[column].astype(float).to_numpy()
    return np.nan_to_num(values if higher else -values, nan=-np.inf)


def pareto_front(rows: pd.DataFrame, dims: dict[str, bool] | None = None) -> pd.Series:
    """True for rows no other row dominates (at least as good in every dim, better in one).

    Args:
        dims: column -> higher is better; default: selection's Pareto dimensions. A missing value counts
            as the worst.
    """
    import numpy as np
    import pandas as pd

    dims = pareto_dims() if dims is None else dims
    scores = np.column_stack([score(rows, c, up) for c, up in dims.items()]) if len(rows) else np.empty((0, 0))
    front = [not np.any(np.all(scores >= s, axis=1) & np.any(scores > s, axis=1)) for s in scores]
    return pd.Series(front, index=rows.index, dtype=bool)
