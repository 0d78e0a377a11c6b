"""The bundled load generator behind ``python -m netframe bench`` and ``benchmarks/``."""

from netframe.bench._run import SCENARIOS, BenchError, BenchOptions, run_bench

__all__ = ["SCENARIOS", "BenchError", "BenchOptions", "run_bench"]
