"""The HTTP/1.1 phase of a connection: requests in, answers out, maybe a WebSocket upgrade.

Two parts, readable and testable apart:

- ``RequestReader`` (no I/O): bytes in, parsed by httptools, and out comes
  what happened, in order: a complete ``Request``, ``CONTINUE`` (the client
  waits for it before sending its body), an ``Upgrade`` (a WebSocket
  handshake and the bytes after it) or a ``Refusal`` (answer, then close).
  ``--max-header`` bounds one request's head (request line and headers),
  never its body nor the requests pipelined after it; ``--max-http-body``
  bounds the body.
- ``HttpConnection``: the ``asyncio.Protocol`` of a new connection. It admits
  it (per-IP limit), answers requests through the route table and, on an
  upgrade, hands the socket to a ``WebSocketConnection``. A deferred answer
  (``routes.Deferred``) holds the connection: nothing more is parsed until
  it is written (answers go out in order), what arrives meanwhile is kept
  (reading pauses past ``HOLD_LIMIT``), and a client that goes away cancels it.
  With ``--workers``, a request for a project another worker owns moves the
  connection to it (``handoff.py``): the connection keeps the bytes read
  since it last had nothing unanswered, to pass them along.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Final, cast

import httptools
from websockets.datastructures import Headers
from websockets.http11 import Request as WsRequest
from websockets.protocol import OPEN

from .http_api import Request, Response, error, loggable_path
from .websocket import HubServerProtocol, WebSocketConnection

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("hub.server")


class Continue:
    """The client sent ``Expect: 100-continue``: it waits for ``100 Continue`` before its body."""


CONTINUE: Final = Continue()
CONTINUE_BYTES: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Upgrade:
    """A request to switch protocols: the request, its raw target and headers, and what followed it."""

    request: Request
    target: str
    headers: list[tuple[str, str]]
    rest: bytes


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request refused before it reached a route: answer it and close."""

    response: Response
    # The limit reached (for hub_limits_reached_total), if that is why.
    limit: str | None = None


Event = Request | Continue | Upgrade | Refusal

# Bytes of a head besides what the callbacks give: the request line's " " and
# " HTTP/1.1\r\n", a header line's ": " and "\r\n", the blank line's "\r\n".
_LINE_OVERHEAD: Final = 12
_HEADER_OVERHEAD: Final = 4
_END_OVERHEAD: Final = 2
# Statuses that never carry a body.
_NO_BODY: Final = (204, 304)
# Bytes a connection keeps while it waits for a deferred answer, past which it stops reading.
HOLD_LIMIT: Final = 64 << 10


class _Stop(Exception):
    """Raised in a parser callback to stop parsing; the reader's ``_refusal`` says why."""


# Path prefixes whose requests may carry a longer head than --max-header, and that length.
LongHeads = tuple[tuple[bytes, ...], int]


