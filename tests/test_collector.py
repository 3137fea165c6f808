"""The garbage collector policy (hub/collector.py) and what it relies on: tearing down a
connection, a session, an agent or a relay join leaves no reference cycle behind.

A frozen object that becomes part of a cycle is not reclaimed until the next interval's
full walk, so every way a hub lets go of its objects is driven here over real sockets and
the collector is then asked what it would have had to find.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections import Counter
from collections.abc import Iterator

import pytest
import websockets

from hub.collector import Collector
from hub.websocket import HubServerProtocol
from tests.helpers import API_KEY, MixedLog, http, running_hub, wait_for
from tests.test_openreplay_socketio import KEY, agent, sio_tab


@pytest.fixture
def clean_gc() -> Iterator[None]:
    """Whatever earlier tests left to collect is collected first; nothing stays frozen after."""
    gc.collect()
    try:
        yield
    finally:
        gc.unfreeze()


class Node:
    """Something a weak reference can watch."""

    other: Node | None = None


def test_a_full_collection_freezes_what_survived_it(clean_gc: None) -> None:
    now = [0.0]
    collector = Collector(lambda: now[0], full_every=60.0)
    collector.install()
    try:
        gc.collect()
        frozen = gc.get_freeze_count()
        assert frozen > 0 and collector.collections == 1
        survivors = [Node() for _ in range(1000)]
        gc.collect(1)  # a young collection freezes nothing
        assert gc.get_freeze_count() <= frozen
        gc.collect()
        assert gc.get_freeze_count() >= frozen + len(survivors)
        # A frozen object is freed when its last reference goes, collector or not.
        ref = weakref.ref(survivors[0])
        del survivors
        assert ref() is None
    finally:
        collector.uninstall()


def test_a_frozen_cycle_is_reclaimed_by_the_intervals_full_walk(clean_gc: None) -> None:
    now = [0.0]
    collector = Collector(lambda: now[0], full_every=60.0)
    collector.install()
    try:
        a, b = Node(), Node()
        a.other, b.other = b, a
        ref = weakref.ref(a)
        gc.collect()  # frozen while still in use
        del a, b
        gc.collect()
        assert ref() is not None, "a cycle of frozen objects outlives its use until the full walk"
        now[0] = 59.0
        gc.collect()
        assert ref() is not None and gc.get_freeze_count() > 0
        now[0] = 60.0
        gc.collect()  # the interval is up: everything unfrozen, for the next full collection
        assert gc.get_freeze_count() == 0 and collector.full_walks == 0
        gc.collect()
        assert ref() is None
        assert collector.full_walks == 1 and gc.get_freeze_count() > 0
        now[0] = 100.0
        gc.collect()
        assert gc.get_freeze_count() > 0, "the next interval ends at 120 s"
    finally:
        collector.uninstall()


def test_each_tick_collects_and_freezes_what_came_since_the_last(clean_gc: None) -> None:
    collector = Collector(lambda: 0.0)
    collector.install()
    try:
        collector.tick()
        frozen = gc.get_freeze_count()
        young = [Node() for _ in range(300)]
        assert gc.get_count()[0] > 0
        collector.tick()
        assert gc.get_freeze_count() >= frozen + len(young) and collector.collections == 2
    finally:
        collector.uninstall()


def hub_garbage() -> Counter[str]:
    """The hub's objects the collector would find unreachable now (kept aside, then freed)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = Counter(
            type(o).__qualname__
            for o in gc.garbage
            if type(o).__module__.startswith("hub.") or isinstance(o, HubServerProtocol)
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return found


async def test_tearing_down_connections_sessions_agents_and_joins_leaves_no_cycle(clean_gc: None) -> None:
    async with running_hub(grace=0.2) as h:
        server = h.hub.server
        url = h.url

        async def tracker(sid: str) -> MixedLog:
            peer = MixedLog(await websockets.connect(f"{url}/ws/tracker/p1"))
            await peer.send(type="start", sessionID=sid, userID=f"u-{sid}", metadata={"plan": "pro"})
            await wait_for(lambda: peer.of("started"), what=f"{sid} started")
            await peer.send(type="heartbeat")
            return peer

        trackers = [await tracker(f"s{i}") for i in range(5)]
        watcher = MixedLog(await websockets.connect(f"{url}/ws/agent/p1?token={API_KEY}"))
        await watcher.send(type="subscribe")
        await wait_for(lambda: watcher.of("snapshot"), what="the snapshot")
        joiner = MixedLog(await websockets.connect(f"{url}/ws/agent/p1?token={API_KEY}"))
        await joiner.send(type="join", sessionID="s0", agent={"name": "Ann"})
        await wait_for(lambda: joiner.of("joined"), what="joined")
        await trackers[0].send(type="emit", event="click", data={"n": 1})
        await wait_for(lambda: joiner.of("session.event"), what="the relayed event")
        assert (await http(h.port, "POST", "/public/p1/assist/sessions", {"limit": 10})).status == 200
        async with (
            sio_tab(h.port, "7100000000000009", "tabA") as tab,
            websockets.connect(f"{url}/ws/agent/{KEY}?token={API_KEY}") as ws,
        ):
            native = MixedLog(ws)
            await native.send(type="join", sessionID="7100000000000009", agent={"name": "Nat"})
            await wait_for(lambda: native.of("joined"), what="joined on the Socket.IO tab")
            await wait_for(lambda: tab.of("NEW_AGENT"), what="NEW_AGENT")
            async with agent(h.port, "7100000000000009", token=f"Bearer {API_KEY}", name="Ann") as sio_agent:
                await wait_for(lambda: tab.of("NEW_AGENT")[1:], what="the Socket.IO agent's NEW_AGENT")
                await tab.client.emit("click", {"meta": {"tabId": "tabA"}, "data": [1, 2]})
                await wait_for(lambda: sio_agent.of("click"), what="the click at the Socket.IO agent")
            native.task.cancel()

        # Every way out: a closing handshake, a dropped socket (no close frame), an end.
        await trackers[0].ws.close()
        trackers[1].ws.transport.abort()
        await trackers[2].send(type="end")
        await trackers[2].ws.close()
        trackers[3].ws.transport.abort()
        await trackers[4].ws.close()
        joiner.ws.transport.abort()
        await watcher.ws.close()
        for peer in [*trackers, joiner, watcher]:
            peer.task.cancel()

        await wait_for(lambda: not server.connections, what="every connection gone")
        ended = "every session ended after its grace"
        await wait_for(lambda: len(h.hub.index) == 0 and h.hub.registry.waiting == 0, what=ended)
        await asyncio.sleep(0)
        leaked = hub_garbage()
        assert not leaked, f"left in reference cycles: {dict(leaked)}"
