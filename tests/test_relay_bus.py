"""The relay across nodes: relay cores in one process, each with its own ``RedisBus``.

A real redis-server (tests/redis_server.py) carries everything between
them: a tab on core A, an agent on core B, and later the tab moving to C.
What crosses Redis is checked in Redis itself (``INFO commandstats``,
``PUBSUB NUMSUB``): nothing for an unwatched session.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest
from redis.asyncio import Redis

from hub.record import Session
from hub.relay import Emit, Join, Leave, Limits, Relay, Send, binary_header
from hub.relay_bus import RedisBus, up_channel
from tests.redis_server import RedisServer, have_redis

pytestmark = pytest.mark.skipif(not have_redis(), reason="redis-server is not installed")

P = "proj"
KEY = (P, "s1")


class Sink:
    def __init__(self) -> None:
        self.text: list[dict[str, Any]] = []
        self.binary: list[bytes] = []

    def buffered(self) -> int:
        return 0

    def send_text(self, frame: bytes) -> None:
        self.text.append(json.loads(frame))

    def send_binary(self, frame: bytes) -> None:
        self.binary.append(frame)

    def close(self, code: int, reason: str) -> None:
        raise AssertionError(f"closed {code} {reason}")

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.text if f["type"] == kind]


async def until(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await anyio.sleep(0.01)


def emit(event: str, data: Any) -> tuple[Emit, int]:
    raw = msgspec.json.encode({"type": "emit", "event": event, "data": data})
    return msgspec.json.decode(raw, type=Emit), len(raw)


def session(sid: str, tabs: int) -> Session:
    return Session(sessionID=sid, projectKey=P, projectId=1, timestamp=0, lastActiveAt=0, tabs=tabs)


@asynccontextmanager
async def nodes(url: str, *names: str) -> AsyncIterator[list[Relay]]:
    relays = []
    async with anyio.create_task_group() as tg:
        for name in names:
            bus = RedisBus(url, name)
            relays.append(Relay(Limits(join_wait=5.0), lambda p, s: True, bus))
            tg.start_soon(bus.run)
        buses = [r.bus for r in relays]
        await until(lambda: all(isinstance(b, RedisBus) and b.connected for b in buses), "buses connected")
        yield relays
        tg.cancel_scope.cancel()


async def publishes(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_publish", {}).get("calls", 0))


async def test_a_tab_and_an_agent_on_two_nodes_relay_through_redis_only_while_joined() -> None:
    with RedisServer() as server:
        redis = Redis.from_url(server.url)
        async with nodes(server.url, "A", "B") as (a, b):
            tab_sink = Sink()
            tab = a.add_tab(P, "s1", "t1", tab_sink, time.monotonic())
            quiet = a.add_tab(P, "s2", "t1", Sink(), time.monotonic())

            # Unwatched: emits cost Redis nothing.
            before = await publishes(redis)
            for i in range(20):
                a.emit(tab, *emit("click", i), time.monotonic())
            await anyio.sleep(0.2)
            assert await publishes(redis) == before

            # The join crosses: the agent's answer lists the tab of the other node.
            agent_sink = Sink()
            agent = b.add_agent(P, agent_sink)
            b.join(agent, Join("s1", {"name": "Bo"}), time.monotonic())
            await until(lambda: bool(agent_sink.of("joined")), "joined")
            assert agent_sink.of("joined") == [{"type": "joined", "sessionID": "s1", "tabs": ["t1"]}]
            await until(lambda: bool(tab_sink.of("agents")), "the agents notice")
            assert tab_sink.of("agents")[-1] == {
                "type": "agents",
                "count": 1,
                "agents": [{"id": agent.id, "agent": {"name": "Bo"}}],
            }

            # Emits arrive in order; a binary payload byte for byte.
            for i in range(200):
                a.emit(tab, *emit("click", i), time.monotonic())
            payload = bytes(range(256)) * 64
            a.emit_binary(tab, payload, time.monotonic())
            a.emit(tab, *emit("after", None), time.monotonic())
            await until(lambda: len(agent_sink.of("session.event")) == 201, "201 events")
            got = agent_sink.of("session.event")
            assert [e["data"] for e in got[:200]] == list(range(200))
            assert {(e["sessionID"], e["tab"]) for e in got} == {("s1", "t1")}
            assert agent_sink.binary == [binary_header("s1", "t1") + payload]

            # The other session's tab still costs nothing.
            before = await publishes(redis)
            a.emit(quiet, *emit("click", 0), time.monotonic())
            await anyio.sleep(0.1)
            assert await publishes(redis) == before

            # The agent talks back: to the tab on the other node.
            b.send(agent, Send("s1", "message", msgspec.Raw(b'{"text":"hi"}')), time.monotonic())
            b.send(agent, Send("s1", "control", msgspec.Raw(b"2"), tab="t1"), time.monotonic())
            b.send(agent, Send("s1", "control", msgspec.Raw(b"3"), tab="elsewhere"), time.monotonic())
            await until(lambda: len(tab_sink.of("agent.event")) == 2, "two agent events")
            assert tab_sink.of("agent.event") == [
                {"type": "agent.event", "agent": agent.id, "event": "message", "data": {"text": "hi"}},
                {"type": "agent.event", "agent": agent.id, "event": "control", "data": 2},
            ]

            # Leave: the tab is told, and the session stops crossing Redis.
            b.leave(agent, Leave("s1"))
            await until(lambda: tab_sink.of("agents")[-1]["count"] == 0, "the agents notice after leave")
            await until(lambda: not a.rooms[KEY].remote_agents, "A forgot the join")
            numsub = await redis.pubsub_numsub(up_channel(KEY))
            assert numsub == [(up_channel(KEY).encode(), 0)]
            assert await redis.pubsub_channels("*relay*") == [b"{relay}:ctl"]
            before = await publishes(redis)
            for i in range(20):
                a.emit(tab, *emit("click", i), time.monotonic())
            await anyio.sleep(0.2)
            assert await publishes(redis) == before
            assert len(agent_sink.of("session.event")) == 201
        await redis.aclose()


async def test_a_tab_moving_to_another_node_keeps_its_joined_agent() -> None:
    with RedisServer() as server:
        async with nodes(server.url, "A", "B", "C") as (a, b, c):
            old = Sink()
            tab = a.add_tab(P, "s1", "t1", old, time.monotonic())
            agent_sink = Sink()
            agent = b.add_agent(P, agent_sink)
            b.join(agent, Join("s1", {"name": "Bo"}), time.monotonic())
            await until(lambda: bool(old.of("agents")), "A's tab told")
            a.emit(tab, *emit("on", "A"), time.monotonic())
            await until(lambda: len(agent_sink.of("session.event")) == 1, "A's event")

            # The page reloads onto node C within its grace: A lets the tab go,
            # C starts it, and the registry tells every node the tabs changed.
            a.remove_tab(tab)
            new = Sink()
            moved = c.add_tab(P, "s1", "t1", new, time.monotonic())
            assert new.text == []  # C does not know yet
            b.session_changed(session("s1", 1), {"tabs": 1})
            await until(lambda: bool(new.of("agents")), "C's tab told who watches")
            assert new.of("agents")[-1]["agents"] == [{"id": agent.id, "agent": {"name": "Bo"}}]
            assert KEY not in a.rooms  # A kept nothing

            for i in range(50):
                c.emit(moved, *emit("on", i), time.monotonic())
            await until(lambda: len(agent_sink.of("session.event")) == 51, "C's events")
            assert [e["data"] for e in agent_sink.of("session.event")] == ["A", *range(50)]
            b.send(agent, Send("s1", "message", msgspec.Raw(b'"back"')), time.monotonic())
            await until(lambda: bool(new.of("agent.event")), "the agent's event on C")
            assert old.of("agent.event") == []
