"""The WebSocket phase of a connection: frames in, whole messages to an endpoint, frames out.

websockets' Sans-I/O ``ServerProtocol`` keeps the protocol's rules (masking,
control frames, ping, close, fragment order, size limit). What it leaves to
its caller is here:

- ``Fragments`` and ``is_utf8`` (no I/O): a fragmented message joined, and
  text checked to be UTF-8, failing fast (RFC 6455 §8.1: close 1007) at the
  first fragment that cannot be, even with a code point split across two.
- ``WebSocketConnection``: the ``asyncio.Protocol`` after the upgrade. Each
  read is charged to the connection's token bucket, handled at most
  ``--read-batch`` messages at a time (reading pauses until the rest is
  handled), and its deadlines (idle or heartbeat timeout, a ping at half
  of it, the close handshake) are enforced by the server's sweep.
- ``Heartbeat`` (no I/O): a protocol whose server pings in messages of its
  own (Engine.IO's ``2``, answered ``3``). An endpoint that speaks first or
  pings so ``greet``s its connection while it is routed.

Text messages go to ``Endpoint.receive``, binary ones to
``Endpoint.receive_binary``: binary frames are never parsed as JSON.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import math
import socket
import time
from enum import Enum
from typing import TYPE_CHECKING, Final
from typing import Protocol as TypingProtocol

from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN, Event
from websockets.server import ServerProtocol

from .admission import TokenBucket
from .clock import now_ms
from .wire import CLOSE_ABNORMAL, CloseCode

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("hub.server")

# Seconds the peer has to answer our close frame before the socket is dropped.
CLOSE_TIMEOUT_S: Final = 2.0

_TEXT: Final = Opcode.TEXT
_BINARY: Final = Opcode.BINARY
_CONT: Final = Opcode.CONT
_CLOSE: Final = Opcode.CLOSE
_utf8_decoder: Final = codecs.getincrementaldecoder("utf-8")


class Endpoint(TypingProtocol):
    """What a WebSocket path does with its connection's messages."""

    # Seconds of silence before the hub closes the connection; None = never.
    idle_timeout: float | None
    # Ping a silent peer at half the idle timeout, so only a dead one times out
    # (agents in browsers cannot ping). Trackers are not pinged: their silence
    # is what the heartbeat timeout detects.
    keepalive: bool

    def receive(self, data: bytes, now: int) -> bytes | None:
        """One whole text message (valid UTF-8); returns a reply text frame, if any."""

    def receive_binary(self, data: bytes, now: int) -> bytes | None:
        """One whole binary message; returns a reply text frame, if any."""

    def closed(self, now: int, timed_out: bool) -> None: ...

    def writable(self) -> None:
        """The connection's send buffer drained: queued frames may go."""


def is_utf8(data: bytes) -> bool:
    """Is ``data`` UTF-8 text (RFC 3629: no surrogates, nothing past U+10FFFF)?"""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class Fragments:
    """A fragmented message being received: its parts, and for text a decoder that fails fast."""

    __slots__ = ("binary", "decoder", "parts")

    def __init__(self, first: bytes, binary: bool) -> None:
        self.binary = binary
        self.parts = [first]
        self.decoder = None if binary else _utf8_decoder()
        if self.decoder is not None:
            self.decoder.decode(first, False)

    def add(self, data: bytes, fin: bool) -> None:
        """One more fragment; raises ``UnicodeDecodeError`` as soon as text cannot be UTF-8."""
        self.parts.append(data)
        if self.decoder is not None:
            # Only validating: the decoded text is dropped (endpoints parse bytes).
            self.decoder.decode(data, fin)

    def join(self) -> bytes:
        return b"".join(self.parts)


class Beat(Enum):
    """What a ``Heartbeat`` wants of its connection now."""

    PING = "ping"
    TIMED_OUT = "timed out"
    # The peer never completed the protocol's own connect (Socket.IO's CONNECT) in time.
    NOT_CONNECTED = "not connected"