class RequestReader:
    """Parses one connection's bytes into requests; after a refusal or an upgrade it reads no more."""

    __slots__ = (
        "_body",
        "_busy",
        "_events",
        "_head",
        "_headers",
        "_limit",
        "_refusal",
        "_seq",
        "_stalled",
        "_url",
        "long_heads",
        "max_body",
        "max_head",
        "parser",
    )

    def __init__(self, max_head: int, max_body: int, long_heads: LongHeads = ((), 0)) -> None:
        self.max_head = max_head
        # Paths (prefixes) whose requests may carry a longer head, and how long.
        self.long_heads = long_heads
        # The head limit of the request being read.
        self._limit = max_head
        self.max_body = max_body
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._events: list[Event] = []
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._body = bytearray()
        # Bytes of the head being read, as parsed so far; None between heads.
        self._head: int | None = None
        # Bytes of whole reads during which one head stayed incomplete: httptools holds an
        # unfinished header line without telling, and this bounds it.
        self._stalled = 0
        # Heads begun so far: tells whether a read continued the same head.
        self._seq = 0
        self._refusal: Refusal | None = None
        # Within a request: begun, not complete.
        self._busy = False

    @property
    def idle(self) -> bool:
        """Between requests: every byte fed so far belongs to a complete one."""
        return not self._busy

    @property
    def done(self) -> bool:
        """Refused, upgraded or stopped: the connection reads no more HTTP."""
        return self.parser is None

    def stop(self) -> None:
        """Read no more: the connection closes after its answer."""
        self.parser = None

    def feed(self, data: bytes) -> list[Event]:
        """What ``data`` completed, in order (empty until something is complete)."""
        parser = self.parser
        if parser is None:
            return []
        events = self._events = []
        head_before, seq_before = self._head, self._seq
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            request = events.pop()
            assert isinstance(request, Request)
            headers, self._headers = self._headers, []
            target = self._url.decode("latin-1")
            events.append(Upgrade(request, target, headers, data[upgrade.args[0] :]))
            self.parser = None
            return events
        except httptools.HttpParserError:
            events.append(self._refusal or Refusal(error(400, "malformed HTTP request")))
            self.parser = None
            return events
        if self._head is not None and head_before is not None and self._seq == seq_before:
            self._stalled += len(data)
            if self._stalled > self._limit:
                events.append(_too_large_head())
                self.parser = None
        return events

    def _refuse(self, refusal: Refusal) -> _Stop:
        self._refusal = refusal
        return _Stop()

    # httptools callbacks ------------------------------------------------

    def on_message_begin(self) -> None:
        self._busy = True
        self._url = b""
        self._headers = []
        self._body = bytearray()
        self._head = _LINE_OVERHEAD
        self._stalled = 0
        self._seq += 1
        self._limit = self.max_head

    def on_url(self, url: bytes) -> None:
        self._url += url
        assert self._head is not None
        self._head += len(url)
        prefixes, size = self.long_heads
        if prefixes and self._limit < size and self._url.startswith(prefixes):
            self._limit = size
        if len(self._url) > self._limit:
            raise self._refuse(Refusal(error(414, "request URI too long"), "max_header"))

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._head is not None
        self._head += len(name) + len(value) + _HEADER_OVERHEAD
        if self._head > self._limit:
            raise self._refuse(_too_large_head())
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        assert self._head is not None and self.parser is not None
        size = self._head + len(self.parser.get_method()) + _END_OVERHEAD
        self._head = None
        if size > self._limit:
            raise self._refuse(_too_large_head())
        expect = False
        for name, value in self._headers:
            lower = name.lower()
            if lower == "content-length":
                try:
                    size = int(value)
                except ValueError:
                    raise self._refuse(Refusal(error(400, "invalid Content-Length"))) from None
                if size > self.max_body:
                    raise self._refuse(_too_large_body(self.max_body))
            elif lower == "expect":
                expect = value.strip().lower() == "100-continue"
        # An HTTP/1.0 client does not know 100 (RFC 9110 §10.1.1).
        if expect and self.parser.get_http_version() != "1.0":
            self._events.append(CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body += body
        if len(self._body) > self.max_body:
            raise self._refuse(_too_large_body(self.max_body))

    def on_message_complete(self) -> None:
        self._busy = False
        parser = self.parser
        assert parser is not None
        events = self._events
        if events and events[-1] is CONTINUE:
            events.pop()  # the body came with the head: no need to ask for it
        parsed = httptools.parse_url(self._url)
        events.append(
            Request(
                method=parser.get_method().decode("ascii", "replace"),
                path=(parsed.path or b"/").decode("utf-8", "replace"),
                query=(parsed.query or b"").decode("utf-8", "replace"),
                headers={name.lower(): value for name, value in self._headers},
                body=bytes(self._body),
                keep_alive=parser.should_keep_alive(),
            )
        )
        if not parser.should_upgrade():
            self._headers = []
        self._body = bytearray()


def _too_large_head() -> Refusal:
    return Refusal(error(431, "request header fields too large"), "max_header")


def _too_large_body(limit: int) -> Refusal:
    return Refusal(error(413, f"request body over the limit of {limit} bytes"), "max_http_body")


def encode_response(response: Response, keep_alive: bool, head: bool = False) -> bytes:
    """One response; ``head``: a HEAD request's, the GET's headers without the body."""
    status = response.status
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    # 204 and 304 have no body; their Content-Length would have to be the GET's (RFC 9110 §8.6).
    if status not in _NO_BODY:
        lines += [f"Content-Type: {response.content_type}", f"Content-Length: {len(response.body)}"]
    # API answers are never cached; a response that says otherwise (static files) wins.
    if not any(name.lower() == "cache-control" for name, _ in response.headers):
        lines.append("Cache-Control: no-store")
    lines += [f"{name}: {value}" for name, value in response.headers]
    if not keep_alive:
        lines.append("Connection: close")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return data if head or status in _NO_BODY else data + response.body


class HttpConnection(asyncio.Protocol):
    """A connection until it upgrades: admitted, then requests answered in order."""

    __slots__ = (
        "admitted",
        "adopted",
        "deadline",
        "held",
        "inbox",
        "paused",
        "peer",
        "queued",
        "reader",
        "server",
        "track",
        "transport",
        "waiting",
        "waiting_for",
        "window",
    )

    def __init__(self, server: Server, adopted: bytes | None = None) -> None:
        self.server = server
        # Handed over by another worker: the bytes it had read, parsed before any other.
        self.adopted = adopted
        # Requests may be handed to the worker owning their project: never an adopted connection's.
        self.track = server.handoff is not None and adopted is None
        # While tracking: the bytes read since nothing was unanswered, and the requests among them.
        self.inbox: bytes | bytearray | None = None
        self.window = 0
        settings = server.settings
        self.reader = RequestReader(settings.max_header, settings.max_http_body, server.long_heads)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        # Counted in the per-IP limit (released when the connection goes).
        self.admitted = False
        # Monotonic time by which the client must have sent a whole request (or its next one).
        self.deadline = time.monotonic() + settings.handshake_timeout
        # A deferred answer being awaited, and its request; None when none is.
        self.waiting: asyncio.Task[Response] | None = None
        self.waiting_for: Request | None = None
        # Meanwhile: what was parsed behind it, and the bytes that arrived (not yet parsed).
        self.queued: list[Event] = []
        self.held: bytearray | None = None
        # Reading paused: more than HOLD_LIMIT bytes held.
        self.paused = False

    # asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass: no isinstance).
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        server = self.server
        server.add(self)
        if server.per_ip.admit(self.peer):
            self.admitted = True
        else:
            server.limits["max_conns_per_ip"] += 1
            limit = server.per_ip.limit
            self._respond(error(429, f"over {limit} connections from one address"), keep_alive=False)
        adopted, self.adopted = self.adopted, None
        if adopted and self.admitted:
            # Before anything read here: the transport reads only after this returns.
            self.data_received(adopted)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.forget(self)
        if self.admitted:
            self.admitted = False
            self.server.per_ip.release(self.peer)
        self.transport = None
        task = self.waiting
        if task is not None:
            # The client is gone: its answer is no one's (a future it waited on is shielded).
            self.waiting = self.waiting_for = None
            self.queued = []
            self.held = None
            task.cancel()

    def data_received(self, data: bytes) -> None:
        if self.waiting is not None:
            self._hold(data)
        elif self.track:
            self._tracked(data)
        else:
            self._handle(self.reader.feed(data))

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            if self.transport is None or self.transport.is_closing():
                return
            if isinstance(event, Request):
                if self.track and self._hand_off(event):
                    return
                self._answer(event)
                if self.waiting is not None:
                    # Deferred: what follows waits for its answer.
                    self.queued = _after(events, event)
                    return
            elif event is CONTINUE:
                self.transport.write(CONTINUE_BYTES)
            elif isinstance(event, Upgrade):
                if self.track and self._hand_off(event.request):
                    return
                self._upgrade(event)
            elif isinstance(event, Refusal):
                if event.limit is not None:
                    self.server.limits[event.limit] += 1
                self._respond(event.response, keep_alive=False)

    # For the server ------------------------------------------------------

    def next_expiry(self) -> float:
        # Only ever moved later (each answer restarts it): the server's file stays a lower bound.
        return self.deadline if self.transport is not None else math.inf

    def expire(self, now: float) -> None:
        """A client that does not finish its request (or send the next) in time is dropped."""
        if self.transport is not None and now >= self.deadline:
            self.server.limits["handshake_timeout"] += 1
            self.transport.abort()

    def close(self, code: int, reason: str) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # Requests ------------------------------------------------------------

    def _answer(self, request: Request) -> None:
        """Answer ``request`` now, or wait for its deferred answer (``waiting``)."""
        answer = self.server.routes.answer(request)
        if isinstance(answer, Response):
            log_request(request, answer, self.peer)
            self._respond(answer, keep_alive=request.keep_alive, head=request.method == "HEAD")
            self.deadline = time.monotonic() + self.server.settings.handshake_timeout
        else:
            self._wait(request, answer)

    def _answered(self, request: Request, response: Response) -> None:
        log_request(request, response, self.peer)
        self._respond(response, keep_alive=request.keep_alive, head=request.method == "HEAD")
        self.deadline = time.monotonic() + self.server.settings.handshake_timeout

    # Deferred answers --------------------------------------------------------

    def _wait(self, request: Request, task: asyncio.Task[Response]) -> None:
        self.waiting, self.waiting_for = task, request
        # The task ends by the route table's bound (a 503 then): the sweep drops the
        # connection only if it somehow did not, a handshake timeout later.
        settings = self.server.settings
        self.deadline = time.monotonic() + self.server.routes.defer_timeout + settings.handshake_timeout
        task.add_done_callback(self._deferred_done)

    def _hold(self, data: bytes) -> None:
        """Bytes that came while an answer is awaited: parsed after it."""
        if self.held is None:
            self.held = bytearray(data)
        else:
            self.held += data
        if len(self.held) > HOLD_LIMIT and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def _deferred_done(self, task: asyncio.Task[Response]) -> None:
        request = self.waiting_for
        if task is not self.waiting or request is None:
            return  # the client went away first
        self.waiting = self.waiting_for = None
        if task.cancelled() or task.exception() is not None:
            response = error(500, "internal error")
        else:
            response = task.result()
        if self.transport is None or self.transport.is_closing():
            return  # closed meanwhile (a drain): nothing more is written
        self._answered(request, response)
        self._resume()

    def _resume(self) -> None:
        """After a deferred answer: the requests parsed behind it, then the bytes held meanwhile."""
        events, self.queued = self.queued, []
        held, self.held = self.held, None
        if held and events and isinstance(events[-1], Upgrade):
            # The upgrade's connection reads what followed its handshake.
            upgrade = events[-1]
            events[-1] = Upgrade(upgrade.request, upgrade.target, upgrade.headers, upgrade.rest + held)
            held = None
        self._handle(events)
        if held:
            if self.waiting is None:
                self._handle(self.reader.feed(bytes(held)))
            else:
                self.held = held
        if self.track:
            self._settle()
        transport = self.transport
        if not self.paused or transport is None or transport.is_closing():
            return
        if len(self.held or b"") <= HOLD_LIMIT:
            self.paused = False
            transport.resume_reading()

    def _respond(self, response: Response, keep_alive: bool, head: bool = False) -> None:
        transport = self.transport
        if transport is None:
            return
        self.server.counts.http_responses[response.status] += 1
        transport.write(encode_response(response, keep_alive, head))
        if not keep_alive:
            self.reader.stop()
            transport.close()

    # Hand-off to the worker owning the project (--workers) ----------------------

    def _tracked(self, data: bytes) -> None:
        """``data_received`` while requests may be handed off: the unanswered bytes are kept."""
        if not self.window:
            inbox = self.inbox
            if inbox is None:
                self.inbox = data
            elif isinstance(inbox, bytearray):
                inbox += data
            else:
                self.inbox = bytearray(inbox) + data
        self._handle(self.reader.feed(data))
        self._settle()

    def _settle(self) -> None:
        """Every request read so far answered and none begun: the next read starts afresh."""
        if self.waiting is None and self.reader.idle:
            self.inbox = None
            self.window = 0

    def _hand_off(self, request: Request) -> bool:
        """Hand the connection to the worker owning ``request``'s project: True if it now has it."""
        handoff = self.server.handoff
        assert handoff is not None
        first = not self.window
        self.window += 1
        target = handoff.target(request)
        if target is None:
            return False
        transport, inbox = self.transport, self.inbox
        if not first or inbox is None or transport is None or transport.get_write_buffer_size():
            # Bytes before it were answered here: the rest of them is this worker's to answer.
            handoff.counts["kept"] += 1
            return False
        sock = transport.get_extra_info("socket")
        if sock is None or not handoff.send(target, sock.fileno(), bytes(inbox)):
            return False
        # The owner holds the socket now: this process's descriptor closes, the connection stays.
        self.track = False
        self.inbox = None
        self.reader.stop()
        transport.abort()
        return True

    def _upgrade(self, upgrade: Upgrade) -> None:
        """Validate the WebSocket handshake, route it, and hand the socket over on success."""
        transport = self.transport
        assert transport is not None
        server = self.server
        protocol = HubServerProtocol(state=OPEN, max_size=server.settings.max_frame)
        handshake = protocol.accept(WsRequest(path=upgrade.target, headers=Headers(upgrade.headers)))
        if handshake.status_code != 101:
            transport.write(handshake.serialize())
            transport.close()
            return
        conn = WebSocketConnection(server, transport, protocol, self.peer)
        routed = server.routes.accept(upgrade.request, conn)
        if isinstance(routed, Response):
            log_request(upgrade.request, routed, self.peer)
            self._respond(routed, keep_alive=False)
            return
        transport.write(handshake.serialize())
        # From here on the WebSocket connection owns the socket and the per-IP count.
        conn.admitted, self.admitted = self.admitted, False
        server.add(conn)
        server.forget(self)
        transport.set_protocol(conn)
        self.transport = None
        conn.start(routed, upgrade.rest)


def _after(events: list[Event], event: Event) -> list[Event]:
    """The events after ``event`` (that very one, not an equal one)."""
    for i, other in enumerate(events):
        if other is event:
            return events[i + 1 :]
    return []


def log_request(request: Request, response: Response, peer: str) -> None:
    # The path only: a query string may carry ?token=.
    if log.isEnabledFor(logging.DEBUG):
        path = loggable_path(request.path)
        fields = {"method": request.method, "path": path, "status": response.status, "peer": peer}
        log.debug("http.request", extra={"fields": fields})
