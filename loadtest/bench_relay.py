"""Live relay (issue 17): the hub against a bare ``websockets`` relay, measured in the same run.

    python -m loadtest.bench_relay [--latency-duration 30] [--duration 60] [--out FILE]

Servers are real processes on free ports: the hub (``python -m hub serve``), two hub
nodes on a redis-server this run starts (cross node), and ``loadtest.relay_baseline``
(the bare relay: same frames, ``websockets.broadcast`` fan-out). The load comes from
two more processes, trackers and agents, built on ``loadtest.client.WsConn`` (no task
per connection, uvloop) so the generators stay lean on a 2-core machine; their CPU is
reported with the figures.

Cases (``--cases``, default all, in this order):

- ``latency-bare``, ``latency-hub``, ``latency-cross``: ``--sessions`` sessions emitting
  ``--rate`` events/s each plus one hot session at ``--hot-rate``, one agent joined to
  each; the tracker puts ``time.monotonic_ns()`` in each event's data just before the
  write, the agent process reads the same clock when the frame arrives (one machine:
  one CLOCK_MONOTONIC). Cross node: trackers on hub A, agents on hub B.
- ``stall-bare``, ``stall-hub``: ``latency-*`` plus one agent joined to the hot session
  that never reads (4 KiB SO_RCVBUF, reading paused after ``joined``): the server's RSS
  growth, the other agents' p99 against ``latency-*``, and whether the stalled agent was
  closed with 4008 (its close frame, read once the run is over, and the hub's /metrics).
  The bare relay has no bound (``broadcast`` queues without back-pressure): its growth
  is what the hub's relay buffer saves.
- ``throughput-bare``, ``throughput-hub``: one session streaming ``--mb-per-s`` of binary
  frames (random sizes ``--min-kb``..``--max-kb``) to ``--agents`` agents for
  ``--duration`` s; server CPU seconds per MB of tracker payload relayed (to every
  agent). Every frame each agent receives is checked byte for byte (header, then the
  payload against the tracker's deterministic bytes).

Only frames sent inside the measured window count (after a 1 s warm-up, all agents
joined). Each case starts fresh servers and stops them after. Every latency case keeps a
per-second timeline (server RSS; the hub's relay drops and 4008 closes from /metrics,
scraped alike in every case) and each second's p99: a burst of the shared machine's other
work shows as a few bad seconds (and in the trackers' pacing lag), a cost of the server as
a level. ``--repeat N`` runs the cases round robin; the summary takes medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import multiprocessing
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import psutil
import uvloop

from loadtest.client import OP_BINARY, WsConn, frame, handshake
from loadtest.procs import Server, Watched, free_port
from loadtest.stats import pct

API_KEY = "bench-key"
PROJECT = "bench"
HOT = "hot"
POOL_SEED = 17
WARMUP_S = 1.0
HEARTBEAT_S = 5.0
STALL_RCVBUF = 4096
LATENCY_CASES = ("latency-bare", "latency-hub", "latency-cross", "stall-bare", "stall-hub")
THROUGHPUT_CASES = ("throughput-bare", "throughput-hub")
CASES = (*LATENCY_CASES, *THROUGHPUT_CASES)


@dataclass
class Load:
    """What the generator processes do (pickled to them)."""

    tracker_port: int
    agent_port: int
    binary: bool
    sessions: int = 0  # sessions at ``rate`` (text), besides the hot one
    rate: float = 20.0
    hot_rate: float = 1000.0
    bytes_per_s: float = 2e6  # binary
    min_size: int = 4096
    max_size: int = 65536
    agents: int = 1  # agents per session
    stalled: bool = False  # one more agent on the hot session that never reads


def session_ids(load: Load) -> list[str]:
    return [HOT] if load.binary else [HOT, *(f"s{i}" for i in range(load.sessions))]


def payload_pool() -> bytes:
    """The bytes binary frames are cut from, the same in the tracker and agent processes."""
    return random.Random(POOL_SEED).randbytes(2 * 65536)


def pool_offset(seq: int) -> int:
    return (seq * 7919) % 65536


async def connect(
    port: int, path: str, handler: Any, headers: list[tuple[str, str]], rcvbuf: int = 0
) -> WsConn:
    """A ``WsConn`` on 127.0.0.1 (``rcvbuf``: SO_RCVBUF set before connecting, so the window stays small)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    conn = WsConn(handler, handshake("127.0.0.1", port, path, headers), waiter)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    await loop.create_connection(lambda: conn, sock=sock)
    await asyncio.wait_for(waiter, 10)
    return conn