class Heartbeat:
    """An application-level ping, as Engine.IO 4's server keeps one (no I/O; monotonic seconds).

    ``ping`` goes out ``interval`` seconds after the connection opens, and again
    ``interval`` after each answer; no answer within ``timeout`` of a ping and the
    connection is closed. Other traffic does not count: a peer that sends but never
    answers is dead to the protocol. The endpoint calls ``answered`` (through its
    connection) on the answer; the server's sweep polls, so pings are late by up to
    one ``--sweep-interval``. A peer that has not said ``connected`` within
    ``connect_timeout`` of the opening is let go too (socket.io's connectTimeout:
    answering pings is not enough to hold a connection that never joined).
    """

    __slots__ = ("connect_by", "connect_timeout", "deadline", "due", "interval", "ping", "timeout")

    def __init__(
        self, ping: bytes, interval: float, timeout: float, connect_timeout: float = math.inf
    ) -> None:
        self.ping = ping
        self.interval = interval
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.connect_by = math.inf
        self.due = math.inf
        # When the outstanding ping's answer is late; inf while none is outstanding.
        self.deadline = math.inf

    def begin(self, now: float) -> None:
        """The connection opened."""
        self.connect_by = now + self.connect_timeout
        self.answered(now)

    def answered(self, now: float) -> None:
        self.due = now + self.interval
        self.deadline = math.inf

    def connected(self) -> None:
        self.connect_by = math.inf

    def next_poll(self) -> float:
        """The earliest time ``poll`` could answer something."""
        return min(self.connect_by, self.deadline, self.due)

    def poll(self, now: float) -> Beat | None:
        if now >= self.connect_by:
            return Beat.NOT_CONNECTED
        if now >= self.deadline:
            return Beat.TIMED_OUT
        if now >= self.due and self.deadline == math.inf:
            self.due = math.inf
            self.deadline = now + self.timeout
            return Beat.PING
        return None


class HubServerProtocol(ServerProtocol):
    """websockets' server protocol, but a close may interrupt a fragmented message.

    RFC 6455 lets control frames come between fragments; websockets fails such a close
    with 1002 ("incomplete fragmented message") where the peer expects its close echoed
    (Autobahn case 7.1.5). The unfinished message is dropped and the close answered.
    """

    def recv_frame(self, frame: Frame) -> None:
        if frame.opcode is _CLOSE:
            self.current_size = None
        _recv_frame(self, frame)


# Called directly, not through super(): this runs for every frame, and super()'s
# lookup cost ~0.4 µs a frame where this costs nothing measurable.
_recv_frame: Final = ServerProtocol.recv_frame


def close_code(ws: ServerProtocol) -> int:
    """The code a WebSocket closed with: the hub's own if it closed first, else the client's."""
    frame = ws.close_sent or ws.close_rcvd
    return CLOSE_ABNORMAL if frame is None else int(frame.code)


