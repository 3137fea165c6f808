"""The run's per-second points: the swarm's totals, the latencies of that second, the hub's processes."""

from __future__ import annotations

import os
import time
from typing import Any

from .fleet import Totals
from .stats import pct


class Timeseries:
    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.points: list[dict[str, Any]] = []

    def add(
        self,
        dt: float,
        agg: Totals,
        tick: dict[str, list[float]],
        hub_total: int | list[int] | None,
        hub: dict[str, float | int] | None,
    ) -> dict[str, Any]:
        """A point ``dt`` s after the last: ``tick`` holds the latencies since then."""
        prev = self.points[-1] if self.points else {}
        # Frames a tracker or agent sent; churn counts events and skips, not frames.
        sent = sum(v for k, v in agg.sent.items() if not k.startswith("churn_") and "skipped" not in k)
        point: dict[str, Any] = {
            "t": round(time.monotonic() - self.t0, 2),
            "connected": agg.connected,
            "live": agg.live,
            "starting": agg.starting,
            "agents": agg.agents_open,
            "sent_total": sent,
            "msgs_per_s": round((sent - prev.get("sent_total", 0)) / dt, 1) if dt else 0.0,
            "recv_per_s": round((agg.received - prev.get("received", 0)) / dt, 1) if dt else 0.0,
            "received": agg.received,
            "errors": sum(agg.errors.values()),
            "connect_p50": pct(tick.get("connect", []), 50),
            "connect_p99": pct(tick.get("connect", []), 99),
            "search_p50": pct(tick.get("search", []), 50),
            "search_p99": pct(tick.get("search", []), 99),
            "fanout_p99": pct(tick.get("fanout", []), 99),
            "loadavg": round(os.getloadavg()[0], 2),
        }
        if hub_total is not None:
            point["hub_total"] = hub_total
        if hub is not None:
            point.update(hub)
        self.points.append(point)
        return point

    def peak(self, key: str, default: float | None) -> Any:
        """The highest value of ``key`` over the points (a point without it counts 0)."""
        return max((p.get(key, 0) for p in self.points), default=default)