def on_parent(conn: Connection) -> asyncio.Future[Any]:
    """The parent's next message over the pipe, without blocking the loop."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[Any] = loop.create_future()

    def readable() -> None:
        loop.remove_reader(conn.fileno())
        # The loop made the pipe non-blocking; a large answer back must not meet EAGAIN.
        os.set_blocking(conn.fileno(), True)
        got.set_result(conn.recv())

    loop.add_reader(conn.fileno(), readable)
    return got


# -- the trackers' process ----------------------------------------------------------------------


class Tab:
    """One tracker connection: started, then streaming while its session has agents."""

    def __init__(self, i: int, sid: str, period: float, woken: list[int]) -> None:
        self.i = i
        self.woken = woken
        self.sid = sid
        self.period = period
        self.conn: WsConn | None = None
        self.started = asyncio.get_running_loop().create_future()
        self.watched = False
        self.scheduled = False
        self.close_code: int | None = None
        self.closed = False

    def on_open(self, conn: WsConn) -> None:
        self.conn = conn
        conn.send(json.dumps({"type": "start", "sessionID": self.sid, "tabId": "t1"}).encode())

    def on_message(self, conn: WsConn, data: bytes) -> None:
        msg = json.loads(data)
        if msg.get("type") == "started" and not self.started.done():
            self.started.set_result(None)
        elif msg.get("type") == "agents":
            self.watched = msg.get("count", 0) > 0
            if self.watched:
                self.woken.append(self.i)

    def on_close(self, conn: WsConn, code: int | None, opened: bool) -> None:
        self.closed, self.close_code, self.watched = True, code, False
        if not self.started.done():
            self.started.set_exception(ConnectionError(f"tracker {self.sid} closed ({code})"))


def trackers_main(load: Load, pipe: Connection) -> None:
    uvloop.run(_trackers(load, pipe))


async def _trackers(load: Load, pipe: Connection) -> None:
    pool = payload_pool()
    rng = random.Random(1)
    tabs = []
    woken: list[int] = []  # tabs whose session got its first agent
    for i, sid in enumerate(session_ids(load)):
        # Binary: each frame's period is its size / bytes_per_s.
        period = 0.0 if load.binary else 1 / (load.hot_rate if sid == HOT else load.rate)
        tab = Tab(i, sid, period, woken)
        await connect(load.tracker_port, f"/ws/tracker/{PROJECT}", tab, [])
        tabs.append(tab)
    await asyncio.gather(*(t.started for t in tabs))
    pipe.send("ready")
    stop = on_parent(pipe)
    heap: list[tuple[float, int]] = []
    lags: array[float] = array("d")
    sent = sent_bytes = seq = 0
    next_beat = time.monotonic() + HEARTBEAT_S
    while not stop.done():
        now = time.monotonic()
        while woken:
            i = woken.pop()
            if tabs[i].watched and not tabs[i].scheduled:
                tabs[i].scheduled = True
                # Spread the sessions' events over their period.
                heapq.heappush(heap, (now + rng.random() * tabs[i].period, i))
        while heap and heap[0][0] <= now:
            at, i = heapq.heappop(heap)
            tab = tabs[i]
            if not tab.watched or tab.conn is None:
                tab.scheduled = False
                continue
            lags.append(now - at)
            seq += 1
            if load.binary:
                size = rng.randint(load.min_size, load.max_size)
                head = seq.to_bytes(8, "big") + time.monotonic_ns().to_bytes(8, "big")
                off = pool_offset(seq)
                tab.conn.write(frame(head + pool[off : off + size - 16], OP_BINARY))
                period = size / load.bytes_per_s
                sent_bytes += size
            else:
                body = (
                    b'{"type":"emit","event":"click","data":{"t":%d,"n":%d,'
                    b'"path":"body>div#app>main>section.cart>button.checkout"}}'
                ) % (time.monotonic_ns(), seq)
                tab.conn.write(frame(body))
                period = tab.period
                sent_bytes += len(body)
            sent += 1
            heapq.heappush(heap, (at + period, i))
        if now >= next_beat:
            next_beat = now + HEARTBEAT_S
            for tab in tabs:
                if tab.conn is not None and tab.conn.open:
                    tab.conn.send(b'{"type":"heartbeat"}')
        # Whole milliseconds: the loop's timers have that resolution, a shorter sleep spins.
        wait = heap[0][0] - time.monotonic() if heap else 0.01
        await asyncio.sleep(min(max(wait, 0.001), 0.05))
    lag_ms = sorted(x * 1000 for x in lags)
    closes = {t.sid: t.close_code for t in tabs if t.closed}
    pipe.send(
        {
            "sent": sent,
            "sent_bytes": sent_bytes,
            "lag_p99_ms": pct(lag_ms, 99),
            "lag_max_ms": lag_ms[-1] if lag_ms else None,
            "tracker_closes": closes,
        }
    )
    for tab in tabs:
        if tab.conn is not None:
            tab.conn.abort()


# -- the agents' process ------------------------------------------------------------------------


class Agent:
    """One agent connection joined to one session; it notes each event's send time and its own."""

    def __init__(self, sid: str, pool: bytes, sent: array[int], lat: array[int], sizes: array[int]) -> None:
        self.sid = sid
        self.pool = pool
        # Per frame: the tracker's send time and the latency (ns), and (binary) the payload's size.
        self.sent, self.lat, self.sizes = sent, lat, sizes
        self.joined = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.conn: WsConn | None = None
        self.frames = self.bytes = self.checked = self.bad = self.gaps = self.retries = 0

    def on_open(self, conn: WsConn) -> None:
        self.conn = conn
        self.join()

    def join(self) -> None:
        if self.conn is not None:
            self.conn.send(json.dumps({"type": "join", "sessionID": self.sid}).encode())

    def on_message(self, conn: WsConn, data: bytes) -> None:
        now = time.monotonic_ns()
        if data[:1] != b"{":
            self.binary(data, now)
            return
        msg = json.loads(data)
        kind = msg.get("type")
        if kind == "session.event":
            self.sent.append(msg["data"]["t"])
            self.lat.append(now - msg["data"]["t"])
            self.frames += 1
        elif kind == "joined" and not self.joined.done():
            self.joined.set_result(None)
        elif kind == "session.gap":
            self.gaps += 1
        elif kind == "error" and msg.get("code") == "not_found" and self.retries < 50:
            # The node of the agent may not mirror the session yet (cross node): ask again.
            self.retries += 1
            asyncio.get_running_loop().call_later(0.1, self.join)
        elif kind == "error":
            raise RuntimeError(f"agent {self.sid}: {msg}")

    def binary(self, data: bytes, now: int) -> None:
        """A relayed binary frame: the header names the session and tab; the payload is the tracker's."""
        n = int.from_bytes(data[:2], "big")
        head = json.loads(data[2 : 2 + n])
        payload = data[2 + n :]
        seq = int.from_bytes(payload[:8], "big")
        t = int.from_bytes(payload[8:16], "big")
        off = pool_offset(seq)
        self.checked += 1
        if (
            head != {"sessionID": self.sid, "tab": "t1"}
            or payload[16:] != self.pool[off : off + len(payload) - 16]
        ):
            self.bad += 1
        self.sent.append(t)
        self.lat.append(now - t)
        self.sizes.append(len(payload))
        self.frames += 1
        self.bytes += len(payload)

    def on_close(self, conn: WsConn, code: int | None, opened: bool) -> None:
        if not self.closed.done():
            self.closed.set_result(code)
        if not self.joined.done():
            self.joined.set_exception(ConnectionError(f"agent {self.sid} closed ({code})"))


