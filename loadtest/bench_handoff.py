"""What a hand-off costs (``--workers``, hub/handoff.py): a search answered directly against
one handed to the project's owner, in the same run.

    python -m loadtest.bench_handoff [--connections 400] [--sessions 200]

Starts a redis-server (free port) and ``hub serve --workers 2``, fills one
project (owned by worker 0) with tracker sessions, then on each of
``--connections`` new connections to the shared port: ``GET /metrics``
first (answered by the worker the kernel chose: its ``hub_worker_index``
says which), then the project's search (``GET …/assist/sessions?limit=10``),
timed from its write to its last byte. On worker 0 it is answered
directly; on worker 1 its connection is handed to worker 0 first. A second
search on the same connection is timed too: once handed off, a connection
is the owner's, and answers at direct speed. Then ``--connections`` searches
each on a new connection, timed from the connect to the answer's last byte
(Figure 1's ``--fresh-searches``: the kernel picks the worker, half of them
are handed off), with the hub workers' context switches per connection
(each voluntary one is a wake-up). Medians, p90 and p99 of each, and the
ratios, are printed as a Markdown table.

``--spin N`` keeps N busy processes at normal priority while timing: on this
2-core machine the hub then waits for a CPU at every wake-up, as it does
under a swarm.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import statistics
import time

import psutil
import websockets

from hub.handoff import owner
from tests.helpers import HubProcess
from tests.redis_server import RedisServer

API_KEY = "bench-handoff-key"


def project_of_worker(index: int, count: int) -> str:
    return next(f"p{n}" for n in range(1000) if owner(f"p{n}", count) == index)


def request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\r\n".encode()


async def answer(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    found = re.search(rb"(?i)content-length: (\d+)", head)
    assert found is not None and head.startswith(b"HTTP/1.1 200"), head
    return await reader.readexactly(int(found.group(1)))


async def timed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> float:
    started = time.perf_counter()
    writer.write(data)
    await answer(reader)
    return time.perf_counter() - started


def spin() -> None:
    while True:
        pass


async def fresh(port: int, data: bytes) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await answer(reader)
    took = time.perf_counter() - started
    writer.close()
    return took


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def switches(workers: list[psutil.Process]) -> tuple[int, int]:
    """Voluntary and involuntary context switches of ``workers`` so far."""
    counts = [w.num_ctx_switches() for w in workers]
    return sum(c.voluntary for c in counts), sum(c.involuntary for c in counts)


async def run(connections: int, sessions: int, spinners: int) -> None:
    with RedisServer() as redis, HubProcess(
        "--redis-url", redis.url, "--api-key", API_KEY, "--workers", "2", "--log-level", "warning",
        "--max-sessions-per-project", str(max(sessions, 1000)),
    ) as hub:  # fmt: skip
        hub.wait_ready(path="/readyz", timeout=30)
        await asyncio.sleep(1.0)  # every worker takes hand-offs once ready
        project = project_of_worker(0, 2)
        trackers = []
        for i in range(sessions):
            ws = await websockets.connect(f"ws://127.0.0.1:{hub.port}/ws/tracker/{project}")
            await ws.send(json.dumps({"type": "start", "sessionID": f"s{i}", "userID": f"u{i}"}))
            await ws.recv()
            trackers.append(ws)
        search = request(f"/public/{project}/assist/sessions?limit=10")
        # Until the owner mirrors every worker's trackers.
        while True:
            reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
            writer.write(search)
            total = json.loads(await answer(reader))["data"]["total"]
            writer.close()
            if total == sessions:
                break
            await asyncio.sleep(0.1)
        spinning = [multiprocessing.Process(target=spin, daemon=True) for _ in range(spinners)]
        for p in spinning:
            p.start()
        load_before = os.getloadavg()
        first: dict[int, list[float]] = {0: [], 1: []}
        second: dict[int, list[float]] = {0: [], 1: []}
        for _ in range(connections):
            reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
            writer.write(request("/metrics"))
            found = re.search(rb"^hub_worker_index (\S+)", await answer(reader), re.M)
            assert found is not None
            worker = int(float(found.group(1)))
            first[worker].append(await timed(reader, writer, search))
            second[worker].append(await timed(reader, writer, search))
            writer.close()
        workers = psutil.Process(hub.proc.pid).children()
        before = switches(workers)
        new = [await fresh(hub.port, search) for _ in range(connections)]
        voluntary, involuntary = (after - was for after, was in zip(switches(workers), before, strict=True))
        load_after = os.getloadavg()
        for p in spinning:
            p.kill()
        for ws in trackers:
            await ws.close()
        hub.terminate()

    def row(name: str, values: list[float], base: list[float]) -> str:
        med, p90, p99 = (pct(values, q) * 1e6 for q in (0.5, 0.9, 0.99))
        ratio = statistics.median(values) / statistics.median(base)
        return f"| {name} | {len(values)} | {med:.0f} | {p90:.0f} | {p99:.0f} | {ratio:.2f} |"

    print(
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; {sessions} sessions, "
        f"{spinners} busy processes"
    )
    print("| search | n | p50 µs | p90 µs | p99 µs | p50 / direct |")
    print("|---|---|---|---|---|---|")
    print(row("direct (accepted by the owner)", first[0], first[0]))
    print(row("handed off (accepted by the other worker)", first[1], first[0]))
    print(row("next search on a direct connection", second[0], first[0]))
    print(row("next search on a handed-off connection", second[1], first[0]))
    print(row("new connection, connect to answer (either worker)", new, first[0]))
    print(
        f"new connections: the workers' context switches per connection, voluntary "
        f"{voluntary / connections:.2f}, involuntary {involuntary / connections:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=400)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--spin", type=int, default=0, help="busy processes while timing")
    args = parser.parse_args()
    asyncio.run(run(args.connections, args.sessions, args.spin))


if __name__ == "__main__":
    main()