class WebSocketConnection(asyncio.Protocol):
    """One accepted WebSocket: its messages go to one endpoint."""

    __slots__ = (
        "admitted",
        "backlog",
        "bucket",
        "deadline",
        "endpoint",
        "fragments",
        "greeting",
        "heartbeat",
        "held",
        "last_seen",
        "paused",
        "peer",
        "pinged",
        "server",
        "timed_out",
        "transport",
        "windows",
        "ws",
    )

    def __init__(self, server: Server, transport: asyncio.Transport, ws: ServerProtocol, peer: str) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = transport
        self.ws = ws
        self.peer = peer
        self.endpoint: Endpoint | None = None
        # Counted in the per-IP limit (handed over by the HTTP phase).
        self.admitted = False
        self.fragments: Fragments | None = None
        # Events of one read not handled yet: reading waits until they are.
        self.backlog: list[Event] | None = None
        now = time.monotonic()
        self.last_seen = now
        # Monotonic time by which a closing handshake must be done; none while open.
        self.deadline = math.inf
        self.paused = False
        # While the transport is paused: frames kept here in one buffer, not as one uvloop
        # write each (~900 bytes of RSS per queued write however small the frame).
        self.held: bytearray | None = None
        self.timed_out = False
        self.pinged = False
        self.bucket = TokenBucket(server.rate, server.burst, now) if server.rate else None
        # Receive buffer sizes (idle, watched) when set by the endpoint's route.
        self.windows: tuple[int, int] | None = None
        self.greeting: bytes | None = None
        self.heartbeat: Heartbeat | None = None

    def greet(self, frame: bytes | None, heartbeat: Heartbeat | None = None) -> None:
        """While the connection is routed (before the 101 goes out): ``frame`` is the first
        text frame, sent right after the upgrade, and ``heartbeat`` pings from then on."""
        self.greeting = frame
        self.heartbeat = heartbeat

    def start(self, endpoint: Endpoint, rest: bytes) -> None:
        """The handshake is answered: messages go to ``endpoint``, beginning with ``rest``."""
        self.endpoint = endpoint
        self.server.count_open(endpoint, self)
        self.last_seen = now = time.monotonic()
        if self.heartbeat is not None:
            self.heartbeat.begin(now)
        self.server.watch(self)
        if self.greeting is not None:
            self.send(self.greeting)
            self.greeting = None
        if rest:
            self.data_received(rest)

    # asyncio callbacks -------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        server = self.server
        server.forget(self)
        if self.admitted:
            self.admitted = False
            server.per_ip.release(self.peer)
        close_sent = self.ws.close_sent
        if close_sent is not None and close_sent.code == CloseCode.TOO_BIG:
            server.limits["max_frame"] += 1
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is not None:
            server.count_close(endpoint, close_code(self.ws), self.peer)
            try:
                endpoint.closed(now_ms(), self.timed_out)
            except Exception:
                log.exception("endpoint close failed")
        self.transport = None
        # A connection dropped without a closing handshake leaves websockets' protocol in
        # a cycle (the parser's exception -> its traceback -> the parser's frame -> the
        # protocol): broken here, the connection is freed when its last reference goes,
        # with no collector pass (which at 16k connections stalls the loop ~0.2 s).
        self.ws.parser_exc = None

    def pause_writing(self) -> None:
        self.paused = True
        self.held = bytearray()

    def resume_writing(self) -> None:
        self.paused = False
        held, self.held = self.held, None
        if held and self.transport is not None:
            self.transport.write(held)
        if self.endpoint is not None:
            self.endpoint.writable()

    def data_received(self, data: bytes) -> None:
        self.ws.receive_data(data)
        self._received()

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self._received()
        return None

    # Reading -------------------------------------------------------------

    def _received(self) -> None:
        events = self.ws.events_received()
        if events:
            now = time.monotonic()
            bucket = self.bucket
            if bucket is not None and not bucket.take(len(events), now):
                self.server.limits["rate_limit"] += 1
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
            data = bytes(event.data)
            if opcode is _TEXT:
                if event.fin:
                    if not (data.isascii() or is_utf8(data)):
                        self._invalid_text()
                        break
                    self._message(data)
                else:
                    try:
                        self.fragments = Fragments(data, binary=False)
                    except UnicodeDecodeError:
                        self._invalid_text()
                        break
            elif opcode is _BINARY:
                if event.fin:
                    self._message(data, binary=True)
                else:
                    self.fragments = Fragments(data, binary=True)
            elif opcode is _CONT and self.fragments is not None:
                fragments = self.fragments
                try:
                    fragments.add(data, event.fin)
                except UnicodeDecodeError:
                    self._invalid_text()
                    break
                if event.fin:
                    self.fragments = None
                    if fragments.binary:
                        self._message(fragments.join(), binary=True)
                    else:
                        self._message(fragments.join())
        self._flush()

    def _resume(self) -> None:
        events, self.backlog = self.backlog, None
        if events is None or self.transport is None:
            return
        self._handle(events)
        if self.backlog is None and self.transport is not None:
            self.transport.resume_reading()

    def _invalid_text(self) -> None:
        """A text message that is not UTF-8: fail the connection with 1007 (RFC 6455 §8.1)."""
        self.fragments = None
        self.backlog = None
        if self.ws.state is OPEN:
            self.ws.fail(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message")

    def _message(self, data: bytes, binary: bool = False) -> None:
        endpoint = self.endpoint
        ws = self.ws
        # Frames that arrived with the peer's close (e.g. a tracker's `end` right before it
        # closes) still count; after a close the hub started, nothing does.
        if endpoint is None or not (ws.state is OPEN or ws.close_rcvd_then_sent):
            return
        receive = endpoint.receive_binary if binary else endpoint.receive
        reply = receive(data, now_ms())
        if reply is not None and ws.state is OPEN:
            ws.send_text(reply)

    def _flush(self) -> None:
        ws, transport = self.ws, self.transport
        if transport is None:
            return
        for chunk in ws.data_to_send():
            if chunk:
                if self.held is not None:
                    self.held += chunk
                else:
                    transport.write(chunk)
            else:
                if self.held:
                    transport.write(self.held)
                    self.held = None
                transport.close()
                return
        if ws.close_expected():
            at = time.monotonic() + CLOSE_TIMEOUT_S
            if at < self.deadline:
                self.deadline = at
                self.server.watch(self)

    # For endpoints ------------------------------------------------------

    @property
    def open(self) -> bool:
        return self.ws.state is OPEN and self.transport is not None

    def send(self, frame: bytes) -> None:
        """Queue one text frame to the client."""
        if self.open:
            self.ws.send_text(frame)
            self._flush()

    def send_binary(self, data: bytes) -> None:
        """Queue one binary frame to the client."""
        if self.open:
            self.ws.send_binary(data)
            self._flush()

    def send_text(self, frame: bytes) -> None:
        """Queue one text frame (the relay's ``Sink``)."""
        self.send(frame)

    def buffered(self) -> int:
        """Bytes queued to the client and not yet taken by the kernel (the relay's back-pressure)."""
        transport = self.transport
        held = len(self.held) if self.held is not None else 0
        return transport.get_write_buffer_size() + held if transport is not None else 0

    def answered(self) -> None:
        """The peer answered the heartbeat's ping (an endpoint saw its pong)."""
        if self.heartbeat is not None:
            self.heartbeat.answered(time.monotonic())

    def connected(self) -> None:
        """The peer completed the protocol's own connect: the heartbeat's connect deadline is off."""
        if self.heartbeat is not None:
            self.heartbeat.connected()

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake; the transport is dropped if it stalls."""
        if self.open:
            self.ws.send_close(code, reason)
            self.deadline = time.monotonic() + CLOSE_TIMEOUT_S
            self.server.watch(self)
            self._flush()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def set_receive_buffer(self, size: int, watched: int = 0) -> None:
        """A small receive window (``size``) while idle; ``watched`` bytes while the relay streams."""
        self.windows = (size, watched or size)
        self._set_rcvbuf(size)

    def watched(self, on: bool) -> None:
        """The relay's agents joined or left this tab: widen or narrow its receive window.

        A tab streams only while watched; a 16 KiB window would throttle that stream to
        16 KiB per round trip (on loopback, whose MSS is 64 KiB, to one segment per
        200 ms persist probe).
        """
        if self.windows is not None:
            self._set_rcvbuf(self.windows[1] if on else self.windows[0])

    def _set_rcvbuf(self, size: int) -> None:
        self._setsockopt(socket.SO_RCVBUF, size)

    def set_send_buffer(self, size: int) -> None:
        """Bound what the kernel queues to a slow reader (Linux autotunes it up to 4 MiB),
        so that ``buffered`` sees back-pressure after ``size`` bytes, not megabytes; and
        pause writing at half of it (64 KiB at most: past that, frames wait in ``held``,
        one buffer, rather than as the event loop's writes), so that a queue over
        ``size`` always ends with ``writable`` (the relay's cue to send ``session.gap``)."""
        self._setsockopt(socket.SO_SNDBUF, size)
        if self.transport is not None:
            self.transport.set_write_buffer_limits(high=min(size // 2, 64 << 10))

    def _setsockopt(self, option: int, size: int) -> None:
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, option, size)

    # For the server ------------------------------------------------------

    def next_expiry(self) -> float:
        """The earliest time ``expire`` could act: a lower bound, as traffic only moves it later."""
        if self.transport is None:
            return math.inf
        if self.ws.state is not OPEN:
            return self.deadline
        heartbeat = self.heartbeat
        at = heartbeat.next_poll() if heartbeat is not None else math.inf
        endpoint = self.endpoint
        timeout = endpoint.idle_timeout if endpoint is not None else None
        if endpoint is not None and timeout is not None:
            if endpoint.keepalive and not self.pinged:
                timeout /= 2
            at = min(at, self.last_seen + timeout)
        return at

    def expire(self, now: float) -> None:
        """Enforce the idle (or heartbeat) timeout, the keepalive ping, the close deadline
        and the heartbeat's ping and answer."""
        transport = self.transport
        if transport is None:
            return
        ws = self.ws
        if ws.state is not OPEN:
            if now >= self.deadline:
                transport.abort()
            return
        heartbeat = self.heartbeat
        if heartbeat is not None:
            beat = heartbeat.poll(now)
            if beat is Beat.PING:
                self.send(heartbeat.ping)
            elif beat is not None:
                # Counted as an idle timeout: the peer is as gone as a silent one.
                self.server.limits["idle_timeout"] += 1
                self.timed_out = True
                self.close(
                    CloseCode.IDLE_TIMEOUT, "ping timeout" if beat is Beat.TIMED_OUT else "connect timeout"
                )
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
