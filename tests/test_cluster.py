"""Cluster mode over real Redis and real hub processes, killed for real (CONTRACT §5, §6).

The registry's bookkeeping of several nodes' parts, without I/O: test_unit_registry.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.helpers import API_KEY, FrameLog, HubProcess, http, wait_for
from tests.redis_server import RedisCluster, RedisServer, have_redis

pytestmark = pytest.mark.skipif(not have_redis(), reason="redis-server is not installed")

LEASE = 1.5


def node(redis_url: str, name: str, *args: str) -> HubProcess:
    return HubProcess(
        "--redis-url", redis_url,
        "--node-id", name,
        "--api-key", API_KEY,
        "--node-lease", str(LEASE),
        "--grace", "20",
        *args,
    )  # fmt: skip


@contextmanager
def cluster(redis_url: str, count: int, *args: str) -> Iterator[list[HubProcess]]:
    with ExitStack() as stack:
        nodes = [stack.enter_context(node(redis_url, f"n{i}", *args)) for i in range(count)]
        for n in nodes:
            n.wait_ready(path="/readyz")
        yield nodes


async def sessions_of(port: int) -> dict[str, dict[str, Any]]:
    reply = await http(port, "POST", "/public/p1/assist/sessions", {"limit": 1000})
    assert reply.status == 200, reply.body
    return {s["sessionID"]: s for s in reply.json()["data"]["sessions"]}


View = dict[str, dict[str, Any]]


async def agreed(
    nodes: list[HubProcess], expect: set[str] | None = None, until: Callable[[View], bool] | None = None
) -> View | None:
    """Every node's answer when they are all equal (and hold ``expect``, and it passes
    ``until``), else None."""
    answers = [await sessions_of(n.port) for n in nodes]
    first = answers[0]
    if any(a != first for a in answers[1:]):
        return None
    if expect is not None and set(first) != expect:
        return None
    if until is not None and not until(first):
        return None
    return first


async def wait_agreed(
    nodes: list[HubProcess],
    expect: set[str] | None = None,
    timeout: float = 5.0,
    until: Callable[[View], bool] | None = None,
) -> View:
    async def check() -> Any:
        got = await agreed(nodes, expect, until)
        return (got,) if got is not None else None

    (result,) = await wait_for(check, timeout=timeout, interval=0.02)
    return result  # type: ignore[no-any-return]


async def tracker(port: int, sid: str, **fields: Any) -> ClientConnection:
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws/tracker/p1")
    await ws.send(json.dumps({"type": "start", "sessionID": sid, **fields}))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert reply["type"] == "started", reply
    return ws


class AgentLog(FrameLog):
    """An agent connection whose frames are collected in the background."""

    def ends(self) -> dict[str, str]:
        return {f["sessionID"]: f["reason"] for f in self.frames if f["type"] == "session.end"}

    def started(self) -> set[str]:
        return {f["session"]["sessionID"] for f in self.frames if f["type"] == "session.start"}


@asynccontextmanager
async def agent(port: int) -> AsyncIterator[AgentLog]:
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/ws/agent/p1",
        additional_headers={"Authorization": f"Bearer {API_KEY}"},
        max_size=None,
    ) as ws:
        await ws.send(json.dumps({"type": "subscribe"}))
        log = AgentLog(ws)
        await wait_for(lambda: log.frames)
        assert log.frames[0]["type"] == "snapshot"
        try:
            yield log
        finally:
            log.task.cancel()


# -- real nodes ----------------------------------------------------------------------


async def test_three_nodes_and_an_observer_agree_after_every_step() -> None:
    with RedisServer() as redis, cluster(redis.url, 4) as nodes:
        holders, observer = nodes[:3], nodes[3]
        async with agent(observer.port) as watch:
            ws = {
                f"s{i}": await tracker(holders[i % 3].port, f"s{i}", userID=f"u{i}", metadata={"a": "1"})
                for i in range(6)
            }
            view = await wait_agreed(nodes, {f"s{i}" for i in range(6)})
            assert all(s["tabs"] == 1 and s["connected"] for s in view.values())
            assert view["s4"]["userID"] == "u4"

            await ws["s1"].send(json.dumps({"type": "update", "metadata": {"a": "2"}, "pageTitle": "Cart"}))
            view = await wait_agreed(nodes, until=lambda v: v["s1"]["pageTitle"] == "Cart")
            assert view["s1"]["metadata"] == {"a": "2"}
            search = {"filters": [{"name": "a", "operator": "is", "value": ["2"]}]}
            for n in nodes:
                reply = await http(n.port, "POST", "/public/p1/assist/sessions", search)
                assert [s["sessionID"] for s in reply.json()["data"]["sessions"]] == ["s1"]

            # A second tab of s0 (held by node 0) on node 1: one session, two tabs.
            second = await tracker(holders[1].port, "s0")
            await wait_for(lambda: _tabs(nodes, "s0", 2), timeout=5)

            await ws["s2"].send(json.dumps({"type": "end"}))
            await ws["s3"].close()
            await second.close()
            view = await wait_agreed(
                nodes,
                {f"s{i}" for i in range(6)} - {"s2"},
                until=lambda v: not v["s3"]["connected"] and v["s0"]["tabs"] == 1,
            )
            assert view["s3"]["tabs"] == 0 and view["s0"]["connected"]

            await wait_for(lambda: "s2" in watch.ends())
            assert watch.ends() == {"s2": "ended"}
            assert watch.started() == {f"s{i}" for i in range(6)}
            for w in ws.values():
                await w.close()


async def _tabs(nodes: list[HubProcess], sid: str, tabs: int) -> bool:
    views = [await sessions_of(n.port) for n in nodes]
    return all(sid in v and v[sid]["tabs"] == tabs for v in views)


async def test_a_killed_node_s_sessions_vanish_within_the_lease_unless_they_resume_elsewhere() -> None:
    with RedisServer() as redis, cluster(redis.url, 3) as nodes:
        victim, survivor, observer = nodes
        async with agent(observer.port) as watch:
            moving = await tracker(victim.port, "moving", userID="m")
            await tracker(victim.port, "lost", userID="l")
            await tracker(survivor.port, "stays")
            await wait_agreed(nodes, {"moving", "lost", "stays"})

            victim.kill()  # SIGKILL: no goodbye
            killed_at = time.monotonic()
            # The tracker reconnects elsewhere within its grace and resumes.
            await moving.close()
            resumed = await tracker(survivor.port, "moving")
            await wait_agreed([survivor, observer], {"moving", "stays"}, timeout=LEASE + 1)
            assert time.monotonic() - killed_at <= LEASE + 1
            view = await sessions_of(observer.port)
            assert view["moving"]["connected"] and view["moving"]["tabs"] == 1
            assert view["moving"]["userID"] == "m"

            await wait_for(lambda: "lost" in watch.ends())
            assert watch.ends() == {"lost": "node_lost"}
            await resumed.close()


async def test_a_node_back_under_the_same_id_does_not_resurrect_its_old_sessions() -> None:
    with RedisServer() as redis, cluster(redis.url, 2) as nodes:
        first, other = nodes
        await tracker(first.port, "old")
        await wait_agreed(nodes, {"old"})
        first.kill()
        with node(redis.url, "n0") as again:
            again.wait_ready(path="/readyz")
            # Well within the lease: the new epoch tells peers the old process is gone.
            started = time.monotonic()
            await wait_agreed([again, other], set(), timeout=LEASE)
            assert time.monotonic() - started < LEASE
            await tracker(again.port, "new")
            await wait_agreed([again, other], {"new"})


async def test_a_redis_outage_under_traffic_converges_with_nothing_lost_or_duplicated() -> None:
    with RedisServer() as redis, cluster(redis.url, 3) as nodes:
        live: dict[str, ClientConnection] = {}
        for i in range(9):
            live[f"before{i}"] = await tracker(nodes[i % 3].port, f"before{i}")
        await wait_agreed(nodes, set(live))

        redis.kill()
        outage_end = time.monotonic() + 4 * LEASE  # longer than the lease: nobody is dropped
        i = 0
        while time.monotonic() < outage_end:
            # Traffic on every node while Redis is away.
            live[f"during{i}"] = await tracker(nodes[i % 3].port, f"during{i}")
            gone = live.pop(f"before{i}", None)
            if gone is not None:
                await gone.send(json.dumps({"type": "end"}))
            for ws in list(live.values())[:5]:
                await ws.send(json.dumps({"type": "heartbeat"}))
            # Each node still answers its own trackers' sessions.
            own = await sessions_of(nodes[i % 3].port)
            assert f"during{i}" in own and f"before{i}" not in own
            i += 1
            await asyncio.sleep(0.2)

        redis.start()  # empty, as after a restart
        restarted = time.monotonic()
        view = await wait_agreed(nodes, set(live), timeout=5)
        assert time.monotonic() - restarted <= 5
        assert all(s["connected"] and s["tabs"] == 1 for s in view.values())
        for ws in live.values():
            await ws.close()


async def test_sigterm_moves_sessions_to_peers_within_their_grace() -> None:
    with RedisServer() as redis, cluster(redis.url, 2) as nodes:
        leaving, staying = nodes
        async with agent(staying.port) as watch:
            ws = await tracker(leaving.port, "drained", userID="d")
            await wait_agreed(nodes, {"drained"})
            assert leaving.terminate() == 0
            view = await sessions_of(staying.port)
            assert view["drained"]["connected"] is False
            assert view["drained"]["tabs"] == 0
            await ws.close()
            back = await tracker(staying.port, "drained")
            await wait_for(lambda: _connected(staying.port, "drained"))
            assert watch.ends() == {}
            await back.close()


async def _connected(port: int, sid: str) -> bool:
    view = await sessions_of(port)
    return sid in view and view[sid]["connected"]


async def test_readyz_is_503_until_the_node_bootstrapped_from_redis() -> None:
    with RedisServer() as redis:
        redis.kill()  # a Redis that is down when the node starts, on a port known to be redis's
        with node(redis.url, "late") as hub:
            hub.wait_ready(path="/healthz")
            assert (await http(hub.port, "GET", "/readyz")).status == 503
            redis.start()
            hub.wait_ready(path="/readyz", timeout=10)


async def test_redis_cluster_with_sharded_pubsub() -> None:
    with RedisCluster() as redis, cluster(redis.url, 2) as nodes:
        ws = await tracker(nodes[0].port, "sharded", userID="s")
        await wait_agreed(nodes, {"sharded"})
        await ws.send(json.dumps({"type": "update", "userID": "t"}))
        await wait_for(lambda: _user(nodes[1].port, "sharded", "t"))
        await ws.send(json.dumps({"type": "end"}))
        await wait_agreed(nodes, set())
        # The changes went through the project's shard channel, not the cluster-wide bus.
        shard = await _shard_channels(redis)
        assert "{p:p1}:ch" in shard


async def _user(port: int, sid: str, user: str) -> bool:
    view = await sessions_of(port)
    return sid in view and view[sid]["userID"] == user


async def _shard_channels(redis: RedisCluster) -> set[str]:
    found: set[str] = set()
    for n in redis.nodes:
        proc = await asyncio.create_subprocess_exec(
            "redis-cli", "-p", str(n.port), "pubsub", "shardchannels", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        found.update(out.decode().split())
    return found


async def test_workers_share_one_port_and_each_is_a_node() -> None:
    with RedisServer() as redis, node(redis.url, "w", "--workers", "2") as hub:
        hub.wait_ready(path="/readyz")
        await wait_for(lambda: _node_names(redis.port) == {"w-0", "w-1"}, timeout=10)
        ws = [await tracker(hub.port, f"w{i}") for i in range(16)]
        held = await wait_for(lambda: _held_per_node(redis.port), timeout=5)
        # The kernel spread the connections: both workers hold some.
        assert all(held.values()) and sum(held.values()) == 16
        for _ in range(8):
            # Whichever worker answers, it has every session.
            assert set(await sessions_of(hub.port)) == {f"w{i}" for i in range(16)}
        for w in ws:
            await w.close()
        assert hub.terminate() == 0


def _redis_cli(port: int, *args: str) -> list[str]:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=5, check=True
    ).stdout
    return out.split()


def _node_names(port: int) -> set[str]:
    return set(_redis_cli(port, "hkeys", "{hub}:nodes"))


def _held_per_node(port: int) -> dict[str, int] | None:
    # Project p1's partition: each worker's hash of its records (and "@" heartbeat fields, "~"
    # stamps).
    held = {
        n: sum(not f.startswith(("@", "~")) for f in _redis_cli(port, "hkeys", f"{{p:p1}}:s:{n}"))
        for n in ("w-0", "w-1")
    }
    return held if sum(held.values()) == 16 else None


def test_workers_without_redis_is_one_line_and_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hub", "serve", "--workers", "2"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--workers" in proc.stderr and "redis" in proc.stderr


async def test_a_session_is_active_while_any_tab_on_any_node_is() -> None:
    """CONTRACT §1: ``active`` (and the activeTime it drives) is any tab's, across nodes too."""
    with RedisServer() as redis, cluster(redis.url, 2) as nodes:
        a = await tracker(nodes[0].port, "s")
        b = await tracker(nodes[1].port, "s", active=False)
        both = await wait_agreed(nodes, {"s"}, until=lambda v: v["s"]["tabs"] == 2)
        assert both["s"]["active"] is True, "the tab on node 0 is active"
        await a.send(json.dumps({"type": "heartbeat", "active": False}))
        await wait_agreed(nodes, {"s"}, until=lambda v: v["s"]["active"] is False)
        await b.send(json.dumps({"type": "heartbeat", "active": True}))
        await wait_agreed(nodes, {"s"}, until=lambda v: v["s"]["active"] is True)
        await b.close()
        hidden = await wait_agreed(nodes, {"s"}, until=lambda v: v["s"]["tabs"] == 1)
        assert hidden["s"]["active"] is False, "only node 0's hidden tab is left"
        await a.close()
