"""The client's end: its pipeline (``pipeline``: stages 1-6 for its micro-batches, averages, relays) and what a step
reports (``report``), the defenses inside its bottom (``defenses``), DP-SGD on its adapters (``dp_sgd``) and split
generation (``generator``)."""

from .pipeline import Client
from .report import StepReport, Traffic

__all__ = ["Client", "StepReport", "Traffic"]
