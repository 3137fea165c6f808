"""Record enrichment benchmark: what hub/enrich.py adds to a tracker's connect, in one run.

    python -m loadtest.bench_enrich [--storm 5000 --distinct 300 --connects 2000] [--compare]

In this process, no sockets. Per User-Agent string (real browsers, a crawler,
an empty and a 2 KB garbage string): the parse without the cache and the
cached lookup. Then one enrichment (headers -> fields, cache warm) without a
GeoIP database, with one (written here by mmdb-writer), and with a trusted
proxy's X-Forwarded-For, against decoding one 16-field tracker ``start``
(``hub.record.decode_message``) as the baseline; and a connect storm on cold
caches: ``--storm`` connections whose User-Agents are drawn (Zipf-like, as
browsers' versions are) from ``--distinct`` strings. The cost per connect is
set against the server CPU of a real connect + start measured in the same run
(``--connects`` trackers against a hub process, its CPU from
/proc/PID/schedstat; FACTS.md has ~240 µs on a quiet machine): the hub does
not call the enrichment yet, so with-enrichment is that figure plus the
enrichment's own cost.

``--compare`` also parses the same strings with ``user-agents`` 2.2 and prints
what each parser names, and looks the address up with ``maxminddb-rust``'s
``get_path`` (neither is a dependency: ``pip install user-agents
maxminddb-rust``).
Figures are the best of 5 repeats (the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import random
import string
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from hub.enrich import Enricher, UserAgents
from hub.record import decode_message

from .bench_fanout import cpu_seconds
from .client import WsConn, ws_connect
from .procs import free_port, start_hub

DB_NETWORKS = 2000

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

PLATFORMS = [
    "Windows NT 10.0; Win64; x64",
    "Macintosh; Intel Mac OS X 10_15_7",
    "X11; Linux x86_64",
    "Linux; Android 14; Pixel 8",
    "Linux; Android 13; SM-S911B",
    "Linux; Android 13; SM-X710",
    "iPhone; CPU iPhone OS 17_4 like Mac OS X",
]


def per_call_us(fn: Callable[[], object], n: int) -> float:
    """Best of 5 repeats of n calls, µs per call."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def distinct_agents(count: int) -> list[str]:
    """``count`` plausible User-Agents: browser versions by platform, as a population has them."""
    rng = random.Random(7)
    agents: set[str] = set()
    while len(agents) < count:
        platform = rng.choice(PLATFORMS)
        major = rng.randrange(100, 140)
        build = f"Chrome/{major}.0.{rng.randrange(6000, 7000)}.{rng.randrange(200)}"
        mobile = " Mobile" if "Android" in platform and "SM-X" not in platform else ""
        agents.add(
            f"Mozilla/5.0 ({platform}) AppleWebKit/537.36 (KHTML, like Gecko) {build}{mobile} Safari/537.36"
        )
    return sorted(agents)


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


def write_db(path: Path) -> str:
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-City", languages=["en"])
    writer.insert_network(IPSet(["81.2.69.0/24"]), city_record(0))
    # Many networks, so a lookup walks a tree of some depth and decodes a record of its own.
    for i, cidr in enumerate(networks(DB_NETWORKS), 1):
        writer.insert_network(IPSet([cidr]), city_record(i))
    writer.to_db_file(str(path))
    return str(path)


class _Started:
    """Counts the hub's answers (one ``started`` per tracker)."""

    def __init__(self) -> None:
        self.count = 0

    def on_open(self, conn: WsConn) -> None:
        pass

    def on_message(self, conn: WsConn, data: bytes) -> None:
        self.count += 1

    def on_close(self, conn: WsConn, code: int | None, opened: bool) -> None:
        pass


