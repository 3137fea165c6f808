"""Interest (CONTRACT §5, README "Cluster"): a node mirrors a project only while it serves it.

Real hub processes over real redis-server (and a real 3-master Redis Cluster). Without
webhooks no node mirrors project p1 unless it serves it: the node of p1's trackers holds
them and publishes them; a search or an agent makes another node mirror p1, which answers
exactly as any other then, and forgets the others' sessions after ``--mirror-idle``
without ending them. With webhooks, p1's two owners (``partitions.owners``) mirror it
whatever they serve: one of them reports a dead node's sessions ended.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from typing import Any

import pytest
import redis as redis_sync
import websockets

from hub.partitions import Partitioner, owners
from tests.helpers import HubProcess, wait_for
from tests.redis_server import RedisCluster, RedisServer, free_port, have_redis
from tests.test_cluster import (
    LEASE,
    AgentLog,
    agent,
    cluster,
    node,
    sessions_of,
    tracker,
    wait_agreed,
)
from tests.test_ops import scrape, value

pytestmark = pytest.mark.skipif(not have_redis(), reason="redis-server is not installed")

IDLE = 1.0
NAMES = ("n0", "n1", "n2")


async def _metric(hub: HubProcess, name: str) -> float:
    return value(await scrape(hub.port), name)


async def _published(redis: RedisServer, counts: dict[str, int], partition: str = "p1") -> None:
    """Until each node's part of ``partition`` in Redis holds ``counts[node]`` records."""
    client = redis_sync.Redis(port=redis.port)

    def written() -> bool:
        for name, count in counts.items():
            fields = client.hkeys(f"{{p:{partition}}}:s:{name}")
            if sum(1 for f in fields if not f.startswith((b"@", b"~"))) != count:
                return False
        return True

    await wait_for(written, what=f"{counts} published")
    client.close()


async def test_a_cold_node_answers_its_first_search_whole_then_forgets_after_the_idle_time() -> None:
    with RedisServer() as redis, cluster(redis.url, len(NAMES), "--mirror-idle", str(IDLE)) as nodes:
        holder, third, cold = nodes
        trackers = [await tracker(holder.port, f"s{i}") for i in range(6)]
        own = await tracker(cold.port, "mine")
        await _published(redis, {"n0": 6, "n2": 1})
        # Without webhooks nobody mirrors p1: each node holds only its own trackers' sessions.
        for hub, held in ((holder, 6), (third, 0), (cold, 1)):
            assert await _metric(hub, "hub_cluster_mirrored_partitions") == 0
            assert await _metric(hub, "hub_live_sessions") == held
            # Nor does it index them: it keeps its own sessions to publish them, no more.
            assert await _metric(hub, "hub_cluster_indexed_projects") == 0

        # A first search bootstraps p1 and answers whole, on either node.
        view = await sessions_of(third.port)
        assert set(view) == {f"s{i}" for i in range(6)} | {"mine"}
        assert await sessions_of(cold.port) == view
        assert await _metric(cold, "hub_cluster_mirrored_partitions") == 1
        assert await _metric(cold, "hub_cluster_indexed_projects") == 1
        await trackers[0].send(json.dumps({"type": "update", "userID": "changed"}))
        await wait_agreed([third, cold], until=lambda v: v["s0"]["userID"] == "changed")

        # Idle: the others' sessions are forgotten here, not ended (their node keeps them).
        async def forgotten() -> bool:
            return await _metric(cold, "hub_cluster_mirrored_partitions") == 0

        await wait_for(forgotten, timeout=IDLE + 5, what="p1 unmirrored after the idle time")
        assert await _metric(cold, "hub_live_sessions") == 1
        assert await _metric(cold, "hub_cluster_indexed_projects") == 0
        assert await _metric(holder, "hub_live_sessions") == 6
        # Searched again after the idle time, it mirrors p1 again and indexes its own too.
        assert await sessions_of(cold.port) == await sessions_of(third.port)
        assert set(await sessions_of(third.port)) == set(view)
        for ws in [*trackers, own]:
            await ws.close()


async def test_an_agent_keeps_the_project_mirrored_while_connected_and_gets_the_whole_snapshot() -> None:
    with RedisServer() as redis, cluster(redis.url, len(NAMES), "--mirror-idle", str(IDLE)) as nodes:
        warm, _, cold = nodes
        ws = [await tracker(warm.port, f"a{i}") for i in range(3)]
        await _published(redis, {"n0": 3})
        async with agent(cold.port) as log:
            snapshot = log.frames[0]
            assert {s["sessionID"] for s in snapshot["sessions"]} == {"a0", "a1", "a2"}
            # Past the idle time the agent still holds the project here and sees changes.
            await asyncio.sleep(IDLE * 2.5)
            assert await _metric(cold, "hub_cluster_mirrored_partitions") == 1
            late = await tracker(warm.port, "late")
            await wait_for(lambda: "late" in log.started(), what="the agent sees a start on another node")
            await ws[0].send(json.dumps({"type": "end"}))
            await wait_for(lambda: log.ends().get("a0") == "ended", what="and an end")

        async def released() -> bool:
            return await _metric(cold, "hub_cluster_mirrored_partitions") == 0

        await wait_for(released, timeout=IDLE + 5, what="p1 unmirrored once the agent left")
        for w in [*ws[1:], late]:
            await w.close()


