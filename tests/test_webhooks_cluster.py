"""Webhooks from a cluster (CONTRACT §9): three real hub processes over a real redis-server, one
real receiver; reloads, second tabs, a drain and a kill. Each event reaches the receiver exactly
once (per event id), a session's end never before its start, and only real starts and ends
are sent."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.helpers import API_KEY, HubProcess, wait_for
from tests.redis_server import RedisServer, have_redis
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.skipif(not have_redis(), reason="redis-server is not installed")

SECRET = "cluster-secret"
LEASE = 1.5
GRACE = 3.0


@contextmanager
def nodes(redis_url: str, hook: str) -> Iterator[list[HubProcess]]:
    with ExitStack() as stack:
        procs = []
        for i in range(3):
            args = [
                "--redis-url", redis_url,
                "--node-id", f"n{i}",
                "--api-key", API_KEY,
                "--node-lease", str(LEASE),
                "--grace", str(GRACE),
                "--sweep-interval", "0.1",
                "--webhook-urls", hook,
                "--webhook-secret", SECRET,
            ]  # fmt: skip
            procs.append(stack.enter_context(HubProcess(*args)))
        for p in procs:
            p.wait_ready(path="/readyz")
        yield procs


async def tracker(node: HubProcess, sid: str, **fields: Any) -> ClientConnection:
    ws = await websockets.connect(f"ws://127.0.0.1:{node.port}/ws/tracker/p1")
    await ws.send(json.dumps({"type": "start", "sessionID": sid, "timestamp": 1_700_000_000_000, **fields}))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert reply["type"] == "started", reply
    return ws


async def end(ws: ClientConnection) -> None:
    await ws.send(json.dumps({"type": "end"}))
    await ws.close()


def by_session(receiver: Receiver) -> dict[str, list[tuple[str, str | None]]]:
    """Each session's events as they arrived: (type, reason)."""
    found: dict[str, list[tuple[str, str | None]]] = {}
    for e in receiver.events():
        found.setdefault(e["session"]["sessionID"], []).append((e["type"], e.get("reason")))
    return found


async def settle(receiver: Receiver, count: int, what: str) -> None:
    await wait_for(lambda: len(receiver.deliveries) >= count, timeout=15, what=what)
    await asyncio.sleep(0.5)  # nothing more arrives: no duplicate, no spurious event
    assert len(receiver.deliveries) == count, by_session(receiver)


async def test_three_nodes_send_each_event_once_through_reloads_tabs_a_drain_and_a_kill() -> None:
    async with Receiver() as receiver:
        with RedisServer() as redis, nodes(redis.url, receiver.url) as (n0, n1, n2):
            ws = {
                "a": await tracker(n0, "a"),
                "b": await tracker(n1, "b"),
                "c": await tracker(n2, "c"),
                "d": await tracker(n1, "d"),
                "e": await tracker(n1, "e"),
                "f": await tracker(n2, "f"),
                "g": await tracker(n0, "g"),
            }
            await settle(receiver, 7, "seven starts")
            assert all(events == [("session.started", None)] for events in by_session(receiver).values())

            # A tracker's end; a reload onto another node; a second tab elsewhere; a tab gone for good.
            await end(ws.pop("a"))
            await ws["b"].close()
            ws["b"] = await tracker(n2, "b")
            c_tab = await tracker(n0, "c")
            await ws.pop("g").close()
            await settle(receiver, 9, "a ended, g disconnected after the grace")

            # A drain: d comes back on n0 within the grace, e never does.
            n1.proc.send_signal(signal.SIGTERM)
            await wait_for(lambda: n1.proc.poll() is not None, timeout=15, what="n1 drained")
            assert n1.proc.returncode == 0
            ws.pop("e")
            ws["d"] = await tracker(n0, "d")
            await settle(receiver, 10, "e disconnected once, from n0 or n2")

            # A kill: b (resumed on n2) and f are lost; c keeps its tab on n0.
            n2.kill()
            await settle(receiver, 12, "b and f node_lost, reported once")

            await end(c_tab)
            await end(ws["d"])
            await settle(receiver, 14, "c and d ended")

    ids = Counter(d.headers["x-hub-event-id"] for d in receiver.deliveries)
    assert all(n == 1 for n in ids.values()), ids
    assert all(d.verified(SECRET) for d in receiver.deliveries)
    assert all(d.headers["x-hub-event-id"] == d.event["id"] for d in receiver.deliveries)
    ended = {"a": "ended", "b": "node_lost", "c": "ended", "d": "ended", "e": "disconnected"}
    ended |= {"f": "node_lost", "g": "disconnected"}
    assert by_session(receiver) == {
        sid: [("session.started", None), ("session.ended", reason)] for sid, reason in ended.items()
    }
