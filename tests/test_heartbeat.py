"""The transport's hooks for a protocol that speaks first and pings in its own messages (Engine.IO).

``Heartbeat`` alone with a fake clock; then a real WebSocket to an in-process server whose
endpoint greets with Engine.IO's open packet, the sweep driven at chosen (fake) instants.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from hub.auth import Auth
from hub.config import Settings
from hub.http_api import Request
from hub.routes import RouteTable
from hub.server import Server
from hub.socketio import PING, PONG, encode_open
from hub.websocket import Beat, Heartbeat, WebSocketConnection
from hub.wire import CloseCode

INTERVAL, TIMEOUT = 25.0, 20.0


# The timer alone ---------------------------------------------------------------------


def test_pings_every_interval_after_the_last_answer() -> None:
    beat = Heartbeat(PING, INTERVAL, TIMEOUT)
    beat.begin(100.0)
    assert beat.poll(124.9) is None
    assert beat.poll(125.0) is Beat.PING
    assert beat.poll(125.1) is None, "one ping outstanding at a time"
    beat.answered(126.0)
    assert beat.poll(150.9) is None
    assert beat.poll(151.0) is Beat.PING


def test_no_answer_within_the_timeout_times_out() -> None:
    beat = Heartbeat(PING, INTERVAL, TIMEOUT)
    beat.begin(0.0)
    assert beat.poll(25.0) is Beat.PING
    assert beat.poll(44.99) is None
    assert beat.poll(45.0) is Beat.TIMED_OUT


def test_a_late_sweep_counts_the_timeout_from_the_ping_it_sends() -> None:
    beat = Heartbeat(PING, INTERVAL, TIMEOUT)
    beat.begin(0.0)
    assert beat.poll(26.0) is Beat.PING, "a sweep a second late"
    assert beat.poll(45.5) is None
    assert beat.poll(46.0) is Beat.TIMED_OUT


def test_an_answer_without_a_ping_outstanding_postpones_the_next() -> None:
    # As engine.io's server: any pong refreshes the interval timer.
    beat = Heartbeat(PING, INTERVAL, TIMEOUT)
    beat.begin(0.0)
    beat.answered(20.0)
    assert beat.poll(44.9) is None
    assert beat.poll(45.0) is Beat.PING


# Over a socket ---------------------------------------------------------------------------


class EngineIO:
    """Greets with the open packet; answers nothing; a pong is an answer to the heartbeat."""

    idle_timeout: float | None = None
    keepalive = False

    def __init__(self, conn: WebSocketConnection) -> None:
        self.conn = conn
        self.messages: list[bytes] = []
        self.closed_with: bool | None = None
        conn.greet(encode_open("sid-1", 25_000, 20_000, 1_000_000), Heartbeat(PING, INTERVAL, TIMEOUT))

    def receive(self, data: bytes, now: int) -> bytes | None:
        if data == PONG:
            self.conn.answered()
        else:
            self.messages.append(data)
        return None

    def receive_binary(self, data: bytes, now: int) -> bytes | None:
        return None

    def closed(self, now: int, timed_out: bool) -> None:
        self.closed_with = timed_out

    def writable(self) -> None:
        pass


@pytest.fixture
async def served() -> AsyncIterator[tuple[Server, list[EngineIO]]]:
    settings = Settings(port=0, rate_limit=0)
    routes = RouteTable(settings, Auth(""), accepting_websockets=lambda: True)
    endpoints: list[EngineIO] = []

    def route(_request: Request, conn: WebSocketConnection) -> EngineIO:
        endpoints.append(EngineIO(conn))
        return endpoints[-1]

    routes.websocket("/socket/", route)
    server = Server(settings, routes)
    await server.start()
    yield server, endpoints
    server.stop_accepting()
    server.close_all(1001, "done")
    await server.wait_closed(2.0)


def only_connection(server: Server) -> WebSocketConnection:
    (conn,) = [c for c in server.connections if isinstance(c, WebSocketConnection)]
    assert conn.heartbeat is not None
    return conn


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def recv(ws: ClientConnection) -> str | bytes:
    async with asyncio.timeout(5):
        return await ws.recv()


async def test_the_server_speaks_first_then_pings_and_closes_a_peer_that_stops_answering(
    served: tuple[Server, list[EngineIO]],
) -> None:
    server, endpoints = served
    async with connect(f"ws://127.0.0.1:{server.port}/socket/?EIO=4&transport=websocket") as ws:
        first = await recv(ws)
        assert isinstance(first, str) and first[0] == "0"
        assert json.loads(first[1:]) == {
            "sid": "sid-1",
            "upgrades": [],
            "pingInterval": 25000,
            "pingTimeout": 20000,
            "maxPayload": 1000000,
        }
        conn = only_connection(server)
        heartbeat = conn.heartbeat
        assert heartbeat is not None

        conn.expire(heartbeat.due - 0.01)
        await ws.send("40")
        await until(lambda: endpoints[0].messages == [b"40"])
        conn.expire(heartbeat.due)
        assert await recv(ws) == "2"

        # Traffic that is not the answer does not count; the answer does.
        await ws.send('42["x"]')
        await until(lambda: len(endpoints[0].messages) == 2)
        assert heartbeat.deadline != float("inf")
        await ws.send("3")
        await until(lambda: heartbeat.deadline == float("inf"))
        conn.expire(heartbeat.due - 0.01)
        conn.expire(heartbeat.due)
        assert await recv(ws) == "2"

        # No answer this time: closed when the timeout passes, as a timed-out connection.
        conn.expire(heartbeat.deadline - 0.01)
        assert conn.open
        conn.expire(heartbeat.deadline)
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (CloseCode.IDLE_TIMEOUT, "ping timeout")
    await until(lambda: endpoints[0].closed_with is not None)
    assert endpoints[0].closed_with is True
    assert server.limits["idle_timeout"] == 1


def test_a_peer_that_never_connects_is_let_go_at_the_connect_timeout() -> None:
    beat = Heartbeat(PING, INTERVAL, TIMEOUT, connect_timeout=45.0)
    beat.begin(0.0)
    assert beat.poll(25.0) is Beat.PING
    beat.answered(26.0)  # answering pings is not joining
    assert beat.poll(44.9) is None
    assert beat.poll(45.0) is Beat.NOT_CONNECTED


def test_a_connected_peer_has_no_connect_deadline() -> None:
    beat = Heartbeat(PING, INTERVAL, TIMEOUT, connect_timeout=45.0)
    beat.begin(0.0)
    beat.connected()
    assert beat.poll(25.0) is Beat.PING
    beat.answered(30.0)
    assert beat.poll(50.0) is None
