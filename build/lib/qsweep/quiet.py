"""Silence the library warnings that are known to be harmless for what qsweep runs, and nothing else.

`import qsweep` installs the filters, so they hold in every process qsweep starts: the CLI, Hydra's jobs and
the trial children of the fork server (which preloads qsweep.runner). Each filter sits on the logger that
emits the message and matches its text narrowly; any other message of the same logger still shows.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings

# torchao/__init__.py tries to load every _C*.so it ships and logs a warning for each that fails. Two of
# them hold CUDA-only kernels (_C_mxfp8: MX formats for Blackwell; _C_cutlass_90a: Hopper SM90a) and link
# libtorch_cuda.so, so on a torch build without CUDA they can never load and nothing qsweep runs needs them.
# On a CUDA build the warning stays: there it means a kernel is really missing.
CUDA_ONLY_LIBS = re.compile(r"^Failed to load \S*torchao/_C_(mxfp8|cutlass_90a)\S*\.so:")
# torchao/kernel/intmm.py: its Triton int8 matmul kernels are CUDA-only; on a torch build without CUDA
# there is no Triton and none of qsweep's CPU paths use them. On a CUDA build a missing Triton is real.
NO_TRITON = re.compile(r"Detected no triton")
# torch 2.13 deprecates pytree.register_constant() on Enum classes, which torchao 0.18 still calls at import
# (torchao.utils, for KernelPreference). Nothing a user can change; torchao will drop the call.
ENUM_CONSTANT = re.compile(r"is an Enum subclass and is now natively supported by torch\.compile")

# torch.compile's AOTAutograd cache asks tensor subclasses (torchao's Int8Tensor, IntxUnpackedToInt8Tensor,
# ...) for _stable_hash_for_caching and, when a class has none, warns and uses its default hash: caching
# still works. Advice for torchao's authors, printed by every compiled trial; shown for no other message.
STABLE_HASH = r"\w+ does not implement _stable_hash_for_caching\. For PT2-compatible tensor subclasses"


def _torch_without_cuda() -> bool:
    # torch is imported by the time torchao logs; torch.version.cuda is None on CPU builds. (Never call
    # torch.cuda.is_available() here: it would initialize CUDA in the fork server's parent.)
    torch = sys.modules.get("torch")
    return torch is not None and getattr(torch.version, "cuda", None) is None and not getattr(torch.version, "hip", None)


def _is_torchao_enum(record: logging.LogRecord) -> bool:
    args = record.args if isinstance(record.args, tuple) else ()
    return bool(args) and getattr(args[0], "__module__", "").startswith("torchao")


# logger name -> predicate on a record; True drops the record
FILTERS = {
    "torchao": lambda r: r.levelno == logging.WARNING and bool(CUDA_ONLY_LIBS.match(r.getMessage()))
    and _torch_without_cuda(),
    "torchao.kernel.intmm": lambda r: r.levelno == logging.WARNING and bool(NO_TRITON.search(r.getMessage()))
    and _torch_without_cuda(),
    "torch.utils._pytree": lambda r: bool(ENUM_CONSTANT.search(r.getMessage())) and _is_torchao_enum(r),
}


class _Drop(logging.Filter):
    def __init__(self, drop) -> None:
        super().__init__()
        self.drop = drop

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.drop(record)


def install() -> None:
    """Attach the filters to their loggers and add the warnings filter (once; repeated calls do nothing)."""
    for name, drop in FILTERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(drop))
    warnings.filterwarnings("ignore", message=STABLE_HASH, category=UserWarning, module=r"torch\._functorch")
