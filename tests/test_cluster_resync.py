"""Cluster resync costs and liveness (issue 16): real Redis, real hub processes.

- A peer is judged dead from its lease key in Redis; after Redis restarts
  empty, a peer still in its reconnect backoff is not declared dead.
- A heartbeat stores only lastActiveAt in Redis, never the whole record.
- After a Redis restart each node reads a peer's snapshot at most once, and
  a RELOAD that follows what a node holds is applied without any read.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import pytest
import redis as redis_sync

from hub.partitions import lease_key
from tests.helpers import HubProcess, wait_for
from tests.redis_server import RedisServer, have_redis
from tests.test_cluster import agent, cluster, tracker, wait_agreed
from tests.test_ops import scrape, value

pytestmark = pytest.mark.skipif(not have_redis(), reason="redis-server is not installed")

LEASE = 1.5


def _hgetall_calls(client: redis_sync.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get("cmdstat_hgetall", {}).get("calls", 0))


async def test_after_a_redis_restart_a_peer_in_its_backoff_is_not_declared_dead() -> None:
    with RedisServer() as redis, cluster(redis.url, 2) as nodes:
        first, second = nodes
        async with agent(first.port) as watch:
            ws = await tracker(second.port, "held-by-second", userID="u")
            await wait_agreed(nodes, {"held-by-second"})
            # The second node stands still, as a node does in its reconnect backoff,
            # while Redis restarts empty and the first node bootstraps again.
            second.proc.send_signal(signal.SIGSTOP)
            try:
                redis.kill()
                redis.start()
                # Longer than the lease: the old rule dropped the peer one lease after this bootstrap.
                await asyncio.sleep(LEASE + 1.5)
            finally:
                second.proc.send_signal(signal.SIGCONT)
            view = await wait_agreed(nodes, {"held-by-second"}, timeout=10)
            assert view["held-by-second"]["connected"]
            assert "held-by-second" not in watch.ends(), watch.ends()
            await ws.close()


async def test_a_killed_node_is_still_dropped_within_the_lease() -> None:
    with RedisServer() as redis, cluster(redis.url, 2) as nodes:
        victim, survivor = nodes
        await tracker(victim.port, "lost")
        await wait_agreed(nodes, {"lost"})
        victim.kill()
        # Lease-key expiry plus one check interval; well within lease + 1 s.
        await wait_agreed([survivor], set(), timeout=LEASE + 1)


async def test_a_heartbeat_stores_only_last_active_at() -> None:
    with RedisServer() as redis, cluster(redis.url, 1) as nodes:
        (only,) = nodes
        client = redis_sync.Redis(port=redis.port)
        ws = await tracker(only.port, "beating", userID="u", pageTitle="Home")
        field = "beating"
        stored = await wait_for(lambda: client.hget("{p:p1}:s:n0", field), timeout=5)
        for _ in range(3):
            await asyncio.sleep(0.05)
            await ws.send(json.dumps({"type": "heartbeat"}))

        def touched() -> bytes | None:
            return client.hget("{p:p1}:s:n0", "@" + field)  # type: ignore[return-value]

        await wait_for(touched, timeout=5)
        # The record itself was not rewritten: only its lastActiveAt moved, in the touch hash.
        assert client.hget("{p:p1}:s:n0", field) == stored
        await ws.send(json.dumps({"type": "update", "pageTitle": "Cart"}))
        await wait_for(lambda: client.hget("{p:p1}:s:n0", field) != stored, timeout=5)
        # A node that joins now reads the record with the latest lastActiveAt.
        with HubProcess(
            "--redis-url", redis.url, "--node-id", "late", "--api-key", "test-key-7f3a",
            "--node-lease", str(LEASE), "--log-level", "warning",
        ) as late:  # fmt: skip
            late.wait_ready(path="/readyz")
            await ws.send(json.dumps({"type": "heartbeat"}))
            view = await wait_agreed([only, late], {"beating"})
            assert view["beating"]["pageTitle"] == "Cart"
        await ws.close()


async def test_heartbeats_wait_for_the_touch_window_and_go_out_in_one_batch() -> None:
    # A publisher that missed the first heartbeat would sleep until the next lease refresh
    # (every lease/4): the heartbeats below start just after one, so the next is >= 2.7 s
    # away (lease 12 s: 3 s) and such a publisher shows, wherever the refreshes fall.
    lease_ms = 12000
    args = ("--touch-window", "0.5", "--node-lease", str(lease_ms / 1000))
    with RedisServer() as redis, cluster(redis.url, 2, *args) as nodes:
        near = nodes[0]
        beating = [await tracker(near.port, f"h{i}") for i in range(5)]
        ids = {f"h{i}" for i in range(5)}
        first = await wait_agreed(nodes, ids)  # the far node mirrors p1 from its first search

        def batches(metrics: Any) -> float:
            return value(metrics, "hub_redis_published_batches_total")

        client = redis_sync.Redis(port=redis.port)
        await wait_for(lambda: client.pttl(lease_key("n0")) > lease_ms - 300, timeout=5, interval=0.01)
        before = batches(await scrape(near.port))
        await asyncio.sleep(0.01)
        sent = time.monotonic()
        for ws in beating:
            # 30 ms apart: past the publish window each time, all within the touch window
            # (at least 0.375 s: 0.5 s less its jitter).
            await ws.send(json.dumps({"type": "heartbeat"}))
            await asyncio.sleep(0.03)

        # Each new lastActiveAt reaches the far node (both answer the same)...
        def moved(view: Any) -> bool:
            return all(view[i]["lastActiveAt"] > first[i]["lastActiveAt"] for i in ids)

        await wait_agreed(nodes, until=moved, timeout=3)
        # ... when the touch window (0.5 s) closes, not at the next lease refresh (>= 2.7 s
        # after the first heartbeat: a publisher asleep until then had missed the first touch)...
        assert time.monotonic() - sent < 2.0
        # ... all five in one batch.
        assert batches(await scrape(near.port)) - before == 1
        for ws in beating:
            await ws.close()


async def test_lease_refreshes_leave_heartbeats_to_their_window() -> None:
    # Refreshes every 0.5 s (lease 2 s) within a touch window of 1.125-1.5 s: none of them
    # publishes the waiting heartbeats; they go out once, when their window closes.
    args = ("--touch-window", "1.5", "--node-lease", "2")
    with RedisServer() as redis, cluster(redis.url, 2, *args) as nodes:
        near = nodes[0]
        beating = [await tracker(near.port, f"r{i}") for i in range(3)]
        ids = {f"r{i}" for i in range(3)}
        first = await wait_agreed(nodes, ids)
        await asyncio.sleep(1.6)  # past the window of the starts' own heartbeats
        before = value(await scrape(near.port), "hub_redis_published_batches_total")
        sent = time.monotonic()
        for ws in beating:
            await ws.send(json.dumps({"type": "heartbeat"}))

        def moved(view: Any) -> bool:
            return all(view[i]["lastActiveAt"] > first[i]["lastActiveAt"] for i in ids)

        await wait_agreed(nodes, until=moved, timeout=4)
        assert time.monotonic() - sent >= 1.1  # not with the refreshes 0.5 and 1 s in
        assert value(await scrape(near.port), "hub_redis_published_batches_total") - before == 1
        for ws in beating:
            await ws.close()


async def test_after_a_redis_restart_each_node_reads_a_peer_at_most_once() -> None:
    count = 3
    with RedisServer() as redis, cluster(redis.url, count) as nodes:
        live = [await tracker(nodes[i % count].port, f"s{i}") for i in range(6)]
        await wait_agreed(nodes, {f"s{i}" for i in range(6)})
        redis.kill()
        await asyncio.sleep(1)
        redis.start()  # empty: every node republishes and tells its peers (RELOAD)
        await wait_agreed(nodes, {f"s{i}" for i in range(6)}, timeout=10)
        # Give every node time to bootstrap and apply its peers' RELOADs.
        await asyncio.sleep(2 * LEASE)
        reads = _hgetall_calls(redis_sync.Redis(port=redis.port))
        # HGETALL of the nodes' registry (one per bootstrap) plus snapshot
        # reads: at most one for each pair of nodes. (Before: every node
        # re-read each peer at its bootstrap or at the peer's RELOAD, or both:
        # N·(N-1) to 2·N·(N-1) snapshot reads.)
        snapshot_reads = reads - count
        assert snapshot_reads <= count * (count - 1) // 2, reads
        for ws in live:
            await ws.close()


async def test_a_node_stalled_past_its_lease_writes_its_sessions_again() -> None:
    with RedisServer() as redis, cluster(redis.url, 2) as nodes:
        watcher, stalled = nodes
        ws = [await tracker(stalled.port, f"st{i}") for i in range(5)]
        expect = {f"st{i}" for i in range(5)}
        await wait_agreed(nodes, expect)
        os.kill(stalled.proc.pid, signal.SIGSTOP)
        try:
            # Its peer takes it for dead (node_lost) and reaps its keys.
            await wait_agreed([watcher], set(), timeout=LEASE + 5)
            await wait_for(lambda: not redis_sync.Redis(port=redis.port).exists("{p:p1}:s:n1"), timeout=5)
        finally:
            os.kill(stalled.proc.pid, signal.SIGCONT)
        # Back, it finds its lease ran out and writes its partitions again: its sessions return.
        await wait_agreed(nodes, expect, timeout=10)
        for w in ws:
            await w.close()
