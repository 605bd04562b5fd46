"""The client's end: its pipeline (``pipeline``: stages 1-6 for its micro-batches, averages, relays) and what a step
reports (``report``) and split generation (``generator``). The defenses it runs are given to it (``defenses/``)."""

from .pipeline import Client
from .report import StepReport, Traffic

__all__ = ["Client", "StepReport", "Traffic"]
