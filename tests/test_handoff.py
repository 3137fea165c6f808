"""``--workers N``: each project served by one worker, by socket hand-off (hub/handoff.py).

Real ``hub serve --workers N --redis-url`` processes over a real redis-server; the kernel
spreads connections to the shared port over the workers. Which worker served what is read
from each worker's /metrics (``hub_worker_index`` names the worker a scrape reached):
searches counted, agents held, hand-offs sent, received, failed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import websockets

from hub.handoff import owner, project_of
from hub.http_api import Request
from hub.openreplay import paths as openreplay_paths
from tests.helpers import API_KEY, HubProcess, http, wait_for
from tests.redis_server import RedisServer, have_redis

redis_only = pytest.mark.skipif(not have_redis(), reason="redis-server is not installed")

SEARCH = "/public/{}/assist/sessions"
# What a client sees of a connection a killed worker had: reset, or closed without an answer.
LOST = (OSError, asyncio.IncompleteReadError)


def project_owned_by(index: int, count: int, prefix: str = "p") -> str:
    """The first project key ``{prefix}{n}`` that worker ``index`` of ``count`` owns."""
    return next(f"{prefix}{n}" for n in range(1000) if owner(f"{prefix}{n}", count) == index)


# -- which request names which project (no I/O) -----------------------------------------


def head(path: str, query: str = "") -> Request:
    return Request("GET", path, query, {})


def test_owner_is_crc32_of_the_key_modulo_the_workers() -> None:
    assert owner("p1", 3) == zlib.crc32(b"p1") % 3
    assert {owner(f"p{n}", 4) for n in range(40)} == {0, 1, 2, 3}


def test_the_project_of_a_request_head() -> None:
    socketio = openreplay_paths("/ws-assist/socket")
    of = lambda path, query="": project_of(head(path, query), socketio, None)  # noqa: E731
    assert of("/public/p1/assist/sessions") == "p1"
    assert of("/public/p%2E1/assist/sessions/s1") == "p.1", "the key as the route table reads it"
    assert of("/ws/agent/p1") == "p1"
    assert of("/assist/KEY/sockets-live/p1") == "p1"
    assert of("/assist/KEY/sockets-live/p1/autocomplete") == "p1"
    assert of("/assist/KEY/sockets-list/p1/s9") == "p1"
    agent = "EIO=4&transport=websocket&peerId=p1-s9&identity=agent"
    assert of("/ws-assist/socket/", agent) == "p1"
    assert of("/socket", agent) == "p1"
    # Trackers land anywhere, and so does everything not about one project.
    assert of("/ws/tracker/p1") is None
    tab = "EIO=4&transport=websocket&peerId=p1-s9-t1&identity=session&tabId=t1"
    assert of("/ws-assist/socket/", tab) is None
    assert of("/public/p1") is None
    assert of("/healthz") is None and of("/metrics") is None
    # A configured key with a dash is the longest key the peerId starts with.
    assert project_of(head("/socket", "peerId=a-b-s9&identity=agent"), socketio, {"a-b": 1, "a": 2}) == "a-b"


# -- real workers -------------------------------------------------------------------------


class Workers:
    """``hub serve --workers N``: its port, its workers' pids and the metrics of each."""

    def __init__(self, hub: HubProcess, count: int) -> None:
        self.hub, self.count = hub, count

    @property
    def port(self) -> int:
        return self.hub.port

    def _lines(self, event: str) -> list[dict[str, str]]:
        found = []
        for line in self.hub.stderr.text().splitlines():
            if f" {event} " in line + " ":
                found.append(dict(re.findall(r"(\w+)=(\S+)", line.partition(event)[2])))
        return found

    def pid(self, index: int) -> int:
        """The pid of worker ``index``'s latest process."""
        pids = [int(f["pid"]) for f in self._lines("workers.worker") if f["worker"] == str(index)]
        return pids[-1]

    def listening(self, index: int) -> int:
        """Times worker ``index`` began taking hand-offs (once per process)."""
        return sum(f["worker"] == str(index) for f in self._lines("handoff.listening"))

    async def metrics(self, timeout: float = 20.0) -> dict[int, dict[str, float]]:
        """Every worker's metrics, by index: scrapes on new connections until each answered one."""
        seen: dict[int, dict[str, float]] = {}
        deadline = time.monotonic() + timeout
        while len(seen) < self.count:
            assert time.monotonic() < deadline, f"scrapes reached only workers {sorted(seen)}"
            try:
                reply = await http(self.port, "GET", "/metrics")
            except LOST:
                continue
            values = parse_metrics(reply.body.decode())
            seen[int(values["hub_worker_index"])] = values
        return seen


