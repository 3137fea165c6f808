"""The ingest scenario: heartbeats/s each server absorbs, the bare websockets baseline then the hub.

The same swarm steps through ``--ladder`` rates against each server in turn;
a step's cost is the server's CPU per heartbeat, and a probe (a repeated
start, answered) times whether it keeps up.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import replace
from typing import Any

from rich.console import Console

from .fleet import Fleet
from .options import Options
from .procs import Watched, start_servers
from .result import machine
from .stats import Latencies, pct


async def run_ingest(opts: Options) -> dict[str, Any]:
    console = Console(stderr=True)
    load_before = os.getloadavg()
    servers: dict[str, Any] = {}
    for kind in ("baseline", "hub"):
        servers[kind] = await climb(replace(opts, spawn=kind, targets=list(opts.targets)), console)
    base, hub = servers["baseline"], servers["hub"]
    ratio = (
        round(hub["capacity_at_80pct"] / base["capacity_at_80pct"], 3)
        if hub["capacity_at_80pct"] and base["capacity_at_80pct"]
        else None
    )
    # The same offered rate on both servers, both keeping up: baseline cost / hub cost.
    matched = sorted(
        b["cpu_us_per_hb"] / h["cpu_us_per_hb"]
        for b, h in zip(base["steps"], hub["steps"], strict=False)
        if b["kept_up"] and h["kept_up"] and b["cpu_us_per_hb"] and h["cpu_us_per_hb"]
    )
    return {
        "scenario": "ingest",
        "options": opts.record(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine(load_before),
        "servers": servers,
        "summary": {
            "hub_capacity_at_80pct": hub["capacity_at_80pct"],
            "baseline_capacity_at_80pct": base["capacity_at_80pct"],
            "ratio": ratio,
            "ratio_same_rate_median": round(matched[len(matched) // 2], 3) if matched else None,
            "hub_best_rate_under_80pct": hub["best_rate_under_80pct"],
            "baseline_best_rate_under_80pct": base["best_rate_under_80pct"],
        },
    }


async def climb(opts: Options, console: Console) -> dict[str, Any]:
    """One server (``opts.spawn``) up the ladder, until it stops keeping up; its record."""
    opts.api_key = opts.api_key or "loadtest-key"
    spawned = await start_servers(opts.spawn, opts.hubs, opts.api_key, opts.hub_args, opts.grace)
    latencies = Latencies()
    fleet = Fleet(latencies)
    try:
        opts.targets = [server.url for server in spawned]
        watched = Watched([server.proc.pid for server in spawned])
        await fleet.start(opts, heartbeat=0.0, probe=0.1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and fleet.totals().live < opts.trackers:
            await asyncio.sleep(0.2)
        steps: list[dict[str, Any]] = []
        rss_idle = watched.rss()
        for rate in opts.ladder:
            fleet.set_rate(rate)
            await asyncio.sleep(1.0)  # warm up
            sent0 = fleet.totals().sent["heartbeat"]
            watched.cpu_percent()
            latencies.take_tick()
            t0 = time.monotonic()
            await asyncio.sleep(opts.step)
            dt = time.monotonic() - t0
            cpu = watched.cpu_percent()
            agg = fleet.totals()
            achieved = (agg.sent["heartbeat"] - sent0) / dt
            probes = latencies.take_tick()["probe"]
            step = {
                "offered": rate,
                "achieved": round(achieved),
                "cpu_pct": round(cpu, 1),
                "cpu_us_per_hb": round(cpu / 100 * 1e6 / achieved, 2) if achieved else None,
                "probe_p50_ms": pct(probes, 50),
                "probe_p99_ms": pct(probes, 99),
                "client_backlog_bytes": agg.backlog,
                "errors": sum(agg.errors.values()),
                "loadavg": round(os.getloadavg()[0], 2),
            }
            steps.append(step)
            if not opts.quiet:
                console.print(f"{opts.spawn:8} {json.dumps(step)}")
            if cpu > 90 or (step["probe_p99_ms"] or 0) > 1000 or achieved < 0.85 * rate:
                break
        fleet.set_rate(0)
        live = fleet.totals().live
        await fleet.stop()
    finally:
        fleet.kill()
        for server in spawned:
            server.stop()
    # Keeping up: the swarm sent what was offered and a start's round trip stayed short (p50, as
    # p99 on a shared machine mostly shows other processes' CPU bursts).
    for s in steps:
        s["kept_up"] = s["achieved"] >= 0.9 * s["offered"] and (s["probe_p50_ms"] or 0) < 50
    ok = [s for s in steps if s["kept_up"] and s["cpu_pct"] <= 80]
    costs = sorted(s["cpu_us_per_hb"] for s in ok if s["cpu_us_per_hb"] and s["cpu_pct"] >= 5)
    cost = costs[len(costs) // 2] if costs else None
    return {
        "command": spawned[0].command,
        "sessions": live,
        "rss_idle_mib": round(rss_idle / 2**20, 1),
        "steps": steps,
        "best_rate_under_80pct": max((s["achieved"] for s in ok), default=None),
        "median_cpu_us_per_hb": cost,
        "capacity_at_80pct": round(0.8e6 / cost) if cost else None,
    }
