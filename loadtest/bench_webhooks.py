"""Webhooks: delivery latency, one node's sender throughput, and trackers while the receiver stalls.

    python -m loadtest.bench_webhooks [--rate 1000] [--duration 10] [--burst 20000]

One hub process (``--webhook-urls`` to a receiver on this machine) and a receiver process: a
raw asyncio HTTP/1.1 server (uvloop) that answers 204 and notes when each event arrived, or
(``stall``) reads requests and never answers.

- latency: ``--trackers`` connections each loop start -> started -> end, paced to ``--rate``
  events/s (a start and an end per cycle); latency = arrival at the receiver - the event's
  ``time`` (the hub's clock when the registry changed; same machine, ms resolution).
- trackers: the same load three times, the start -> started round trip's p50/p99 with webhooks
  off, with a healthy receiver, and with a stalled one (the hub's queue fills, then overflows).
- throughput: ``--burst`` events queued while the receiver is down, then it comes up; events/s
  from its first arrival to its last, and the hub's CPU per delivery over that time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import statistics
import time
from typing import Any

import uvloop

from loadtest.procs import free_port, start_hub
from loadtest.wsraw import RawWs

API_KEY = "bench-key"
SECRET = "bench-secret"


# -- the receiver (a child process) ----------------------------------------------------------


def receiver(port: int, mode: str, results: Any, ready: Any, count: Any) -> None:
    """Serve until SIGTERM, then send [(arrival ms, event time ms)] through ``results``."""
    arrivals: list[tuple[float, int]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length)
                if mode == "stall":
                    continue  # read, never answered
                arrivals.append((time.time() * 1000, json.loads(body)["time"]))
                count.value += 1
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        ready.set()
        await stop.wait()
        server.close()

    uvloop.run(main())
    results.send(arrivals)


class Receiver:
    def __init__(self, port: int, mode: str = "ok") -> None:
        ctx = multiprocessing.get_context("spawn")
        self._results, child_end = ctx.Pipe(duplex=False)
        ready = ctx.Event()
        self.count = ctx.Value("q", 0, lock=False)  # events received so far
        args = (port, mode, child_end, ready, self.count)
        self.proc = ctx.Process(target=receiver, args=args, daemon=True)
        self.proc.start()
        if not ready.wait(10):
            raise SystemExit("the receiver did not start")

    def stop(self) -> list[tuple[float, int]]:
        assert self.proc.pid is not None
        os.kill(self.proc.pid, signal.SIGTERM)
        arrivals: list[tuple[float, int]] = self._results.recv()
        self.proc.join(5)
        return arrivals


# -- trackers ----------------------------------------------------------------------------------


async def tracker_load(port: int, trackers: int, rate: float, duration: float, tag: str) -> list[float]:
    """Start -> started -> end cycles paced to ``rate`` events/s; the round trips in seconds."""
    period = trackers * 2 / rate  # each cycle is two events
    rtts: list[float] = []
    stop_at = time.monotonic() + duration

    async def one(i: int) -> None:
        ws = await RawWs.connect(port, "/ws/tracker/bench")
        await asyncio.sleep(period * i / trackers)  # spread the cycles over the period
        n = 0
        next_at = time.monotonic()
        while next_at < stop_at:
            n += 1
            t = time.perf_counter()
            ws.send(b'{"type":"start","sessionID":"%s-%d-%d"}' % (tag.encode(), i, n))
            _, reply = await ws.recv()
            rtts.append(time.perf_counter() - t)
            assert b'"started"' in reply[:40], reply[:200]
            ws.send(b'{"type":"end"}')
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        ws.close()

    await asyncio.gather(*(one(i) for i in range(trackers)))
    return rtts


async def burst(port: int, events: int, trackers: int = 50) -> None:
    """``events`` events (start + end cycles) as fast as the hub takes them."""
    cycles = events // 2 // trackers

    async def one(i: int) -> None:
        ws = await RawWs.connect(port, "/ws/tracker/bench")
        for n in range(cycles):
            ws.send(b'{"type":"start","sessionID":"burst-%d-%d"}' % (i, n))
            await ws.recv()
            ws.send(b'{"type":"end"}')
        ws.close()

    await asyncio.gather(*(one(i) for i in range(trackers)))


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hub(port: int, hook_port: int | None, queue: int = 10_000) -> Any:
    extra = ["--rate-limit", "0", "--drain-timeout", "2"]
    if hook_port is not None:
        extra += ["--webhook-urls", f"http://127.0.0.1:{hook_port}/hook", "--webhook-secret", SECRET]
        extra += ["--webhook-queue", str(queue)]
    return start_hub(port, API_KEY, extra)


def stop(proc: Any) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def latency_and_trackers(args: argparse.Namespace) -> None:
    rows = []
    for mode in ("off", "ok", "stall"):
        port, hook_port = free_port(), free_port()
        rec = Receiver(hook_port, mode) if mode != "off" else None
        proc = hub(port, hook_port if rec else None)
        try:
            rtts = uvloop.run(tracker_load(port, args.trackers, args.rate, args.duration, mode))
            deadline = time.monotonic() + 60
            while mode == "ok" and rec and rec.count.value < 2 * len(rtts) and time.monotonic() < deadline:
                time.sleep(0.05)  # every event delivered before the hub stops
        finally:
            stop(proc)
            arrivals = rec.stop() if rec else []
        rows.append((mode, rtts))
        if mode == "ok":
            lat = [arrived - at for arrived, at in arrivals]
            print(
                f"delivery at {args.rate:.0f} events/s for {args.duration:.0f} s: {len(lat)} events, "
                f"latency p50 {pct(lat, 0.5):.1f} ms, p99 {pct(lat, 0.99):.1f} ms, max {max(lat):.1f} ms"
            )
    healthy = pct(rows[1][1], 0.99)
    for mode, rtts in rows:
        p50, p99 = pct(rtts, 0.5) * 1000, pct(rtts, 0.99) * 1000
        name = {"off": "no webhooks", "ok": "receiver healthy", "stall": "receiver stalled"}[mode]
        print(
            f"tracker start->started, {name}: {len(rtts)} round trips, p50 {p50:.2f} ms, p99 {p99:.2f} ms "
            f"({pct(rtts, 0.99) / healthy:.2f}x healthy p99), mean {statistics.mean(rtts) * 1000:.2f} ms"
        )


def throughput(args: argparse.Namespace) -> None:
    port, hook_port = free_port(), free_port()
    proc = hub(port, hook_port, queue=args.burst + 1000)
    try:
        uvloop.run(burst(port, args.burst))
        time.sleep(1.0)  # the queue is full; its first attempts have failed
        cpu0 = cpu_seconds(proc.pid)
        rec = Receiver(hook_port)
        deadline = time.monotonic() + 120
        while rec.count.value < args.burst and time.monotonic() < deadline:
            time.sleep(0.05)
        cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        stop(proc)
    arrivals = sorted(a for a, _ in rec.stop())
    span = (arrivals[-1] - arrivals[0]) / 1000
    print(
        f"sender throughput: {len(arrivals)} queued events delivered in {span:.2f} s from the first "
        f"arrival = {len(arrivals) / span:.0f} events/s; hub CPU {cpu * 1e6 / len(arrivals):.0f} µs "
        "per delivery (the backoff wait included: idle)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s (default 1000)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    parser.add_argument("--trackers", type=int, default=50, help="tracker connections (default 50)")
    parser.add_argument("--burst", type=int, default=20_000, help="events for the throughput run")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores")
    latency_and_trackers(args)
    throughput(args)


if __name__ == "__main__":
    main()
