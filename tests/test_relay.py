"""The live relay over real sockets (CONTRACT §7): tabs emit, joined agents receive and talk back.

One hub in this process for the rules; two hub processes and a real
redis-server for a tab on one node and its agent on another. The relay
core's timing rules (gap, stall, token bucket) are unit-tested with a fake
clock in test_unit_relay.py; here they are driven with settings small
enough to reach by sending, never by waiting on short timers.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from typing import Any

import pytest
import websockets

from loadtest.client import frame, handshake
from tests.helpers import API_KEY, HubProcess, MixedLog, http, running_hub, wait_for
from tests.redis_server import RedisServer, have_redis


class Peer(MixedLog):
    """A tab's or an agent's WebSocket, its frames collected as they come."""

    async def next_of(self, kind: str, after: int = 0, timeout: float = 5.0) -> dict[str, Any]:
        got = await wait_for(lambda: self.of(kind)[after:], timeout=timeout, what=f"a {kind} frame")
        frame: dict[str, Any] = got[0]
        return frame


@asynccontextmanager
async def tab(url: str, sid: str, project: str = "p1", **fields: Any) -> AsyncIterator[Peer]:
    async with websockets.connect(f"{url}/ws/tracker/{project}", max_size=None) as ws:
        peer = Peer(ws)
        await peer.send(type="start", sessionID=sid, **fields)
        await peer.next_of("started")
        try:
            yield peer
        finally:
            peer.task.cancel()


@asynccontextmanager
async def agent(url: str, project: str = "p1", key: str = API_KEY) -> AsyncIterator[Peer]:
    async with websockets.connect(f"{url}/ws/agent/{project}?token={key}", max_size=None) as ws:
        peer = Peer(ws)
        try:
            yield peer
        finally:
            peer.task.cancel()


def split_binary(frame: bytes) -> tuple[dict[str, Any], bytes]:
    """CONTRACT §7's relayed binary frame: 2-byte big-endian length, JSON header, payload."""
    n = int.from_bytes(frame[:2], "big")
    return json.loads(frame[2 : 2 + n]), frame[2 + n :]


async def metric(port: int, name: str) -> float:
    body = (await http(port, "GET", "/metrics")).body.decode()
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# -- one node -------------------------------------------------------------------


async def test_join_emit_send_leave() -> None:
    async with running_hub() as h, tab(h.url, "s1", tabId="tab-a") as t, agent(h.url) as a:
        started = t.of("started")[0]
        assert started["tabId"] == "tab-a"
        await t.send(type="emit", event="before", data=1)  # unwatched: goes nowhere
        await a.send(type="join", sessionID="s1", agent={"name": "Ann"})
        joined = await a.next_of("joined")
        assert joined == {"type": "joined", "sessionID": "s1", "tabs": ["tab-a"]}
        notice = await t.next_of("agents")
        assert notice["count"] == 1 and notice["agents"][0]["agent"] == {"name": "Ann"}
        await t.send(type="emit", event="click", data={"path": "main > button", "n": [1, 2]})
        event = await a.next_of("session.event")
        assert event == {
            "type": "session.event",
            "sessionID": "s1",
            "tab": "tab-a",
            "event": "click",
            "data": {"path": "main > button", "n": [1, 2]},
        }
        assert not [e for e in a.of("session.event") if e["event"] == "before"]
        await a.send(type="send", sessionID="s1", event="message", data={"text": "hi"})
        got = await t.next_of("agent.event")
        assert got == {
            "type": "agent.event",
            "agent": notice["agents"][0]["id"],
            "event": "message",
            "data": {"text": "hi"},
        }
        await a.send(type="leave", sessionID="s1")
        assert (await t.next_of("agents", after=1))["count"] == 0
        await a.send(type="send", sessionID="s1", event="message", data=None)
        assert (await a.next_of("error"))["code"] == "not_joined"


async def test_binary_frames_pass_through_byte_for_byte() -> None:
    payload = os.urandom(40_000) + b"\x00\xff"
    async with running_hub() as h, tab(h.url, "s1", tabId="t1") as t, agent(h.url) as a:
        await a.send(type="join", sessionID="s1")
        await a.next_of("joined")
        await t.ws.send(payload)
        await wait_for(lambda: a.binary)
        header, body = split_binary(a.binary[0])
        assert header == {"sessionID": "s1", "tab": "t1"} and body == payload


async def test_events_keep_their_order_per_tab_and_reach_every_agent() -> None:
    async with running_hub() as h, tab(h.url, "s1") as t, agent(h.url) as a, agent(h.url) as b:
        for peer in (a, b):
            await peer.send(type="join", sessionID="s1")
            await peer.next_of("joined")
        await wait_for(lambda: t.of("agents") and t.of("agents")[-1]["count"] == 2)
        for i in range(150):  # within --rate-limit's burst of 200 messages
            await t.send(type="emit", event="n", data=i)
        for peer in (a, b):
            got = await wait_for(lambda p=peer: len(p.of("session.event")) == 150 and p.of("session.event"))
            assert [e["data"] for e in got] == list(range(150))


