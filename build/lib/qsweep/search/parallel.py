"""Several workers on one study: `qsweep search search.n_workers=N`, and more on other hosts with
`QSWEEP_SEARCH_WORKER=<n> qsweep search <the same overrides>` (by hand or through a launcher).

The process the user started is the coordinator: it builds the setup, runs the sensitivity pass and
enqueues the seeds, then starts N worker processes (`qsweep search`, told apart by QSWEEP_SEARCH_WORKER,
running the coordinator's resolved config) that run trials only; after they end it reads the study back,
confirms the best recipes end to end and writes the outputs, once. The workers share the study through its storage
and nest their trials under the coordinator's MLflow parent run (QSWEEP_SEARCH_PARENT): every trial is
one Optuna trial number and at most one MLflow run, whichever worker ran it.

On CUDA each worker is pinned to its own GPU (CUDA_VISIBLE_DEVICES) and holds that GPU's claim for its
life (qsweep.gpus), so its latency microbenchmarks have the GPU to themselves; N is capped at the GPU
count. On CPU the workers share the cores: their timings are not comparable with a serial run's.

Storages: any SQLAlchemy URL (postgresql:// for many workers on many hosts; SQLite waits up to 60 s for
another writer's lock) or `journal:///shared/path/optuna.log`, Optuna's journal file, for a shared file
system without a database server (no heartbeats: a trial of a worker that died stays RUNNING).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any

from qsweep import gpus

if TYPE_CHECKING:
    from qsweep.config import RootConf
    from qsweep.search.study import Setup

WORKER_ENV = "QSWEEP_SEARCH_WORKER"  # set in a worker process: its number; it runs trials only
PARENT_ENV = "QSWEEP_SEARCH_PARENT"  # the study's MLflow parent run, which a worker's trials nest under
CONFIG_ENV = "QSWEEP_SEARCH_CONFIG"  # the coordinator's resolved config (YAML): every worker runs exactly it
JOURNAL = "journal:"


def journal_path(url: str) -> str | None:
    """The file of a `journal:///abs/path.log` (or `journal:rel/path.log`) storage, else None."""
    if not url.startswith(JOURNAL):
        return None
    rest = url[len(JOURNAL):]
    return rest[2:] if rest.startswith("//") else rest


def optuna_storage(url: str, max_retry: int) -> Any:
    """The Optuna storage of search.storage: RDB with heartbeats (a trial whose worker died is failed and
    retried up to `max_retry` times), or a journal file."""
    import optuna

    path = journal_path(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if path is not None:
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(path))
        # SQLite has one writer at a time: another worker's write makes this one wait, not fail at 5 s.
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine, heartbeat_interval=60, grace_period=180,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry))


def worker_gpus(device: str, n_workers: int) -> list[str | None]:
    """The GPU of each worker (CUDA_VISIBLE_DEVICES entries; one worker per GPU, N capped at the GPU
    count), or None for each of N CPU workers."""
    if device != "cuda":
        return [None] * n_workers
    visible = gpus.visible_gpus()
    if n_workers > len(visible):
        print(f"qsweep search: search.n_workers={n_workers} > {len(visible)} GPUs; running {len(visible)} "
              "workers (one per GPU, so that each trial's latency is measured alone)", flush=True)
    return list(visible[:n_workers])


def run_workers(setup: Setup, seeds: list[dict[str, str]], overrides: list[str]) -> tuple[Any, int, float]:
    """Seed the study, run search.n_workers worker processes on it up to search.n_trials finished trials,
    and read it back; returns (study, new trials, seconds), as study.run_trials does."""
    import optuna

    from qsweep.search.space import recipe_key
    from qsweep.search.study import open_study

    s = setup.root.search
    study = open_study(setup)
    for seed in seeds:
        study.enqueue_trial({k: seed[k] for k in setup.space.free}, skip_if_exists=True)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    before = len(study.get_trials(deepcopy=False, states=finished))
    started = time.perf_counter()
    if before >= s.n_trials:
        print(f"qsweep search: study {setup.study_name!r} already holds {before} trials "
              f"(search.n_trials={s.n_trials}); raise it to add trials", flush=True)
    else:
        placement = worker_gpus(setup.point.device, s.n_workers)
        where = ", ".join(f"GPU {g}" for g in placement) if placement[0] is not None else "CPU"
        print(f"qsweep search: study {setup.study_name!r} holds {before} trials; {len(placement)} workers "
              f"({where}) run {s.n_trials - before} more", flush=True)
        codes = _run_processes(setup, placement, overrides)
        failed = [f"worker {i} exited with code {c}" for i, c in enumerate(codes) if c != 0]
        if failed:
            print(f"qsweep search: {'; '.join(failed)}", flush=True)
        if len(failed) == len(codes):
            raise RuntimeError(f"every search worker failed ({'; '.join(failed)}); their output says why")
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if "metrics" in trial.user_attrs:
            setup.memo.setdefault(recipe_key(setup.space.complete(trial.params)), trial.user_attrs["metrics"])
    after = len(study.get_trials(deepcopy=False, states=finished))
    return study, after - before, time.perf_counter() - started


def _run_processes(setup: Setup, placement: list[str | None], overrides: list[str]) -> list[int]:
    from omegaconf import OmegaConf

    config = setup.out_dir / "worker_config.yaml"
    config.write_text(OmegaConf.to_yaml(OmegaConf.structured(setup.root)))
    procs = []
    try:
        for i, gpu in enumerate(placement):
            env = {**os.environ, WORKER_ENV: str(i), PARENT_ENV: setup.parent_run_id, CONFIG_ENV: str(config)}
            if gpu is not None:
                env[gpus.VISIBLE] = gpu
            procs.append(subprocess.Popen([sys.executable, "-m", "qsweep", "search", *overrides], env=env))
        return [p.wait() for p in procs]
    finally:  # an interrupt or error here: no worker goes on alone
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()


def coordinator_run(tracker: Any, study: str) -> str:
    """The MLflow run a worker's trials nest under: its coordinator's (QSWEEP_SEARCH_PARENT), else the
    study's parent run found by its tags (a worker started by hand or by a launcher on another host)."""
    from qsweep.config import ConfigError
    from qsweep.tracking import ROLE_SEARCH, ROLE_TAG, STUDY_TAG

    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    found = tracker.find(**{STUDY_TAG: study, ROLE_TAG: ROLE_SEARCH})
    if not found:
        raise ConfigError(f"search worker: study {study!r} has no search run in this MLflow experiment yet; "
                          "start the search itself first (qsweep search without QSWEEP_SEARCH_WORKER)")
    return found[-1].info.run_id  # the oldest, as the coordinator picks


