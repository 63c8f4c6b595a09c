"""qsweep: an experiment-tracking sweep harness for torchao quantization."""

from qsweep import quiet

quiet.install()  # before torchao is imported anywhere: see qsweep/quiet.py for which warnings and why
