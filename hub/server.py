"""The transport: one ``asyncio.Protocol`` per connection, no task per connection.

HTTP is parsed by httptools; a WebSocket upgrade is handed to websockets'
Sans-I/O ``ServerProtocol``, which keeps every protocol rule (handshake,
masking, fragments, ping, close, size limit). This layer only moves bytes:
what a frame or a request means is decided by the endpoint or ``HttpApi``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from http import HTTPStatus
from typing import Final
from typing import Protocol as TypingProtocol

import httptools
from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request as WsRequest
from websockets.protocol import OPEN, Event
from websockets.server import ServerProtocol

from .config import Settings
from .counts import ConnectionCounts
from .http_api import HttpApi, Request, Response, error
from .wire import CLOSE_ABNORMAL, CloseCode

log = logging.getLogger("hub.server")

# Seconds the peer has to answer our close frame before the socket is dropped.
CLOSE_TIMEOUT_S = 2.0


class Endpoint(TypingProtocol):
    """What a WebSocket path does with its connection's messages."""

    # Seconds of silence before the hub closes the connection; None = never.
    idle_timeout: float | None
    # Ping a silent peer at half the idle timeout, so only a dead one times out
    # (agents in browsers cannot ping). Trackers are not pinged: their silence
    # is what the heartbeat timeout detects.
    keepalive: bool

    def receive(self, data: bytes, now: int) -> bytes | None:
        """One whole message; returns a reply frame, if any."""

    def closed(self, now: int, timed_out: bool) -> None: ...

    def writable(self) -> None:
        """The connection's send buffer drained: queued frames may go."""


# Route a WebSocket handshake: an endpoint to accept it, or a refusal.
WsRouter = Callable[[Request, "Connection"], "Endpoint | Response"]


def now_ms() -> int:
    return int(time.time() * 1000)


