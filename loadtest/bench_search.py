"""Search benchmark: the indexed live search against the naive scan, same run, same data.

    python -m loadtest.bench_search --sessions 10000            # fill through the tracker endpoint
    python -m loadtest.bench_search --sessions 100000 --fill index

``--fill ws`` starts a hub process (``python -m hub serve``) and opens one
tracker WebSocket per session that sends a realistic ``start``; the sessions
are then read back over HTTP into an in-process index for the in-process
figures. ``--fill index`` starts a hub in this process and fills it through
``Registry.start`` (no sockets): the HTTP client then shares the hub's event
loop, so its figures include the client's own time.

Prints p50/p90/p99 per query kind, in-process (indexed vs ``search.brute_force``
over the same sessions) and over HTTP (keep-alive, one request at a time,
with tracker heartbeats flowing in ``--fill ws`` mode), heartbeat absorption,
and index memory per session (tracemalloc).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import msgspec

from hub.app import Hub
from hub.config import Settings
from hub.index import LiveIndex
from hub.record import Session, Start, Update, decode_message, new_session
from hub.registry import Registry
from hub.search import Query, brute_force, parse_body
from loadtest.client import HttpClient, WsConn, ws_connect
from loadtest.procs import Server, free_port

API_KEY = "bench-search-key"
PROJECT = "bench"
NOW = 1_760_000_000_000

BROWSERS = ("Chrome",) * 6 + ("Safari",) * 2 + ("Firefox", "Edge")
OSES = ("Windows", "Mac OS X", "Linux", "iOS", "Android")
COUNTRIES = tuple(f"C{i:02d}" for i in range(30)) + ("US",) * 10 + ("DE", "FR") * 3
PLANS = ("free", "free", "pro", "team", "enterprise")
WORDS = ("Checkout", "Cart", "Home", "Search", "Product", "Account", "Help", "Orders", "Login", "Blog")


def make_start(rng: random.Random, n_users: int) -> dict[str, Any]:
    """One realistic tracker ``start``: ~20 fields, 2-3 metadata keys."""
    # A UUID-shaped id from the seeded rng, so runs are repeatable.
    h = "%032x" % rng.getrandbits(128)  # noqa: UP031
    sid = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"
    word = rng.choice(WORDS)
    msg: dict[str, Any] = {
        "type": "start",
        "sessionID": sid,
        "timestamp": NOW - rng.randrange(7_200_000),
        "userUUID": "%032x" % rng.getrandbits(128),  # noqa: UP031
        "pageTitle": f"{word} - page {rng.randrange(20)}",
        "url": f"https://shop.example.com/{word.lower()}/{rng.randrange(200)}",
        "referrer": rng.choice(("https://google.com/", "https://news.example.org/", None)),
        "trackerVersion": f"16.0.{rng.randrange(4)}",
        "userOs": rng.choice(OSES),
        "userBrowser": rng.choice(BROWSERS),
        "userBrowserVersion": f"{rng.randrange(100, 130)}.0",
        "userDevice": rng.choice(("", "iPhone", "Pixel 8", "Galaxy S23")),
        "userDeviceType": rng.choice(("desktop", "desktop", "mobile", "tablet")),
        "userCountry": rng.choice(COUNTRIES),
        "userCity": f"City {rng.randrange(300)}",
        "language": rng.choice(("en-US", "de-DE", "fr-FR", "es-ES")),
        "environment": rng.choice(("production", "staging")),
        "appVersion": f"2.{rng.randrange(20)}.0",
        "userAgent": f"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/{rng.randrange(100, 140)}.0",
        "metadata": {"plan": rng.choice(PLANS), "tenant": f"tenant{rng.randrange(200)}"},
    }
    if rng.random() < 0.8:
        msg["userID"] = f"user{rng.randrange(n_users)}@example.com"
    if rng.random() < 0.6:
        msg["metadata"]["role"] = rng.choice(("admin", "editor", "viewer", "owner", "guest"))
    return msg


# Query kinds: name, whether the issue sets a target for it, and a body maker.
QueryMaker = Callable[[random.Random], dict[str, Any]]
KINDS: list[tuple[str, bool, QueryMaker]] = [
    (
        "is userBrowser, default page",
        True,
        lambda r: {"filters": [{"name": "userBrowser", "operator": "is", "value": [r.choice(BROWSERS)]}]},
    ),
    (
        "contains userID + metadata is, ts desc",
        True,
        lambda r: {
            "filters": [
                {"name": "userId", "operator": "contains", "value": [f"user{r.randrange(10, 100)}"]},
                {"name": "metadata", "source": "plan", "operator": "is", "value": [r.choice(PLANS)]},
            ],
            "sort": "timestamp",
            "order": "desc",
        },
    ),
    ("no filter, limit 1000", True, lambda r: {"limit": 1000}),
    (
        "3 filters: is x2 + value [], limit 50",
        False,
        lambda r: {
            "filters": [
                {"name": "userCountry", "operator": "is", "value": ["US", "DE", r.choice(COUNTRIES)]},
                {"name": "platform", "operator": "is", "value": ["mobile"]},
                {"name": "role", "value": []},
            ],
            "limit": 50,
        },
    ),
    (
        "contains pageTitle, page 3 x 20",
        False,
        lambda r: {
            "filters": [{"name": "pageTitle", "value": [f"{r.choice(WORDS)[2:]} - page 1"]}],
            "page": 3,
            "limit": 20,
        },
    ),
    ("no filter, page 50 x 100, asc", False, lambda r: {"page": 50, "limit": 100, "order": "asc"}),
    (
        "is userBrowser, sort userID asc",
        False,
        lambda r: {
            "filters": [{"name": "userBrowser", "operator": "is", "value": [r.choice(BROWSERS)]}],
            "sort": "userID",
            "order": "asc",
        },
    ),
    ("no filter, sort lastActiveAt desc", False, lambda r: {"sort": "lastActiveAt"}),
    (
        "metadata is, sort lastActiveAt, page 1-5 x 20",
        False,
        lambda r: {
            "filters": [{"name": "plan", "operator": "is", "value": [r.choice(PLANS)]}],
            "sort": "lastActiveAt",
            "page": r.randint(1, 5),
            "limit": 20,
        },
    ),
]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fmt_ms(values: list[float]) -> str:
    return " / ".join(f"{pct(values, q) * 1000:.3f}" for q in (0.5, 0.9, 0.99))


def queries_of(kind: QueryMaker, count: int, seed: int) -> list[tuple[bytes, Query]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        body = json.dumps(kind(rng)).encode()
        out.append((body, parse_body(body)))
    return out


def in_process(index: LiveIndex, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    sessions = index.sessions  # the naive scan lists the project, as the scan index did
    for i, (name, target, kind) in enumerate(KINDS):
        qs = queries_of(kind, args.queries, args.seed + i)
        timer, cpu_timer = time.perf_counter, time.thread_time
        indexed: list[float] = []
        cpu: list[float] = []
        for _, q in qs:
            c0 = cpu_timer()
            t0 = timer()
            index.search(PROJECT, q)
            indexed.append(timer() - t0)
            cpu.append(cpu_timer() - c0)
        naive: list[float] = []
        totals = []
        for _, q in qs[: args.baseline_queries]:
            t0 = timer()
            expected = brute_force(list(sessions(PROJECT)), q)
            naive.append(timer() - t0)
            total, page = index.search(PROJECT, q)
            assert (total, page) == expected, f"indexed answer differs from brute force: {name}"
            totals.append(total)
        rows.append(
            {
                "kind": name,
                "target": target,
                "indexed": indexed,
                "cpu": cpu,
                "naive": naive,
                "matches": sorted(totals)[len(totals) // 2],
            }
        )
    return rows


def heartbeats(index: LiveIndex, count: int) -> tuple[float, float]:
    """Heartbeats/s through Registry.heartbeat, and one-field updates/s through Registry.update.

    The clock advances 1 ms per 20 heartbeats, as at 20,000/s: sessions share
    lastActiveAt values, as they do in a busy hub.
    """
    registry = Registry(index, grace_ms=30_000)
    live = list(index.sessions(PROJECT))
    rng = random.Random(7)
    picks = [live[rng.randrange(len(live))] for _ in range(count)]
    start = NOW + 10_000_000
    t0 = time.perf_counter()
    for k, s in enumerate(picks):
        registry.heartbeat(s, None, start + k // 20)
    beats = count / (time.perf_counter() - t0)
    updates = [Update(pageTitle=f"p{k % 50}") for k in range(64)]
    start += count
    t0 = time.perf_counter()
    for k, s in enumerate(picks):
        registry.update(s, updates[k % 64], start + k // 20)
    return beats, count / (time.perf_counter() - t0)


def memory(n: int, seed: int) -> dict[str, float]:
    """Bytes per session: the records, a plain dict of them (the scan index), the indexed LiveIndex."""
    rng = random.Random(seed)
    n_users = max(1, int(n * 0.6))
    starts = [msgspec.json.encode(make_start(rng, n_users)) for _ in range(n)]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    records = []
    for k, raw in enumerate(starts):
        msg = decode_message(raw)
        assert isinstance(msg, Start)
        records.append(new_session(msg, msg.sessionID, PROJECT, 0, NOW + k))
    after_records = tracemalloc.get_traced_memory()[0]
    scan = {s.sessionID: s for s in records}
    after_scan = tracemalloc.get_traced_memory()[0]
    del scan
    index = LiveIndex()
    before_index = tracemalloc.get_traced_memory()[0]
    for s in records:
        index.add(s)
    after_index = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {
        "record": (after_records - base) / n,
        "scan": (after_scan - after_records) / n,
        "index": (after_index - before_index) / n,
    }


class _Tracker:
    def __init__(self) -> None:
        self.started: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def on_open(self, conn: WsConn) -> None:
        pass

    def on_message(self, conn: WsConn, data: bytes) -> None:
        if not self.started.done():
            self.started.set_result(data)

    def on_close(self, conn: WsConn, code: int | None, opened: bool) -> None:
        if not self.started.done():
            self.started.set_exception(ConnectionError(f"closed with {code}"))


class _Answer(msgspec.Struct):
    total: int
    sessions: list[Session]


class _Reply(msgspec.Struct):
    data: _Answer


async def fill_ws(server: Server, starts: list[bytes]) -> tuple[list[WsConn], float]:
    conns: list[WsConn] = []
    gate = asyncio.Semaphore(500)

    async def one(raw: bytes) -> None:
        async with gate:
            tracker = _Tracker()
            conn = await ws_connect(server.url, f"/ws/tracker/{PROJECT}", tracker)
            conn.send(raw)
            reply = json.loads(await asyncio.wait_for(tracker.started, 30))
            assert reply["type"] == "started", reply
            conns.append(conn)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(raw) for raw in starts))
    return conns, time.perf_counter() - t0


async def read_back(client: HttpClient, n: int) -> LiveIndex:
    """The hub's sessions, as it answers them, into a local index."""
    index = LiveIndex()
    for page in range(1, n // 1000 + 2):
        body = json.dumps({"limit": 1000, "page": page}).encode()
        status, payload = await client.request("POST", f"/public/{PROJECT}/assist/sessions", body)
        assert status == 200, payload
        for s in msgspec.json.decode(payload, type=_Reply).data.sessions:
            index.add(s)
    assert len(index) == n, (len(index), n)
    return index


async def over_http(
    client: HttpClient, args: argparse.Namespace, beat: Callable[[], int] | None
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    # Untimed warm-up: in early runs the first requests after the fill took
    # hundreds of ms (cause not pinned down; the machine was loaded).
    for i, (_, _, kind) in enumerate(KINDS):
        for body, _ in queries_of(kind, 10, args.seed + 100 + i):
            await client.request("POST", f"/public/{PROJECT}/assist/sessions", body)
    for i, (name, _, kind) in enumerate(KINDS):
        times: list[float] = []
        for body, _ in queries_of(kind, args.http_queries, args.seed + i):
            t0 = time.perf_counter()
            status, payload = await client.request("POST", f"/public/{PROJECT}/assist/sessions", body)
            times.append(time.perf_counter() - t0)
            assert status == 200, payload
            if beat is not None:
                await asyncio.sleep(0)  # let the heartbeat sender keep its pace
        out[name] = times
    return out


async def send_heartbeats(conns: list[WsConn], rate: int, stop: asyncio.Event, sent: list[int]) -> None:
    frame = b'{"type":"heartbeat"}'
    rng = random.Random(3)
    tick = 0.005
    t0 = time.perf_counter()
    while not stop.is_set():
        due = int((time.perf_counter() - t0) * rate) - sent[0]
        for _ in range(max(0, due)):
            conns[rng.randrange(len(conns))].send(frame)
        sent[0] += max(0, due)
        await asyncio.sleep(tick)


def report(args: argparse.Namespace, info: dict[str, Any]) -> None:
    n = args.sessions
    print(f"\n## {n:,} live sessions, fill: {info['fill']}")
    print(f"command: python -m loadtest.bench_search {' '.join(sys.argv[1:])}")
    print(
        "load average (2 shared cores): {:.1f} at start, {:.1f} at end".format(
            info["load"][0], os.getloadavg()[0]
        )
    )
    if "mem" in info:
        m = info["mem"]
        print(
            f"memory per session (tracemalloc): record {m['record']:.0f} B, "
            f"scan index (dict) {m['scan']:.0f} B, indexed LiveIndex {m['index']:.0f} B beyond the record"
        )
    print(
        f"heartbeats absorbed in-process (Registry.heartbeat -> LiveIndex.touch): {info['beats']:,.0f}/s; "
        f"one-field updates (Registry.update -> LiveIndex.apply): {info['updates']:,.0f}/s"
    )
    print(
        f"\nin process, ms p50 / p90 / p99 ({args.queries} queries per kind; "
        f"naive scan: first {args.baseline_queries} of them; CPU time = this thread's, "
        "which leaves out time the shared machine gave to other processes)\n"
    )
    print("| query | median matches | indexed | indexed, CPU time | naive scan | speed-up (p50) |")
    print("|---|---|---|---|---|---|")
    for row in info["rows"]:
        star = " *" if row["target"] else ""
        ratio = pct(row["naive"], 0.5) / pct(row["indexed"], 0.5)
        print(
            f"| {row['kind']}{star} | {row['matches']:,} | {fmt_ms(row['indexed'])} | "
            f"{fmt_ms(row['cpu'])} | {fmt_ms(row['naive'])} | {ratio:,.0f}x |"
        )
    if info.get("http"):
        print(f"\nover HTTP ({info['http_note']}), ms p50 / p90 / p99 ({args.http_queries} per kind)\n")
        print("| query | HTTP | naive scan in process alone | HTTP vs naive (p50) |")
        print("|---|---|---|---|")
        naive = {row["kind"]: row["naive"] for row in info["rows"]}
        for name, times in info["http"].items():
            ratio = pct(naive[name], 0.5) / pct(times, 0.5)
            print(f"| {name} | {fmt_ms(times)} | {fmt_ms(naive[name])} | {ratio:,.1f}x |")
    print("\n* = a query kind with a target in issue #4")


async def run(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    n_users = max(1, int(args.sessions * 0.6))
    starts = [msgspec.json.encode(make_start(rng, n_users)) for _ in range(args.sessions)]
    info: dict[str, Any] = {"load": os.getloadavg()}
    if not args.skip_memory:
        info["mem"] = memory(args.sessions, args.seed)
    fill = args.fill or ("ws" if args.sessions <= 15_000 else "index")
    if fill == "ws":
        server = Server("hub", API_KEY, extra="--heartbeat-timeout 3600")
        try:
            await server.ready()
            conns, took = await fill_ws(server, starts)
            info["fill"] = (
                f"{len(conns):,} tracker WebSockets to a hub process (`python -m hub serve`), "
                f"each sending `start`, in {took:.1f} s"
            )
            client = HttpClient(server.url, API_KEY)
            index = await read_back(client, args.sessions)
            stop, sent = asyncio.Event(), [0]
            sender = asyncio.create_task(send_heartbeats(conns, args.heartbeat_rate, stop, sent))
            t0 = time.perf_counter()
            info["http"] = await over_http(client, args, beat=lambda: sent[0])
            stop.set()
            await sender
            rate = sent[0] / (time.perf_counter() - t0)
            info["http_note"] = (
                f"hub in its own process, client in this one, keep-alive; "
                f"{rate:,.0f} tracker heartbeats/s sent to the hub meanwhile"
            )
            client.close()
            for conn in conns:
                conn.abort()
        finally:
            server.stop()
    else:
        hub = Hub(replace(Settings(), port=free_port(), api_key=API_KEY, heartbeat_timeout=3600.0))
        task = asyncio.create_task(hub.serve(handle_signals=False))
        await hub.listening.wait()
        t0 = time.perf_counter()
        for k, raw in enumerate(starts):
            msg = decode_message(raw)
            assert isinstance(msg, Start)
            hub.registry.start(PROJECT, 0, msg, NOW + k, attach=True)
        info["fill"] = (
            f"{args.sessions:,} sessions through Registry.start into an in-process hub's index "
            f"(no sockets), in {time.perf_counter() - t0:.1f} s"
        )
        index = hub.index
        client = HttpClient(f"ws://127.0.0.1:{hub.port}", API_KEY)
        info["http"] = await over_http(client, args, beat=None)
        info["http_note"] = "hub and client share this process and event loop, keep-alive, no heartbeats"
        client.close()
        hub.stop()
        await task
    info["rows"] = in_process(index, args)
    info["beats"], info["updates"] = heartbeats(index, args.heartbeats)
    report(args, info)


def main() -> None:
    doc = (__doc__ or "").split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_search", description=doc)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--fill", choices=("ws", "index"), help="default: ws up to 15k sessions, else index")
    parser.add_argument("--queries", type=int, default=500, help="indexed queries per kind, in process")
    parser.add_argument("--baseline-queries", type=int, default=30, help="naive-scan queries per kind")
    parser.add_argument("--http-queries", type=int, default=300, help="queries per kind over HTTP")
    parser.add_argument("--heartbeat-rate", type=int, default=20_000, help="tracker heartbeats/s (ws fill)")
    parser.add_argument("--heartbeats", type=int, default=200_000, help="in-process heartbeats to time")
    parser.add_argument("--skip-memory", action="store_true", help="skip the tracemalloc measurement")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(args))
    else:
        uvloop.run(run(args))


if __name__ == "__main__":
    main()
