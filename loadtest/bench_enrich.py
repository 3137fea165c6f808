"""Record enrichment benchmark: what hub/enrich.py adds to a tracker's connect.

    python -m loadtest.bench_enrich --wired [--rounds 6 --trackers 2000 --warmup 300 --distinct 300]
                                    [--diagnose] [--before REV] [--profile DIR] [--out FILE]
    python -m loadtest.bench_enrich [--storm 5000 --distinct 300 --connects 2000] [--compare]

``--wired``: the issue's figure, server CPU per tracker connect + 16-field
``start`` with and without enrichment, in one run against real hub processes
(the hub CPU from /proc/PID/task/*/schedstat, the load from loadtest.client's
lean WebSocket client). Three cases, each on a hub of its own:

- ``none``: handshakes without a User-Agent header, a hub without a GeoIP
  database: the enrichment finds nothing to do;
- ``ua``: each tracker sends a browser User-Agent drawn Zipf-like from
  ``--distinct`` strings (Chrome, Safari, Firefox, Edge, Samsung Internet on
  their systems and versions);
- ``ua+geo``: the same, to a hub started with ``--geoip-db`` (a
  GeoLite2-City-shaped database written here with mmdb-writer) and
  ``--trusted-proxies 127.0.0.0/8,10.0.0.0/8``; every tracker comes through
  the trusted proxies with ``X-Forwarded-For: <client>, 10.0.0.7``, the
  clients nearly all distinct public addresses of the database, so the
  proxy walk runs and nearly every connect decodes a record.

Each round starts a fresh hub per case, all at once: the User-Agent and
GeoIP caches start cold in each storm. A hub first takes ``--warmup``
trackers without a User-Agent, so its own first-use costs are out of the
figure for all cases alike. Then the storms take turns, ``--batch`` trackers
at a time (A B C A B C ..., the order rotated at every turn), and a hub's CPU
counts while its own batch connects and starts: a shared machine's noise,
which comes and goes over seconds, falls on every case alike, and the ratios
are paired within a round. The ``start`` does not carry
the fields the enrichment fills, so they land in the record and its index,
as for a tracker that leaves them to the hub. Each started record is checked
for what its case's enrichment finds.

``--diagnose`` adds cases that split a with-case's cost, one difference at a
time: ``ua-warm`` and ``ua+geo-warm`` (each distinct handshake of the storm
is among the warm-up's trackers, so the storm finds the LRUs warm: ``ua``
minus ``ua-warm`` is what the parses cost), ``ua-sent`` and ``geo-sent`` (no
header, no database: the start carries the fields ``ua`` or ``ua+geo``
finds, so the record is the same: ``ua`` minus ``ua-sent`` is what the hub's
finding costs, against a tracker that tells it). Every hub then warms up with
at least ``--trackers`` trackers (ua+geo-warm's ~2,000 distinct clients), so
all hold as many sessions.
``--before REV`` adds ``ua`` and ``ua+geo`` once more, on hubs running the
hub/ of a git revision (or of a directory): before and after a change, in the
same rounds, each paired with the same round's ``none``.
``--profile DIR`` runs the hubs under cProfile during the storms only (its
timings are the profiler's, not figures) and prints where the time goes and
what grew against ``none``.

Without ``--wired``, in this process, no sockets: per User-Agent string (real
browsers, a crawler, an empty and a 2 KB garbage string) the parse without
the cache and the cached lookup; one enrichment (headers -> fields, cache
warm) without a GeoIP database, with one, and with a trusted proxy's
X-Forwarded-For, against decoding one 16-field tracker ``start``
(``hub.record.decode_message``); and a connect storm on cold caches:
``--storm`` enrichments whose User-Agents are drawn as above. Each is set
against the server CPU of a connect + start measured in the same run (the
``none`` case above, ``--connects`` trackers), to show its share.

``--compare`` also parses the same strings with ``user-agents`` 2.2 and prints
what each parser names, and looks the address up with ``maxminddb-rust``'s
``get_path`` (neither is a dependency: ``pip install user-agents
maxminddb-rust``).
In-process figures are the best of 5 repeats (the machine is shared). A tight
loop keeps the parser's automata and the database in the CPU caches; a server
calls them between other work, so the parse and the lookup are also timed
with every cache cold (32 MiB touched before each call): the wired figures,
not the tight loops, are the ones to judge by.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import ipaddress
import json
import os
import pstats
import random
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import msgspec
from mmdb_writer import MMDBWriter
from netaddr import IPSet
from ua_parser import load_lazy_builtins
from ua_parser.regex import Resolver

from hub.enrich import Enricher, UserAgents
from hub.record import GEO_FIELDS, UA_FIELDS, decode_message

from .client import WsConn, ws_connect
from .procs import free_port

ROOT = Path(__file__).resolve().parent.parent
DB_NETWORKS = 2000
# Set by --profile on the hubs it starts: where profiled_hub writes its stats.
PROFILE_ENV = "BENCH_ENRICH_PROFILE"
# The wired GeoIP case's proxies: the client's own (loopback) and one inner hop.
TRUSTED_PROXIES = "127.0.0.0/8,10.0.0.0/8"
INNER_PROXY = "10.0.0.7"
IN_FLIGHT = 200

STRINGS = {
    "Chrome/Windows": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36",
    "Safari/iPhone": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
    "Firefox/Linux": "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Edge/Windows": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36 Edg/124.0.2478.51",
    "Samsung Internet/tablet": "Mozilla/5.0 (Linux; Android 13; SM-X710) AppleWebKit/537.36 "
    "(KHTML, like Gecko) SamsungBrowser/24.0 Chrome/117.0.0.0 Safari/537.36",
    "Googlebot": "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "empty": "",
    "2 KB garbage": "".join(random.Random(18).choices(string.printable[:94], k=2048)),
}

START_FIELDS = {
    "type": "start",
    "sessionID": "0b1f6d2e-3c4a-4b5c-9d6e-7f8091a2b3c4",
    "userID": "ann@example.com",
    "userUUID": "uuid-12345",
    "metadata": {"plan": "pro", "tenant": "t42"},
    "userProperties": {"visits": 3},
    "pageTitle": "Checkout",
    "url": "https://shop.example.com/checkout",
    "referrer": "https://www.google.com/",
    "trackerVersion": "16.0.0",
    "userOs": "Windows",
    "userBrowser": "Chrome",
    "userBrowserVersion": "124.0",
    "userDeviceType": "desktop",
    "userCountry": "FR",
    "language": "en-US",
}
START = msgspec.json.encode(START_FIELDS)

# The wired storm's 16-field start: none of the fields enrichment fills, so what it finds is kept.
WIRED_START_FIELDS = {
    "type": "start",
    "sessionID": "",
    "tabId": "",
    "timestamp": 0,
    "userID": "ann@example.com",
    "userUUID": "uuid-12345",
    "metadata": {"plan": "pro", "tenant": "t42"},
    "userProperties": {"visits": 3},
    "pageTitle": "Checkout",
    "url": "https://shop.example.com/checkout",
    "referrer": "https://www.google.com/",
    "trackerVersion": "16.0.0",
    "language": "en-US",
    "environment": "production",
    "appVersion": "4.2.0",
    "active": True,
}

# Browsers with a rough share of traffic: (weight, User-Agent template) filled by _fill.
_FAMILIES = (
    (30, "Mozilla/5.0 ({desktop}) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{major}.0.0.0 Safari/537.36"),
    (
        18,
        "Mozilla/5.0 (Linux; Android {android}; K) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{major}.0.0.0 Mobile Safari/537.36",
    ),
    (
        16,
        "Mozilla/5.0 (iPhone; CPU iPhone OS {ios} like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/{safari} Mobile/15E148 Safari/604.1",
    ),
    (
        4,
        "Mozilla/5.0 (iPad; CPU OS {ios} like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/{safari} Mobile/15E148 Safari/604.1",
    ),
    (
        6,
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/{safari} Safari/605.1.15",
    ),
    (
        8,
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{major}.0.0.0 Safari/537.36 Edg/{major}.0.{build}.{patch}",
    ),
    (6, "Mozilla/5.0 ({gecko}; rv:{fx}.0) Gecko/20100101 Firefox/{fx}.0"),
    (
        5,
        "Mozilla/5.0 (Linux; Android {android}; SM-{samsung}) AppleWebKit/537.36 (KHTML, like Gecko) "
        "SamsungBrowser/{sb}.0 Chrome/{major}.0.0.0 Mobile Safari/537.36",
    ),
    (
        4,
        "Mozilla/5.0 (iPhone; CPU iPhone OS {ios} like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) CriOS/{major}.0.{build}.{patch} Mobile/15E148 Safari/604.1",
    ),
    (
        3,
        "Mozilla/5.0 (Linux; Android {android}; {pixel}) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{major}.0.{build}.{patch} Mobile Safari/537.36",
    ),
)
_DESKTOPS = ("Windows NT 10.0; Win64; x64", "Macintosh; Intel Mac OS X 10_15_7", "X11; Linux x86_64")
_GECKOS = (
    "Windows NT 10.0; Win64; x64",
    "Macintosh; Intel Mac OS X 10.15",
    "X11; Linux x86_64",
    "X11; Ubuntu; Linux x86_64",
)
_SAMSUNGS = ("S911B", "S918B", "A546B", "A146P", "X710", "X810", "G991B")
_PIXELS = ("Pixel 7", "Pixel 8", "Pixel 8 Pro", "Pixel 6a")


def _fill(template: str, rng: random.Random) -> str:
    ios = rng.choice(("16_6", "17_1", "17_3", "17_4", "17_5", "18_0", "18_1"))
    return template.format(
        desktop=rng.choice(_DESKTOPS),
        gecko=rng.choice(_GECKOS),
        major=rng.randrange(110, 132),
        build=rng.randrange(5000, 7000),
        patch=rng.randrange(200),
        android=rng.randrange(10, 15),
        ios=ios,
        safari=ios.replace("_", "."),
        fx=rng.randrange(115, 133),
        samsung=rng.choice(_SAMSUNGS),
        sb=rng.randrange(20, 27),
        pixel=rng.choice(_PIXELS),
    )


def distinct_agents(count: int, seed: int = 7) -> list[str]:
    """``count`` distinct browser User-Agents, in a random order (the order is their Zipf rank)."""
    rng = random.Random(seed)
    weights = [w for w, _ in _FAMILIES]
    templates = [t for _, t in _FAMILIES]
    agents: dict[str, None] = {}
    while len(agents) < count:
        agents[_fill(rng.choices(templates, weights)[0], rng)] = None
    return list(agents)


def zipf_draw(pool: Sequence[str], k: int, rng: random.Random) -> list[str]:
    """``k`` draws from ``pool``, the i-th string weighted 1/i, as a population's browsers repeat."""
    return rng.choices(pool, [1 / (rank + 1) for rank in range(len(pool))], k=k)