async def test_send_reaches_one_tab_or_all_and_only_the_named_session() -> None:
    async with (
        running_hub() as h,
        tab(h.url, "s1", tabId="x") as x,
        tab(h.url, "s1", tabId="y") as y,
        tab(h.url, "s2", tabId="x") as other,
        agent(h.url) as a,
    ):
        await a.send(type="join", sessionID="s1")
        assert (await a.next_of("joined"))["tabs"] == ["x", "y"]
        await a.send(type="send", sessionID="s1", event="only-y", data=None, tab="y")
        await a.send(type="send", sessionID="s1", event="all", data=None)
        await wait_for(lambda: len(y.of("agent.event")) == 2)
        await wait_for(lambda: x.of("agent.event"))
        assert [e["event"] for e in x.of("agent.event")] == ["all"]
        assert [e["event"] for e in y.of("agent.event")] == ["only-y", "all"]
        assert not other.of("agent.event") and not other.of("agents"), "s2 is not s1"


async def test_a_duplicated_tab_gets_its_own_id() -> None:
    async with running_hub() as h, tab(h.url, "s1", tabId="same") as t1, tab(h.url, "s1", tabId="same") as t2:
        first, second = t1.of("started")[0]["tabId"], t2.of("started")[0]["tabId"]
        assert first == "same" and second != "same"
        assert second == t2.of("started")[0]["tabId"]


async def test_an_agent_joins_only_its_own_projects_sessions() -> None:
    keys = {"p1": ("key-one",), "p2": ("key-two",)}
    async with (
        running_hub(projects={"p1": 1, "p2": 2}, keys_file=keys) as h,
        tab(h.url, "s1", project="p1") as t,
        agent(h.url, project="p2", key="key-two") as a,
    ):
        await a.send(type="join", sessionID="s1")
        assert (await a.next_of("error"))["code"] == "not_found"
        await a.send(type="send", sessionID="s1", event="x", data=None)
        assert (await a.next_of("error", after=1))["code"] == "not_joined"
        await asyncio.sleep(0.1)
        assert not t.of("agents") and not t.of("agent.event")


async def test_join_limit_and_unknown_session() -> None:
    async with (
        running_hub(relay_max_joins=1) as h,
        tab(h.url, "s1"),
        tab(h.url, "s2"),
        agent(h.url) as a,
    ):
        await a.send(type="join", sessionID="nope")
        assert (await a.next_of("error"))["code"] == "not_found"
        await a.send(type="join", sessionID="s1")
        await a.next_of("joined")
        await a.send(type="join", sessionID="s2")
        err = await a.next_of("error", after=1)
        assert err["code"] == "too_many_joins" and err["sessionID"] == "s2"


async def test_a_tab_over_the_event_size_limit_is_closed_1008() -> None:
    async with running_hub(relay_max_event=1000) as h, tab(h.url, "s1") as t, agent(h.url) as a:
        await a.send(type="join", sessionID="s1")
        await a.next_of("joined")
        await t.ws.send(b"x" * 1001)
        await wait_for(lambda: t.ws.close_code is not None)
        assert t.ws.close_code == 1008
        assert await metric(h.port, 'hub_relay_closes_total{reason="tab_policy"}') == 1


async def test_a_tab_over_the_relay_rate_is_closed_1008() -> None:
    async with running_hub(relay_rate=1000.0, relay_burst=5000) as h, tab(h.url, "s1") as t:
        for _ in range(10):  # 10 KB at once, a 5 KB burst: the bucket runs dry
            await t.ws.send(b"y" * 1000)
        await wait_for(lambda: t.ws.close_code is not None)
        assert t.ws.close_code == 1008


