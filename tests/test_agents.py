"""Agents over real sockets: subscribe, snapshot, stream, coalescing, auth (CONTRACT §3)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from hub.fanout import Agent
from hub.wire import CloseCode
from tests.helpers import API_KEY, RunningHub, http, running_hub, wait_for

AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def connect_agent(h: RunningHub, project: str = "p1", **kwargs: Any) -> ClientConnection:
    kwargs.setdefault("additional_headers", AUTH)
    return await websockets.connect(h.agent_url(project), max_size=None, **kwargs)


async def recv(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    return frame


async def subscribe(ws: ClientConnection, **body: Any) -> list[dict[str, Any]]:
    await ws.send(json.dumps({"type": "subscribe", **body}))
    frame = await recv(ws)
    assert frame["type"] == "snapshot", frame
    sessions: list[dict[str, Any]] = frame["sessions"]
    return sessions


def apply_update(session: dict[str, Any], changes: dict[str, Any]) -> None:
    """An update as README tells agents: activeTime moves with lastActiveAt while active."""
    if "lastActiveAt" in changes and "activeTime" not in changes and session["active"]:
        session["activeTime"] += max(0, changes["lastActiveAt"] - session["lastActiveAt"])
    session.update(changes)


@asynccontextmanager
async def tracker(h: RunningHub, **start: Any) -> AsyncIterator[ClientConnection]:
    async with websockets.connect(h.tracker_url()) as ws:
        await ws.send(json.dumps({"type": "start", **start}))
        assert json.loads(await ws.recv())["type"] == "started"
        yield ws


async def start_tracker(h: RunningHub, **start: Any) -> ClientConnection:
    ws = await websockets.connect(h.tracker_url())
    await ws.send(json.dumps({"type": "start", **start}))
    assert json.loads(await ws.recv())["type"] == "started"
    return ws


def hub_agent(h: RunningHub, ws: ClientConnection) -> Agent:
    """The hub's side of an agent client connection, found by its port."""
    port = ws.local_address[1]
    for agent in h.hub.fanout.agents:
        peer = agent.sink.transport.get_extra_info("peername")  # type: ignore[attr-defined]
        if peer[1] == port:
            return agent
    raise AssertionError("no such agent")


CHROME = [{"name": "userBrowser", "operator": "is", "value": ["Chrome"]}]


async def test_snapshot_is_the_search_answer() -> None:
    async with running_hub() as h:
        trackers = [
            await start_tracker(
                h, sessionID=f"s{i}", userBrowser="Chrome" if i % 3 else "Firefox", userID=f"u{i}"
            )
            for i in range(12)
        ]
        async with await connect_agent(h) as agent:
            snap = await subscribe(agent, filters=CHROME)
            assert sorted(s["sessionID"] for s in snap) == sorted(f"s{i}" for i in range(12) if i % 3)
            search = await h.search(body={"filters": CHROME, "limit": 1000})
            assert sorted(s["sessionID"] for s in search["sessions"]) == sorted(s["sessionID"] for s in snap)
            everything = await subscribe(agent)
            records = {s["sessionID"]: s for s in (await h.search(body={"limit": 1000}))["sessions"]}
            assert {s["sessionID"]: s for s in everything} == records and len(records) == 12
            order = [(s["timestamp"], s["sessionID"]) for s in everything]
            assert order == sorted(order, reverse=True)
        for t in trackers:
            await t.close()


