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
from redis.asyncio.cluster import RedisCluster as ClusterClient

from hub.record import Session
from hub.relay import Emit, Join, Leave, Limits, Relay, Send, binary_header
from hub.relay_bus import RedisBus, up_channel
from tests.redis_server import RedisCluster, RedisServer, have_redis

pytestmark = pytest.mark.skipif(not have_redis(), reason="redis-server is not installed")

P = "proj"
KEY = (P, "s1")


class Sink:
    def __init__(self) -> None:
        self.text: list[dict[str, Any]] = []
        self.binary: list[bytes] = []

    def buffered(self) -> int:
        return 0

    def watched(self, on: bool) -> None:
        pass

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
async def nodes(url: str, *names: str, join_wait: float = 5.0) -> AsyncIterator[list[Relay]]:
    relays = []
    async with anyio.create_task_group() as tg:
        for name in names:
            bus = RedisBus(url, name)
            relays.append(Relay(Limits(join_wait=join_wait), lambda p, s: True, bus))
            tg.start_soon(bus.run)
        buses = [r.bus for r in relays]
        # Connected, and said hello (so that publish is not counted as an event's).
        await until(lambda: all(isinstance(b, RedisBus) and b.published for b in buses), "buses connected")
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

            # B drains: C forgets its agents and stops publishing.
            assert isinstance(b.bus, RedisBus)
            await b.bus.leave()
            await until(lambda: new.of("agents")[-1]["count"] == 0, "C's tab told B's agents left")
            assert not c.rooms[KEY].remote_agents


async def test_a_join_of_a_session_with_no_tab_anywhere_is_answered_after_the_wait() -> None:
    with RedisServer() as server:
        async with nodes(server.url, "A", "B", join_wait=0.3) as (_, b):
            agent_sink = Sink()
            started = time.monotonic()
            b.join(b.add_agent(P, agent_sink), Join("s1"), started)
            await anyio.sleep(0.1)
            b.tick(time.monotonic())
            assert agent_sink.text == []  # the tabs' nodes may still answer
            await anyio.sleep(0.25)
            b.tick(time.monotonic())
            assert agent_sink.text == [{"type": "joined", "sessionID": "s1", "tabs": []}]


async def test_on_a_redis_cluster_the_relay_uses_sharded_pub_sub_only_while_joined() -> None:
    with RedisCluster() as cluster:
        redis = ClusterClient.from_url(cluster.url.replace("redis+cluster", "redis"))
        await redis.initialize()
        async with nodes(cluster.url, "A", "B") as (a, b):
            tab_sink = Sink()
            tab = a.add_tab(P, "s1", "t1", tab_sink, time.monotonic())
            agent_sink = Sink()
            agent = b.add_agent(P, agent_sink)
            b.join(agent, Join("s1"), time.monotonic())
            await until(lambda: bool(agent_sink.of("joined")), "joined")
            assert agent_sink.of("joined")[0]["tabs"] == ["t1"]
            for i in range(100):
                a.emit(tab, *emit("click", i), time.monotonic())
            payload = b"\x00\xff" * 5000
            a.emit_binary(tab, payload, time.monotonic())
            await until(lambda: len(agent_sink.binary) == 1, "the binary frame")
            assert [e["data"] for e in agent_sink.of("session.event")] == list(range(100))
            assert agent_sink.binary == [binary_header("s1", "t1") + payload]
            b.send(agent, Send("s1", "message", msgspec.Raw(b"1")), time.monotonic())
            await until(lambda: bool(tab_sink.of("agent.event")), "the agent event")

            b.leave(agent, Leave("s1"))
            await until(lambda: tab_sink.of("agents")[-1]["count"] == 0, "the agents notice after leave")
            await until(lambda: not a.rooms[KEY].remote_agents, "A forgot the join")
            shard = redis.get_node_from_key(up_channel(KEY))
            numsub = await redis.execute_command("PUBSUB SHARDNUMSUB", up_channel(KEY), target_nodes=shard)
            assert numsub == [(up_channel(KEY).encode(), 0)]
            before = await spublishes(redis)
            for i in range(20):
                a.emit(tab, *emit("click", i), time.monotonic())
            await anyio.sleep(0.2)
            assert await spublishes(redis) == before
        await redis.aclose()


async def spublishes(redis: ClusterClient) -> int:
    stats = await redis.info("commandstats", target_nodes="all")
    return sum(int(s.get("cmdstat_spublish", {}).get("calls", 0)) for s in stats.values())


async def test_after_a_redis_restart_the_nodes_resubscribe_and_the_join_holds() -> None:
    with RedisServer() as server:
        async with nodes(server.url, "A", "B") as (a, b):
            tab = a.add_tab(P, "s1", "t1", Sink(), time.monotonic())
            agent_sink = Sink()
            b.join(b.add_agent(P, agent_sink), Join("s1"), time.monotonic())
            await until(lambda: bool(agent_sink.of("joined")), "joined")
            assert isinstance(a.bus, RedisBus) and isinstance(b.bus, RedisBus)
            buses = (a.bus, b.bus)

            heard = a.bus.received
            server.kill()
            await until(lambda: not any(bus.connected for bus in buses), "both saw Redis go")
            a.emit(tab, *emit("lost", 0), time.monotonic())  # dropped, not queued
            assert a.bus.dropped >= 1
            server.start()  # empty, as after a restart: no subscription survives
            await until(lambda: all(bus.connected for bus in buses), "both back", timeout=10.0)
            # B subscribed again and re-sent its join (A hears it).
            async with Redis.from_url(server.url) as redis:
                with anyio.fail_after(5):
                    while await redis.pubsub_numsub(up_channel(KEY)) != [(up_channel(KEY).encode(), 1)]:
                        await anyio.sleep(0.01)
            await until(lambda: a.bus.received > heard, "B's join re-sent")
            a.emit(tab, *emit("back", 1), time.monotonic())
            await until(lambda: bool(agent_sink.of("session.event")), "an event after the restart")
            assert [e["event"] for e in agent_sink.of("session.event")] == ["back"]


async def test_an_unreachable_redis_is_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on: every attempt is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bus = RedisBus(f"redis://127.0.0.1:{port}", "lonely")
    with caplog.at_level("WARNING", logger="hub.relay"), anyio.move_on_after(3):
        await bus.run()  # retries every 0.1-2 s, for 3 s
    down = [r for r in caplog.records if r.getMessage() == "relay.redis_down"]
    assert len(down) == 1, [r.__dict__.get("fields") for r in down]
