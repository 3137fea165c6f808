"""Cross-node propagation latency: a tracker update on node A -> the agent frame on node B.

Starts a redis-server and two hub nodes (real processes, on free ports).
``--sessions`` trackers on node A send ``update`` frames at each rate, each
carrying its send time (``pageTitle`` = ``t<ns>``); an agent subscribed to the
whole project, in its own process, takes ``now - sent`` for every
``session.update`` it receives. The baseline is the same agent on node A
itself (no Redis in the path), in the same run; the figure to read is the
cross-node p99 and its ratio to the baseline.

    python -m loadtest.bench_cluster --rates 1000,10000 --seconds 5 --sessions 500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from loadtest.client import WsConn, ws_connect
from loadtest.procs import Server, free_port

API_KEY = "bench-cluster-key"
PROJECT = "bench"


class _Agent:
    def __init__(self) -> None:
        self.latencies_us: list[float] = []
        self.snapshot = asyncio.Event()

    def on_open(self, conn: WsConn) -> None:
        conn.send(b'{"type":"subscribe"}')

    def on_message(self, conn: WsConn, data: bytes) -> None:
        now = time.time_ns()
        frame = msgspec.json.decode(data)
        kind = frame.get("type")
        if kind == "session.update":
            title = frame["changes"].get("pageTitle")
            if isinstance(title, str) and title.startswith("t"):
                self.latencies_us.append((now - int(title[1:])) / 1000)
        elif kind == "snapshot":
            self.snapshot.set()

    def on_close(self, conn: WsConn, code: int | None, opened: bool) -> None:
        pass


def _agent_process(port: int, pipe: Connection) -> None:
    """Collect latencies until told to stop, then send them back."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        agent = _Agent()
        await ws_connect(
            f"ws://127.0.0.1:{port}",
            f"/ws/agent/{PROJECT}",
            agent,
            headers=[("Authorization", f"Bearer {API_KEY}")],
        )
        await agent.snapshot.wait()
        pipe.send("ready")
        loop = asyncio.get_running_loop()
        while True:
            message = await loop.run_in_executor(None, pipe.recv)
            if message == "reset":
                agent.latencies_us = []
            else:
                pipe.send(agent.latencies_us)
                return

    asyncio.run(main())


class _Tracker:
    def on_open(self, conn: WsConn) -> None: ...

    def on_message(self, conn: WsConn, data: bytes) -> None: ...

    def on_close(self, conn: WsConn, code: int | None, opened: bool) -> None: ...


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else float("nan")


async def _drive(trackers: list[WsConn], rate: int, seconds: float) -> float:
    """Send ``rate`` updates/s for ``seconds`` (5 ms ticks); returns the rate achieved."""
    tick = 0.005
    per_tick = rate * tick
    sent = 0
    owed = 0.0
    i = 0
    start = time.perf_counter()
    next_tick = start
    while (now := time.perf_counter()) - start < seconds:
        owed += per_tick
        while owed >= 1:
            trackers[i % len(trackers)].send(b'{"type":"update","pageTitle":"t%d"}' % time.time_ns())
            i += 1
            sent += 1
            owed -= 1
        next_tick += tick
        await asyncio.sleep(max(0.0, next_tick - time.perf_counter()))
    return sent / (now - start)


async def _measure(agent_port: int, trackers: list[WsConn], rate: int, seconds: float) -> dict[str, float]:
    parent, child = multiprocessing.get_context("fork").Pipe()
    proc = multiprocessing.get_context("fork").Process(target=_agent_process, args=(agent_port, child))
    proc.start()
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, parent.recv) == "ready"
    await _drive(trackers, rate, 1.0)  # warm-up
    await asyncio.sleep(0.2)
    parent.send("reset")
    achieved = await _drive(trackers, rate, seconds)
    await asyncio.sleep(0.5)  # the last frames in flight
    parent.send("stop")
    latencies: list[float] = await loop.run_in_executor(None, parent.recv)
    proc.join(5)
    return {
        "rate": achieved,
        "frames": len(latencies),
        "p50_ms": percentile(latencies, 0.50) / 1000,
        "p99_ms": percentile(latencies, 0.99) / 1000,
        "max_ms": max(latencies, default=float("nan")) / 1000,
    }