def per_call_us(fn: Callable[[], object], n: int) -> float:
    """Best of 5 repeats of n calls, µs per call."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


EVICT_BYTES = 32 * 1024 * 1024


def evicted_us(fn: Callable[[], object], n: int) -> float:
    """Median µs of ``n`` calls, each after 32 MiB are written and read: every CPU cache is cold, as
    (at worst) for a call that comes between a server's other work, unlike a tight loop's repeats."""
    buf = bytearray(EVICT_BYTES)
    times = []
    for i in range(n):
        buf[::64] = bytes([i & 0xFF]) * (EVICT_BYTES // 64)
        bytes(buf)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


LANGUAGES = ("de", "en", "es", "fr", "ja", "pt-BR", "ru", "zh-CN")


def city_record(i: int) -> dict[str, Any]:
    """A record shaped like GeoLite2-City's (every name in its 8 languages): what a lookup decodes."""

    def names(text: str) -> dict[str, str]:
        return {lang: f"{text} ({lang})" for lang in LANGUAGES}

    return {
        "city": {"geoname_id": 2643743 + i, "names": names(f"City {i}")},
        "continent": {"code": "EU", "geoname_id": 6255148, "names": names("Europe")},
        "country": {"geoname_id": 2635167, "iso_code": "GB", "names": names("United Kingdom")},
        "location": {
            "accuracy_radius": 10,
            "latitude": 51.5,
            "longitude": -0.09,
            "time_zone": "Europe/London",
        },
        "postal": {"code": f"EC{i % 10}"},
        "registered_country": {"geoname_id": 2635167, "iso_code": "GB", "names": names("United Kingdom")},
        "subdivisions": [{"geoname_id": 6269131, "iso_code": "ENG", "names": names("England")}],
    }


