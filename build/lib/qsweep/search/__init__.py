"""Per-layer recipe search with Optuna: which layer gets which scheme, under a drift budget.

Every quantizable layer (or group of layers sharing one choice) picks a candidate scheme; the trial's
assignment becomes a torchao `FqnToConfig`. A trial costs one accuracy evaluation of a deep copy of
the model built once per process: no compile, no latency measurement. Speed comes from a cost model
of cached single-layer microbenchmarks, and the best recipes are then measured end to end exactly
as grid trials are and timed in turn with the baseline (`confirm`). A sensitivity pass (one layer at a time) seeds the study with greedy
recipes, and the uniform recipes are seeded too, so the search starts from the best uniform scheme.

The study lives in an Optuna RDB storage (resume, several workers); the study is a parent MLflow
run and each trial a nested run with the grid's metric schema.

Modules, in the order they build on each other: space (candidates, groups, recipes), evaluate (drift
and size of a recipe, latency cost model), study (sensitivity, seeds, Optuna), confirm (end-to-end
and paired measurement, the verdict), command (`qsweep search`).
"""
