"""Benchmarks and the CPU replay (README.md, "Two commands"). The scripts run
as files (`python benchmark/multiturn.py`) or modules (`python -m
benchmark.multiturn`); tests import the modules as `benchmark.*`."""
