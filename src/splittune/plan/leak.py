"""``splittune plan --max-leak``: keep the choices whose first cut, uplink codec and a defense setting hold the
strongest adaptive attack's ROUGE-L within the target, by the leak table (``privacy/leak_table.py``), each with the
setting in its config; rank them by perplexity cost (2% apart is a tie), sure before likely, then as the planner ranks
(time first), then by the lower bound on the leak (at equal cost and time, more privacy).

A choice is *sure* when the upper 95% bound of its measured leak is within the target, and *likely* when only the
mean is. A target no choice meets is refused with the least leak that one reaches."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..config import ConfigError
from ..privacy.grid import Setting, cell_config
from ..privacy.leak_table import LeakPoint, LeakTable

COST_TIE = 0.02  # perplexity ratios this close are a tie


class LeakTargetError(ConfigError):
    """No choice that fits meets --max-leak; the message names the least leak reachable and how."""


@dataclass(frozen=True)
class Guard:
    point: LeakPoint
    how: str  # how the table bounds this choice ("" when measured at its cut and codec)
    sure: bool  # the upper 95% bound is within the target


def meet(fits: list, table: LeakTable, target: float, rank) -> list:
    """The choices of ``fits`` (``search.Ranked``) with every setting that holds them within ``target``, best first;
    ``rank``: the planner's own ordering, applied after the perplexity cost."""
    kept, least = [], None
    for r in fits:
        for name in table.settings:
            point, how = table.at(r.choice.cuts[0], r.choice.up, name)
            if point is None:
                continue
            if least is None or point.leak < least[0].leak:
                least = (point, r)
            if point.leak <= target:
                config = cell_config(r.config, Setting(name, point.overlay)) if name != "none" else r.config
                kept.append(replace(r, config=config, guard=Guard(point, how, point.leak_hi <= target)))
    if not kept:
        if least is None:
            raise LeakTargetError(f"the leak table for {table.model} measured cuts {table.cuts}, and no choice that fits cuts "
                                  "at or below them; measure deeper cuts (--leak-cuts)")
        point, r = least
        raise LeakTargetError(f"no choice that fits meets --max-leak {target:g}: the least leak reachable is {point.leak:.3f} "
                              f"(ROUGE-L of the adaptive inversion; upper 95% bound {point.leak_hi:.3f}) with cut {point.cut}, "
                              f"{point.setting}, perplexity x{point.ppl_ratio:.2f}; raise --max-leak to at least {point.leak:.2f}, "
                              "measure deeper cuts or stronger settings, or give the client more memory for a deeper cut")
    return sorted(kept, key=lambda r: (round(math.log(max(r.guard.point.ppl_ratio, 1e-9)) / math.log1p(COST_TIE)),
                                       not r.guard.sure, rank(r), r.guard.point.leak_hi))
