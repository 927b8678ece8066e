"""`mmm bench`: structured layers and attention paths timed against their baselines, side by side.

Cases register with `@bench_case(...)`; `mmm bench --list` shows them. See `registry` for how to add a
case or a variant, `runner` for what is measured, `report` for the outputs.
"""

from .registry import CASE_MODULES, CASES, Case, Variant, Workload, bench_case, load_builtin_cases, select_cases
from .runner import derive, floor_ms, run_case, run_cases
from .timing import FULL, QUICK, TimerSettings, median_ms

__all__ = [
    "CASE_MODULES", "CASES", "Case", "Variant", "Workload", "bench_case", "load_builtin_cases", "select_cases",
    "derive", "floor_ms", "run_case", "run_cases", "FULL", "QUICK", "TimerSettings", "median_ms",
]
