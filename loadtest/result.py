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
        "server": {
            "spawned": opts.spawn,
            "command": run.servers[0].command if run.servers else None,
            # Each server's log (stderr, --log-level warning): where it is and how it ends.
            "logs": [{"path": srv.log.name, "tail": srv.log_tail(1500)} for srv in run.servers],
        },
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
            "steady": steady(run.steady),
            "search_window": search_window(run.search_window),
            "redis": redis_usage(run),
        },
        "projects": projects(run),
        "processes": run.processes,
        "checks": run.checks.record(final),
        "timeseries": points.points,
    }


def _span(snaps: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], float] | None:
    """A window's first and last snapshots and the seconds between them (None if unfinished)."""
    if "start" not in snaps or "end" not in snaps:
        return None
    a, b = snaps["start"], snaps["end"]
    seconds = b["at"] - a["at"]
    return (a, b, seconds) if seconds > 0 else None


def _hub_cpu(a: dict[str, Any], b: dict[str, Any]) -> dict[Any, float]:
    """CPU seconds each hub process (there at both snapshots) used between them."""
    return {pid: b["hub"][pid] - cpu for pid, cpu in a["hub"].items() if pid in b["hub"]}


def steady(snaps: dict[str, Any]) -> dict[str, Any] | None:
    """The steady window: seconds, live sessions, hub CPU % of one core (in all and per process), Redis's."""
    span = _span(snaps)
    if span is None:
        return None
    a, b, seconds = span
    used = _hub_cpu(a, b)
    per = {str(pid): round(100 * cpu / seconds, 1) for pid, cpu in used.items()}
    out: dict[str, Any] = {
        "seconds": round(seconds, 1),
        "quiet": bool(snaps.get("quiet")),
        "live": [a["live"], b["live"]],
        "hub_cpu_pct": round(sum(per.values()), 1),
        "hub_cpu_pct_per_process": per,
    }
    if a["redis_cpu_s"] is not None and b["redis_cpu_s"] is not None:
        out["redis_cpu_pct"] = round(100 * (b["redis_cpu_s"] - a["redis_cpu_s"]) / seconds, 1)
    out.update(run_queue(a, b, seconds, sum(used.values())))
    return out


def run_queue(a: dict[str, Any], b: dict[str, Any], seconds: float, cpu: float) -> dict[str, Any]:
    """Time the hub's and the swarm's processes spent runnable but waiting for a CPU, in ms per
    second of the window (summed over processes), and the hub's per ms of the CPU (``cpu``
    seconds) it used: the share of a request's latency that is the machine's queue, not the
    hub's code."""
    out: dict[str, Any] = {"swarm_policy": b.get("swarm_policy", [])}
    for side in ("hub_wait", "swarm_wait"):
        waited = [b[side][pid] - w for pid, w in a.get(side, {}).items() if pid in b.get(side, {})]
        if waited:
            out[f"{side}_ms_per_s"] = round(1000 * sum(waited) / seconds, 1)
    if "hub_wait_ms_per_s" in out and cpu > 0:
        out["hub_wait_per_cpu"] = round(out["hub_wait_ms_per_s"] * seconds / 1000 / cpu, 2)
    return out


def search_window(snaps: dict[str, Any]) -> dict[str, Any] | None:
    """While the searches ran: seconds, hub CPU % of one core, and the run-queue waits (``run_queue``)."""
    span = _span(snaps)
    if span is None:
        return None
    a, b, seconds = span
    cpu = sum(_hub_cpu(a, b).values())
    window = {"seconds": round(seconds, 1), "hub_cpu_pct": round(100 * cpu / seconds, 1)}
    return window | run_queue(a, b, seconds, cpu)


def redis_usage(run: Run) -> dict[str, Any] | None:
    """The run's own redis-server: its RSS growth per live session and CPU seconds used."""
    usage = run.redis_usage
    if usage is None or usage.settled_rss is None:
        return None
    live = run.fleet.totals().live
    return {"memory": usage.memory(live), "cpu_s": usage.cpu_seconds_used()}


def projects(run: Run) -> dict[str, Any] | None:
    """With --projects-zipf: each project's share, trackers, and searches (count, p50/p99)."""
    opts = run.opts
    if not opts.per_project:
        return None
    trackers: dict[str, int] = {}
    for key, n in run.checks.trackers_by.items():
        project = key.split(":", 1)[1]
        trackers[project] = trackers.get(project, 0) + n
    return {
        p: {
            "share": round(w, 4),
            "trackers": trackers.get(p, 0),
            "search_ms": percentiles(run.searches.by_project.get(p, [])),
        }
        for p, w in zip(opts.projects, opts.project_weights, strict=True)
    }


def write(result: dict[str, Any], opts: Options) -> str:
    """``--out``, or ``results/<scenario>-<time>.json``; returns the path."""
    out = opts.out or os.path.join("results", f"{opts.scenario}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    return out
