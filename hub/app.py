"""A hub process: the live index, its endpoints and its long-lived work.

Long-lived work (the sweeper, signal handling, drain) runs in one anyio
task group; connections themselves have no task.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import signal
import socket
import time
from collections import Counter
from typing import Any, Final

import anyio
from anyio.abc import TaskStatus

from . import openapi, static, webhooks
from .auth import Auth, origin_allowed
from .clock import now_ms
from .cluster import Cluster
from .collector import Collector
from .config import Settings
from .counts import AGENT, TRACKER
from .endpoints import AgentEndpoint, TrackerEndpoint
from .enrich import Enricher
from .fanout import FanOut
from .handoff import Handoff, Workers
from .http1 import HttpConnection
from .http_api import HttpApi, Request, Response, error, mirrored_first
from .index import LiveIndex
from .metrics import Metrics
from .openreplay import AgentEndpoint as OpenReplayAgent
from .openreplay import OpenReplay
from .openreplay import TabEndpoint as OpenReplayTab
from .openreplay import paths as openreplay_paths
from .openreplay_api import OpenReplayApi
from .registry import Registry
from .relay import Limits, Relay
from .relay_bus import LocalBus, RedisBus, RelayBus
from .replication import LocalReplication, Replication
from .routes import RouteTable
from .server import Server
from .websocket import Endpoint, WebSocketConnection
from .wire import CloseCode, ErrorCode

log = logging.getLogger("hub")

# Bytes of a Socket.IO handshake's head at most (OpenReplay's assist server allows 64 KiB).
OPENREPLAY_MAX_HEAD: Final = 64 << 10
# Bytes of a watched tab's receive buffer at least (a loopback segment is 64 KiB).
WATCHED_RCVBUF_MIN: Final = 256 << 10


class Hub:
    def __init__(
        self, settings: Settings, workers: Workers | None = None, collector: Collector | None = None
    ) -> None:
        self.settings = settings
        # The process's garbage collector policy, when this hub is the process (run()).
        self.collector = collector
        # A cluster node indexes a project only while it serves it (README, "Cluster").
        self.index = LiveIndex(lazy=bool(settings.redis_url))
        # Built once per process: the User-Agent rules compile and the GeoIP database opens here.
        self.enricher = Enricher(settings.geoip_db, settings.trusted_proxies)
        self.registry = Registry(
            self.index,
            grace_ms=int(settings.grace * 1000),
            max_sessions_per_project=settings.max_sessions_per_project,
        )
        # The one place that knows whether this is a cluster node (README, "Cluster").
        self.replication: Replication = (
            Cluster(settings, self.registry) if settings.redis_url else LocalReplication()
        )
        self.registry.replication = self.replication
        self.ready = False
        self.draining = False
        self.metrics = Metrics(self.index, per_project=settings.metrics_per_project)
        self.registry.listeners.append(self.metrics.sessions)
        # Times each hardening limit was reached, by name; counted by the transport and the API.
        self.limits: Counter[str] = Counter()
        self.api = HttpApi(
            settings,
            self.index,
            ready=lambda: self.ready and not self.draining and self.replication.ready,
            limits=self.limits,
            on_search=self.metrics.observe_search,
        )
        self.routes = self._routes()
        self.server = Server(settings, self.routes, self.metrics.connections, self.limits)
        self.fanout = FanOut(self.index, settings.agent_max_pending, wake=self._wake_agents)
        self.registry.listeners.append(self.fanout)
        self.relay = self._relay(settings)
        self.registry.listeners.append(self.relay)
        self.server.endpoint_kinds.update({TrackerEndpoint: TRACKER, AgentEndpoint: AGENT})
        # OpenReplay's tracker and dashboard over Socket.IO: tabs and agents of the same relay.
        self.openreplay = OpenReplay(
            settings,
            self.registry,
            self.relay,
            self.enricher,
            self.routes.auth,
            self.metrics.trackers,
            self.limits,
            lambda: now_ms() / 1000,
        )
        self.server.endpoint_kinds.update({OpenReplayTab: TRACKER, OpenReplayAgent: AGENT})
        # OpenReplay's tracker puts its sessionInfo JSON in the handshake's query: OpenReplay's
        # own server allows 64 KiB of head for it.
        self.server.long_heads = (
            tuple(path.encode() for path in openreplay_paths(settings.openreplay_path)),
            max(settings.max_header, OPENREPLAY_MAX_HEAD),
        )
        # --workers: each project served by one worker of the machine (handoff.py).
        self.handoff = self._handoff(workers) if workers is not None and workers.count > 1 else None
        self._add_gauges()
        self._add_relay_metrics()
        self.replication.add_metrics(self.metrics.gauge, self.metrics.counter)
        # Lifecycle webhooks (README, "Webhooks"); None without a webhook URL.
        self.webhooks = webhooks.build(settings, self.registry, self.replication, lambda: self.draining)
        if self.webhooks is not None:
            self.registry.listeners.append(self.webhooks)
            self.webhooks.add_metrics(self.metrics)
        self._stop = anyio.Event()
        # Set once the hub listens; ``port`` is then the bound port.
        self.listening = anyio.Event()
        self.port = 0

    def _relay(self, settings: Settings) -> Relay:
        """The live relay (README, "Live relay"); across nodes through Redis in a cluster."""
        bus: RelayBus = LocalBus()
        if isinstance(self.replication, Cluster):
            assert settings.redis_url is not None
            bus = RedisBus(settings.redis_url, self.replication.node)
        limits = Limits(
            max_joins=settings.relay_max_joins,
            agent_buffer=settings.relay_agent_buffer,
            agent_stall=settings.relay_agent_stall,
            rate=settings.relay_rate,
            burst=settings.relay_burst,
            max_event=settings.relay_max_event,
        )
        index = self.index
        relay = Relay(limits, live=lambda project, sid: index.get(project, sid) is not None, bus=bus)
        if isinstance(self.replication, Cluster):
            self.replication.node_gone.append(relay.node_gone)
        return relay

    def _handoff(self, workers: Workers) -> Handoff:
        handoff = Handoff(workers, openreplay_paths(self.settings.openreplay_path), self.settings.projects)
        server = self.server
        server.handoff = handoff
        handoff.adopt = lambda data: HttpConnection(server, adopted=data)
        self.metrics.counter(
            "hub_handoff",
            "Connections for a project another worker owns: sent to it, received here, failed "
            "(owner unreachable: served here) or kept (behind a request answered here).",
            lambda: {(result,): float(count) for result, count in handoff.counts.items()},
            labels=["result"],
        )
        self.metrics.gauge(
            "hub_worker_index",
            "This worker's index among --workers (a project's owner is crc32(key) % workers).",
            lambda: float(workers.index),
        )
        return handoff

    async def _take_handoffs(self, handoff: Handoff) -> None:
        """Adopt other workers' connections once ready to serve them (until then they serve)."""
        while not (self.replication.ready and not self.draining):
            await anyio.sleep(0.05)
        try:
            handoff.listen()
        except OSError as exc:
            log.error("handoff.listen_failed", extra={"fields": {"error": str(exc)}})

    def _routes(self) -> RouteTable:
        """Every path this hub answers (README, "HTTP API", "Trackers", "Agents", "Operations")."""
        routes = RouteTable(
            self.settings,
            Auth.from_settings(self.settings),
            accepting_websockets=lambda: not self.draining,
        )
        api = self.api
        # In a cluster, a project's searches are answered once this node mirrors it.
        warm = mirrored_first(self.replication)
        routes.http(
            "/public/{projectKey}/assist/sessions",
            get=warm(api.list_sessions),
            post=warm(api.search),
            auth=True,
            cors=True,
        )
        routes.http(
            "/public/{projectKey}/assist/sessions/{sessionID}", get=warm(api.session), auth=True, cors=True
        )
        routes.http(
            "/public/{projectKey}/assist/autocomplete", get=warm(api.autocomplete), auth=True, cors=True
        )
        routes.http("/healthz", get=api.healthz)
        routes.http("/readyz", get=api.readyz)
        routes.http("/metrics", get=self.metrics.route)
        routes.http(openapi.PATH, get=openapi.route(self.settings), cors=True)
        for path, serve in static.routes().items():
            routes.http(path, get=serve)
        if self.settings.assist_key:
            # OpenReplay's assist HTTP API (README, "Migrating from OpenReplay's assist server").
            openreplay = OpenReplayApi(self.settings, self.index, self.limits, self.metrics.observe_search)
            openreplay.register(routes, mirrored_first(self.replication, "project"))
        routes.websocket("/ws/tracker/{projectKey}", self._route_tracker)
        routes.websocket("/ws/agent/{projectKey}", self._route_agent, auth=True)
        for path in openreplay_paths(self.settings.openreplay_path):
            routes.websocket(path, self._route_openreplay)
        return routes

    def _route_tracker(self, request: Request, conn: WebSocketConnection) -> Endpoint | Response:
        project_key = request.params["projectKey"]
        project_id = self.settings.project_id(project_key)
        assert project_id is not None  # the route table checked the project exists
        if not origin_allowed(self.settings, request.headers):
            self.limits["tracker_origin"] += 1
            return error(403, "origin not allowed")
        self._tracker_window(conn)
        return TrackerEndpoint(
            self.registry,
            project_key,
            project_id,
            self.settings.heartbeat_timeout,
            self.metrics.trackers,
            # Once per connection: every start it sends takes what its handshake tells.
            self.enricher.fields(request.headers, conn.peer or None),
            self.relay,
            conn,
        )

    def _tracker_window(self, conn: WebSocketConnection) -> None:
        if self.settings.tracker_rcvbuf:
            # A small window: a flooding client fills it and waits, instead of the hub's memory.
            # While the relay streams it, a window for its rate over a 250 ms round trip.
            watched = max(self.settings.tracker_rcvbuf, int(self.settings.relay_rate / 4), WATCHED_RCVBUF_MIN)
            conn.set_receive_buffer(self.settings.tracker_rcvbuf, watched)

    def _route_openreplay(self, request: Request, conn: WebSocketConnection) -> Endpoint | Response:
        """A Socket.IO handshake (README, "Migrating from OpenReplay's assist server")."""
        routed = self.openreplay.route(request, conn)
        if isinstance(routed, OpenReplayTab):
            self._tracker_window(conn)
        elif isinstance(routed, OpenReplayAgent):
            refused = self._agents_full()
            if refused is not None:
                return refused
            conn.set_send_buffer(self.settings.relay_agent_buffer)
        return routed

    def _agents_full(self) -> Response | None:
        """A 503 past --max-agents agent connections, native and Socket.IO alike."""
        limit = self.settings.max_agents
        if limit and self.metrics.connections.open_now(AGENT) >= limit:
            self.limits["max_agents"] += 1
            return error(503, f"the hub holds its limit of {limit} agent connections")
        return None

    def _route_agent(self, request: Request, conn: WebSocketConnection) -> Endpoint | Response:
        refused = self._agents_full()
        if refused is not None:
            return refused
        # A stalled agent then costs its relay buffer here and about as much in the kernel.
        conn.set_send_buffer(self.settings.relay_agent_buffer)
        return AgentEndpoint(
            self.fanout,
            self.relay,
            conn,
            request.params["projectKey"],
            self.settings.max_filters,
            self.settings.agent_idle_timeout or None,
            self.limits,
            self.replication,
        )

    def _add_gauges(self) -> None:
        m = self.metrics
        m.gauge(
            "hub_ready",
            "1 when /readyz answers 200 (bootstrapped, not draining).",
            lambda: float(self.api.ready()),
        )
        m.gauge("hub_draining", "1 while a SIGTERM drain runs.", lambda: float(self.draining))
        m.gauge(
            "hub_local_sessions",
            "Live sessions held by this node's trackers (or waiting out their grace here).",
            lambda: len(self.registry.held()),
        )
        m.gauge(
            "hub_disconnected_sessions",
            "Sessions of this node waiting out their reconnect grace.",
            lambda: self.registry.waiting,
        )
        m.counter(
            "hub_limits_reached",
            "Times a hardening limit refused or closed a client, by limit.",
            self._limits_reached,
            labels=["limit"],
        )
        m.gauge("hub_agents", "Agent connections in the fan-out.", lambda: len(self.fanout.agents))
        m.gauge(
            "hub_agent_queue_depth",
            "Sessions with unsent changes, summed over agents (the fan-out backlog).",
            lambda: sum(agent.pending for agent in self.fanout.agents),
        )
        m.gauge(
            "hub_agent_queue_depth_max",
            "Sessions with unsent changes of the most behind agent.",
            lambda: max((agent.pending for agent in self.fanout.agents), default=0),
        )

    def _add_relay_metrics(self) -> None:
        m = self.metrics
        counts = self.relay.counts
        relay_counters = [
            ("hub_relay_events", "Tab events accepted for the relay (emit and binary frames).", "emitted"),
            ("hub_relay_event_bytes", "Bytes of the tab events accepted for the relay.", "bytes_in"),
            ("hub_relay_frames_sent", "Relay frames sent to agents (session.event and binary).", "relayed"),
            ("hub_relay_bytes_sent", "Bytes of the relay frames sent to agents.", "bytes_out"),
            ("hub_relay_dropped", "Relay frames dropped for agents over their relay buffer.", "dropped"),
            ("hub_relay_gaps", "session.gap frames sent to agents that lost events.", "gaps"),
            ("hub_relay_agent_events", "Agent events delivered to tabs.", "sent"),
        ]
        for name, doc, attr in relay_counters:
            m.counter(name, doc, functools.partial(getattr, counts, attr))
        m.counter(
            "hub_relay_closes",
            "Relay connections closed: agents too slow (4008), tabs over the rate or size (1008).",
            lambda: {
                ("agent_too_slow",): float(counts.slow_closes),
                ("tab_policy",): float(counts.policy_closes),
            },
            labels=["reason"],
        )
        m.gauge(
            "hub_relay_rooms",
            "Sessions with a tab or a joined agent in this node's relay.",
            lambda: len(self.relay.rooms),
        )
        bus = self.relay.bus
        if isinstance(bus, RedisBus):
            m.counter(
                "hub_relay_redis_published",
                "Relay messages this node published to Redis.",
                lambda: bus.published,
            )
            m.counter(
                "hub_relay_redis_received", "Relay messages received from other nodes.", lambda: bus.received
            )
            m.counter(
                "hub_relay_redis_dropped",
                "Relay messages not published: Redis down, or too far behind.",
                lambda: bus.dropped,
            )

    def _limits_reached(self) -> dict[tuple[str, ...], float]:
        reached: dict[tuple[str, ...], float] = {(n,): float(c) for n, c in self.limits.items()}
        # The per-project session limit is refused by the registry, as a tracker error.
        reached[("max_sessions_per_project",)] = float(self.metrics.trackers.errors[ErrorCode.PROJECT_FULL])
        return reached

    def _wake_agents(self) -> None:
        # Changes arrive in bursts (a read of many tracker frames): send once after.
        asyncio.get_running_loop().call_soon(self.fanout.flush)

    async def serve(
        self,
        sock: socket.socket | None = None,
        *,
        handle_signals: bool = True,
        task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until ``stop()`` (or SIGTERM/SIGINT with ``handle_signals``), then drain."""
        try:
            await self.server.start(sock)
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise BindError(f"cannot listen on {self.settings.host}:{self.settings.port}: {reason}") from exc
        self.port = self.server.port
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._sweeper)
            tg.start_soon(self._agent_ticker)
            tg.start_soon(self.replication.run)
            tg.start_soon(self.relay.bus.run)
            if self.webhooks is not None:
                tg.start_soon(self.webhooks.run)
            if self.handoff is not None:
                tg.start_soon(self._take_handoffs, self.handoff)
            if handle_signals:
                tg.start_soon(self._signals)
            self.ready = True
            log.info("hub.listening", extra={"fields": {"host": self.settings.host, "port": self.port}})
            self.listening.set()
            task_status.started(self.port)
            await self._stop.wait()
            await self._drain()
            tg.cancel_scope.cancel()
        self.enricher.close()

    def stop(self) -> None:
        self._stop.set()

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("hub.signal", extra={"fields": {"signal": signal.Signals(signum).name}})
                self.stop()
                return

    async def _drain(self) -> None:
        """Readiness off and no new connections at once, then every connection closed
        with 1012 so trackers reconnect elsewhere; all of it within ``drain_timeout``."""
        self.draining = True
        self.server.stop_accepting()
        if self.handoff is not None:
            self.handoff.close()
        timeout = self.settings.drain_timeout
        deadline = anyio.current_time() + timeout
        open_at_start = len(self.server.connections)
        log.info("drain.start", extra={"fields": {"connections": open_at_start, "timeout": timeout}})
        # Telling peers gets at most half the budget: the closing handshakes
        # must still have time to happen.
        with anyio.move_on_after(timeout / 2) as before:
            await self.replication.leave()
            await self.relay.bus.leave()
        self.server.close_all(CloseCode.RESTART, "hub restarting")
        # What is still open by the deadline is aborted.
        await self.server.wait_closed(timeout=deadline - anyio.current_time())
        if self.webhooks is not None:
            await self.webhooks.drain(deadline - anyio.current_time())
        log.log(
            logging.WARNING if before.cancelled_caught else logging.INFO,
            "drain.done",
            extra={"fields": {"connections": open_at_start, "leave_timed_out": before.cancelled_caught}},
        )

    async def _sweeper(self) -> None:
        interval = self.settings.sweep_interval
        while True:
            await anyio.sleep(interval)
            self.sweep()

    async def _agent_ticker(self) -> None:
        interval = self.settings.agent_interval
        while True:
            await anyio.sleep(interval)
            self.fanout.tick()
            self.relay.tick(now_ms() / 1000)

    def sweep(self) -> None:
        self.server.sweep()
        self.registry.sweep(now_ms())
        if self.collector is not None:
            self.collector.tick()


class BindError(OSError):
    """The listening socket could not be opened (port in use, bad address)."""


def run(
    settings: Settings, sock: socket.socket | None = None, workers: Workers | None = None, **backend: Any
) -> None:
    """Serve until stopped; on ``sock`` when given (a ``--workers`` process), else host:port."""
    collector = Collector(time.monotonic)
    hub = Hub(settings, workers, collector)
    # What start-up built lives as long as the process (the User-Agent rules alone are
    # ~29 MB of objects): out of the collector's sight, a full collection no longer
    # walks it while heartbeats flow; later full collections walk only what came
    # since the last one (collector.py).
    gc.freeze()
    collector.install()
    started = time.monotonic()
    anyio.run(hub.serve, sock, backend="asyncio", backend_options=backend)
    log.info("hub.stopped", extra={"fields": {"uptime_s": round(time.monotonic() - started, 1)}})
