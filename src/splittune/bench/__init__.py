"""``splittune bench``: the suites, the side-by-side timing, per-party memory, the planner's error, the report."""

from .harness import run_bench, total_ticks
from .suites import ENTRIES, SUITES, select, suite

__all__ = ["ENTRIES", "SUITES", "run_bench", "select", "suite", "total_ticks"]