def networks(count: int) -> list[str]:
    return [f"{20 + i % 180}.{i % 251}.{i % 7}.0/24" for i in range(count)]


def client_addresses(k: int, rng: random.Random) -> list[str]:
    """``k`` addresses in the database's networks, nearly all distinct: the GeoIP cache's worst case."""
    nets = networks(DB_NETWORKS)
    return [rng.choice(nets).replace(".0/24", f".{rng.randrange(256)}") for _ in range(k)]


def write_db(path: Path) -> str:
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-City", languages=["en"])
    writer.insert_network(IPSet(["81.2.69.0/24"]), city_record(0))
    # Many networks, so a lookup walks a tree of some depth and decodes a record of its own.
    for i, cidr in enumerate(networks(DB_NETWORKS), 1):
        writer.insert_network(IPSet([cidr]), city_record(i))
    writer.to_db_file(str(path))
    return str(path)


# ---------------------------------------------------------------- wired: hub processes over sockets


def hub_cpu(pid: int) -> float:
    """CPU seconds of every thread of a process, in ns resolution (unlike /proc/PID/stat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return total / 1e9


def profiled_hub() -> None:
    """``hub serve`` (argv) under cProfile, on from SIGUSR1 to SIGUSR2; stats to $BENCH_ENRICH_PROFILE."""
    from hub.cli import main as hub_main

    out = os.environ[PROFILE_ENV]
    profile = cProfile.Profile()

    def on(signum: int, frame: FrameType | None) -> None:
        profile.enable()

    def off(signum: int, frame: FrameType | None) -> None:
        profile.disable()
        # Whole or absent: the benchmark stops the hub once the file is there.
        profile.dump_stats(f"{out}.part")
        os.replace(f"{out}.part", out)

    signal.signal(signal.SIGUSR1, on)
    signal.signal(signal.SIGUSR2, off)
    sys.exit(hub_main(sys.argv[1:]))


@dataclass(frozen=True)
class Case:
    name: str
    label: str
    user_agent: bool = False
    geoip: bool = False
    # The warm-up holds each distinct handshake of the storm (LRUs warm); the start carries these fields.
    warm: bool = False
    sends: tuple[str, ...] = ()
    # --before: the hub of another tree (hub/ as it was), with the same storm.
    before: bool = False


CASES = (
    Case("none", "without: no User-Agent header, no GeoIP database"),
    Case("ua", "User-Agent (ua-parser, LRU cold)", user_agent=True),
    Case("ua+geo", "User-Agent + GeoIP behind trusted proxies (both LRUs cold)", user_agent=True, geoip=True),
)
# --diagnose: where a with-case's time goes, one difference at a time.
DIAGNOSTIC_CASES = (
    Case("ua-warm", "ua, the LRU warm (each string seen in the warm-up)", user_agent=True, warm=True),
    Case("ua+geo-warm", "ua+geo, both LRUs warm", user_agent=True, geoip=True, warm=True),
    Case("ua-sent", "none, the start carries the 6 fields ua finds", sends=UA_FIELDS),
    Case("geo-sent", "none, the start carries the 9 fields ua+geo finds", sends=UA_FIELDS + GEO_FIELDS),
)


# --before: the with-cases again on hubs of another tree, in the same rounds.
BEFORE_CASES = tuple(
    replace(c, name=f"{c.name}@before", label=f"{c.label}, --before's hub", before=True) for c in CASES[1:]
)


class HubProcess:
    """A hub on a free port (``ready``: once it accepts), profiled from ``profile_on`` to ``profile_off``;
    ``root``: the tree whose hub/ it runs."""

    def __init__(self, extra: list[str], profile_to: Path | None = None, root: Path = ROOT) -> None:
        self._start = (extra, profile_to, root)
        self._spawn(*self._start)

    def _spawn(self, extra: list[str], profile_to: Path | None, root: Path) -> None:
        self.port = free_port()
        hub = ["serve", "--port", str(self.port), "--api-key", "bench-enrich", "--log-level", "warning"]
        hub += ["--grace", "3600"]  # a closed warm-up's session is held through the run
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
        if profile_to is None:
            args = [sys.executable, "-m", "hub", *hub, *extra]
        else:
            env[PROFILE_ENV] = str(profile_to)
            args = [sys.executable, "-c", "from loadtest.bench_enrich import profiled_hub; profiled_hub()"]
            args += [*hub, *extra]
        self.profile_to = profile_to
        self.proc = subprocess.Popen(args, env=env, cwd=root)

    def ready(self) -> None:
        deadline = time.monotonic() + 30
        spawns = 1
        while not self._accepts():
            if self.proc.poll() is not None and spawns < 3:
                # The free port was taken between the pick and the bind (a busy machine): again.
                spawns += 1
                self._spawn(*self._start)
            elif time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("hub did not start")
            time.sleep(0.05)

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def cpu(self) -> float:
        return hub_cpu(self.proc.pid)

    def profile_on(self) -> None:
        if self.profile_to is not None:
            os.kill(self.proc.pid, signal.SIGUSR1)
            self._accepts()  # wakes an idle loop, so the handler runs now

    def profile_off(self) -> None:
        if self.profile_to is None:
            return
        os.kill(self.proc.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while not self.profile_to.exists() and time.monotonic() < deadline:
            self._accepts()
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class _Started:
    """Counts the hub's ``started`` answers and what enrichment put in their records."""

    def __init__(self) -> None:
        self.count = 0
        self.with_browser = 0
        self.with_country = 0

    def on_open(self, conn: WsConn) -> None:
        pass

    def on_message(self, conn: WsConn, data: bytes) -> None:
        self.count += 1
        self.with_browser += b'"userBrowser":"' in data
        self.with_country += b'"userCountry":"' in data

    def on_close(self, conn: WsConn, code: int | None, opened: bool) -> None:
        pass


