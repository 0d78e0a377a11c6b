"""The bundled load generator behind ``python -m netframe bench`` and ``benchmarks/``.

``run_bench`` needs the ``bench`` extra (numpy, psutil); it is imported on first use so
that the options alone stay light.
"""

from typing import Any

from netframe.bench._options import SCENARIOS, BenchError, BenchOptions

__all__ = ["SCENARIOS", "BenchError", "BenchOptions", "run_bench"]


def __getattr__(name: str) -> Any:
    if name == "run_bench":
        from netframe.bench._run import run_bench

        return run_bench
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
