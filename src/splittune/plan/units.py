"""The planner's quantities as people write them: ``8GB``, ``512MiB``, ``100Mbps``, ``1Gbps``, ``20ms``.

Sizes are bytes (decimal ``kB MB GB TB`` and binary ``KiB MiB GiB TiB``, case-insensitive), rates are
bits per second (``kbps Mbps Gbps``, or ``Mbit/s``), times are ``us ms s``. A bare number is refused
(is ``8`` bytes or gigabytes?), except 0; a bad value is a ConfigError naming the flag and the forms.
"""

from __future__ import annotations

import math
import re

from ..config import SIZE_UNITS as SIZES, ConfigError  # one table of size units for configs and flags

RATES = {"bps": 1e-6, "kbps": 1e-3, "mbps": 1.0, "gbps": 1e3, "bit/s": 1e-6, "kbit/s": 1e-3, "mbit/s": 1.0, "gbit/s": 1e3}
TIMES = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_NUMBER = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e([+-]?[0-9]+))?\s*([a-zA-Z/]*)\s*$")


def _parse(text: str, units: dict[str, float], flag: str, forms: str) -> float:
    match = _NUMBER.match(str(text))
    if match is not None:
        value = float(match.group(1) + (f"e{match.group(2)}" if match.group(2) else ""))
        unit = match.group(3).lower()
        if unit in units and math.isfinite(value):
            return value * units[unit]
        if not unit and value == 0:
            return 0.0
    raise ConfigError(f"{flag} {text!r} is not a quantity it understands; write a number and a unit: {forms}")


def parse_size(text: str, flag: str = "--client-memory") -> int:
    """Bytes: ``8GB``, ``512MiB``, ``1.5GiB``."""
    value = _parse(text, SIZES, flag, "8GB, 512MiB, 1.5GiB (kB MB GB TB decimal, KiB MiB GiB TiB binary)")
    if value <= 0:
        raise ConfigError(f"{flag} {text!r} must be more than nothing (e.g. 8GB)")
    return int(value)


def parse_rate(text: str, flag: str = "--bandwidth") -> float:
    """Megabits per second: ``100Mbps``, ``1Gbps``, ``512kbps``."""
    value = _parse(text, RATES, flag, "100Mbps, 1Gbps, 512kbps (or Mbit/s)")
    if value <= 0:
        raise ConfigError(f"{flag} {text!r} must be a positive rate (e.g. 100Mbps)")
    return value


def parse_time(text: str, flag: str = "--latency") -> float:
    """Milliseconds, one way: ``20ms``, ``0.5s``, ``300us``, ``0``."""
    return _parse(text, TIMES, flag, "20ms, 0.5s, 300us (or 0)")

