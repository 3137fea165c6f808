"""Percentiles, and latency samples kept both for the whole run and for the current second."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))], 3)


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p90": pct(values, 90),
        "p99": pct(values, 99),
        "max": round(max(values), 3) if values else None,
    }


class Latencies:
    """Milliseconds by kind (connect, probe, fanout, snapshot, search, search_lag).

    ``whole`` feeds the run's summary; ``tick`` holds what came since the last
    per-second point, which takes it.
    """

    def __init__(self) -> None:
        self.whole: defaultdict[str, list[float]] = defaultdict(list)
        self.tick: defaultdict[str, list[float]] = defaultdict(list)

    def add(self, kind: str, values: Iterable[float]) -> None:
        values = list(values)
        self.whole[kind].extend(values)
        self.tick[kind].extend(values)

    def take_tick(self) -> defaultdict[str, list[float]]:
        tick, self.tick = self.tick, defaultdict(list)
        return tick
