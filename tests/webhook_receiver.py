"""A webhook receiver for tests: a raw asyncio HTTP/1.1 server over real sockets.

It records every POST it reads (the exact body bytes and the headers) and answers 204, or 500
(``fail``), or nothing at all (``stall``); ``stop`` closes its socket and every connection (the
receiver is down: connection refused) and ``start`` opens it again on the same port.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.time)

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed

    def verified(self, secret: str) -> bool:
        """The receiver's check, as README "Webhooks" shows it."""
        expected = "sha256=" + hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, self.headers.get("x-hub-signature", ""))


class Receiver:
    def __init__(self) -> None:
        self.port = 0
        self.mode = "ok"  # ok | fail | stall
        self.deliveries: list[Delivery] = []
        self.attempts = 0  # requests read, whatever the answer
        self.connections = 0  # TCP connections accepted (reuse keeps it low)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.arrived = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Down: the listening socket and every open connection closed."""
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> Receiver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            await self.stop()

    def events(self) -> list[dict[str, Any]]:
        return [d.event for d in self.deliveries]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.attempts += 1
                if self.mode == "stall":
                    await asyncio.Event().wait()
                if self.mode == "fail":
                    writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nfail")
                    continue
                self.deliveries.append(Delivery(headers, body))
                self.arrived.set()
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
