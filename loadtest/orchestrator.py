"""One run: the parts composed, and the once-a-second loop that drives them.

One run = (maybe) servers it starts, a few worker processes holding the
connections (``fleet``), a search load (``searches``), and checks as it goes
(``checks``): the hub's ``total`` against the live count the swarm believes,
sampled sessions by id, and at the end (churn stopped) every session the
swarm holds, page by page. Each second adds a point to the time series and
redraws the live view; the result file is assembled in ``result``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .checks import Checks
from .fleet import Fleet
from .hubmetrics import per_worker, workers_of
from .ingest import run_ingest
from .live_view import LiveView
from .options import Options
from .procs import (
    HubUsage,
    Server,
    Watched,
    listen_overflows,
    pids_listening,
    policy,
    run_queue_wait,
    start_servers,
)
from .result import swarm_result
from .searches import HubSearch, SearchProcess
from .stats import Latencies
from .timeseries import Timeseries

if TYPE_CHECKING:
    from tests.redis_server import RedisServer


class Run:
    """A swarm scenario against hubs that are up: ``opts.targets`` are theirs."""

    def __init__(
        self, opts: Options, servers: list[Server], t0: float, redis: RedisServer | None = None
    ) -> None:
        self.opts = opts
        self.servers = servers
        self.t0 = t0
        self.redis = redis
        self.redis_usage = (
            HubUsage(Watched([redis.proc.pid])) if redis is not None and redis.proc is not None else None
        )
        pids = (
            [server.proc.pid for server in servers]
            or opts.hub_pids
            or sorted({pid for url in opts.targets for pid in pids_listening(urlsplit(url).port or 80)})
        )
        # Made before the swarm starts: its RSS and CPU are the baseline.
        self.usage = HubUsage(Watched(pids)) if pids else None
        self.latencies = Latencies()
        self.fleet = Fleet(self.latencies)
        self.api = HubSearch(opts.targets, opts.projects, opts.api_key)
        self.searches = SearchProcess(opts, self.latencies)
        self.checks = Checks(opts, self.api, self.fleet, t0)
        self.timeseries = Timeseries(t0)
        self.live_at: float | None = None  # wall clock when the swarm first reported every tracker live
        self.registered_at: float | None = None  # storm: when the hub's total first held them all
        # The steady window (the hold after --steady-skip): each process's CPU seconds at its ends.
        self.steady: dict[str, Any] = {}
        self.search_window: dict[str, Any] = {}  # from the searches' start to their stop (--steady-window)
        self.processes: dict[str, Any] = {}  # per hub process at the settled state, /metrics per worker

    async def watch_registered(self) -> None:
        """Storm: poll the hub's total until it holds every tracker."""
        while self.registered_at is None:
            try:
                totals = await self.api.totals()
            except Exception:
                await asyncio.sleep(0.05)
                continue
            total = sum(totals) if self.opts.sharded else min(totals)
            if total >= self.opts.trackers:
                self.registered_at = time.time()
            await asyncio.sleep(0.02)

    async def execute(self, load_before: tuple[float, float, float], overflows_before: int) -> dict[str, Any]:
        opts = self.opts
        searchable = opts.spawn != "baseline"
        if opts.qps > 0 and searchable:
            await self.searches.open()
        await self.fleet.start(opts)
        loop = asyncio.get_running_loop()
        watcher = loop.create_task(self.watch_registered()) if opts.scenario == "storm" else None
        hold_until: float | None = None
        steady_from: float | None = None
        quiet = False  # --steady-window: searches stopped and checks paused for the window
        last_tick = time.monotonic()
        last_check = 0.0
        hard_stop = time.monotonic() + opts.ramp_time + opts.duration + 90
        view = LiveView(f"loadtest {opts.scenario} — {', '.join(opts.targets)}", opts.quiet)
        with view:
            while True:
                tick = 1.0
                if steady_from is not None and "start" not in self.steady:
                    # Wake when the steady window starts, not up to a tick after it: the
                    # searches stop on time, whatever the checks cost the loop.
                    tick = min(tick, max(0.0, steady_from - time.monotonic()))
                await asyncio.sleep(tick)
                now = time.monotonic()
                agg = self.fleet.totals()
                if self.live_at is None and agg.live >= opts.trackers:
                    self.live_at = time.time()
                hub_total = None
                steady_due = steady_from is not None and now >= steady_from and "start" not in self.steady
                if now - last_check >= opts.check_interval and searchable and not quiet and not steady_due:
                    last_check = now
                    hub_total = await self.checks.count()
                    await self.checks.sample()
                hub = await self.usage.sample(agg.live) if self.usage is not None else None
                point = self.timeseries.add(now - last_tick, agg, self.latencies.take_tick(), hub_total, hub)
                last_tick = now
                view.show(point, agg.errors, (self.checks.count_mismatches, self.checks.sample_missing))
                if hold_until is None and agg.ramped:
                    # From now, not from the pass's start: the checks above may have taken a
                    # good part of a second, which the searches' window would lose.
                    held_at = time.monotonic()
                    hold_until = held_at + opts.duration
                    if opts.steady_window > 0:
                        steady_from = hold_until - min(opts.steady_window, opts.duration)
                    else:
                        steady_from = held_at + min(opts.steady_skip, opts.duration / 2)
                    if opts.qps > 0 and searchable:
                        self.search_window["start"] = await self.cpu_snapshot()
                        self.searches.start()
                if steady_from is not None and now >= steady_from and "start" not in self.steady:
                    if opts.steady_window > 0:
                        quiet = True
                        await self.searches.stop()
                    self.steady["start"] = await self.cpu_snapshot()
                    if "start" in self.search_window and quiet:
                        self.search_window["end"] = self.steady["start"]
                    self.steady["quiet"] = quiet
                    if opts.steady_window > 0 and hold_until is not None:
                        # Stopping the searches waits for those in flight: the window still
                        # lasts what was asked.
                        hold_until = max(hold_until, self.steady["start"]["at"] + opts.steady_window)
                if (hold_until is not None and now >= hold_until) or now >= hard_stop:
                    if "start" in self.steady:
                        self.steady["end"] = await self.cpu_snapshot()
                    if "start" in self.search_window and "end" not in self.search_window:
                        self.search_window["end"] = self.steady.get("end") or await self.cpu_snapshot()
                    break
                if self.fleet.exited():
                    view.warn("a swarm worker exited early")
                    break
        await self.searches.stop()
        if watcher is not None:
            watcher.cancel()
        final = await self.checks.final() if searchable else {"skipped": "baseline has no search"}
        agg = self.fleet.totals()
        if self.usage is not None:
            self.usage.settle()
            await self.describe_processes()
        if self.redis_usage is not None:
            self.redis_usage.settle()
        await self.fleet.stop()
        return swarm_result(self, agg, final, load_before, overflows_before)

    async def cpu_snapshot(self) -> dict[str, Any]:
        """Monotonic time, CPU seconds per watched hub process and of Redis, and the live count."""

        swarm = [w.proc.pid for w in self.fleet.workers]

        def read() -> dict[str, Any]:
            hub = self.usage.watched.per_process() if self.usage is not None else {}
            redis = self.redis_usage.watched.cpu_seconds() if self.redis_usage is not None else None
            return {
                "at": time.monotonic(),
                "hub": {pid: p["cpu_s"] for pid, p in hub.items()},
                "hub_wait": {pid: p["wait_s"] for pid, p in hub.items() if "wait_s" in p},
                "swarm_wait": {pid: w for pid in swarm if (w := run_queue_wait(pid)) is not None},
                "swarm_policy": sorted({p for pid in swarm if (p := policy(pid)) is not None}),
                "redis_cpu_s": redis,
            }

        snap = await asyncio.to_thread(read)
        snap["live"] = self.fleet.totals().live
        return snap

    async def describe_processes(self) -> None:
        """Each hub process's RSS and CPU, and with --spawn hub each worker's /metrics."""
        assert self.usage is not None
        self.processes["hub"] = await asyncio.to_thread(self.usage.watched.per_process)
        if self.servers and self.opts.spawn == "hub":
            workers = workers_of(self.opts.hub_args)
            scraped: list[dict[str, Any]] = []
            for server in self.servers:
                with contextlib.suppress(Exception):
                    scraped += [{"port": server.port, **m} for m in await per_worker(server.url, workers)]
            self.processes["metrics"] = scraped


async def run(opts: Options) -> dict[str, Any]:
    """The scenario ``opts`` names, start to end; servers it started are stopped whatever happens."""
    if opts.scenario == "ingest":
        return await run_ingest(opts)
    t0 = time.monotonic()
    load_before = os.getloadavg()
    overflows_before = listen_overflows()
    servers: list[Server] = []
    redis = None
    try:
        if opts.redis:
            # A redis-server of the run's own on a free port, nothing persisted (never 6379).
            from tests.redis_server import RedisServer

            redis = RedisServer()
            opts.hub_args = f"{opts.hub_args} --redis-url {redis.url}".strip()
        if opts.spawn in ("hub", "baseline"):
            opts.api_key = opts.api_key or "loadtest-key"
            servers = await start_servers(opts.spawn, opts.hubs, opts.api_key, opts.hub_args, opts.grace)
            opts.targets = [server.url for server in servers]
            opts.sharded = opts.sharded or (opts.hubs > 1 and not opts.redis)
        r = Run(opts, servers, t0, redis)
        try:
            return await r.execute(load_before, overflows_before)
        finally:
            r.fleet.kill()
            r.searches.kill()
            r.api.close()
    finally:
        for server in servers:
            server.stop()
        if redis is not None:
            redis.__exit__()
