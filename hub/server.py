"""The transport: one ``asyncio.Protocol`` per connection, no task per connection.

A connection starts as an ``http1.HttpConnection`` (httptools parses its
requests, the route table answers them); a WebSocket upgrade hands the
socket to a ``websocket.WebSocketConnection`` (``transport.set_protocol``),
which drives websockets' Sans-I/O ``ServerProtocol``. Admission (per-IP
limit, token bucket) is ``admission.py``. This layer only moves bytes: what
a frame or a request means is decided by an endpoint or a route's handler.

``Server`` listens, holds the open connections and sweeps their deadlines (``deadlines.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter
from typing import TYPE_CHECKING

from .admission import PerIpLimit
from .config import Settings
from .counts import ConnectionCounts
from .deadlines import Deadlines
from .http1 import HttpConnection, LongHeads
from .routes import RouteTable
from .websocket import Endpoint, WebSocketConnection

if TYPE_CHECKING:
    from .handoff import Handoff

log = logging.getLogger("hub.server")

Connection = HttpConnection | WebSocketConnection


class Server:
    """Listens, owns the set of connections, sweeps their deadlines."""

    def __init__(
        self,
        settings: Settings,
        routes: RouteTable,
        counts: ConnectionCounts | None = None,
        limits: Counter[str] | None = None,
    ) -> None:
        self.settings = settings
        self.routes = routes
        self.counts = counts if counts is not None else ConnectionCounts()
        # Times each limit was reached, by name (README, "Security"; /metrics).
        self.limits: Counter[str] = limits if limits is not None else Counter()
        # Endpoint class -> metrics label ("tracker", "agent"); set by whoever routes.
        self.endpoint_kinds: dict[type, str] = {}
        # Path prefixes whose requests may carry a longer head (e.g. a handshake whose
        # query carries a JSON document), and that length; set by whoever routes.
        self.long_heads: LongHeads = ((), 0)
        # --workers: hands connections for another worker's project to it (handoff.py).
        self.handoff: Handoff | None = None
        self.connections: set[Connection] = set()
        # When each connection's timers next need a look: a sweep visits only those.
        self.deadlines: Deadlines[Connection] = Deadlines(settings.sweep_interval, time.monotonic())
        self.per_ip = PerIpLimit(settings.max_conns_per_ip)
        self.rate = settings.rate_limit
        self.burst = float(settings.rate_burst)
        self.read_batch = settings.read_batch
        # Set by wait_closed: the last connection gone.
        self._all_closed: asyncio.Event | None = None
        self._server: asyncio.Server | None = None

    async def start(self, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await loop.create_server(
                lambda: HttpConnection(self), sock=sock, backlog=self.settings.backlog
            )
        else:
            self._server = await loop.create_server(
                lambda: HttpConnection(self),
                self.settings.host,
                self.settings.port,
                backlog=self.settings.backlog,
                reuse_address=True,
            )

    def count_open(self, endpoint: Endpoint, conn: WebSocketConnection) -> None:
        kind = self.endpoint_kinds.get(type(endpoint), "other")
        self.counts.opened[kind] += 1
        log.debug("connection.open", extra={"fields": {"kind": kind, "peer": conn.peer}})

    def count_close(self, endpoint: Endpoint, code: int, peer: str) -> None:
        kind = self.endpoint_kinds.get(type(endpoint), "other")
        self.counts.closed[(kind, code)] += 1
        log.debug("connection.close", extra={"fields": {"kind": kind, "peer": peer, "code": code}})

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    def add(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.watch(conn)

    def watch(self, conn: Connection) -> None:
        """File ``conn`` by when its timers next need a look; called where one moved earlier."""
        if conn in self.connections:
            self.deadlines.set(conn, conn.next_expiry())

    def sweep(self) -> None:
        """Enforce the deadlines that have passed: work for the connections due, not for all."""
        now = time.monotonic()
        for conn in self.deadlines.due(now):
            conn.expire(now)
            self.watch(conn)

    def close_all(self, code: int, reason: str) -> None:
        """WebSockets get a close frame with ``code``; HTTP connections are closed."""
        for conn in list(self.connections):
            conn.close(code, reason)

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.deadlines.discard(conn)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    async def wait_closed(self, timeout: float) -> None:
        """Until every connection is gone or ``timeout``; what is left is aborted."""
        if self.connections:
            self._all_closed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), max(timeout, 0.0))
        for conn in list(self.connections):
            conn.abort()
        if self._server is not None:
            self._server.close()