@dataclass(frozen=True)
class Tracker:
    """A tracker of a storm: its handshake's headers and what its start carries beyond WIRED_START_FIELDS."""

    headers: list[tuple[str, str]]
    fields: dict[str, str]


async def _trackers(port: int, trackers: Sequence[Tracker], prefix: str, started: _Started) -> list[WsConn]:
    """Connects ``trackers``, each sending its start; back once all are started."""
    limit = asyncio.Semaphore(IN_FLIGHT)
    now = int(time.time() * 1000)
    goal = started.count + len(trackers)

    async def one(i: int) -> WsConn:
        t = trackers[i]
        async with limit:
            conn = await ws_connect(f"ws://127.0.0.1:{port}", "/ws/tracker/bench", started, headers=t.headers)
            start = {**WIRED_START_FIELDS, **t.fields, "sessionID": f"{prefix}-{i}", "tabId": f"t-{i}"}
            conn.send(msgspec.json.encode({**start, "timestamp": now}))
            return conn

    conns = await asyncio.gather(*(one(i) for i in range(len(trackers))))
    deadline = time.monotonic() + 120
    while started.count < goal:
        if time.monotonic() > deadline:
            raise SystemExit(
                f"only {started.count - goal + len(trackers)} of {len(trackers)} trackers started"
            )
        await asyncio.sleep(0.005)
    return conns


@dataclass
class Storm:
    """One case's storm on one fresh hub: server CPU per connect + start, and what the records got."""

    case: str
    round: int
    trackers: int
    us: float
    with_browser: int
    with_country: int