def agents_main(load: Load, pipe: Connection) -> None:
    uvloop.run(_agents(load, pipe))


async def _agents(load: Load, pipe: Connection) -> None:
    pool = payload_pool()
    sent: array[int] = array("q")
    lat: array[int] = array("q")
    sizes: array[int] = array("q")
    auth = [("Authorization", f"Bearer {API_KEY}")]
    path = f"/ws/agent/{PROJECT}"
    agents = []
    for sid in session_ids(load):
        for _ in range(load.agents):
            agent = Agent(sid, pool, sent, lat, sizes)
            await connect(load.agent_port, path, agent, auth)
            agents.append(agent)
    await asyncio.wait_for(asyncio.gather(*(a.joined for a in agents)), 30)
    stalled = None
    if load.stalled:
        # Its own arrays: what it gets (once the run is over) is not a latency sample.
        stalled = Agent(HOT, pool, array("q"), array("q"), array("q"))
        await connect(load.agent_port, path, stalled, auth, rcvbuf=STALL_RCVBUF)
        await asyncio.wait_for(stalled.joined, 30)
        assert stalled.conn is not None and stalled.conn.transport is not None
        stalled.conn.transport.pause_reading()
    pipe.send("ready")
    await on_parent(pipe)
    closes = {a.sid: a.closed.result() for a in agents if a.closed.done()}
    result: dict[str, Any] = {
        "frames": sum(a.frames for a in agents),
        "bytes": sum(a.bytes for a in agents),
        "checked": sum(a.checked for a in agents),
        "bad": sum(a.bad for a in agents),
        "gaps": sum(a.gaps for a in agents),
        "join_retries": sum(a.retries for a in agents),
        "agent_closes": closes,
    }
    if stalled is not None and stalled.conn is not None:
        # Read what the server left for it: a close frame at the end if it was closed and the
        # frame reached it (a server that gave up on the closing handshake reset the connection).
        if stalled.conn.transport is not None:
            stalled.conn.transport.resume_reading()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(stalled.closed), 5)
        result["stalled"] = {
            "closed": stalled.closed.done(),
            "close_code": stalled.closed.result() if stalled.closed.done() else None,
            "frames_read_after": stalled.frames,
            "gaps": stalled.gaps,
        }
    pipe.send((result, sent.tobytes(), lat.tobytes(), sizes.tobytes()))
    for agent in agents:
        if agent.conn is not None:
            agent.conn.abort()


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Cluster:
    """The servers of one case: what the trackers and agents connect to, and what is watched."""

    name: str
    servers: list[Any]
    redis: subprocess.Popen[bytes] | None = None
    redis_dir: str = ""
    commands: list[str] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.servers]

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        if self.redis is not None:
            self.redis.kill()
            self.redis.wait()
            shutil.rmtree(self.redis_dir, ignore_errors=True)