async def test_with_webhooks_a_project_s_two_owners_mirror_it_whatever_they_serve() -> None:
    hook = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens: deliveries fail, and are retried
    first, backup = owners("p1", NAMES)
    with (
        RedisServer() as redis,
        cluster(redis.url, len(NAMES), "--webhook-urls", hook, "--webhook-secret", "s") as nodes,
    ):
        hubs = dict(zip(NAMES, nodes, strict=True))
        (other,) = [n for n in NAMES if n not in (first, backup)]
        ws = await tracker(hubs[other].port, "w0")

        async def owners_mirror() -> bool:
            return all(
                [await _metric(hubs[n], "hub_cluster_mirrored_partitions") == 1 for n in (first, backup)]
            )

        await wait_for(owners_mirror, what="p1's owners mirror it")
        for name in (first, backup):
            await wait_for(lambda n=name: _metric(hubs[n], "hub_live_sessions"), what=f"{name} holds w0")
        assert await _metric(hubs[other], "hub_cluster_mirrored_partitions") == 0
        await ws.close()


async def test_partitions_spread_over_a_redis_cluster_s_masters() -> None:
    projects = [f"proj{i}" for i in range(12)]
    with RedisCluster() as redis, ExitStack() as stack:
        hub = stack.enter_context(node(redis.url, "n0"))
        hub.wait_ready(path="/readyz")
        conns: list[Any] = []
        for p in projects:
            ws = await websockets.connect(f"ws://127.0.0.1:{hub.port}/ws/tracker/{p}")
            await ws.send(json.dumps({"type": "start", "sessionID": f"s-{p}"}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "started"
            conns.append(ws)

        def keys_per_master() -> list[int]:
            counts = []
            for n in redis.nodes:
                out = subprocess.run(
                    ["redis-cli", "-p", str(n.port), "--scan", "--pattern", "{p:*}:s:n0"],
                    capture_output=True, text=True, timeout=5,
                ).stdout  # fmt: skip
                counts.append(len(out.split()))
            return counts

        def spread_when_all_written() -> list[int] | None:
            counts = keys_per_master()
            return counts if sum(counts) == len(projects) else None

        spread = await wait_for(spread_when_all_written)
        # Each project's records live on its slot's master: more than one master holds some.
        assert sum(1 for c in spread if c) >= 2, spread
        for ws in conns:
            await ws.close()


async def test_a_tab_resuming_on_a_node_that_does_not_mirror_the_project_continues_its_session() -> None:
    with RedisServer() as redis, cluster(redis.url, len(NAMES)) as nodes:
        warm, _, cold = nodes  # the searches on the first make it mirror p1
        ws = await tracker(warm.port, "r", url="https://shop.test/a", userID="ann")
        await ws.send(json.dumps({"type": "update", "url": "https://shop.test/b"}))
        before = (await wait_agreed([warm], until=lambda v: v.get("r", {}).get("pageViews") == 2))["r"]
        await ws.close()
        await wait_agreed([warm], until=lambda v: v["r"]["connected"] is False)
        # The tab comes back on the node that does not mirror p1, on the same page.
        back = await tracker(cold.port, "r", url="https://shop.test/b")
        view = await wait_agreed([warm], until=lambda v: v["r"]["connected"] is True)
        after = view["r"]
        assert after["timestamp"] == before["timestamp"]
        assert after["pageViews"] == 2 and after["userID"] == "ann"
        assert after["activeTime"] >= before["activeTime"]
        assert await _metric(cold, "hub_cluster_adopted_sessions_total") == 1
        await back.close()


async def test_a_project_in_buckets_is_answered_whole_by_a_cold_node() -> None:
    buckets = Partitioner({"p1": 4}).of_project("p1")
    args = ("--project-buckets", "p1=4", "--mirror-idle", str(IDLE))
    with RedisCluster() as redis, cluster(redis.url, len(NAMES), *args) as nodes:
        warm, other, cold = nodes
        ws = [await tracker((warm, other)[i % 2].port, f"b{i}") for i in range(24)]
        expect = {f"b{i}" for i in range(24)}
        await wait_agreed([warm], expect, timeout=10)
        # Every bucket's records live under its own hash tag, spread over the masters.
        found = {k for n in redis.nodes for k in _keys(n.port, "{p:p1#*}:s:*")}
        assert {k.split("}")[0] for k in found} == {f"{{p:{b}" for b in buckets}
        assert await _metric(cold, "hub_cluster_mirrored_partitions") == 0
        assert set(await sessions_of(cold.port)) == expect
        assert await _metric(cold, "hub_cluster_mirrored_partitions") == len(buckets)
        async with agent(cold.port) as log:
            assert {s["sessionID"] for s in log.frames[0]["sessions"]} == expect
        for w in ws:
            await w.close()


def _keys(port: int, pattern: str) -> list[str]:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "--scan", "--pattern", pattern],
        capture_output=True, text=True, timeout=5,
    ).stdout  # fmt: skip
    return out.split()


