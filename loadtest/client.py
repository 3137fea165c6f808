"""Lean load-generating clients: a WebSocket client on ``asyncio.Protocol`` and a keep-alive HTTP client.

The websockets asyncio client costs ~440 µs CPU per handshake (FACTS.md): a
swarm built on it would measure itself, not the hub. This client writes the
handshake and masked frames itself, has no task per connection, and hands
whole messages to a handler object, so one process can hold ~15k connections.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time
from typing import Protocol as TypingProtocol
from typing import cast
from urllib.parse import urlsplit

# Lets many connections share a source address: the kernel picks the port at
# connect() time, per destination, instead of at bind() time (Linux 4.2+).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_MESSAGE = 64 * 1024 * 1024

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - the pure-Python fallback of websockets
    from websockets.utils import apply_mask


def frame(payload: bytes, opcode: int = OP_TEXT, mask: bytes | None = None) -> bytes:
    """One final, masked client frame (RFC 6455 §5.2)."""
    mask = os.urandom(4) if mask is None else mask
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + mask + apply_mask(payload, mask)


class Handler(TypingProtocol):
    """What a swarm member does with its connection's events."""

    def on_open(self, conn: WsConn) -> None: ...

    def on_message(self, conn: WsConn, data: bytes) -> None: ...

    def on_close(self, conn: WsConn, code: int | None, opened: bool) -> None:
        """The connection is gone; ``code`` is the server's close code, if it sent one."""


class HandshakeError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"handshake refused with HTTP {status}")
        self.status = status


class WsConn(asyncio.Protocol):
    """One client WebSocket: handshake, then whole messages to ``handler``."""

    __slots__ = (
        "buf",
        "close_code",
        "closing",
        "frags",
        "handler",
        "opened",
        "request",
        "transport",
        "waiter",
    )

    def __init__(self, handler: Handler, request: bytes, waiter: asyncio.Future[None]) -> None:
        self.handler = handler
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.opened = False
        self.close_code: int | None = None
        self.closing = False
        self.frags: list[bytes] | None = None
        # Resolved when the handshake is answered; dropped after that.
        self.waiter: asyncio.Future[None] | None = waiter

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tcp = cast(asyncio.Transport, transport)
        tcp.write(self.request)
        self.request = b""

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionResetError("closed during handshake"))
        self.waiter = None
        self.handler.on_close(self, self.close_code, self.opened)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not self.opened:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            status_line = buf[: buf.find(b"\r\n")]
            try:
                status = int(status_line.split()[1])
            except (IndexError, ValueError):
                status = 0
            waiter, self.waiter = self.waiter, None
            if status != 101:
                if waiter is not None and not waiter.done():
                    waiter.set_exception(HandshakeError(status))
                self.buf = b""
                self.abort()
                return
            self.opened = True
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            self.handler.on_open(self)
            buf = buf[end + 4 :]
        self.buf = self._frames(buf)

    def _frames(self, buf: bytes) -> bytes:
        """Handle every whole frame in ``buf``; return what is left over."""
        pos, size = 0, len(buf)
        while size - pos >= 2 and self.transport is not None:
            b0, b1 = buf[pos], buf[pos + 1]
            n, head = b1 & 0x7F, 2
            if n == 126:
                if size - pos < 4:
                    break
                n, head = struct.unpack_from("!H", buf, pos + 2)[0], 4
            elif n == 127:
                if size - pos < 10:
                    break
                n, head = struct.unpack_from("!Q", buf, pos + 2)[0], 10
            if n > MAX_MESSAGE:
                self.abort()
                return b""
            if b1 & 0x80:  # servers never mask; tolerate it anyway
                head += 4
            if size - pos < head + n:
                break
            payload = buf[pos + head : pos + head + n]
            if b1 & 0x80:
                payload = apply_mask(payload, buf[pos + head - 4 : pos + head])
            pos += head + n
            self._frame(b0 & 0x80, b0 & 0x0F, payload)
        return buf[pos:]

    def _frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode in (OP_TEXT, OP_BINARY):
            if fin:
                self.handler.on_message(self, payload)
            else:
                self.frags = [payload]
        elif opcode == OP_CONT and self.frags is not None:
            self.frags.append(payload)
            if fin:
                data, self.frags = b"".join(self.frags), None
                self.handler.on_message(self, data)
        elif opcode == OP_PING:
            self.write(frame(payload, OP_PONG))
        elif opcode == OP_CLOSE:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            if not self.closing:
                self.write(frame(payload[:2], OP_CLOSE))
            if self.transport is not None:
                self.transport.close()

    # For handlers --------------------------------------------------------

    @property
    def open(self) -> bool:
        return (
            self.opened
            and not self.closing
            and self.close_code is None
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def write(self, data: bytes) -> None:
        """Raw bytes, e.g. a frame built once by ``frame`` and sent many times."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send(self, payload: bytes) -> None:
        self.write(frame(payload))

    def close(self, code: int = 1000) -> None:
        """Closing handshake: the server answers and drops the connection."""
        if self.open:
            self.write(frame(struct.pack("!H", code), OP_CLOSE))
            self.closing = True

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def backlog(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0


def handshake(host: str, port: int, path: str, headers: list[tuple[str, str]] | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{name}: {value}" for name, value in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    default = 443 if parts.scheme in ("wss", "https") else 80
    return parts.hostname or "127.0.0.1", parts.port or default


async def ws_connect(
    url: str,
    path: str,
    handler: Handler,
    source: str | None = None,
    headers: list[tuple[str, str]] | None = None,
    timeout: float = 10.0,
) -> WsConn:
    """Open a WebSocket to ``url`` + ``path`` from ``source``; returns once the handshake is answered."""
    loop = asyncio.get_running_loop()
    host, port = host_port(url)
    waiter: asyncio.Future[None] = loop.create_future()
    conn = WsConn(handler, handshake(host, port, path, headers), waiter)
    try:
        async with asyncio.timeout(timeout):
            if source is None or source == "127.0.0.1":
                # The kernel picks 127.0.0.1 by itself: one call, the cheapest path.
                await loop.create_connection(lambda: conn, host, port)
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                    sock.bind((source, 0))
                    await loop.sock_connect(sock, (host, port))
                except BaseException:
                    sock.close()
                    raise
                await loop.create_connection(lambda: conn, sock=sock)
            await waiter
    except BaseException:
        if conn.transport is not None:
            conn.transport.abort()
        raise
    return conn


class HttpClient:
    """One keep-alive HTTP/1.1 connection; requests go one at a time."""

    def __init__(self, url: str, api_key: str) -> None:
        self.host, self.port = host_port(url)
        self.api_key = api_key
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.sent_at = 0.0  # monotonic time the last request was written

    async def request(
        self, method: str, path: str, body: bytes = b"", timeout: float = 10.0
    ) -> tuple[int, bytes]:
        reused = self.writer is not None
        try:
            return await asyncio.wait_for(self._request(method, path, body), timeout)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.close()
            if not reused:
                raise
        except BaseException:
            self.close()
            raise
        # The server closed the idle keep-alive connection: once more on a fresh one.
        try:
            return await asyncio.wait_for(self._request(method, path, body), timeout)
        except BaseException:
            self.close()
            raise

    async def _request(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: Bearer {self.api_key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.sent_at = time.monotonic()
        self.writer.write(head.encode("latin-1") + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        payload = await self.reader.readexactly(length) if length else b""
        if close:
            self.close()
        return status, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None