async def _connect_and_start(port: int, n: int) -> None:
    started = _Started()
    limit = asyncio.Semaphore(200)
    headers = [("User-Agent", STRINGS["Chrome/Windows"])]

    async def one(i: int) -> WsConn:
        async with limit:
            conn = await ws_connect(f"ws://127.0.0.1:{port}", "/ws/tracker/bench", started, headers=headers)
            conn.send(msgspec.json.encode({**START_FIELDS, "sessionID": f"enrich-{i}"}))
            return conn

    conns = await asyncio.gather(*(one(i) for i in range(n)))
    deadline = time.monotonic() + 60
    while started.count < n and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    for conn in conns:
        conn.abort()


def connect_cost(n: int) -> float:
    """Server CPU per tracker connect + start, µs, measured now on this machine."""
    port = free_port()
    hub = start_hub(port, "bench-enrich", [])
    try:
        c0 = cpu_seconds(hub.pid)
        asyncio.run(_connect_and_start(port, n))
        return (cpu_seconds(hub.pid) - c0) / n * 1e6
    finally:
        hub.kill()
        hub.wait()


def parsers(n: int) -> None:
    agents = UserAgents()
    print("User-Agent parse, µs per call (ua-parser 1.0 + ua-parser-rs):")
    print(f"  {'string':26} {'uncached':>9} {'cached':>8}")
    for name, ua in STRINGS.items():
        uncached = per_call_us(lambda ua=ua: agents.parse(ua), max(1, n // 20))
        agents.fields(ua)
        cached = per_call_us(lambda ua=ua: agents.fields(ua), n)
        print(f"  {name:26} {uncached:9.1f} {cached:8.2f}")


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
        cost = per_call_us(lambda ua=ua: legacy(ua), max(1, n // 1000))
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
        ("enrich: User-Agent, cached", per_call_us(lambda: plain.fields(headers, "81.2.69.160"), n)),
        (
            "GeoIP: one new address (decode a record)",
            per_call_us(lambda: geo_db.lookup("81.2.69.160"), n // 4),
        ),
        ("enrich: User-Agent + GeoIP, cached", per_call_us(lambda: geo.fields(headers, "81.2.69.160"), n)),
        ("enrich: + trusted proxy, X-Forwarded-For", per_call_us(lambda: geo.fields(proxied, "10.0.0.1"), n)),
    ]
    print("\nOne connection's enrichment, µs per call:")
    for label, us in rows:
        share = f"{us / base:5.2f}x the decode, {1 + us / connect_us:5.3f}x a connect + start"
        print(f"  {label:42} {us:7.2f}  {share if us is not base else ''}")
    geo.close()


def storm(connections: int, distinct: int, db: str, connect_us: float) -> None:
    pool = distinct_agents(distinct)
    rng = random.Random(18)
    weights = [1 / (rank + 1) for rank in range(len(pool))]
    drawn = rng.choices(pool, weights, k=connections)
    # Addresses in the database's networks, nearly all distinct: the GeoIP cache's worst case.
    nets = networks(DB_NETWORKS)
    peers = [rng.choice(nets).replace(".0/24", f".{rng.randrange(256)}") for _ in range(connections)]
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
                enricher.fields({"user-agent": ua}, peer)
            best = min(best, time.process_time() - t0)
            enricher.close()
        us = best / connections * 1e6
        print(f"  {label:20} {us:7.1f} µs per connect: {1 + us / connect_us:5.3f}x a connect + start")


def footprint() -> None:
    t0 = time.process_time()
    agents = UserAgents()
    built = time.process_time() - t0
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
    parser.add_argument("--calls", type=int, default=20000, help="calls per cached figure (default 20000)")
    parser.add_argument("--storm", type=int, default=5000, help="connections in the storm (default 5000)")
    parser.add_argument(
        "--distinct", type=int, default=300, help="distinct User-Agents drawn from (default 300)"
    )
    parser.add_argument(
        "--connects", type=int, default=2000, help="trackers for the connect + start figure (default 2000)"
    )
    parser.add_argument("--compare", action="store_true", help="also parse with user-agents 2.2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = write_db(Path(tmp) / "city.mmdb")
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