async def _round(
    hubs: dict[str, HubProcess],
    warmups: dict[str, list[Tracker]],
    storms: dict[str, list[Tracker]],
    batch: int,
) -> dict[str, tuple[float, _Started]]:
    """Every hub's warm-up, then the storms in batches, taking turns: the i-th batch of each case,
    in an order rotated at every turn. A hub's CPU counts while its own batch connects and starts."""
    for name, hub in hubs.items():
        warm = await _trackers(hub.port, warmups[name], f"warm-{name}", _Started())
        # Their sessions stay, in grace (HubProcess's --grace), but not their sockets: the storms'
        # file descriptors are many already.
        for conn in warm:
            conn.abort()
    await asyncio.sleep(0.5)
    for hub in hubs.values():
        hub.profile_on()
    conns = []
    cpu = dict.fromkeys(hubs, 0.0)
    started = {name: _Started() for name in hubs}
    names = list(hubs)
    n = len(next(iter(storms.values())))
    for turn, i in enumerate(range(0, n, batch)):
        k = turn % len(names)
        for name in names[k:] + names[:k]:
            hub = hubs[name]
            c0 = hub.cpu()
            conns += await _trackers(hub.port, storms[name][i : i + batch], f"{name}-{i}", started[name])
            await asyncio.sleep(0.002)  # what the hub does right after its last `started`
            cpu[name] += hub.cpu() - c0
    for hub in hubs.values():
        hub.profile_off()
    for conn in conns:
        conn.abort()
    return {name: (cpu[name], started[name]) for name in hubs}


def _run(coro: Coroutine[Any, Any, dict[str, tuple[float, _Started]]]) -> dict[str, tuple[float, _Started]]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency of the hub
        return asyncio.run(coro)
    return uvloop.run(coro)  # the lean client on uvloop: less of the shared CPU for the load


def storm_trackers(
    case: Case, agents: list[str], clients: list[str], found: list[dict[str, str]]
) -> list[Tracker]:
    """The storm's trackers for ``case``: ``found`` is what the hub would find for each."""
    trackers = []
    for ua, client, fields in zip(agents, clients, found, strict=True):
        headers = [("User-Agent", ua)] if case.user_agent else []
        if case.geoip:
            headers.append(("X-Forwarded-For", f"{client}, {INNER_PROXY}"))
        trackers.append(Tracker(headers, {k: v for k, v in fields.items() if k in case.sends}))
    return trackers


def warmup_trackers(case: Case, storm: list[Tracker], warmup: int) -> list[Tracker]:
    """``warmup`` trackers without a header; for a warm case, one for each distinct handshake of
    the storm takes the place of one of them."""
    before = list({str(t.headers): t for t in storm}.values()) if case.warm else []
    return before + [Tracker([], {})] * (warmup - len(before))


def warmup_size(args: argparse.Namespace) -> int:
    # With --diagnose a warm case's warm-up holds the storm's distinct handshakes: every hub as many.
    return max(args.warmup, args.trackers) if args.diagnose else int(args.warmup)


def storm_round(
    cases: Sequence[Case],
    rnd: int,
    storms: dict[str, list[Tracker]],
    db: str,
    args: argparse.Namespace,
) -> list[Storm]:
    """One round: a fresh hub per case, all at once, their storms interleaved in batches."""
    hubs: dict[str, HubProcess] = {}
    try:
        for case in cases:
            extra = ["--geoip-db", db, "--trusted-proxies", TRUSTED_PROXIES] if case.geoip else []
            profile = args.profile / f"{case.name}-r{rnd}.prof" if args.profile is not None else None
            root = args.before if case.before else ROOT
            hubs[case.name] = HubProcess(extra, profile, root)
        for hub in hubs.values():
            hub.ready()
        warmups = {c.name: warmup_trackers(c, storms[c.name], warmup_size(args)) for c in cases}
        measured = _run(_round(hubs, warmups, storms, args.batch))
    finally:
        for hub in hubs.values():
            hub.stop()
    results = []
    for case in cases:
        cpu, started = measured[case.name]
        n = len(storms[case.name])
        result = Storm(case.name, rnd, n, cpu / n * 1e6, started.with_browser, started.with_country)
        check(case, result, n)
        results.append(result)
    return results


