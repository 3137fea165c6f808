"""A lean WebSocket client for benchmarks: hand-written handshake and framing.

The websockets client costs ~440 µs of CPU per handshake (FACTS.md), which
would make the load generator the bottleneck. Frames are masked with a zero
key (valid per RFC 6455, and the payload goes out unchanged).
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One masked client frame (zero mask key)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload


def handshake(path: str, host: str = "127.0.0.1", headers: dict[str, str] | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class RawWs:
    """An asyncio WebSocket client connection; ``recv`` returns (opcode, payload)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, path: str, headers: dict[str, str] | None = None) -> RawWs:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(handshake(path, headers=headers))
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            writer.close()
            raise ConnectionError(head.split(b"\r\n", 1)[0].decode("latin-1"))
        return cls(reader, writer)

    def send(self, payload: bytes) -> None:
        self.writer.write(frame(payload))

    async def recv(self) -> tuple[int, bytes]:
        b0, b1 = await self.reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return b0 & 0x0F, await self.reader.readexactly(n)

    def close(self) -> None:
        self.writer.close()