async def run(rates: list[int], seconds: float, sessions: int) -> list[dict[str, Any]]:
    redis_dir = tempfile.mkdtemp(prefix="bench-redis-")
    redis_port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", redis_dir],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    extra = f"--redis-url redis://127.0.0.1:{redis_port} --rate-limit 0 --max-conns-per-ip 0"
    a = Server("hub", API_KEY, extra=f"{extra} --node-id A")
    b = Server("hub", API_KEY, extra=f"{extra} --node-id B")
    rows: list[dict[str, Any]] = []
    try:
        await a.ready()
        await b.ready()
        trackers = []
        for i in range(sessions):
            conn = await ws_connect(a.url, f"/ws/tracker/{PROJECT}", _Tracker())
            conn.send(json.dumps({"type": "start", "sessionID": f"b{i}", "userID": f"u{i}"}).encode())
            trackers.append(conn)
        print(f"hub: {a.command}", file=sys.stderr)
        for rate in rates:
            for mode, port in (("same node (baseline)", a.port), ("cross node", b.port)):
                row = {"mode": mode, "target": rate, **await _measure(port, trackers, rate, seconds)}
                rows.append(row)
                print(
                    f"{mode:22} {rate:>6}/s sent {row['rate']:8.0f}/s frames {row['frames']:7d} "
                    f"p50 {row['p50_ms']:6.2f} ms p99 {row['p99_ms']:6.2f} ms max {row['max_ms']:7.2f} ms",
                    flush=True,
                )
        for conn in trackers:
            conn.abort()
    finally:
        for server in (a, b):
            server.proc.kill()
            server.proc.wait()
        redis.kill()
        redis.wait()
        shutil.rmtree(redis_dir, ignore_errors=True)
    return rows


def mirror_cpu(sessions: int = 500, batches: int = 2000, per_batch: int = 20) -> tuple[float, float]:
    """In-process µs per update: encoding on the publishing node, decode + apply on a receiving one."""
    from hub.cluster import Batch, _BatchOut
    from hub.index import LiveIndex
    from hub.record import Session
    from hub.registry import Registry
    from hub.wire import BatchKind

    encode = msgspec.msgpack.Encoder().encode
    decode = msgspec.msgpack.Decoder(Batch).decode
    records = [
        Session(
            sessionID=f"b{i}",
            projectKey=PROJECT,
            projectId=0,
            timestamp=1,
            lastActiveAt=1,
            userID=f"u{i}",
            userBrowser="Chrome",
            metadata={"plan": "a"},
        )
        for i in range(sessions)
    ]
    registry = Registry(LiveIndex(), grace_ms=30_000)
    for r in records:
        registry.remote_upsert("A", msgspec.structs.replace(r), 1)
    n = batches * per_batch
    start = time.perf_counter()
    wire = []
    for k in range(batches):
        changed = (records[(k * per_batch + j) % sessions] for j in range(per_batch))
        up = [msgspec.Raw(encode(msgspec.structs.replace(r, pageTitle=f"t{k}"))) for r in changed]
        wire.append(encode(_BatchOut("A", "e", PROJECT, k, BatchKind.OPS, up, [], [])))
    encode_us = (time.perf_counter() - start) / n * 1e6
    start = time.perf_counter()
    for data in wire:
        for record in decode(data).up:
            registry.remote_upsert("A", record, 2)
    apply_us = (time.perf_counter() - start) / n * 1e6
    return encode_us, apply_us


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", default="1000,10000", help="updates/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per rate and mode")
    parser.add_argument("--sessions", type=int, default=500, help="tracker sessions on node A")
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    encode_us, apply_us = mirror_cpu()
    print(f"mirror CPU per update: encode {encode_us:.1f} us, decode+apply on a peer {apply_us:.1f} us")
    rows = asyncio.run(run(rates, args.seconds, args.sessions))
    print("\n| path | target/s | sent/s | agent frames | p50 | p99 | max |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['target']:,} | {r['rate']:,.0f} | {r['frames']:,} | "
            f"{r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['max_ms']:.1f} ms |"
        )
    by = {(r["mode"], r["target"]): r for r in rows}
    for rate in rates:
        cross, base = by[("cross node", rate)], by[("same node (baseline)", rate)]
        print(f"p99 ratio cross/same at {rate:,}/s: {cross['p99_ms'] / base['p99_ms']:.2f}")


if __name__ == "__main__":
    main()
