"""A stream-based raw WebSocket client for floods and protocol tests.

Framing and the handshake are loadtest.client's; this only reads frames
back with asyncio streams, one at a time, as a test wants them.
"""

from __future__ import annotations

import asyncio
import struct

from loadtest.client import frame, handshake


class RawWs:
    """An asyncio WebSocket client connection; ``recv`` returns (opcode, payload)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, path: str, headers: dict[str, str] | None = None) -> RawWs:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(handshake("127.0.0.1", port, path, list((headers or {}).items())))
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