def before_tree(rev: str, into: Path) -> Path:
    """A directory whose hub/ --before's hubs run: the one named, or ``rev`` of this repository."""
    if Path(rev, "hub").is_dir():
        return Path(rev).resolve()
    into.mkdir()
    archive = subprocess.run(["git", "archive", rev, "hub"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def wired(args: argparse.Namespace, db: str) -> dict[str, Any]:
    """Rounds of the cases, each on fresh hubs; ratios per round and overall."""
    cases = CASES + (DIAGNOSTIC_CASES if args.diagnose else ()) + (BEFORE_CASES if args.before else ())
    pool = distinct_agents(args.distinct)
    # What the hub finds for a tracker, for the cases whose start carries it instead.
    finder = Enricher(
        geoip_db=db, trusted_proxies=[ipaddress.ip_network(n) for n in TRUSTED_PROXIES.split(",")]
    )
    load_before = loadavg()
    print(f"load average before: {load_before}")
    print(
        f"{args.rounds} rounds x {len(cases)} cases, {args.trackers} trackers each after {warmup_size(args)} "
        f"warm-up ones, in turns of {args.batch} ({IN_FLIGHT} in flight); User-Agents drawn Zipf-like "
        f"from {len(pool)} strings"
    )
    for c in cases:
        print(f"  {c.name:14} {c.label}")
    storms: list[Storm] = []
    for rnd in range(args.rounds):
        rng = random.Random(1800 + rnd)
        agents = zipf_draw(pool, args.trackers, rng)
        clients = client_addresses(args.trackers, rng)
        found = [
            finder.fields({"user-agent": ua, "x-forwarded-for": f"{client}, {INNER_PROXY}"}, "127.0.0.1")
            for ua, client in zip(agents, clients, strict=True)
        ]
        results = storm_round(
            cases, rnd, {c.name: storm_trackers(c, agents, clients, found) for c in cases}, db, args
        )
        storms += results
        print(
            f"  round {rnd + 1}: " + ", ".join(f"{r.case} {r.us:.1f}" for r in results) + " µs  "
            f"({len(set(agents))} distinct User-Agents, {len(set(clients))} distinct clients; "
            f"load {loadavg()})"
        )
    finder.close()
    load_after = loadavg()
    print(f"load average after: {load_after}")
    result = summarize(cases, storms, args)
    result["load_before"], result["load_after"] = load_before, load_after
    return result


def check(case: Case, s: Storm, n: int) -> None:
    """Every record got what its case's enrichment finds, and no more."""
    want_browser = n if case.user_agent or "userBrowser" in case.sends else 0
    want_country = n if case.geoip or "userCountry" in case.sends else 0
    if (s.with_browser, s.with_country) != (want_browser, want_country):
        raise SystemExit(
            f"{s.case} round {s.round + 1}: {s.with_browser} records with userBrowser (want {want_browser}), "
            f"{s.with_country} with userCountry (want {want_country})"
        )


def summarize(cases: Sequence[Case], storms: list[Storm], args: argparse.Namespace) -> dict[str, Any]:
    by_case = {c.name: [s for s in storms if s.case == c.name] for c in cases}
    base = {s.round: s.us for s in by_case["none"]}
    out: dict[str, Any] = {}
    print("\nServer CPU per connect + start, µs over rounds; x without: paired by round (median, spread)")
    print(f"  {'case':14} {'best':>6} {'median':>6} {'worst':>6}   {'x best-of':>9} {'x median':>8}  spread")
    for c in cases:
        us = [s.us for s in by_case[c.name]]
        entry: dict[str, Any] = {"label": c.label, "us_per_connect": us}
        row = f"  {c.name:14} {min(us):6.1f} {statistics.median(us):6.1f} {max(us):6.1f}"
        if c.name != "none":
            # A with-storm against the without-storm of its own round: the same minute's machine.
            ratios = [s.us / base[s.round] for s in by_case[c.name]]
            entry["ratio_per_round"] = ratios
            entry["ratio_of_bests"] = min(us) / min(base.values())
            entry["ratio_median"] = statistics.median(ratios)
            row += (
                f"   {entry['ratio_of_bests']:9.3f} {entry['ratio_median']:8.3f}"
                f"  {min(ratios):.3f}-{max(ratios):.3f}"
            )
        print(row)
        out[c.name] = entry
    for c in cases:
        if c.before:
            # This tree's hub against the before tree's, each round's pair on the same minute's machine.
            now = {s.round: s.us for s in by_case[c.name.removesuffix("@before")]}
            ratios = [now[s.round] / s.us for s in by_case[c.name]]
            out[c.name]["now_per_round"] = ratios
            out[c.name]["now_median"] = statistics.median(ratios)
            print(
                f"  {c.name.removesuffix('@before')} now / before: {statistics.median(ratios):.3f} median "
                f"({min(ratios):.3f}-{max(ratios):.3f})"
            )
    return {
        "command": " ".join(["python -m loadtest.bench_enrich", *sys.argv[1:]]),
        "rounds": args.rounds,
        "trackers": args.trackers,
        "warmup": warmup_size(args),
        "distinct": args.distinct,
        "cases": out,
    }


def profile_report(profile_dir: Path, trackers: int) -> None:
    """Where each case's storms spent the hub's time (rounds merged), per connect, and what grew against
    the case without enrichment: the functions whose own time per connect grew most."""
    print("\nProfiled storms (cProfile inflates every call: read the shares and the growth, not the µs):")
    per_connect: dict[str, dict[tuple[str, int, str], tuple[float, float, float]]] = {}
    for c in CASES + DIAGNOSTIC_CASES:
        files = sorted(str(p) for p in profile_dir.glob(f"{c.name}-r[0-9]*.prof"))
        if not files:
            continue
        n = trackers * len(files)
        raw: dict[tuple[str, int, str], Any] = pstats.Stats(*files).stats  # type: ignore[attr-defined]
        per_connect[c.name] = {
            key: (calls / n, tt / n * 1e6, ct / n * 1e6) for key, (_, calls, tt, ct, _) in raw.items()
        }
    base = per_connect.get("none", {})
    for name, funcs in per_connect.items():
        total = sum(own for _, own, _ in funcs.values())
        print(f"  {name}: {total:.0f} µs profiled per connect", end="")
        if name == "none":
            print("; top own time:")
            rows = sorted(funcs.items(), key=lambda kv: kv[1][1], reverse=True)[:10]
        else:
            grown = total - sum(own for _, own, _ in base.values())
            print(f", {grown:+.0f} against none; the most grown own time:")
            rows = sorted(
                funcs.items(), key=lambda kv: kv[1][1] - base.get(kv[0], (0, 0, 0))[1], reverse=True
            )
            rows = rows[:14]
        for (file, line, func), (calls, own, cum) in rows:
            was = base.get((file, line, func), (0.0, 0.0, 0.0))
            where = f"{Path(file).name}:{line}({func})" if line else func
            grew = f" ({own - was[1]:+6.1f})" if name != "none" else ""
            print(f"    {own:7.1f}{grew} µs own {cum:7.1f} cum {calls:5.2f} calls  {where}")


# ---------------------------------------------------------------- in-process parts


def connect_cost(n: int) -> float:
    """Server CPU per tracker connect + start without enrichment's work, µs, measured now."""
    hub = HubProcess([])
    try:
        hub.ready()
        plain = Tracker([], {})
        cpu, _ = _run(_round({"none": hub}, {"none": [plain] * 200}, {"none": [plain] * n}, n))["none"]
    finally:
        hub.stop()
    return cpu / n * 1e6


def parsers(n: int) -> None:
    agents = UserAgents()
    print("User-Agent parse, µs per call (ua-parser 1.0 + ua-parser-rs):")
    print(f"  {'string':26} {'uncached':>9} {'CPU caches cold':>15} {'cached':>8}")
    for name, ua in STRINGS.items():
        uncached = per_call_us(functools.partial(agents.parse, ua), max(1, n // 20))
        cold = evicted_us(functools.partial(agents.parse, ua), 40)
        agents.fields(ua)
        cached = per_call_us(functools.partial(agents.fields, ua), n)
        print(f"  {name:26} {uncached:9.1f} {cold:15.1f} {cached:8.2f}")


def compare(n: int) -> None:
    try:
        import user_agents
        from ua_parser import user_agent_parser
    except ImportError:
        print("--compare needs user-agents: pip install user-agents")
        return
    agents = UserAgents()

    def legacy(ua: str) -> object:
        user_agent_parser._PARSE_CACHE.clear()  # its own 200-entry cache would answer the repeats
        return user_agents.parse(ua)

    print("\nuser-agents 2.2 on the same strings (µs per uncached parse; what each parser names):")
    for name, ua in STRINGS.items():
        cost = per_call_us(functools.partial(legacy, ua), max(1, n // 1000))
        old = user_agents.parse(ua)
        kind = next(
            (
                k
                for k, on in (("mobile", old.is_mobile), ("tablet", old.is_tablet), ("desktop", old.is_pc))
                if on
            ),
            "-",
        )
        named = f"{old.browser.family} / {old.os.family} / {old.device.family} / {kind}"
        print(f"  {name:26} {cost:9.1f}  user-agents: {named}")
        ours = agents.parse(ua)
        ours.pop("userAgent", None)
        print(f"  {'':26} {'':9}  ua-parser:   {ours}")


def compare_readers(n: int, db: str) -> None:
    """The GeoIP lookup of a new address: maxminddb's whole record against maxminddb-rust's three paths."""
    try:
        import maxminddb
        import maxminddb_rust
    except ImportError:
        print("--compare needs maxminddb-rust for the reader row: pip install maxminddb-rust")
        return
    full = maxminddb.open_database(db)
    paths = maxminddb_rust.open_database(db)
    wanted = (("country", "iso_code"), ("subdivisions", 0, "names", "en"), ("city", "names", "en"))
    address = "81.2.69.160"
    print("\nGeoIP lookup of one address, µs per call:")
    whole = per_call_us(lambda: full.get(address), n)
    three = per_call_us(lambda: [paths.get_path(address, path) for path in wanted], n)
    print(f"  {f'maxminddb {maxminddb.__version__}, whole record':42} {whole:7.2f}")
    print(f"  {'maxminddb-rust, get_path x3':42} {three:7.2f}")
    whole = evicted_us(lambda: full.get(address), 40)
    three = evicted_us(lambda: [paths.get_path(address, path) for path in wanted], 40)
    print(f"  {'the same, CPU caches cold: maxminddb':42} {whole:7.2f}")
    print(f"  {'the same, CPU caches cold: maxminddb-rust':42} {three:7.2f}")
    full.close()
    paths.close()


def enrichment(n: int, db: str, connect_us: float) -> None:
    headers = {"user-agent": STRINGS["Chrome/Windows"], "host": "hub.example.com"}
    proxied = {**headers, "x-forwarded-for": "203.0.113.9, 81.2.69.160, 10.0.0.7"}
    plain = Enricher()
    geo = Enricher(geoip_db=db, trusted_proxies=[ipaddress.ip_network("10.0.0.0/8")])
    assert geo.geoip is not None
    geo_db = geo.geoip
    base = per_call_us(lambda: decode_message(START), n)
    rows = [
        ("decode one 16-field start (baseline)", base),
        ("enrich: User-Agent, cached", per_call_us(lambda: dict(plain.fields(headers, "81.2.69.160")), n)),
        (
            "GeoIP: one new address (decode a record)",
            per_call_us(lambda: geo_db.lookup("81.2.69.160"), n // 4),
        ),
        (
            "enrich: User-Agent + GeoIP, cached",
            per_call_us(lambda: dict(geo.fields(headers, "81.2.69.160")), n),
        ),
        (
            "enrich: + trusted proxy, X-Forwarded-For",
            per_call_us(lambda: dict(geo.fields(proxied, "10.0.0.1")), n),
        ),
    ]
    print("\nOne connection's enrichment, µs per call:")
    for label, us in rows:
        share = f"{us / base:5.2f}x the decode, {1 + us / connect_us:5.3f}x a connect + start"
        print(f"  {label:42} {us:7.2f}  {share if us is not base else ''}")
    geo.close()


def storm(connections: int, distinct: int, db: str, connect_us: float) -> None:
    rng = random.Random(18)
    drawn = zipf_draw(distinct_agents(distinct), connections, rng)
    peers = client_addresses(connections, rng)
    print(
        f"\nConnect storm, cold caches: {connections} connections, {len(set(drawn))} distinct User-Agents, "
        f"{len(set(peers))} distinct addresses"
    )
    for label, make in (("User-Agent only", Enricher), ("User-Agent + GeoIP", lambda: Enricher(geoip_db=db))):
        best = float("inf")
        for _ in range(3):
            enricher = make()
            t0 = time.process_time()
            for ua, peer in zip(drawn, peers, strict=True):
                dict(enricher.fields({"user-agent": ua}, peer))  # every field read, as a start lacking them
            best = min(best, time.process_time() - t0)
            enricher.close()
        us = best / connections * 1e6
        print(f"  {label:20} {us:7.1f} µs per connect: {1 + us / connect_us:5.3f}x a connect + start")


def footprint() -> None:
    # The rules compiled anew: the hub's UserAgents shares one compiled set per process.
    t0 = time.process_time()
    Resolver(load_lazy_builtins())
    built = time.process_time() - t0
    agents = UserAgents()
    pool = distinct_agents(4096)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for ua in pool:
        agents.fields(ua)
    per_entry = (tracemalloc.get_traced_memory()[0] - before) / len(pool)
    tracemalloc.stop()
    print(
        f"\nParser start: {built:.2f} s CPU to compile the rules; cache: {per_entry:.0f} B a distinct string"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--wired", action="store_true", help="hub processes over sockets, with and without")
    parser.add_argument("--rounds", type=int, default=6, help="--wired: rounds of the cases (default 6)")
    parser.add_argument("--trackers", type=int, default=2000, help="--wired: trackers a storm (default 2000)")
    parser.add_argument("--warmup", type=int, default=300, help="--wired: trackers before each (default 300)")
    parser.add_argument("--profile", type=Path, help="--wired: profile the storms, stats here")
    parser.add_argument("--out", type=Path, help="--wired: the figures as JSON to this file")
    parser.add_argument("--batch", type=int, default=100, help="--wired: trackers a turn (default 100)")
    parser.add_argument(
        "--diagnose", action="store_true", help="--wired: also the cases that split the cost (warm, sent)"
    )
    parser.add_argument("--calls", type=int, default=20000, help="calls per cached figure (default 20000)")
    parser.add_argument("--storm", type=int, default=5000, help="connections in the storm (default 5000)")
    parser.add_argument(
        "--distinct", type=int, default=300, help="distinct User-Agents drawn from (default 300)"
    )
    parser.add_argument(
        "--connects", type=int, default=2000, help="trackers for the connect + start figure (default 2000)"
    )
    parser.add_argument("--compare", action="store_true", help="also parse with user-agents 2.2")
    parser.add_argument(
        "--before",
        metavar="REV",
        help="--wired: also run ua and ua+geo on the hub of this git revision (or directory)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = write_db(Path(tmp) / "city.mmdb")
        if args.before:
            args.before = before_tree(args.before, Path(tmp) / "before")
        if args.wired:
            if args.profile is not None:
                args.profile.mkdir(parents=True, exist_ok=True)
            result = wired(args, db)
            if args.profile is not None:
                profile_report(args.profile, args.trackers)
            if args.out is not None:
                args.out.write_text(json.dumps(result, indent=1))
            return
        connect_us = connect_cost(args.connects)
        print(f"Server CPU per connect + start, this run: {connect_us:.0f} µs ({args.connects} trackers)")
        parsers(args.calls)
        if args.compare:
            compare(args.calls)
            compare_readers(args.calls // 4, db)
        enrichment(args.calls, db, connect_us)
        storm(args.storm, args.distinct, db, connect_us)
        footprint()


if __name__ == "__main__":
    main()
