"""Deferred HTTP answers (hub/routes.py, hub/http1.py): a handler returns an awaitable of its
response; the connection parses nothing more until it is written, in order, over real sockets.

The deferred route is test-only, added to a running in-process hub's route table.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from hub.http_api import Request, Response
from hub.routes import Deferred
from tests.helpers import API_KEY, RunningHub, http, running_hub, wait_for

ORIGIN = "https://app.example"
PATH = "/public/p1/deferred"


@dataclass
class Handlers:
    """The test route's handlers: what each deferred answer waits for, and what happened."""

    # A future several requests may wait on (a project's bootstrap, say).
    shared: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    # Coroutines started, and cancelled, by label.
    started: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    # Set to let a "gate" answer go.
    gate: asyncio.Event = field(default_factory=asyncio.Event)

    def get(self, request: Request) -> Response | Deferred:
        mode = request.params["mode"]
        if mode == "now":
            return Response(200, b'{"answer":"now"}')
        if mode == "sleep":
            return self._after(request, asyncio.sleep(float(request.query.partition("=")[2])), "sleep")
        if mode == "gate":
            return self._after(request, self.gate.wait(), "gate")
        if mode == "shared":
            # A future, not a coroutine: the route table shields it.
            return self._shared(request)
        if mode == "never":
            return self._after(request, asyncio.Event().wait(), "never")
        if mode == "fail":
            return self._fail()
        return Response(404, b'{"error":"no such mode"}')

    def post(self, request: Request) -> Response | Deferred:
        return self._after(request, asyncio.sleep(0.1), "post")

    async def _after(self, request: Request, waited: Any, label: str) -> Response:
        self.started.append(label)
        try:
            await waited
        except asyncio.CancelledError:
            self.cancelled.append(label)
            raise
        body = {"answer": label, "path": request.path, "bytes": len(request.body)}
        return Response(200, json.dumps(body).encode())

    def _shared(self, request: Request) -> Deferred:
        fut: asyncio.Future[Response] = asyncio.get_running_loop().create_future()

        def done(shared: asyncio.Future[None]) -> None:
            if not fut.done():
                fut.set_result(Response(200, b'{"answer":"shared"}'))

        self.shared.add_done_callback(done)
        return fut

    async def _fail(self) -> Response:
        await asyncio.sleep(0.01)
        raise RuntimeError("the handler broke")


@asynccontextmanager
async def deferred_hub(**overrides: Any) -> AsyncIterator[tuple[RunningHub, Handlers]]:
    async with running_hub(cors_origins=(ORIGIN,), **overrides) as hub:
        handlers = Handlers()
        hub.hub.routes.http(
            "/public/{projectKey}/deferred/{mode}", get=handlers.get, post=handlers.post, auth=True, cors=True
        )
        yield hub, handlers