# "is" filters are found by value, others matched on every change: both paths.
@pytest.mark.parametrize(
    "filters", [CHROME, [{"name": "userBrowser", "operator": "contains", "value": ["chro"]}]]
)
async def test_start_update_end_and_unmatched(filters: list[dict[str, Any]]) -> None:
    async with running_hub() as h, await connect_agent(h) as agent:
        assert await subscribe(agent, filters=filters) == []
        t = await start_tracker(h, sessionID="a", userBrowser="Chrome", pageTitle="home")
        frame = await recv(agent)
        assert frame["type"] == "session.start" and frame["session"]["pageTitle"] == "home"
        await t.send(json.dumps({"type": "update", "pageTitle": "cart"}))
        frame = await recv(agent)
        assert frame["type"] == "session.update" and frame["sessionID"] == "a"
        assert (
            set(frame["changes"]) == {"pageTitle", "lastActiveAt"} and frame["changes"]["pageTitle"] == "cart"
        )
        await t.send(json.dumps({"type": "update", "userBrowser": "Firefox"}))
        assert await recv(agent) == {"type": "session.end", "sessionID": "a", "reason": "unmatched"}
        await t.send(json.dumps({"type": "update", "pageTitle": "unseen"}))
        await t.send(json.dumps({"type": "update", "userBrowser": "chrome"}))
        frame = await recv(agent)
        assert frame["type"] == "session.start" and frame["session"]["pageTitle"] == "unseen"
        await t.send(json.dumps({"type": "end"}))
        assert await recv(agent) == {"type": "session.end", "sessionID": "a", "reason": "ended"}
        # A tracker that goes away: connected:false at once (the end after the grace:
        # test_unit_fanout, test_contract).
        t2 = await start_tracker(h, sessionID="b", userBrowser="Chrome")
        assert (await recv(agent))["type"] == "session.start"
        await t2.close()
        frame = await recv(agent)
        assert frame["changes"] == {"connected": False, "tabs": 0}
        await t.close()


async def test_heartbeats_reach_agents_on_the_real_ticker_coalesced() -> None:
    """The --agent-interval ticker end to end (1 s): five heartbeats of a session become
    fewer frames, all sent by ticks. What one tick sends, to the session: test_unit_fanout."""
    async with (
        running_hub(agent_interval=1.0) as h,
        await connect_agent(h) as plain,
        await connect_agent(h) as batch,
    ):
        await subscribe(plain)
        await subscribe(batch, batch=True)
        a = await start_tracker(h, sessionID="a")
        b = await start_tracker(h, sessionID="b")
        for agent in (plain, batch):
            assert {(await recv(agent))["type"] for _ in range(2)} == {"session.start"}
        for _ in range(5):
            await a.send('{"type":"heartbeat"}')
            await b.send('{"type":"heartbeat"}')
        await wait_for(lambda: h.hub.metrics.trackers.received["heartbeat"] == 10, what="10 heartbeats read")
        final = {s["sessionID"]: s["lastActiveAt"] for s in (await h.search())["sessions"]}

        async def until_final(agent: ClientConnection) -> list[dict[str, Any]]:
            frames: list[dict[str, Any]] = []
            seen: dict[str, int] = {}
            while seen != final:
                try:
                    frame = await recv(agent)
                except TimeoutError:
                    raise AssertionError(f"the agent saw {seen}, never the records' {final}") from None
                frames.append(frame)
                changes = (
                    frame["changes"]
                    if frame["type"] == "sessions.update"
                    else {frame["sessionID"]: frame["changes"]}
                )
                for sid, change in changes.items():
                    assert list(change) == ["lastActiveAt"], frame
                    seen[sid] = change["lastActiveAt"]
            return frames

        frames = await until_final(plain)
        assert {f["type"] for f in frames} == {"session.update"}, "CONTRACT §3 frames unless batch is asked"
        for sid in ("a", "b"):
            assert 1 <= [f["sessionID"] for f in frames].count(sid) < 5, "coalesced per interval"
        batched = await until_final(batch)
        # a and b heartbeat in turns: whatever the tick boundaries, one tick holds both.
        assert any(f["type"] == "sessions.update" and set(f["changes"]) == {"a", "b"} for f in batched)
        with pytest.raises(TimeoutError):
            await recv(plain, timeout=0.3)  # nothing touched since: nothing more
        await a.close()
        await b.close()