class Connection(asyncio.Protocol):
    """One client connection: HTTP requests, then maybe one WebSocket."""

    __slots__ = (
        "backlog",
        "body",
        "counted",
        "deadline",
        "endpoint",
        "fragments",
        "head_size",
        "headers",
        "last_seen",
        "parser",
        "paused",
        "peer",
        "pinged",
        "server",
        "timed_out",
        "tokens",
        "transport",
        "url",
        "ws",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.head_size = 0
        self.ws: ServerProtocol | None = None
        self.endpoint: Endpoint | None = None
        self.fragments: list[bytes] | None = None
        # Monotonic time by which the client must have done something.
        self.deadline = time.monotonic() + server.settings.handshake_timeout
        self.last_seen = 0.0
        self.paused = False
        self.timed_out = False
        self.pinged = False
        self.peer: str = ""
        # Rate limit: a token bucket refilled from last_seen (README, "Security").
        self.tokens = float(server.settings.rate_burst)
        # Events of one read not handled yet: reading waits until they are.
        self.backlog: list[Event] | None = None
        self.counted = False

    # asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self.server.connections.add(self)
        limit = self.server.settings.max_conns_per_ip
        if limit:
            per_ip = self.server.per_ip
            if per_ip.get(self.peer, 0) >= limit:
                self.server.limits["max_conns_per_ip"] += 1
                self._respond(error(429, f"over {limit} connections from one address"), keep_alive=False)
                return
            per_ip[self.peer] = per_ip.get(self.peer, 0) + 1
            self.counted = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.forget(self)
        if self.counted:
            self.counted = False
            per_ip = self.server.per_ip
            per_ip[self.peer] -= 1
            if not per_ip[self.peer]:
                del per_ip[self.peer]
        ws = self.ws
        if ws is not None and ws.close_sent is not None and ws.close_sent.code == CloseCode.TOO_BIG:
            self.server.limits["max_frame"] += 1
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is not None:
            self.server.count_close(endpoint, self)
            try:
                endpoint.closed(now_ms(), self.timed_out)
            except Exception:
                log.exception("endpoint close failed")
        self.transport = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.endpoint is not None:
            self.endpoint.writable()

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self._ws_data(data)
        elif self.parser is not None:
            self._http_data(data)

    def eof_received(self) -> bool | None:
        if self.ws is not None:
            self.ws.receive_eof()
            self._ws_events()
        return None

    # HTTP ---------------------------------------------------------------

    def _http_data(self, data: bytes) -> None:
        assert self.parser is not None
        self.head_size += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade(data[upgrade.args[0] :])
        except httptools.HttpParserError as exc:
            # httptools wraps what a callback raises; a _Refuse carries its answer.
            cause = exc.__context__
            if isinstance(cause, _Refuse):
                limit = _STATUS_LIMITS.get(cause.response.status)
                if limit is not None:
                    self.server.limits[limit] += 1
                self._respond(cause.response, keep_alive=False)
            else:
                self._respond(error(400, "malformed HTTP request"), keep_alive=False)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.server.settings.max_header:
            raise _Refuse(error(414, "request URI too long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_size > self.server.settings.max_header:
            raise _Refuse(error(431, "request header fields too large"))
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        if self.head_size > self.server.settings.max_header:
            raise _Refuse(error(431, "request header fields too large"))
        for name, value in self.headers:
            if name.lower() == "content-length":
                try:
                    size = int(value)
                except ValueError:
                    raise _Refuse(error(400, "invalid Content-Length")) from None
                if size > self.server.settings.max_http_body:
                    raise _Refuse(
                        error(
                            413, f"request body over the limit of {self.server.settings.max_http_body} bytes"
                        )
                    )

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > self.server.settings.max_http_body:
            raise _Refuse(
                error(413, f"request body over the limit of {self.server.settings.max_http_body} bytes")
            )

    def on_message_complete(self) -> None:
        assert self.parser is not None
        if self.parser.should_upgrade():
            return  # handled by HttpParserUpgrade in _http_data
        request = self._request()
        try:
            response = self.server.api.handle(request)
        except Exception:
            log.exception("HTTP handler failed on %s %s", request.method, request.path)
            response = error(500, "internal error")
        log_request(request, response, self.peer)
        self._respond(response, keep_alive=self.parser.should_keep_alive(), head=request.method == "HEAD")
        self.head_size = 0
        self.deadline = time.monotonic() + self.server.settings.handshake_timeout

    def _request(self) -> Request:
        assert self.parser is not None
        parsed = httptools.parse_url(self.url)
        return Request(
            method=self.parser.get_method().decode("ascii", "replace"),
            path=(parsed.path or b"/").decode("utf-8", "replace"),
            query=(parsed.query or b"").decode("utf-8", "replace"),
            headers={name.lower(): value for name, value in self.headers},
            body=bytes(self.body),
        )

    def _respond(self, response: Response, keep_alive: bool, head: bool = False) -> None:
        """Write one response; ``head``: a HEAD request's, the GET's headers without the body."""
        if self.transport is None:
            return
        self.server.counts.http_responses[response.status] += 1
        reason = HTTPStatus(response.status).phrase
        lines = [
            f"HTTP/1.1 {response.status} {reason}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
        ]
        # API answers are never cached; a response that says otherwise (static files) wins.
        if not any(name.lower() == "cache-control" for name, _ in response.headers):
            lines.append("Cache-Control: no-store")
        lines += [f"{name}: {value}" for name, value in response.headers]
        if not keep_alive:
            lines.append("Connection: close")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.transport.write(data if head else data + response.body)
        if not keep_alive:
            self.parser = None
            self.transport.close()

    # WebSocket ----------------------------------------------------------

    def _upgrade(self, rest: bytes) -> None:
        request = self._request()
        routed = self.server.route_ws(request, self)
        if isinstance(routed, Response):
            log_request(request, routed, self.peer)
            self._respond(routed, keep_alive=False)
            return
        ws = ServerProtocol(state=OPEN, max_size=self.server.settings.max_frame)
        response = ws.accept(WsRequest(path=self.url.decode("latin-1"), headers=Headers(self.headers)))
        assert self.transport is not None
        if response.status_code != 101:
            self.transport.write(response.serialize())
            self.parser = None
            self.transport.close()
            return
        self.transport.write(response.serialize())
        self.parser = None
        self.url = b""
        self.headers = []
        self.body = bytearray()
        self.ws = ws
        self.endpoint = routed
        self.server.count_open(routed, self)
        self.last_seen = time.monotonic()
        if rest:
            self._ws_data(rest)

    def _ws_data(self, data: bytes) -> None:
        assert self.ws is not None
        self.ws.receive_data(data)
        self._ws_events()

    def _ws_events(self) -> None:
        ws = self.ws
        assert ws is not None
        events = ws.events_received()
        if events:
            now = time.monotonic()
            server = self.server
            if server.rate:
                # Two float ops per read: refill for the time since the last one, take one per frame.
                tokens = self.tokens + (now - self.last_seen) * server.rate
                self.tokens = tokens = min(tokens, server.burst) - len(events)
                if tokens < 0:
                    server.limits["rate_limit"] += 1
                    self._refuse_flood()
                    return
            self.last_seen = now
            self.pinged = False
        self._handle(events)

    def _refuse_flood(self) -> None:
        """Past the rate limit: close with 1008 and stop reading at once."""
        self.close(CloseCode.POLICY, "rate limit exceeded")
        if self.transport is not None:
            self.transport.close()

    def _handle(self, events: list[Event]) -> None:
        batch = self.server.read_batch
        if batch and len(events) > batch and self.transport is not None:
            # Yield to other connections: handle the rest on the next loop turn.
            self.backlog = events[batch:]
            events = events[:batch]
            self.transport.pause_reading()
            asyncio.get_running_loop().call_soon(self._resume)
        for event in events:
            if not isinstance(event, Frame):
                continue
            opcode = event.opcode
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                if event.fin:
                    self._message(bytes(event.data))
                else:
                    self.fragments = [bytes(event.data)]
            elif opcode is Opcode.CONT and self.fragments is not None:
                self.fragments.append(bytes(event.data))
                if event.fin:
                    data = b"".join(self.fragments)
                    self.fragments = None
                    self._message(data)
        self._flush()

    def _resume(self) -> None:
        events, self.backlog = self.backlog, None
        if events is None or self.transport is None:
            return
        self._handle(events)
        if self.backlog is None and self.transport is not None:
            self.transport.resume_reading()

    def _message(self, data: bytes) -> None:
        endpoint = self.endpoint
        ws = self.ws
        # Frames that arrived with the peer's close (e.g. a tracker's `end` right before it
        # closes) still count; after a close the hub started, nothing does.
        if endpoint is None or ws is None or not (ws.state is OPEN or ws.close_rcvd_then_sent):
            return
        reply = endpoint.receive(data, now_ms())
        if reply is not None and ws.state is OPEN:
            ws.send_text(reply)

    def _flush(self) -> None:
        ws, transport = self.ws, self.transport
        if ws is None or transport is None:
            return
        for chunk in ws.data_to_send():
            if chunk:
                transport.write(chunk)
            else:
                transport.close()
                return
        if ws.close_expected():
            self.deadline = min(self.deadline, time.monotonic() + CLOSE_TIMEOUT_S)

    # For endpoints ------------------------------------------------------

    @property
    def open(self) -> bool:
        return self.ws is not None and self.ws.state is OPEN and self.transport is not None

    def send(self, frame: bytes) -> None:
        """Queue one text frame to the client."""
        if self.open:
            assert self.ws is not None
            self.ws.send_text(frame)
            self._flush()

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake; the transport is dropped if it stalls."""
        if self.open:
            assert self.ws is not None
            self.ws.send_close(code, reason)
            self.deadline = time.monotonic() + CLOSE_TIMEOUT_S
            self._flush()
        elif self.transport is not None and self.ws is None:
            self.transport.close()

    def set_receive_buffer(self, size: int) -> None:
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    def expire(self, now: float) -> None:
        """Called by the sweeper: enforce handshake, heartbeat and close deadlines."""
        transport = self.transport
        if transport is None:
            return
        ws = self.ws
        if ws is None or ws.state is not OPEN:
            if now >= self.deadline:
                if ws is None:
                    self.server.limits["handshake_timeout"] += 1
                transport.abort()
            return
        endpoint = self.endpoint
        timeout = endpoint.idle_timeout if endpoint is not None else None
        if timeout is None or endpoint is None:
            return
        idle = now - self.last_seen
        if idle > timeout:
            self.server.limits["idle_timeout"] += 1
            self.timed_out = True
            self.close(CloseCode.IDLE_TIMEOUT, "idle timeout" if endpoint.keepalive else "heartbeat timeout")
        elif endpoint.keepalive and not self.pinged and idle > timeout / 2:
            self.pinged = True
            ws.send_ping(b"")
            self._flush()


def log_request(request: Request, response: Response, peer: str) -> None:
    # The path only: a query string may carry ?token=.
    if log.isEnabledFor(logging.DEBUG):
        fields = {"method": request.method, "path": request.path, "status": response.status, "peer": peer}
        log.debug("http.request", extra={"fields": fields})


def close_code(ws: ServerProtocol | None) -> int:
    """The code a WebSocket closed with: the hub's own if it closed first, else the client's."""
    if ws is None:
        return CLOSE_ABNORMAL
    frame = ws.close_sent or ws.close_rcvd
    return CLOSE_ABNORMAL if frame is None else int(frame.code)


# Refusals that are a limit reached, by HTTP status (for the limit counter).
_STATUS_LIMITS: Final = {413: "max_http_body", 414: "max_header", 431: "max_header"}


class _Refuse(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


class Server:
    """Listens, owns the set of connections, sweeps their deadlines."""

    def __init__(
        self, settings: Settings, api: HttpApi, route_ws: WsRouter, counts: ConnectionCounts | None = None
    ) -> None:
        self.settings = settings
        self.api = api
        self.route_ws = route_ws
        self.counts = counts if counts is not None else ConnectionCounts()
        # Endpoint class -> metrics label ("tracker", "agent"); set by whoever routes.
        self.endpoint_kinds: dict[type, str] = {}
        self.connections: set[Connection] = set()
        # Set by wait_closed: the last connection gone.
        self._all_closed: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        # Times each limit was reached, by name (README, "Security"; /metrics).
        self.limits: Counter[str] = api.limits
        self.per_ip: dict[str, int] = {}
        self.rate = settings.rate_limit
        self.burst = float(settings.rate_burst)
        self.read_batch = settings.read_batch

    async def start(self, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await loop.create_server(
                lambda: Connection(self), sock=sock, backlog=self.settings.backlog
            )
        else:
            self._server = await loop.create_server(
                lambda: Connection(self),
                self.settings.host,
                self.settings.port,
                backlog=self.settings.backlog,
                reuse_address=True,
            )

    def count_open(self, endpoint: Endpoint, conn: Connection) -> None:
        kind = self.endpoint_kinds.get(type(endpoint), "other")
        self.counts.opened[kind] += 1
        log.debug("connection.open", extra={"fields": {"kind": kind, "peer": conn.peer}})

    def count_close(self, endpoint: Endpoint, conn: Connection) -> None:
        kind = self.endpoint_kinds.get(type(endpoint), "other")
        code = close_code(conn.ws)
        self.counts.closed[(kind, code)] += 1
        log.debug("connection.close", extra={"fields": {"kind": kind, "peer": conn.peer, "code": code}})

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    def sweep(self) -> None:
        now = time.monotonic()
        for conn in list(self.connections):
            conn.expire(now)

    def close_all(self, code: int, reason: str) -> None:
        for conn in list(self.connections):
            if conn.ws is not None:
                conn.close(code, reason)
            elif conn.transport is not None:
                conn.transport.close()

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    async def wait_closed(self, timeout: float) -> None:
        """Until every connection is gone or ``timeout``; what is left is aborted."""
        if self.connections:
            self._all_closed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), max(timeout, 0.0))
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:
            self._server.close()

