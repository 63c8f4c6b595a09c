"""qsweep: an experiment-tracking sweep harness for torchao quantization."""