async def test_new_subscribe_replaces_old() -> None:
    async with (
        running_hub() as h,
        tracker(h, sessionID="s1", userBrowser="Chrome") as t1,
        tracker(h, sessionID="s2") as t2,
    ):
        agent = await connect_agent(h)
        assert [s["sessionID"] for s in await subscribe(agent, filters=CHROME)] == ["s1"]
        assert [s["sessionID"] for s in await subscribe(agent, sessionID="s2")] == ["s2"]
        await t1.send(json.dumps({"type": "update", "pageTitle": "not for this agent"}))
        await t2.send(json.dumps({"type": "update", "pageTitle": "watched"}))
        frame = await recv(agent)
        assert frame["sessionID"] == "s2" and frame["changes"]["pageTitle"] == "watched"
        # sessionID and filters together: that session while it matches.
        assert await subscribe(agent, sessionID="s2", filters=CHROME) == []
        await t2.send(json.dumps({"type": "update", "userBrowser": "Chrome"}))
        frame = await recv(agent)
        assert frame["type"] == "session.start" and frame["session"]["sessionID"] == "s2"
        await agent.close()
        await wait_for(lambda: not h.hub.fanout.agents)


async def test_bad_subscribe_is_an_error_frame_and_keeps_the_old_one() -> None:
    bad = [{"name": "userBrowser", "operator": "regex", "value": ["x"]}]
    async with running_hub() as h, await connect_agent(h) as agent:
        await subscribe(agent, filters=CHROME)
        reply = await http(h.port, "POST", "/public/p1/assist/sessions", {"filters": bad})
        assert reply.status == 400
        await agent.send(json.dumps({"type": "subscribe", "filters": bad}))
        frame = await recv(agent)
        assert frame == {"type": "error", "code": "invalid_filters", "message": reply.json()["error"]}
        for raw, code in [
            ("{", "invalid_json"),
            ('{"type":"nope"}', "unknown_type"),
            ('{"type":"subscribe","filters":[{"name":1}]}', "invalid_filters"),
            ('{"type":"subscribe","sessionID":"bad id!"}', "invalid_field"),
            ('{"type":"subscribe","batch":"yes"}', "invalid_field"),
        ]:
            await agent.send(raw)
            frame = await recv(agent)
            assert frame["type"] == "error" and frame["code"] == code, frame
        await agent.send('{"type":"ping"}')
        assert await recv(agent) == {"type": "pong"}
        async with tracker(h, sessionID="c", userBrowser="Chrome"):
            frame = await recv(agent)
            assert frame["type"] == "session.start" and frame["session"]["sessionID"] == "c"


async def test_auth_and_project_refusals() -> None:
    async with running_hub(projects={"p1": 1}) as h:
        for kwargs, url in [
            ({}, h.agent_url()),
            ({"additional_headers": {"Authorization": "Bearer wrong"}}, h.agent_url()),
            ({"additional_headers": {"Authorization": f"Basic {API_KEY}"}}, h.agent_url()),
            ({}, h.agent_url() + "?token=wrong"),
            ({}, h.agent_url() + "?token="),
        ]:
            with pytest.raises(InvalidStatus) as refused:
                await websockets.connect(url, **kwargs)
            assert refused.value.response.status_code == 401
            assert (
                b"wrong" not in refused.value.response.body
                and API_KEY.encode() not in refused.value.response.body
            )
        with pytest.raises(InvalidStatus) as unknown:
            await websockets.connect(h.agent_url("nope"), additional_headers=AUTH)
        assert unknown.value.response.status_code == 404
        async with await websockets.connect(h.agent_url() + f"?token={API_KEY}") as agent:
            assert await subscribe(agent) == []
        async with await connect_agent(h) as agent:
            assert await subscribe(agent) == []