def request(path: str, method: str = "GET", body: bytes = b"", close: bool = False) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x", f"Authorization: Bearer {API_KEY}", f"Origin: {ORIGIN}"]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    # Seconds from the client's first write.
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """One raw connection: requests written as given, answers read in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.t0 = time.monotonic()

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, head_only: bool = False, timeout: float = 5.0) -> Answer:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = b"" if head_only else await asyncio.wait_for(self.reader.readexactly(length), timeout)
        return Answer(int(status_line.split()[1]), headers, body, time.monotonic() - self.t0)

    async def closed(self, timeout: float = 5.0) -> bool:
        return await asyncio.wait_for(self.reader.read(1), timeout) == b""

    def close(self) -> None:
        self.writer.close()


async def test_a_deferred_answer_comes_when_ready_with_cors_and_outlives_the_request_deadline() -> None:
    # The connection's own deadline (handshake timeout) is far shorter than the wait.
    async with deferred_hub(handshake_timeout=0.3) as (hub, _):
        client = await Client.open(hub.port)
        await client.send(request(f"{PATH}/sleep?s=0.8"))
        answer = await client.answer()
        assert answer.status == 200 and answer.json()["answer"] == "sleep"
        assert answer.at >= 0.8
        assert answer.headers["access-control-allow-origin"] == ORIGIN, "CORS decorates deferred answers"
        # The connection is kept alive and answers the next request at once.
        await client.send(request(f"{PATH}/now"))
        assert (await client.answer()).json() == {"answer": "now"}
        client.close()


async def test_pipelined_requests_behind_a_deferred_one_are_answered_in_order() -> None:
    async with deferred_hub() as (hub, handlers):
        client = await Client.open(hub.port)
        # Three requests in one write: the first waits, the two behind it are parsed already.
        await client.send(request(f"{PATH}/gate") + request(f"{PATH}/now") + request("/healthz"))
        await wait_for(lambda: handlers.started == ["gate"])
        # More while it waits: a POST with a body larger than the connection holds before it pauses.
        big = b"x" * (200 << 10)
        await client.send(request(f"{PATH}/now") + request(f"{PATH}/post", "POST", big))
        (conn,) = hub.hub.server.connections
        await wait_for(lambda: conn.paused, what="reading paused past the hold limit")  # type: ignore[union-attr]
        await asyncio.sleep(0.1)
        # Nothing is answered before the first.
        assert client.reader.at_eof() is False and len(client.reader._buffer) == 0  # type: ignore[attr-defined]
        handlers.gate.set()
        answers = [await client.answer() for _ in range(5)]
        assert [a.status for a in answers] == [200] * 5
        assert answers[0].json()["answer"] == "gate"
        assert answers[1].json() == {"answer": "now"}
        assert answers[2].json() == {"status": "ok"}
        assert answers[3].json() == {"answer": "now"}
        assert answers[4].json() == {"answer": "post", "path": f"{PATH}/post", "bytes": len(big)}
        # Still alive: reading resumed after the pause.
        await client.send(request(f"{PATH}/now"))
        assert (await client.answer()).json() == {"answer": "now"}
        client.close()


async def test_a_client_gone_before_its_answer_cancels_the_work_and_leaves_no_connection() -> None:
    async with deferred_hub() as (hub, handlers):
        server = hub.hub.server
        client = await Client.open(hub.port)
        await client.send(request(f"{PATH}/never"))
        await wait_for(lambda: handlers.started == ["never"])
        assert len(server.connections) == 1
        client.close()
        await wait_for(lambda: handlers.cancelled == ["never"], what="the handler's coroutine cancelled")
        await wait_for(lambda: not server.connections, what="the connection forgotten")


async def test_a_shared_future_is_not_cancelled_by_one_client_leaving() -> None:
    async with deferred_hub() as (hub, handlers):
        leaving = await Client.open(hub.port)
        staying = await Client.open(hub.port)
        await leaving.send(request(f"{PATH}/shared"))
        await staying.send(request(f"{PATH}/shared"))
        await wait_for(lambda: len(hub.hub.server.connections) == 2)
        leaving.close()
        await wait_for(lambda: len(hub.hub.server.connections) == 1)
        assert not handlers.shared.cancelled()
        handlers.shared.set_result(None)
        assert (await staying.answer()).json() == {"answer": "shared"}
        staying.close()


async def test_past_the_bound_a_deferred_answer_is_a_503_with_retry_after_and_the_connection_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with deferred_hub() as (hub, handlers):
        hub.hub.routes.defer_timeout = 0.3
        client = await Client.open(hub.port)
        await client.send(request(f"{PATH}/never") + request(f"{PATH}/now"))
        answer = await client.answer()
        assert answer.status == 503
        assert answer.headers["retry-after"] == "1"
        assert answer.headers["access-control-allow-origin"] == ORIGIN
        assert "no answer within 0.3 s" in answer.json()["error"]
        assert 0.3 <= answer.at < 2.0
        assert handlers.cancelled == ["never"], "the late work is cancelled"
        assert (await client.answer()).json() == {"answer": "now"}
        client.close()


async def test_a_deferred_handler_that_raises_is_a_500_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    async with deferred_hub() as (hub, _):
        with caplog.at_level(logging.ERROR, logger="hub.server"):
            reply = await http(hub.port, "GET", f"{PATH}/fail", headers={"Origin": ORIGIN})
        assert reply.status == 500 and reply.json() == {"error": "internal error"}
        assert reply.headers["access-control-allow-origin"] == ORIGIN
        assert "the handler broke" in caplog.text


async def test_head_of_a_deferred_answer_has_the_get_headers_and_no_body() -> None:
    async with deferred_hub() as (hub, _):
        client = await Client.open(hub.port)
        # The HEAD's answer is followed at once by the next one's: no body between.
        await client.send(request(f"{PATH}/sleep?s=0.1", "HEAD") + request(f"{PATH}/now"))
        head = await client.answer(head_only=True)
        get = await client.answer()
        assert head.status == 200 and int(head.headers["content-length"]) > 0
        assert get.json() == {"answer": "now"}
        client.close()


async def test_auth_is_checked_before_a_handler_defers() -> None:
    async with deferred_hub() as (hub, handlers):
        reply = await http(hub.port, "GET", f"{PATH}/never", key="wrong")
        assert reply.status == 401 and handlers.started == []


def test_deferred_answers_under_uvloop() -> None:
    """The CLI's event loop: pipelining, a pause past the hold limit, and a client leaving."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        await test_pipelined_requests_behind_a_deferred_one_are_answered_in_order()
        await test_a_client_gone_before_its_answer_cancels_the_work_and_leaves_no_connection()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