class StalledAgent:
    """A raw agent connection that reads nothing (a 4 KiB receive buffer) until ``drain``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, join: str) -> StalledAgent:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        # A small limit: the reader pauses the socket at 8 KiB instead of reading on.
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        writer.write(handshake("127.0.0.1", port, f"/ws/agent/p1?token={API_KEY}"))
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        writer.write(frame(json.dumps({"type": "join", "sessionID": join}).encode()))
        return cls(reader, writer)

    async def frames(self) -> AsyncIterator[tuple[int, bytes]]:
        """Read on: (opcode, payload) of each server frame (unmasked, unfragmented)."""
        while True:
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await self.reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await self.reader.readexactly(8), "big")
            yield b0 & 0x0F, await self.reader.readexactly(n)


async def test_a_stalled_agent_loses_events_not_the_others_then_gets_a_gap() -> None:
    hub = running_hub(relay_agent_buffer=64 * 1024, relay_agent_stall=3600.0)
    async with hub as h, tab(h.url, "s1") as t, agent(h.url) as fast:
        slow = await StalledAgent.open(h.port, "s1")
        await fast.send(type="join", sessionID="s1")
        await wait_for(lambda: t.of("agents") and t.of("agents")[-1]["count"] == 2)
        for i in range(150):  # 1.2 MB: past the slow agent's 64 KiB and what the kernel holds
            await t.ws.send(i.to_bytes(4, "big") + b"z" * 8000)
            # In step with the fast agent, which shares this event loop with the hub.
            await wait_for(lambda i=i: len(fast.binary) == i + 1, what="the frame for the fast agent")
        assert [int.from_bytes(split_binary(f)[1][:4], "big") for f in fast.binary] == list(range(150))
        dropped = await metric(h.port, "hub_relay_dropped_total")
        assert dropped > 0, "the slow agent's events past its buffer were dropped"
        # Now it reads: what was queued arrives, then (once it drained) a gap naming the loss.
        received = 0
        async for opcode, payload in slow.frames():
            if opcode == 2:
                received += 1
                continue
            msg = json.loads(payload)
            if msg["type"] == "session.gap":
                assert msg == {"type": "session.gap", "sessionID": "s1", "dropped": dropped}
                break
        assert received + dropped == 150, "each event either arrived or was counted in the gap"
        assert await metric(h.port, "hub_relay_gaps_total") == 1
        slow.writer.close()


async def test_an_agent_over_its_buffer_for_the_stall_time_is_closed_4008() -> None:
    hub = running_hub(relay_agent_buffer=16 * 1024, relay_agent_stall=0.2, agent_interval=0.05)
    async with hub as h, tab(h.url, "s1") as t:
        slow = await StalledAgent.open(h.port, "s1")
        await wait_for(lambda: t.of("agents"))
        for _ in range(150):  # over ~0.75 s: the queue stays over its bound past the stall time
            await t.ws.send(b"w" * 8000)
            await asyncio.sleep(0.005)
            if t.of("agents")[-1]["count"] == 0:
                break
        await wait_for(lambda: t.of("agents")[-1]["count"] == 0, what="the slow agent let go")
        assert await metric(h.port, 'hub_relay_closes_total{reason="agent_too_slow"}') == 1
        async for opcode, payload in slow.frames():
            if opcode == 8:
                assert int.from_bytes(payload[:2], "big") == 4008
                break
        slow.writer.close()


async def test_an_agent_sending_binary_gets_an_error() -> None:
    async with running_hub() as h, agent(h.url) as a:
        await a.ws.send(b"\x01\x02")
        assert (await a.next_of("error"))["code"] == "unsupported_binary"


async def test_emit_before_start_is_refused() -> None:
    async with running_hub() as h, websockets.connect(f"{h.url}/ws/tracker/p1") as ws:
        await ws.send(json.dumps({"type": "emit", "event": "x"}))
        assert json.loads(await ws.recv())["code"] == "not_started"


# -- across nodes ----------------------------------------------------------------

cross_node = pytest.mark.skipif(not have_redis(), reason="redis-server is not installed")


@contextmanager
def two_nodes() -> Iterator[tuple[str, str, str]]:
    with ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        urls = []
        for name in ("a", "b", "c"):
            proc = stack.enter_context(
                HubProcess("--redis-url", redis.url, "--node-id", name, "--api-key", API_KEY, "--grace", "20")
            )
            proc.wait_ready(path="/readyz")
            urls.append(f"ws://127.0.0.1:{proc.port}")
        yield urls[0], urls[1], urls[2]


@cross_node
async def test_across_nodes_tab_on_a_agent_on_b_and_the_tab_moving_to_c() -> None:
    with two_nodes() as (a_url, b_url, c_url):
        async with agent(b_url) as ag:
            async with tab(a_url, "s1", tabId="t1") as t:
                await wait_for(lambda: ag.ws is not None)

                async def joined() -> Any:
                    await ag.send(type="join", sessionID="s1")
                    got = await wait_for(lambda: ag.of("joined") or ag.of("error"))
                    if got[0]["type"] == "error":  # the record has not reached b yet
                        ag.text.clear()
                        return None
                    return got[0]

                j = await wait_for(joined, what="a join of a session on another node")
                assert j["tabs"] == ["t1"]
                await wait_for(lambda: t.of("agents") and t.of("agents")[-1]["count"] == 1)
                for i in range(50):
                    await t.send(type="emit", event="n", data=i)
                payload = os.urandom(5000)
                await t.ws.send(payload)
                got = await wait_for(lambda: len(ag.of("session.event")) == 50 and ag.of("session.event"))
                assert [e["data"] for e in got] == list(range(50)), "in order across Redis"
                await wait_for(lambda: ag.binary)
                assert split_binary(ag.binary[0]) == ({"sessionID": "s1", "tab": "t1"}, payload)
                await ag.send(type="send", sessionID="s1", event="message", data={"text": "hello"})
                assert (await t.next_of("agent.event"))["data"] == {"text": "hello"}
            # The tab closed on a; it comes back on c within the grace, same tab id.
            async with tab(c_url, "s1", tabId="t1") as moved:
                notice = await moved.next_of("agents", timeout=10)
                assert notice["count"] == 1, "the joined agent followed the tab to c"
                await moved.send(type="emit", event="after-move", data=True)
                await wait_for(lambda: any(e["event"] == "after-move" for e in ag.of("session.event")))