def small_receive_buffer_socket(port: int) -> socket.socket:
    """A client socket that reads little: the hub's side fills up quickly."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def collect(ws: ClientConnection, into: list[dict[str, Any]]) -> None:
    try:
        async for raw in ws:
            into.append(json.loads(raw))
    except ConnectionClosed:
        pass


async def test_stalled_agent_is_bounded_and_others_keep_receiving() -> None:
    n = 1000
    async with running_hub() as h:
        trackers = await asyncio.gather(*(start_tracker(h, sessionID=f"s{i}") for i in range(n)))
        fast = await connect_agent(h)
        slow = await connect_agent(h, sock=small_receive_buffer_socket(h.port), max_queue=1)
        assert len(await subscribe(fast, batch=True)) == n and len(await subscribe(slow)) == n
        seen: list[dict[str, Any]] = []
        reader = asyncio.create_task(collect(fast, seen))
        stalled = hub_agent(h, slow)
        peak = 0
        # ~1 KiB titles: 1 MB a round outgrows the kernel's socket buffers (4 MiB at most).
        pad = "x" * 1000
        rounds = 12
        for round_ in range(rounds):
            for i, t in enumerate(trackers):
                await t.send(json.dumps({"type": "update", "pageTitle": f"r{round_}-{i}{pad}"}))
                await t.send('{"type":"heartbeat"}')
            await asyncio.sleep(0)
            peak = max(peak, stalled.pending)
            assert stalled.pending <= n
        await wait_for(lambda: stalled.sink.paused)
        # The fast agent has every session's last title, and then the heartbeat batches.
        last = {f"s{i}": f"r{rounds - 1}-{i}{pad}" for i in range(n)}

        def titles() -> dict[str, str]:
            got: dict[str, str] = {}
            for f in seen:
                if f["type"] == "session.update" and "pageTitle" in f["changes"]:
                    got[f["sessionID"]] = f["changes"]["pageTitle"]
            return got

        await wait_for(lambda: titles() == last, timeout=10)
        for t in trackers:
            await t.send('{"type":"heartbeat"}')
        mark = len(seen)

        def beaten() -> set[str]:
            # A tick may split them: one session alone goes as a session.update.
            got: set[str] = set()
            for f in seen[mark:]:
                if f["type"] == "sessions.update":
                    got.update(f["changes"])
                elif f["type"] == "session.update" and list(f["changes"]) == ["lastActiveAt"]:
                    got.add(f["sessionID"])
            return got

        def ticked() -> bool:
            # The test ticks instead of waiting for the 1 s ticker (test_unit_fanout has the rules).
            h.hub.fanout.tick()
            return beaten() == set(last)

        await wait_for(ticked, timeout=10)
        assert stalled.pending <= n and peak <= n
        reader.cancel()
        for ws in (fast, slow, *trackers):
            ws.transport.abort()


async def test_agent_past_max_pending_is_closed() -> None:
    n = 200
    async with running_hub(agent_max_pending=50) as h:
        trackers = await asyncio.gather(*(start_tracker(h, sessionID=f"s{i}") for i in range(n)))
        slow = await connect_agent(h, sock=small_receive_buffer_socket(h.port), max_queue=1)
        fast = await connect_agent(h)
        await subscribe(slow)
        await subscribe(fast)
        seen: list[dict[str, Any]] = []
        reader = asyncio.create_task(collect(fast, seen))
        stalled = hub_agent(h, slow)
        pad = "x" * 1000
        round_ = 0
        while stalled in h.hub.fanout.agents:
            for i, t in enumerate(trackers):
                await t.send(json.dumps({"type": "update", "pageTitle": f"r{round_}-{i}{pad}"}))
            round_ += 1
            await asyncio.sleep(0)
            assert round_ < 200, "the slow agent was never dropped"
        # Reading now, the slow client drains its backlog and finds the close frame.
        await asyncio.wait_for(collect(slow, []), 10)
        assert slow.close_code == CloseCode.TOO_SLOW and slow.close_reason.startswith("too slow")
        assert hub_agent(h, fast) in h.hub.fanout.agents
        await wait_for(
            lambda: any(f.get("changes", {}).get("pageTitle") == f"r{round_ - 1}-0{pad}" for f in seen)
        )
        reader.cancel()
        for ws in (fast, *trackers):
            await ws.close()


async def test_order_per_session_and_snapshot_plus_stream_under_concurrency() -> None:
    """Concurrent trackers; one agent from the start, one joining midway.

    Per session, an agent sees start, updates, end (repeatable), titles in
    order; snapshot + stream rebuilds exactly the hub's final state.
    """
    async with running_hub() as h:
        early = await connect_agent(h)
        await subscribe(early)
        early_seen: list[dict[str, Any]] = []
        early_reader = asyncio.create_task(collect(early, early_seen))
        late_seen: list[dict[str, Any]] = []
        late_reader: asyncio.Task[None] | None = None
        late = await connect_agent(h)

        async def life(i: int) -> None:
            for lap in range(3):
                async with websockets.connect(h.tracker_url()) as t:
                    await t.send(json.dumps({"type": "start", "sessionID": f"s{i}", "pageTitle": f"{lap}-0"}))
                    await t.recv()
                    for k in range(1, 15):
                        await t.send(json.dumps({"type": "update", "pageTitle": f"{lap}-{k}"}))
                        await t.send('{"type":"heartbeat"}')
                        if k % 5 == 0:
                            await asyncio.sleep(0)
                    if lap < 2:
                        await t.send('{"type":"end"}')
                    else:
                        await t.send(json.dumps({"type": "update", "metadata": {"done": "yes"}}))
                        await wait_for(lambda: done.is_set())

        async def join_midway() -> None:
            nonlocal late_reader
            await asyncio.sleep(0.02)
            await late.send('{"type":"subscribe"}')
            late_reader = asyncio.create_task(collect(late, late_seen))

        done = asyncio.Event()
        lives = [asyncio.create_task(life(i)) for i in range(30)]
        await join_midway()
        await wait_for(
            lambda: (
                all(s.metadata.get("done") for s in h.hub.index.sessions("p1"))
                and h.hub.index.count("p1") == 30
            ),
            timeout=20,
        )
        final = {s["sessionID"]: s for s in (await h.search(body={"limit": 1000}))["sessions"]}
        # The last lastActiveAt batches: one tick now, instead of waiting for the ticker.
        h.hub.fanout.tick()

        def rebuild(frames: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
            state: dict[str, dict[str, Any]] = {}
            last_title: dict[str, tuple[int, int]] = {}
            for f in frames:
                kind = f["type"]
                # Copies: rebuild runs again on the same frames until it agrees.
                if kind == "snapshot":
                    state = {s["sessionID"]: dict(s) for s in f["sessions"]}
                elif kind == "session.start":
                    sid = f["session"]["sessionID"]
                    assert sid not in state, f"start of {sid} while it is live"
                    state[sid] = dict(f["session"])
                elif kind == "session.update":
                    assert f["sessionID"] in state, f"update before start: {f}"
                    apply_update(state[f["sessionID"]], f["changes"])
                elif kind == "sessions.update":
                    for sid, changes in f["changes"].items():
                        assert sid in state, f"batched update before start: {sid}"
                        apply_update(state[sid], changes)
                elif kind == "session.end":
                    assert state.pop(f["sessionID"], None) is not None, f"end of unknown: {f}"
                else:
                    raise AssertionError(f)
                for sid, s in state.items():
                    lap, k = map(int, s["pageTitle"].split("-"))
                    assert (lap, k) >= last_title.get(sid, (0, 0)), f"title went back for {sid}"
                    last_title[sid] = (lap, k)
            return state

        await wait_for(lambda: rebuild(early_seen) == final)
        assert late_reader is not None
        assert late_seen[0]["type"] == "snapshot"
        await wait_for(lambda: rebuild(late_seen) == final)
        done.set()
        await asyncio.gather(*lives)
        for task in (early_reader, late_reader):
            task.cancel()
        await early.close()
        await late.close()


async def test_is_filters_move_a_session_between_agents() -> None:
    async with running_hub() as h:
        a, b, p = [await connect_agent(h) for _ in range(3)]
        await subscribe(a, filters=[{"name": "userId", "operator": "is", "value": ["ANN"]}])
        await subscribe(b, filters=[{"name": "userId", "operator": "is", "value": ["bob", "x"]}])
        await subscribe(
            p, filters=[{"name": "METADATA", "source": "plan", "operator": "is", "value": ["pro"]}]
        )
        t = await start_tracker(h, sessionID="s1", userID="ann", metadata={"plan": "pro"})
        assert (await recv(a))["type"] == "session.start" and (await recv(p))["type"] == "session.start"
        await t.send(json.dumps({"type": "update", "userID": "Bob"}))
        assert await recv(a) == {"type": "session.end", "sessionID": "s1", "reason": "unmatched"}
        assert (await recv(b))["session"]["userID"] == "Bob"
        assert (await recv(p))["changes"]["userID"] == "Bob"
        await t.send(json.dumps({"type": "update", "metadata": {"plan": "free"}}))
        assert (await recv(p))["reason"] == "unmatched"
        assert (await recv(b))["changes"]["metadata"] == {"plan": "free"}
        await t.send('{"type":"end"}')
        assert await recv(b) == {"type": "session.end", "sessionID": "s1", "reason": "ended"}
        with pytest.raises(TimeoutError):
            await recv(a, timeout=0.1)
        for ws in (a, b, p, t):
            await ws.close()


async def test_dead_agent_is_closed_and_live_ones_are_kept_by_the_hubs_ping() -> None:
    async with running_hub(agent_idle_timeout=1.0) as h:
        # A peer that completes the handshake and then never reads: it cannot answer pings.
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        writer.write(
            f"GET /ws/agent/p1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {API_KEY}\r\n\r\n".encode()
        )
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        # A websockets client answers the hub's pings by itself, as browsers do.
        quiet = await connect_agent(h, ping_interval=None)
        chatty = await connect_agent(h, ping_interval=None)
        await subscribe(quiet)
        await subscribe(chatty)
        for _ in range(15):  # 1.5 s: past the 1 s timeout
            await chatty.send('{"type":"ping"}')
            assert await recv(chatty) == {"type": "pong"}
            await asyncio.sleep(0.1)
        rest = await asyncio.wait_for(reader.read(), 5)  # the hub's ping, its close frame, then EOF
        assert b"\x88" in rest and b"idle timeout" in rest and (4000).to_bytes(2, "big") in rest
        writer.close()
        assert hub_agent(h, quiet) in h.hub.fanout.agents, "a live agent that sends nothing stays"
        assert hub_agent(h, chatty) in h.hub.fanout.agents
        await quiet.close()
        await chatty.close()


async def test_subscribe_while_stalled_snapshots_when_writable() -> None:
    n = 200
    pad = "x" * 1000
    async with running_hub() as h:
        trackers = await asyncio.gather(
            *(
                start_tracker(h, sessionID=f"s{i}", userBrowser="Chrome" if i % 2 else "Edge")
                for i in range(n)
            )
        )
        slow = await connect_agent(h, sock=small_receive_buffer_socket(h.port), max_queue=1)
        await subscribe(slow)
        stalled = hub_agent(h, slow)
        round_ = 0
        while not stalled.sink.paused:
            for i, t in enumerate(trackers):
                await t.send(json.dumps({"type": "update", "pageTitle": f"r{round_}-{i}{pad}"}))
            round_ += 1
            await asyncio.sleep(0.01)
            assert round_ < 100, "the agent's connection never paused"
        await slow.send(json.dumps({"type": "subscribe", "filters": CHROME}))
        await wait_for(lambda: stalled.snapshot_due)
        for i, t in enumerate(trackers):
            await t.send(json.dumps({"type": "update", "pageTitle": f"last-{i}"}))
        await wait_for(lambda: all(s.pageTitle.startswith("last") for s in h.hub.index.sessions("p1")))
        assert stalled.pending == 0  # nothing queued: the snapshot will carry it all
        # Past the frames queued before the stall, the new subscription's snapshot.
        deadline = time.monotonic() + 10
        while (frame := await recv(slow))["type"] != "snapshot" or len(frame["sessions"]) == n:
            assert time.monotonic() < deadline, "no snapshot of the new subscription within 10 s"
        assert sorted(s["pageTitle"] for s in frame["sessions"]) == sorted(
            f"last-{i}" for i in range(1, n, 2)
        )
        for ws in (slow, *trackers):
            await ws.close()