def parse_metrics(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def handoffs(values: dict[str, float], result: str) -> float:
    return values[f'hub_handoff_total{{result="{result}"}}']


def searches(values: dict[str, float]) -> float:
    return values["hub_search_duration_seconds_count"]


@contextmanager
def workers(count: int, *args: str) -> Iterator[Workers]:
    with RedisServer() as redis, HubProcess(
        "--redis-url", redis.url,
        "--node-id", "w",
        "--api-key", API_KEY,
        "--node-lease", "1.5",
        "--grace", "20",
        "--workers", str(count),
        *args,
    ) as hub:  # fmt: skip
        hub.wait_ready(path="/readyz", timeout=20)
        running = Workers(hub, count)
        deadline = time.monotonic() + 20
        while not all(running.listening(i) for i in range(count)):
            assert time.monotonic() < deadline, hub.stderr.text()
            time.sleep(0.05)
        try:
            yield running
        except BaseException:
            hub.terminate()  # the workers drain too (a kill of the parent alone also ends them)
            raise
        if hub.proc.poll() is None:  # (a test may have killed it)
            assert hub.terminate() == 0


async def tracker(port: int, project: str, sid: str) -> Any:
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws/tracker/{project}")
    await ws.send(json.dumps({"type": "start", "sessionID": sid, "userID": f"user-{sid}"}))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert reply["type"] == "started", reply
    return ws


async def sessions_of(port: int, project: str) -> set[str]:
    reply = await http(port, "GET", SEARCH.format(project) + "?limit=100")
    assert reply.status == 200, reply.body
    return {s["sessionID"] for s in reply.json()["data"]["sessions"]}


async def next_frame(ws: Any, kind: str) -> dict[str, Any]:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if frame["type"] == kind:
            return frame  # type: ignore[no-any-return]


@redis_only
async def test_searches_and_agents_of_a_project_are_all_served_by_its_owner() -> None:
    with workers(3) as hub:
        project = project_owned_by(1, 3)
        # Trackers land anywhere: each worker publishes its own.
        trackers = [await tracker(hub.port, project, f"s{i}") for i in range(6)]
        expected = {f"s{i}" for i in range(6)}
        await wait_for(lambda: sessions_of(hub.port, project), what="a first answer")
        await wait_for(lambda: _equal(sessions_of(hub.port, project), expected), timeout=10)
        before = await hub.metrics()
        rounds = 30
        for _ in range(rounds):
            assert await sessions_of(hub.port, project) == expected
        agents = []
        for _ in range(9):
            ws = await websockets.connect(
                f"ws://127.0.0.1:{hub.port}/ws/agent/{project}",
                additional_headers={"Authorization": f"Bearer {API_KEY}"},
            )
            await ws.send(json.dumps({"type": "subscribe"}))
            snapshot = await next_frame(ws, "snapshot")
            assert {s["sessionID"] for s in snapshot["sessions"]} == expected
            agents.append(ws)
        # Live updates reach every agent, whichever worker the tracker is on.
        await trackers[0].send(json.dumps({"type": "update", "pageTitle": "checkout"}))
        for ws in agents:
            update = await next_frame(ws, "session.update")
            assert update["sessionID"] == "s0" and update["changes"]["pageTitle"] == "checkout"
        after = await hub.metrics()
        assert after[1]["hub_agents"] == 9 and after[0]["hub_agents"] == after[2]["hub_agents"] == 0
        served = {i: searches(after[i]) - searches(before[i]) for i in range(3)}
        assert served == {0: 0, 1: rounds, 2: 0}, served
        sent = sum(handoffs(after[i], "sent") for i in (0, 2))
        assert sent == handoffs(after[1], "received") and sent >= 1
        assert handoffs(after[1], "sent") == 0
        assert all(handoffs(after[i], "failed") == 0 for i in range(3))
        for ws in agents + trackers:
            await ws.close()


async def _equal(answer: Any, expected: set[str]) -> bool:
    return bool(await answer == expected)


@redis_only
async def test_pipelined_requests_after_a_handed_off_one_are_answered_in_order() -> None:
    with workers(2) as hub:
        mine, theirs = project_owned_by(1, 2), project_owned_by(0, 2)
        ws = await tracker(hub.port, mine, "s1")
        await wait_for(lambda: _equal(sessions_of(hub.port, mine), {"s1"}), timeout=10)
        # A body larger than a hand-off carries inline: it goes beside the socket.
        padded = b"{" + b" " * (64 << 10) + b'"limit": 5}'
        batch = (
            _get(SEARCH.format(mine))
            + _get(SEARCH.format(theirs))  # owned by the other worker: served where the connection is
            + _get("/healthz")
            + _post(SEARCH.format(mine), padded)
            + _get(SEARCH.format(mine) + "/s1", close=True)
        )
        for _ in range(12):
            reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
            writer.write(batch)
            await writer.drain()
            answers = [await _read_answer(reader) for _ in range(5)]
            assert [a[0] for a in answers] == [200] * 5, answers
            assert {s["sessionID"] for s in answers[0][1]["data"]["sessions"]} == {"s1"}
            assert answers[1][1]["data"]["sessions"] == []
            assert answers[2][1] == {"status": "ok"}
            assert answers[3][1]["data"]["total"] == 1
            assert answers[4][1]["data"]["sessionID"] == "s1"
            assert await asyncio.wait_for(reader.read(1), 5) == b"", "closed after Connection: close"
            writer.close()
        after = await hub.metrics()
        sent = handoffs(after[0], "sent")
        assert sent >= 1 and sent == handoffs(after[1], "received")
        assert handoffs(after[0], "received") == 0, "an adopted connection is never handed on"
        await ws.close()


def _get(path: str, close: bool = False) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n{extra}\r\n".encode()


def _post(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, Any]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    return status, json.loads(await asyncio.wait_for(reader.readexactly(length), 5))


@redis_only
async def test_while_the_owner_is_down_other_workers_serve_its_project_and_then_hand_off_again() -> None:
    with workers(2) as hub:
        project = project_owned_by(1, 2)
        old_pid = hub.pid(1)
        # A worker dying in its first 2 s stops them all (workers.MIN_UPTIME_S).
        await asyncio.sleep(2.2)
        os.kill(old_pid, signal.SIGKILL)
        # Until worker 1 is back, worker 0 answers the project's searches itself.
        served_here = 0.0
        deadline = time.monotonic() + 20
        while not served_here:
            assert time.monotonic() < deadline, "no search served by worker 0 while worker 1 was down"
            try:
                reply = await http(hub.port, "GET", SEARCH.format(project))
            except LOST:
                continue  # a connection the killed worker had (accepted, or handed to it as it died)
            assert reply.status == 200, reply.body
            for index, values in (await hub.metrics()).items():
                if index == 0:
                    served_here = handoffs(values, "failed")
            if hub.listening(1) == 2:
                break
        assert served_here >= 1, "a search served locally while the owner was down"
        await wait_for(lambda: hub.listening(1) == 2, timeout=20, what="worker 1 back, taking hand-offs")
        assert hub.pid(1) != old_pid
        # Back: its project's searches go to it again.
        before = await hub.metrics()
        for _ in range(16):
            assert (await http(hub.port, "GET", SEARCH.format(project))).status == 200
        after = await hub.metrics()
        assert searches(after[1]) - searches(before[1]) == 16
        assert searches(after[0]) == searches(before[0])
        assert handoffs(after[1], "received") > handoffs(before[1], "received")


@redis_only
async def test_an_openreplay_agent_handshake_goes_to_the_owner_and_a_tab_stays() -> None:
    """OpenReplay's Socket.IO: an agent's project is in its handshake's peerId; tabs never move."""
    with workers(2, "--openreplay-jwt-secret", "s3cret") as hub:
        project = project_owned_by(1, 2)
        agent = f"EIO=4&transport=websocket&peerId={project}-s1&identity=agent"
        tab = (
            f"EIO=4&transport=websocket&peerId={project}-s1-t1&identity=session&tabId=t1"
            "&sessionInfo=%7B%22pageTitle%22%3A%22home%22%7D"
        )
        opened = []
        for query in [agent] * 8 + [tab] * 16:
            ws = await websockets.connect(f"ws://127.0.0.1:{hub.port}/ws-assist/socket/?{query}")
            # Engine.IO's open packet: the handshake was accepted.
            assert (await asyncio.wait_for(ws.recv(), 5)).startswith("0{")
            opened.append(ws)
        after = await hub.metrics()
        agents = {i: after[i]['hub_connections{kind="agent"}'] for i in (0, 1)}
        tabs = {i: after[i]['hub_connections{kind="tracker"}'] for i in (0, 1)}
        assert agents == {0: 0, 1: 8}, agents
        assert tabs[0] + tabs[1] == 16 and tabs[0] >= 1 and tabs[1] >= 1, f"tabs land anywhere: {tabs}"
        for ws in opened:
            await ws.close()


@redis_only
def test_workers_end_when_their_parent_is_killed() -> None:
    """A worker must not keep serving the port alone: SIGKILL of the parent drains them all."""
    with workers(2) as hub:
        pids = [hub.pid(i) for i in range(2)]
        hub.hub.proc.kill()
        hub.hub.proc.wait()
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in pids):
            assert time.monotonic() < deadline, f"workers {pids} outlived their parent"
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not reaped by init yet) is gone too.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
