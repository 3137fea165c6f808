"""The result file: one JSON document per run, what it holds and where it goes."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

from .fleet import Totals
from .procs import listen_overflows
from .stats import percentiles

if TYPE_CHECKING:
    from .options import Options
    from .orchestrator import Run


def machine(load_before: tuple[float, float, float]) -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}


def swarm_result(
    run: Run,
    agg: Totals,
    final: dict[str, Any],
    load_before: tuple[float, float, float],
    overflows_before: int,
) -> dict[str, Any]:
    """A swarm run (every scenario but ingest): its options, summary, checks and time series."""
    opts, latencies, usage, points = run.opts, run.latencies.whole, run.usage, run.timeseries
    first = run.fleet.first_connect_at()
    elapsed = time.monotonic() - run.t0
    return {
        "scenario": opts.scenario,
        "options": opts.record(),
        "server": {"spawned": opts.spawn, "command": run.servers[0].command if run.servers else None},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - elapsed)),
        "seconds": round(elapsed, 2),
        "machine": machine(load_before),
        "client_processes": len(run.fleet.workers),
        "summary": {
            "max_live": points.peak("live", 0),
            "live_at_end": agg.live,
            "all_live_s": round(run.live_at - first, 3) if run.live_at is not None and first else None,
            # From the swarm's first connect attempt to the hub's total holding every tracker.
            "all_registered_s": round(run.registered_at - first, 3)
            if run.registered_at is not None and first
            else None,
            "listen_overflows": listen_overflows() - overflows_before,
            "sent": dict(agg.sent),
            "received": agg.received,
            "errors": dict(agg.errors),
            "agents_open": agg.agents_open,
            "agent_events": dict(agg.agent_events),
            "connect_ms": percentiles(latencies["connect"]),
            "search_ms": percentiles(latencies["search"]),
            "search_by_kind_ms": {k: percentiles(v) for k, v in run.searches.by_kind.items()},
            "search_errors": dict(run.searches.errors),
            "search_client_lag_ms": percentiles(latencies["search_lag"]),
            "fanout_ms": percentiles(latencies["fanout"]),
            "snapshot_ms": percentiles(latencies["snapshot"]),
            "memory": usage.memory(agg.live) if usage is not None else None,
            # Hub CPU from before the swarm to the settled state (storm: divide by trackers).
            "hub_cpu_s": usage.cpu_seconds_used() if usage is not None else None,
            "hub_max_cpu_pct": points.peak("hub_cpu_pct", None),
            "hub_max_fds": points.peak("hub_fds", None),
        },
        "checks": run.checks.record(final),
        "timeseries": points.points,
    }


def write(result: dict[str, Any], opts: Options) -> str:
    """``--out``, or ``results/<scenario>-<time>.json``; returns the path."""
    out = opts.out or os.path.join("results", f"{opts.scenario}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    return out