def run_worker(root: RootConf, overrides: list[str]) -> int:
    """One worker (QSWEEP_SEARCH_WORKER set): the coordinator's study, space and parent run; trials only.
    Started by `search.n_workers`, or by hand or a launcher on any host that reaches the study's storage
    and the tracking store: `QSWEEP_SEARCH_WORKER=1 qsweep search <the search's overrides>`."""
    import contextlib

    import optuna

    from qsweep.search.command import prepare
    from qsweep.search.study import cached_sensitivity, run_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if os.environ.get(CONFIG_ENV):  # the coordinator's config, whatever overrides it was built from
        from omegaconf import OmegaConf

        from qsweep.config import RootConf, to_root

        root = to_root(OmegaConf.merge(OmegaConf.structured(RootConf), OmegaConf.load(os.environ[CONFIG_ENV])))
    # Its GPU for its whole life: its microbenchmarks and trials run alone there. Claimed before CUDA
    # starts in this process (counting GPUs does not start it), which then sees only that GPU.
    on_gpu = root.device == "cuda" or (root.device == "auto" and bool(gpus.visible_gpus()))
    hold = gpus.claim_gpu(waiting="qsweep search worker: waiting for a free GPU") if on_gpu \
        else contextlib.nullcontext(None)
    with hold as gpu:
        if gpu is not None:
            os.environ[gpus.VISIBLE] = gpu
        setup = prepare(root, overrides)
        if root.search.sensitivity:  # the coordinator's table (cached): the same space, failed pairs left out
            cached_sensitivity(setup)
        run_trials(setup, [])
    return 0