class Bare:
    """``loadtest.relay_baseline`` on a free port (``Server``'s shape: proc, port, stop)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.args = [
            sys.executable,
            "-m",
            "loadtest.relay_baseline",
            "--port",
            str(self.port),
            "--api-key",
            API_KEY,
        ]
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise SystemExit("the bare relay did not start") from None
                time.sleep(0.05)

    @property
    def command(self) -> str:
        return f"python -m loadtest.relay_baseline --port PORT --api-key {API_KEY}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_redis() -> tuple[subprocess.Popen[bytes], str, int]:
    """A redis-server with nothing persisted on a free port, once it answers PING."""
    folder = tempfile.mkdtemp(prefix="bench-relay-redis-")
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*args, "--dir", folder], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, folder, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start")


def hub_flags(binary: bool) -> str:
    # Per-message rate limit off: the hot session emits 1,000 events/s. Throughput: relay limits
    # above 2 MB/s of up-to-64 KiB frames; latency: the relay's own defaults.
    flags = "--rate-limit 0 --drain-timeout 1"
    if binary:
        flags += " --max-frame 131072 --relay-rate 8388608 --relay-burst 16777216 --relay-max-event 131072"
    return flags


def servers_for(case: str) -> Cluster:
    binary = case.startswith("throughput")
    if case.endswith("-bare"):
        bare = Bare()
        return Cluster(case, [bare], commands=[bare.command])
    if case == "latency-cross":
        redis, folder, port = start_redis()
        extra = f"{hub_flags(binary)} --redis-url redis://127.0.0.1:{port}"
        nodes = [
            Server("hub", API_KEY, f"{extra} --node-id A"),
            Server("hub", API_KEY, f"{extra} --node-id B"),
        ]
        cluster = Cluster(
            case, list(nodes), redis, folder, [s.command.replace(str(port), "RPORT") for s in nodes]
        )
    else:
        hub = Server("hub", API_KEY, hub_flags(binary))
        cluster = Cluster(case, [hub], commands=[hub.command])
    try:
        for node in cluster.servers:
            asyncio.run(node.ready())
    except BaseException:
        cluster.stop()
        raise
    return cluster


def metrics(port: int) -> dict[str, float]:
    """The hub's relay counters from /metrics (the lines that name the relay)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    found = {}
    for line in raw.decode(errors="replace").split("\r\n\r\n", 1)[-1].splitlines():
        if "relay" in line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def spawn(target: Any, load: Load) -> tuple[multiprocessing.process.BaseProcess, Connection]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(load, child), daemon=True)
    proc.start()
    return proc, parent


