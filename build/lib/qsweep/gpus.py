"""Which GPU a trial runs on: one trial per GPU at a time, across every qsweep process of the host.

A trial claims a free GPU (a file lock per GPU, released by the OS even if the process is killed) for as
long as it runs, and its child process sees only that GPU (`CUDA_VISIBLE_DEVICES`, set in the child before
CUDA starts: `runner.run_isolated(env=...)`). So a launcher that runs several grid points at once (Hydra's
joblib launcher with one job per GPU, `hydra/launcher=gpus`) spreads them over the GPUs, and no two
timings share a GPU; a point that finds every GPU busy waits. The run records the GPU as param
`device_index` (its entry in the sweep's CUDA_VISIBLE_DEVICES, else its CUDA index); CPU runs have none.

The GPUs are those the sweep sees: `CUDA_VISIBLE_DEVICES` if set (`CUDA_VISIBLE_DEVICES=2,3 qsweep run -m
hydra/launcher=gpus ...` uses GPUs 2 and 3), else every device torch counts. The locks are host-local
(`$TMPDIR/qsweep-gpus[-<SLURM_JOB_ID>]`, or `$QSWEEP_GPU_LOCK_DIR`): a Slurm job's GPUs are its own, so
its locks are too. The GPUs of one sweep are assumed identical (one baseline serves every GPU).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from omegaconf import OmegaConf

VISIBLE = "CUDA_VISIBLE_DEVICES"
LOCK_DIR_ENV = "QSWEEP_GPU_LOCK_DIR"
POLL_S = 0.5


def visible_gpus() -> list[str]:
    """This process's GPUs as CUDA_VISIBLE_DEVICES entries (indices or UUIDs), in CUDA's order; [] on CPU.
    Counting does not start CUDA here (a trial child must be the first to)."""
    listed = os.environ.get(VISIBLE)
    if listed is not None:
        entries = [e.strip() for e in listed.split(",") if e.strip()]
        # CUDA stops at the first invalid entry: "-1" hides every GPU, "0,-1,1" shows only 0.
        valid = []
        for entry in entries:
            if entry.lstrip("-").isdigit() and int(entry) < 0:
                break
            valid.append(entry)
        return valid
    import torch

    # device_count asks NVML where it can; torch.cuda.is_available() would start CUDA in this process.
    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_count() -> int:
    """How many GPUs this process sees; at least 1 (a launcher's n_jobs on a machine without a GPU)."""
    return max(len(visible_gpus()), 1)


# `hydra/launcher=gpus` runs one job per GPU: n_jobs: ${qsweep.gpu_count:}
if not OmegaConf.has_resolver("qsweep.gpu_count"):
    OmegaConf.register_new_resolver("qsweep.gpu_count", gpu_count, use_cache=True)


def lock_dir() -> Path:
    """Host-local folder of the per-GPU locks (a Slurm job's own: its GPUs are allocated to it alone)."""
    if os.environ.get(LOCK_DIR_ENV):
        return Path(os.environ[LOCK_DIR_ENV])
    job = os.environ.get("SLURM_JOB_ID")
    return Path(tempfile.gettempdir()) / (f"qsweep-gpus-{job}" if job else "qsweep-gpus")


def _lock_name(entry: str) -> str:
    return "gpu-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in entry) + ".lock"


@contextlib.contextmanager
def claim_gpu(gpus: list[str] | None = None, waiting: str = "") -> Iterator[str]:
    """Hold one free GPU of `gpus` (default: the visible ones) until the block ends; yields its entry.
    The first free one in order is taken; when all are busy, prints `waiting` once and waits."""
    from filelock import FileLock, Timeout

    gpus = visible_gpus() if gpus is None else gpus
    if not gpus:
        raise RuntimeError("no GPU to claim: CUDA_VISIBLE_DEVICES hides them all, or torch sees none")
    folder = lock_dir()
    if not folder.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # one host, several users: everyone's trials take turns
            folder.chmod(0o1777)
    locks = [(entry, FileLock(str(folder / _lock_name(entry)), mode=0o666)) for entry in gpus]
    said = False
    while True:
        for entry, lock in locks:
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            try:
                yield entry
            finally:
                lock.release()
            return
        if waiting and not said:
            print(waiting, flush=True)
            said = True
        time.sleep(POLL_S)


def device_index(entry: str) -> int | str:
    """The `device_index` param of a run: the GPU's index (an int), or its UUID where it was named so."""
    return int(entry) if entry.isdigit() else entry


@contextlib.contextmanager
def trial_device(device: str, isolated: bool, waiting: str = "") -> Iterator[tuple[dict[str, str], int | str | None]]:
    """For one trial: (the environment of its child process, the GPU's device_index). On CUDA with an
    isolated trial, a free GPU is claimed for the block and the child sees only it; otherwise nothing
    is claimed (a CPU trial, or an in-process one whose CUDA device is already fixed): ({}, None)."""
    if device != "cuda" or not isolated:
        yield {}, None
        return
    with claim_gpu(waiting=waiting) as entry:
        yield {VISIBLE: entry}, device_index(entry)
