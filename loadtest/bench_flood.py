"""Flood isolation: one client floods, how late do the others' heartbeats land?

    python -m loadtest.bench_flood [--trackers 50] [--duration 5] [--interval 0.1]
    python -m loadtest.bench_flood --cost [--trackers 200] [--beats 1000]

Flood mode runs a hub process per configuration, in one run:

- ``off``: no rate limit, no yielding, default socket buffer (no mitigation);
- ``yield``: no rate limit, but reads capped per turn and a small SO_RCVBUF;
- ``on``: the defaults (rate limit + yielding + small buffer).

A flooder process sends heartbeats as fast as the socket takes them and
reconnects whenever the hub closes it. Meanwhile ``--trackers`` well-behaved
trackers send, every ``--interval`` s, a heartbeat followed by a ``start``
of their own session; the ``started`` reply carries the session's
``lastActiveAt``, the hub's clock when those frames reached the index, so
the delay is ``lastActiveAt - send time`` (same machine, same clock).

Cost mode measures the hub's CPU per heartbeat with the rate limiter off and
on (a bucket that never trips), alternating, best of three each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import time
from typing import Any

from loadtest.client import frame, handshake
from loadtest.procs import free_port, start_hub
from loadtest.wsraw import RawWs

HEARTBEAT = b'{"type":"heartbeat"}'
CONFIGS = {
    "off": ["--rate-limit", "0", "--read-batch", "0", "--tracker-rcvbuf", "0"],
    "yield": ["--rate-limit", "0"],
    "on": [],
}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def flooder(port: int, stop: Any, counts: Any) -> None:
    """Send heartbeats flat out; reconnect whenever the hub closes the connection."""
    burst = frame(HEARTBEAT) * 32768
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(handshake("127.0.0.1", port, "/ws/tracker/flood"))
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = s.recv(4096)
                    if not chunk:
                        raise ConnectionError
                    head += chunk
                s.sendall(frame(b'{"type":"start","sessionID":"flooder"}'))
                counts[0] += 1
                while not stop.is_set():
                    s.sendall(burst)
                    counts[1] += len(burst)
        except OSError:
            time.sleep(0.001)


async def connect(port: int, i: int) -> RawWs:
    ws = await RawWs.connect(port, "/ws/tracker/bench")
    ws.send(json.dumps({"type": "start", "sessionID": f"t{i}"}).encode())
    await ws.recv()
    return ws


async def tracker(ws: RawWs, i: int, interval: float, until: float, delays: list[float]) -> int:
    sid = f"t{i}"
    sent: list[float] = []
    probe = json.dumps({"type": "start", "sessionID": sid}).encode()

    async def reader() -> None:
        while True:
            _, payload = await ws.recv()
            msg = json.loads(payload)
            if msg.get("type") == "started":
                delays.append(msg["session"]["lastActiveAt"] - sent.pop(0))

    task = asyncio.create_task(reader())
    await asyncio.sleep(interval * (i % 10) / 10)
    while time.time() < until:
        sent.append(time.time() * 1000)
        ws.send(HEARTBEAT)
        ws.send(probe)
        await asyncio.sleep(interval)
    # Wait for the hub to catch up with what was sent (it may be far behind).
    deadline = time.monotonic() + 60
    while sent and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    task.cancel()
    ws.close()
    return len(sent)


async def flood_run(name: str, extra: list[str], n: int, duration: float, interval: float) -> dict[str, Any]:
    port = free_port()
    hub = start_hub(port, "bench", extra)
    stop = multiprocessing.Event()
    counts = multiprocessing.Array("d", 2)
    flood = multiprocessing.Process(target=flooder, args=(port, stop, counts), daemon=True)
    try:
        conns = await asyncio.gather(*(connect(port, i) for i in range(n)))
        flood.start()
        await asyncio.sleep(0.5)
        delays: list[float] = []
        until = time.time() + duration
        lost = await asyncio.gather(*(tracker(ws, i, interval, until, delays) for i, ws in enumerate(conns)))
        stop.set()
    finally:
        flood.join(5)
        if flood.is_alive():
            flood.kill()
        hub.terminate()
        hub.wait(10)
    delays.sort()
    q = statistics.quantiles(delays, n=100) if len(delays) > 1 else [0.0] * 99
    return {
        "config": name,
        "samples": len(delays),
        "lost": sum(lost),
        "p50_ms": q[49],
        "p99_ms": q[98],
        "max_ms": delays[-1] if delays else 0.0,
        "flood_connects": int(counts[0]),
        "flood_mb_sent": counts[1] / 1e6,
    }


async def cost_run(extra: list[str], n: int, beats: int) -> float:
    port = free_port()
    hub = start_hub(port, "bench", ["--tracker-rcvbuf", "0", *extra])
    try:
        conns = []
        for i in range(n):
            ws = await RawWs.connect(port, "/ws/tracker/bench")
            ws.send(json.dumps({"type": "start", "sessionID": f"c{i}"}).encode())
            await ws.recv()
            conns.append(ws)
        batch = frame(HEARTBEAT) * beats
        probes = [frame(json.dumps({"type": "start", "sessionID": f"c{i}"}).encode()) for i in range(n)]
        before = cpu_seconds(hub.pid)
        for ws, probe in zip(conns, probes, strict=True):
            ws.writer.write(batch + probe)
        await asyncio.gather(*(ws.recv() for ws in conns))
        spent = cpu_seconds(hub.pid) - before
        for ws in conns:
            ws.close()
        return spent / (n * beats) * 1e6
    finally:
        hub.terminate()
        hub.wait(10)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--trackers", type=int, default=50)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--cost", action="store_true", help="CPU per heartbeat, rate limiter off vs on")
    parser.add_argument("--beats", type=int, default=1000)
    args = parser.parse_args()
    if args.cost:
        n = args.trackers if args.trackers != 50 else 200
        variants = {
            "limiter off": ["--rate-limit", "0", "--read-batch", "0"],
            "limiter on": ["--rate-limit", "1e9", "--rate-burst", "1000000000", "--read-batch", "0"],
            "limiter + yield": ["--rate-limit", "1e9", "--rate-burst", "1000000000"],
        }
        best: dict[str, float] = {}
        for _ in range(3):
            for name, extra in variants.items():
                us = await cost_run(extra, n, args.beats)
                best[name] = min(best.get(name, us), us)
        base = best["limiter off"]
        print("| variant | hub CPU per heartbeat (best of 3) | vs off |\n|---|---|---|")
        for name, us in best.items():
            print(f"| {name} | {us:.2f} µs | {us / base:.2f}x |")
        return
    rows = []
    for name, extra in CONFIGS.items():
        rows.append(await flood_run(name, extra, args.trackers, args.duration, args.interval))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| mitigation | heartbeats | lost | p50 | p99 | max | flooder connects | MB the flooder wrote |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['samples']} | {r['lost']} | {r['p50_ms']:.0f} ms | {r['p99_ms']:.0f} ms "
            f"| {r['max_ms']:.0f} ms | {r['flood_connects']} | {r['flood_mb_sent']:.0f} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