def expect(pipe: Connection, proc: multiprocessing.process.BaseProcess, timeout: float) -> Any:
    if not pipe.poll(timeout):
        raise RuntimeError(f"{proc.name} did not answer within {timeout} s (exit code {proc.exitcode})")
    return pipe.recv()


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def run_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    binary = case.startswith("throughput")
    duration = args.duration if binary else args.latency_duration
    cluster = servers_for(case)
    first, last = cluster.servers[0].port, cluster.servers[-1].port
    load = Load(
        tracker_port=first,
        agent_port=last,
        binary=binary,
        sessions=args.sessions,
        rate=args.rate,
        hot_rate=args.hot_rate,
        bytes_per_s=args.mb_per_s * 1e6,
        min_size=args.min_kb * 1024,
        max_size=args.max_kb * 1024,
        agents=args.agents if binary else 1,
        stalled=case.startswith("stall-"),
    )
    procs: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    try:
        procs.append(spawn(trackers_main, load))
        expect(procs[0][1], procs[0][0], 60)
        procs.append(spawn(agents_main, load))
        expect(procs[1][1], procs[1][0], 60)
        time.sleep(WARMUP_S)
        watched = Watched(cluster.pids)
        gen_pids = [p.pid for p, _ in procs if p.pid is not None]
        rss0, cpu0, gen0 = watched.rss(), watched.cpu_seconds(), [cpu_of([p]) for p in gen_pids]
        redis0 = cpu_of([cluster.redis.pid]) if cluster.redis else 0.0
        go = time.monotonic_ns()
        rss_max = rss0
        timeline: list[dict[str, float]] = []
        next_point = go
        while (now := time.monotonic_ns()) - go < duration * 1e9:
            time.sleep(0.25)
            rss = watched.rss()
            rss_max = max(rss_max, rss)
            if now >= next_point and not binary:
                # Each second: RSS, and the hub's drops and 4008 closes. Every latency case
                # scrapes alike: a scrape costs the hub ~1 ms and its first one ~0.6 MiB of RSS.
                next_point += 1_000_000_000
                point = {"t": round((now - go) / 1e9, 1), "rss_mib": round((rss - rss0) / 2**20, 2)}
                if not case.endswith("-bare"):
                    counters = metrics(last)
                    point["dropped"] = counters.get("hub_relay_dropped_total", 0)
                    point["closed_4008"] = counters.get('hub_relay_closes_total{reason="agent_too_slow"}', 0)
                timeline.append(point)
        stop = time.monotonic_ns()
        cpu = watched.cpu_seconds() - cpu0
        gen = [cpu_of([p]) - c for p, c in zip(gen_pids, gen0, strict=True)]
        redis_cpu = cpu_of([cluster.redis.pid]) - redis0 if cluster.redis else None
        rss_end = watched.rss()
        procs[0][1].send("stop")
        trackers = expect(procs[0][1], procs[0][0], 30)
        time.sleep(0.5)  # frames in flight arrive
        procs[1][1].send("stop")
        agents, sent_raw, lat_raw, sizes_raw = expect(procs[1][1], procs[1][0], 30)
        relay = metrics(last) if not case.endswith("-bare") else {}
        if case == "latency-cross":
            relay.update({f"A {k}": v for k, v in metrics(first).items()})
    finally:
        for proc, _ in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        cluster.stop()
    sent, lat, sizes = array("q"), array("q"), array("q")
    sent.frombytes(sent_raw)
    lat.frombytes(lat_raw)
    sizes.frombytes(sizes_raw)
    inside = [i for i in range(len(sent)) if go <= sent[i] < stop]
    window = [lat[i] / 1e6 for i in inside]
    seconds = (stop - go) / 1e9
    result: dict[str, Any] = {
        "case": case,
        "servers": cluster.commands,
        "seconds": round(seconds, 2),
        "load": asdict(load),
        "latency_ms": {
            "n": len(window),
            "p50": pct(window, 50),
            "p99": pct(window, 99),
            "max": round(max(window), 3) if window else None,
        },
        "events_per_s": round(len(window) / seconds, 1),
        "server_cpu_s": round(cpu, 3),
        "server_cpu_pct": round(100 * cpu / seconds, 1),
        "trackers_cpu_pct": round(100 * gen[0] / seconds, 1),
        "agents_cpu_pct": round(100 * gen[1] / seconds, 1),
        "redis_cpu_pct": round(100 * redis_cpu / seconds, 1) if redis_cpu is not None else None,
        "rss_mib": {
            "at_start": round(rss0 / 2**20, 2),
            "max": round(rss_max / 2**20, 2),
            "end": round(rss_end / 2**20, 2),
            "growth_max": round((rss_max - rss0) / 2**20, 2),
        },
        "trackers": trackers,
        "agents": agents,
        "relay_metrics": relay,
    }
    if timeline:
        result["timeline"] = timeline
    if not binary:
        # When in the run the tail came: each second's p99 (ms), by send time.
        seconds_of: dict[int, list[float]] = {}
        for i in inside:
            seconds_of.setdefault(int((sent[i] - go) // 1_000_000_000), []).append(lat[i] / 1e6)
        result["p99_by_second_ms"] = [pct(seconds_of.get(k, []), 99) for k in range(int(seconds) + 1)]
    if binary:
        # Each MB of tracker payload reaches every agent: relayed MB = payload bytes received / agents.
        mb = sum(sizes[i] for i in inside) / load.agents / 1e6
        result["relayed_mb"] = round(mb, 2)
        result["mb_per_s"] = round(mb / seconds, 3)
        result["cpu_s_per_mb"] = round(cpu / mb, 5) if mb else None
    return result


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def median(runs: list[dict[str, Any]], get: Callable[[dict[str, Any]], float | None]) -> float | None:
    values = [v for v in map(get, runs) if v is not None]
    return round(statistics.median(values), 5) if values else None


def summary(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Figures against their targets and the bare relay of the same run: medians over ``--repeat``."""

    def p(case: str, q: str) -> float | None:
        return median(results[case], lambda r: r["latency_ms"][q]) if case in results else None

    out: dict[str, Any] = {
        "p99_ms_of_each_run": {c: [r["latency_ms"]["p99"] for r in runs] for c, runs in results.items()},
    }
    if "latency-hub" in results:
        out["same_node_p99_ms"] = p("latency-hub", "p99")
        out["same_node_p99_ok"] = (p("latency-hub", "p99") or 1e9) <= 5.0
        if "latency-bare" in results:
            out["same_node_p50_vs_bare"] = ratio(p("latency-hub", "p50"), p("latency-bare", "p50"))
            out["same_node_p99_vs_bare"] = ratio(p("latency-hub", "p99"), p("latency-bare", "p99"))
    if "latency-cross" in results:
        out["cross_node_p99_ms"] = p("latency-cross", "p99")
        out["cross_node_p99_ok"] = (p("latency-cross", "p99") or 1e9) <= 15.0
        out["cross_node_p50_ms"] = p("latency-cross", "p50")
    for server in ("hub", "bare"):
        stall, healthy = f"stall-{server}", f"latency-{server}"
        if stall not in results:
            continue
        stalled = [r["agents"]["stalled"] for r in results[stall]]
        out[f"{stall}_stalled_closed"] = [(s["closed"], s["close_code"]) for s in stalled]
        if server == "hub":
            closes = 'hub_relay_closes_total{reason="agent_too_slow"}'
            out[f"{stall}_4008_by_hub"] = [r["relay_metrics"].get(closes) for r in results[stall]]
        if healthy in results:
            out[f"{stall}_p99_vs_healthy"] = ratio(p(stall, "p99"), p(healthy, "p99"))
            growth = median(results[stall], lambda r: r["rss_mib"]["growth_max"])
            base = median(results[healthy], lambda r: r["rss_mib"]["growth_max"])
            if growth is not None and base is not None:
                out[f"{stall}_rss_growth_mib_over_healthy"] = round(growth - base, 2)
    if "throughput-hub" in results:
        hub = median(results["throughput-hub"], lambda r: r["cpu_s_per_mb"])
        out["throughput_cpu_s_per_mb_hub"] = hub
        if "throughput-bare" in results:
            bare = median(results["throughput-bare"], lambda r: r["cpu_s_per_mb"])
            out["throughput_cpu_s_per_mb_bare"] = bare
            out["throughput_hub_vs_bare"] = ratio(hub, bare)
        runs = [r for c in THROUGHPUT_CASES for r in results.get(c, [])]
        out["bytes_checked"] = sum(r["agents"]["checked"] for r in runs)
        out["bytes_bad"] = sum(r["agents"]["bad"] for r in runs)
    return out


def line(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    text = (
        f"{r['case']:16} {lat['n']:7d} frames {r['events_per_s']:8.1f}/s  "
        f"p50 {lat['p50']} ms  p99 {lat['p99']} ms  max {lat['max']} ms  "
        f"server CPU {r['server_cpu_pct']}%  trackers {r['trackers_cpu_pct']}%  "
        f"agents {r['agents_cpu_pct']}%  "
        f"RSS +{r['rss_mib']['growth_max']} MiB"
    )
    if "cpu_s_per_mb" in r:
        agents = r["agents"]
        text += f"  {r['mb_per_s']} MB/s  {r['cpu_s_per_mb']} CPU s/MB"
        text += f"  checked {agents['checked']} bad {agents['bad']}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES))
    parser.add_argument(
        "--latency-duration", type=float, default=30.0, help="seconds measured per latency case"
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds measured per throughput case")
    parser.add_argument("--sessions", type=int, default=100, help="watched sessions besides the hot one")
    parser.add_argument("--rate", type=float, default=20.0, help="events/s of each watched session")
    parser.add_argument("--hot-rate", type=float, default=1000.0, help="events/s of the hot session")
    parser.add_argument("--mb-per-s", type=float, default=2.0, help="binary MB/s of the throughput session")
    parser.add_argument("--min-kb", type=int, default=4)
    parser.add_argument("--max-kb", type=int, default=64)
    parser.add_argument("--agents", type=int, default=3, help="agents of the throughput session")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each case, round robin (medians)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    load_before = os.getloadavg()
    print(f"load average {load_before[0]:.1f}, {os.cpu_count()} cores", flush=True)
    results: dict[str, list[dict[str, Any]]] = {}
    # Round robin: a burst of the machine's other work falls on one run of a case, not all.
    for _ in range(args.repeat):
        for case in cases:
            results.setdefault(case, []).append(run_case(case, args))
            print(line(results[case][-1]), flush=True)
    figures = summary(results)
    print(json.dumps(figures, indent=1))
    document = {
        "command": "python -m loadtest.bench_relay " + " ".join(sys.argv[1:]),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "summary": figures,
        "cases": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(document, f, indent=1)


if __name__ == "__main__":
    main()