async def test_the_directory_of_a_partition_follows_its_records_and_a_dead_node_s_are_removed() -> None:
    with RedisServer() as redis, ExitStack() as stack:
        first = stack.enter_context(node(redis.url, "n0"))
        second = stack.enter_context(node(redis.url, "n1"))
        for hub in (first, second):
            hub.wait_ready(path="/readyz")
        client = redis_sync.Redis(port=redis.port)
        ws = await tracker(first.port, "d1")
        other = await tracker(second.port, "d2")
        await wait_for(lambda: client.hgetall("{p:p1}:where") == {b"d1": b"n0", b"d2": b"n1"})
        await ws.send(json.dumps({"type": "end"}))
        await wait_for(lambda: client.hgetall("{p:p1}:where") == {b"d2": b"n1"})
        back = await tracker(first.port, "d3")
        await wait_for(lambda: client.hget("{p:p1}:where", "d3") == b"n0")
        first.kill()
        # Past the lease the survivor reaps the dead node's keys, its directory entries with them.
        await wait_for(lambda: client.hgetall("{p:p1}:where") == {b"d2": b"n1"}, timeout=LEASE + 5)
        assert not client.exists("{p:p1}:s:n0")
        await other.close()
        await back.close()


@asynccontextmanager
async def _ended_with_a_tab_on(warm: HubProcess, cold: HubProcess) -> AsyncIterator[tuple[Any, AgentLog]]:
    """Session e with a tab on each node and an agent on ``warm`` (so it mirrors p1), ended
    by the tab on ``warm``: the other tab and the agent's log."""
    main = await tracker(warm.port, "e")
    async with agent(warm.port) as log:
        tab = await tracker(cold.port, "e")
        await wait_agreed([warm], until=lambda v: v.get("e", {}).get("tabs") == 2)
        await main.send(json.dumps({"type": "end"}))
        await wait_for(lambda: log.ends().get("e") == "ended", what="the end")
        yield tab, log


async def _holds_none(hub: HubProcess) -> bool:
    return await _metric(hub, "hub_live_sessions") == 0


@pytest.mark.parametrize("redis_kind", [RedisServer, RedisCluster], ids=["one-redis", "redis-cluster"])
async def test_an_end_reaches_the_session_s_tab_on_a_node_that_does_not_mirror_the_project(
    redis_kind: type[RedisServer] | type[RedisCluster],
) -> None:
    # On a Redis Cluster the batch function finds the other node's record in the partition's
    # slot, and the notice goes to that node's inbox, a shard channel.
    with redis_kind() as redis, cluster(redis.url, 2) as nodes:
        warm, cold = nodes
        # The second tab is on the node that does not mirror p1.
        async with _ended_with_a_tab_on(warm, cold) as (tab, log):
            # The tab's node ends its part too: the tab's close then publishes nothing that
            # would bring the session back. A start after it, in the same partition (one
            # channel, in order), shows the close has been heard.
            await wait_for(lambda: _holds_none(cold), what="the tab's node lets e go")
            assert await _metric(warm, "hub_cluster_told_ended_sessions_total") == 1
            await tab.close()
            marker = await tracker(cold.port, "marker")
            await wait_for(lambda: "marker" in log.started(), what="the marker")
            assert "e" not in await sessions_of(warm.port)
            about_e = [f["type"] for f in log.frames if f.get("sessionID") == "e"]
            assert about_e[-1] == "session.end" and about_e.count("session.end") == 1, about_e
            assert "e" not in log.started()
            await marker.close()


async def test_a_session_resumed_and_ended_within_one_publish_window_ends_where_it_waited() -> None:
    with RedisServer() as redis, cluster(redis.url, 2, "--publish-window", "0.3") as nodes:
        warm, cold = nodes
        ws = await tracker(warm.port, "r")
        async with agent(warm.port) as log:
            await ws.close()
            await wait_agreed([warm], until=lambda v: v["r"]["connected"] is False)
            # The tab comes back on the node that does not mirror p1 and ends the session
            # before that node's record of it goes out.
            back = await tracker(cold.port, "r")
            await back.send(json.dumps({"type": "end"}))
            await wait_for(lambda: log.ends().get("r") == "ended", what="the end where r waited")
            assert "r" not in await sessions_of(warm.port)
            await back.close()


