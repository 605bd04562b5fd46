"""The planner's predictions next to what the bench measured, and how far off they were.

The planner (``splittune plan``) predicts a config's step time, each party's peak memory and bytes per
step from a profile of the model on this machine. The bench asks it about every entry it measured and
reports the relative error: ``(predicted - measured) / measured``. Targets (issue 10): ±20% on step
time, ±10% on memory and bytes.
"""

from __future__ import annotations

from typing import Any, Callable

from ..config import RunConfig
from .suites import Part

TARGETS = {"step_s": 0.20, "bytes_up": 0.10, "bytes_down": 0.10, "client_peak": 0.10, "server_peak": 0.10}


def _error(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or not measured:
        return None
    return (predicted - measured) / measured


def compare(prediction: dict[str, Any], figures: dict[str, Any]) -> dict[str, float | None]:
    """Relative errors of a prediction against an entry's measured figures (None where not measured)."""
    memory = figures.get("memory", {})
    return {
        "step_s": _error(prediction["step_s"], figures["step_s"]["median"]),
        "bytes_up": _error(prediction["bytes_up"], figures["bytes_up"]),
        "bytes_down": _error(prediction["bytes_down"], figures["bytes_down"]),
        "client_peak": _error(prediction.get("client_peak_bytes"), memory.get("client_peak_rss")),
        "server_peak": _error(prediction.get("server_peak_bytes"), memory.get("server_peak_rss")),
    }


def predict_entries(part: Part, entries: dict[str, dict], tick: Callable[[str, int, int], None]) -> None:
    """Add ``predicted`` and ``prediction_error`` to every measured entry of ``part`` (one profile for all)."""
    from ..plan import predict, profile_model

    measured = {name: f for name, f in entries.items() if "error" not in f and f.get("config") and name != "peft"}  # not ours
    if not measured:
        return
    tick(f"{part.name}: profiling for the planner's predictions", 0, 0)
    first = RunConfig.model_validate(next(iter(measured.values()))["config"])
    import torch

    profile = profile_model(first.model, batch=first.train.batch_size, seq_len=first.train.seq_len, dtype=first.train.dtype,
                            cfg=first, threads=torch.get_num_threads())  # the entries' own batches and thread count
    for name, figures in measured.items():
        cfg = RunConfig.model_validate(figures["config"])
        if cfg.clients > 1:  # the planner plans one client's run
            figures["predicted"] = {"not_modelled": "several clients"}
            continue
        p = predict(cfg, profile, bandwidth_mbps=cfg.link.bandwidth_mbps, latency_ms=cfg.link.latency_ms)
        prediction = {"step_s": p.step_s, "bytes_up": p.bytes_up, "bytes_down": p.bytes_down,
                      "client_peak_bytes": p.client_peak_bytes, "server_peak_bytes": p.server_peak_bytes}
        if cfg.segments.bottom == "frozen" and cfg.cache.max_bytes:
            prediction["note"] = "the planner counts every epoch's uplink: the activation cache's later epochs are not modelled"
        figures["predicted"] = prediction
        figures["prediction_error"] = compare(prediction, figures)