async def test_an_end_that_could_not_be_told_is_told_with_a_later_flush() -> None:
    # n0 may not publish to n1's inbox at first (a Redis ACL): its notice fails after the
    # batch landed, and goes out once it may.
    with RedisServer() as redis:
        admin = redis_sync.Redis(port=redis.port)
        channels = ["&{hub}:ctl", "&{p:*}:ch", "&{hub}:in:n0"]
        admin.execute_command("ACL", "SETUSER", "n0", "on", ">pw", "~*", "+@all", "resetchannels", *channels)
        with ExitStack() as stack:
            warm = stack.enter_context(node(f"redis://n0:pw@127.0.0.1:{redis.port}", "n0"))
            cold = stack.enter_context(node(redis.url, "n1"))
            for n in (warm, cold):
                n.wait_ready(path="/readyz")
            async with _ended_with_a_tab_on(warm, cold) as (tab, _):
                await asyncio.sleep(1.0)
                assert await _metric(cold, "hub_live_sessions") == 1, "not told yet"
                admin.execute_command("ACL", "SETUSER", "n0", "&{hub}:in:n1")
                await wait_for(lambda: _holds_none(cold), timeout=LEASE + 5, what="the notice, told again")
                assert await _metric(warm, "hub_cluster_told_ended_sessions_total") == 1
                await tab.close()
        admin.close()


@pytest.mark.parametrize("report", ["update", "close"])
async def test_a_field_changed_through_one_node_stays_when_a_tab_on_a_node_not_mirroring_reports(
    report: str,
) -> None:
    with RedisServer() as redis, cluster(redis.url, 3) as nodes:
        warm, cold, late = nodes  # the agent on the first makes it mirror p1
        main = await tracker(warm.port, "s", userID="first")
        async with agent(warm.port):
            # A second tab, on a node that does not mirror p1: it reads the session as it is.
            tab = await tracker(cold.port, "s")
            await wait_agreed([warm], until=lambda v: v.get("s", {}).get("tabs") == 2)
            await main.send(json.dumps({"type": "update", "userID": "second", "metadata": {"plan": "pro"}}))
            await wait_agreed([warm], until=lambda v: v["s"]["userID"] == "second")
            # The other tab reports: its node publishes its part, with the userID it read.
            if report == "update":
                update = {"type": "update", "url": "https://shop.test/next", "metadata": {"lang": "en"}}
                await tab.send(json.dumps(update))
                await wait_agreed([warm], until=lambda v: v["s"]["url"] == "https://shop.test/next")
            else:
                await tab.close()
                await wait_agreed([warm], until=lambda v: v["s"]["tabs"] == 1)
            assert (await sessions_of(warm.port))["s"]["userID"] == "second"
            # A node that reads both parts from Redis (its first search of p1) merges them alike.
            view = await wait_agreed([warm, late])
            assert view["s"]["userID"] == "second"
            # Metadata merges key by key: each tab's key stays.
            assert view["s"]["metadata"] == (
                {"plan": "pro", "lang": "en"} if report == "update" else {"plan": "pro"}
            )
            if report == "update":
                # Its page views: the first page, then the new one (the resume counts none).
                assert view["s"]["url"] == "https://shop.test/next" and view["s"]["pageViews"] == 2
            # Looked up once: the record's page views and active time are not added twice.
            assert await _metric(cold, "hub_cluster_adopted_sessions_total") == 1
        await main.close()
        if report == "update":
            await tab.close()


async def test_a_resumed_session_is_looked_up_once() -> None:
    with RedisServer() as redis, cluster(redis.url, 2) as nodes:
        warm, cold = nodes
        main = await tracker(warm.port, "s")
        async with agent(warm.port):
            tab = await tracker(cold.port, "s")  # a second tab, on a node that does not mirror p1
            await wait_agreed([warm], until=lambda v: v.get("s", {}).get("tabs") == 2)
            await main.send(json.dumps({"type": "update", "userID": "ann"}))  # warm writes last
            await wait_agreed([warm], until=lambda v: v["s"]["userID"] == "ann")
            # The cold node's next batch (another session starting there) looks s up no more:
            # looked up again, the record's page views and active time would count twice.
            other = await tracker(cold.port, "other")
            await wait_agreed([warm], until=lambda v: "other" in v)
            assert await _metric(cold, "hub_cluster_adopted_sessions_total") == 1
            for ws in (main, tab, other):
                await ws.close()
