"""Enrichment from the handshake (hub/enrich.py): User-Agent fields, GeoIP, proxy trust, settings.

The GeoIP database is one this file writes with mmdb-writer, never a downloaded one.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from hub.config import ConfigError, parse_settings
from hub.enrich import BATCH_MAX, BROWSER, DEVICE, SYSTEM, Enricher, GeoIP, TrustedProxies, UserAgents
from hub.index import LiveIndex
from hub.record import ENRICHED_FIELDS, GEO_FIELDS, MAX_STRING, UA_FIELDS, Start
from hub.registry import Registry
from loadtest.bench_enrich import distinct_agents
from tests.helpers import run_hub

CHROME_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36"
)
SAFARI_IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Mobile/15E148 Safari/604.1"
)
FIREFOX_LINUX = "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0"
EDGE = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36 Edg/124.0.2478.51"
)
SAMSUNG_TABLET = (
    "Mozilla/5.0 (Linux; Android 13; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) "
    "SamsungBrowser/24.0 Chrome/117.0.0.0 Safari/537.36"
)
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
GARBAGE = "".join(random.Random(18).choices([chr(c) for c in range(0x21, 0x7F)], k=2048))

REAL = [
    (
        CHROME_WINDOWS,
        {
            "userBrowser": "Chrome",
            "userBrowserVersion": "124.0.0.0",
            "userOs": "Windows",
            "userDeviceType": "desktop",
        },
    ),
    (
        SAFARI_IPHONE,
        {
            "userBrowser": "Mobile Safari",
            "userBrowserVersion": "17.4",
            "userOs": "iOS",
            "userDevice": "iPhone",
            "userDeviceType": "mobile",
        },
    ),
    (
        FIREFOX_LINUX,
        {
            "userBrowser": "Firefox",
            "userBrowserVersion": "125.0",
            "userOs": "Linux",
            "userDeviceType": "desktop",
        },
    ),
    (
        EDGE,
        {
            "userBrowser": "Edge",
            "userBrowserVersion": "124.0.2478.51",
            "userOs": "Windows",
            "userDeviceType": "desktop",
        },
    ),
    (
        SAMSUNG_TABLET,
        {
            "userBrowser": "Samsung Internet",
            "userBrowserVersion": "24.0",
            "userOs": "Android",
            "userDevice": "SM-X710",
            "userDeviceType": "tablet",
        },
    ),
    # A crawler: its name, and "Spider" as uap-core's device; it poses as no device, so no type.
    (GOOGLEBOT, {"userBrowser": "Googlebot", "userBrowserVersion": "2.1", "userDevice": "Spider"}),
]


@pytest.fixture(scope="module")
def user_agents() -> UserAgents:
    return UserAgents()


@pytest.mark.parametrize(("header", "expected"), REAL, ids=[e[0][:40] for e in REAL])
def test_a_real_user_agent_gives_its_fields(
    user_agents: UserAgents, header: str, expected: dict[str, str]
) -> None:
    assert user_agents.fields(header) == {"userAgent": header, **expected}


@pytest.mark.parametrize(
    ("header", "kind"),
    [
        (
            "Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148 Safari/604.1",
            "tablet",
        ),
        ("Mozilla/5.0 (Android 14; Mobile; rv:125.0) Gecko/125.0 Firefox/125.0", "mobile"),
        ("Mozilla/5.0 (Android 14; Tablet; rv:125.0) Gecko/125.0 Firefox/125.0", "tablet"),
        (
            "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/124.0.0.0 Mobile Safari/537.36",
            "mobile",
        ),
        (
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
            "Version/17.4 Safari/605.1.15",
            "desktop",
        ),
        (
            "Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 Chrome/124.0.0.0 Safari/537.36",
            "desktop",
        ),
        (
            "Mozilla/5.0 (PlayStation; PlayStation 5/2.26) AppleWebKit/605.1.15 Version/13.0 Safari/605.1.15",
            "console",
        ),
        (
            "Mozilla/5.0 (SMART-TV; Linux; Tizen 6.0) AppleWebKit/537.36 SamsungBrowser/4.0 TV Safari/537.36",
            "smarttv",
        ),
        (
            "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 "
            "Chrome/124.0.6367.82 Mobile Safari/537.36 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
            "mobile",
        ),
        ("curl/8.5.0", None),
    ],
)
def test_device_type_takes_openreplays_values(user_agents: UserAgents, header: str, kind: str | None) -> None:
    assert user_agents.fields(header).get("userDeviceType") == kind


def test_unknowns_are_absent_never_other(user_agents: UserAgents) -> None:
    for header, _ in REAL:
        found = user_agents.fields(header)
        assert set(found) <= set(UA_FIELDS)
        assert all(value and value != "Other" and not value.startswith("Generic") for value in found.values())
    # A library names itself and nothing else: no system, device or type to guess.
    assert user_agents.fields("python-requests/2.31.0") == {
        "userAgent": "python-requests/2.31.0",
        "userBrowser": "Python Requests",
        "userBrowserVersion": "2.31",
    }


@pytest.mark.parametrize("header", ["", "   ", "\t"])
def test_an_empty_user_agent_gives_nothing(user_agents: UserAgents, header: str) -> None:
    assert user_agents.fields(header) == {}


def test_garbage_is_kept_as_text_cut_to_the_record_limit(user_agents: UserAgents) -> None:
    assert user_agents.fields(GARBAGE) == {"userAgent": GARBAGE[:MAX_STRING]}
    # Header bytes arrive as latin-1: anything in 0x80-0xFF and long runs of one byte.
    odd = "".join(chr(c) for c in range(0x80, 0x100)) * 4
    assert user_agents.fields(odd) == {"userAgent": odd[:MAX_STRING]}
    assert user_agents.fields("Mozilla/" * 4000)["userAgent"] == ("Mozilla/" * 4000)[:MAX_STRING]


def test_each_distinct_string_is_parsed_once_and_the_cache_is_bounded() -> None:
    agents = UserAgents(cache_size=3)
    for _ in range(100):
        agents.fields(CHROME_WINDOWS)
    info = agents.cache_info()
    assert (info.misses, info.hits) == (1, 99)
    for header, _ in REAL:
        agents.fields(header)
    info = agents.cache_info()
    assert info.currsize == info.maxsize == 3
    assert info.misses == len(REAL)  # Chrome was still cached when the table came round to it
    # The least recently used went first: Chrome is parsed again.
    agents.fields(CHROME_WINDOWS)
    assert agents.cache_info().misses == len(REAL) + 1
    # Each miss ran each of the parser's three extractors once.
    assert agents.parses == {BROWSER: len(REAL) + 1, SYSTEM: len(REAL) + 1, DEVICE: len(REAL) + 1}


def test_a_caller_changing_its_answer_does_not_change_the_cache(user_agents: UserAgents) -> None:
    first = user_agents.fields(EDGE)
    first["userBrowser"] = "mine"
    first.pop("userOs")
    assert user_agents.fields(EDGE) == {"userAgent": EDGE, **REAL[3][1]}


def test_the_uncached_parse_answers_the_same(user_agents: UserAgents) -> None:
    before = user_agents.cache_info()
    for header, expected in REAL:
        assert user_agents.parse(header) == {"userAgent": header, **expected}
    assert user_agents.cache_info() == before


# -- GeoIP ------------------------------------------------------------------------------------

LONDON = {
    "country": {"iso_code": "GB", "names": {"en": "United Kingdom"}},
    "subdivisions": [{"iso_code": "ENG", "names": {"en": "England"}}, {"names": {"en": "Greater London"}}],
    "city": {"names": {"en": "London", "de": "London"}},
}
TOKYO = {
    "country": {"iso_code": "JP", "names": {"en": "Japan"}},
    "subdivisions": [{"iso_code": "13", "names": {"en": "Tokyo"}}],
    "city": {"names": {"en": "Tokyo"}},
}
COUNTRY_ONLY = {"country": {"iso_code": "SE", "names": {"en": "Sweden"}}}
# A database of one's own may place private ranges (an office network).
OFFICE = {"country": {"iso_code": "DE"}, "city": {"names": {"en": "Berlin office"}}}


def write_db(path: Path, networks: dict[str, Any], ip_version: int = 6) -> str:
    writer = MMDBWriter(
        ip_version=ip_version,
        ipv4_compatible=ip_version == 6,
        database_type="GeoIP2-City",
        languages=["en"],
        description="hub tests",
    )
    for cidr, record in networks.items():
        writer.insert_network(IPSet([cidr]), record)
    writer.to_db_file(str(path))
    return str(path)


@pytest.fixture(scope="module")
def geo_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_db(
        tmp_path_factory.mktemp("geo") / "city.mmdb",
        {
            "81.2.69.0/24": LONDON,
            "2001:218::/32": TOKYO,
            "89.160.20.0/24": COUNTRY_ONLY,
            "10.20.0.0/16": OFFICE,
            "192.0.2.0/24": "not a map",
        },
    )


@pytest.fixture(scope="module")
def geoip(geo_db: str) -> GeoIP:
    return GeoIP(geo_db)


def test_an_ipv4_address_gives_country_code_first_subdivision_and_city(geoip: GeoIP) -> None:
    assert geoip.fields("81.2.69.160") == {"userCountry": "GB", "userState": "England", "userCity": "London"}


def test_an_ipv6_address_gives_its_location(geoip: GeoIP) -> None:
    assert geoip.fields("2001:218:1:2::3") == {"userCountry": "JP", "userState": "Tokyo", "userCity": "Tokyo"}


def test_a_country_database_entry_gives_only_the_country(geoip: GeoIP) -> None:
    assert geoip.fields("89.160.20.112") == {"userCountry": "SE"}


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "2606:4700::1111",
        "192.168.1.5",
        "10.1.2.3",
        "127.0.0.1",
        "::1",
        "fe80::1",
        "192.0.2.1",
        "bogus",
        "",
    ],
)
def test_an_address_the_database_does_not_hold_gives_nothing(geoip: GeoIP, address: str) -> None:
    # Private and loopback addresses are not special: real databases do not hold them.
    assert geoip.fields(address) == {}


def test_a_private_range_the_database_holds_is_placed(geoip: GeoIP) -> None:
    assert geoip.fields("10.20.3.4") == {"userCountry": "DE", "userCity": "Berlin office"}


def test_each_address_is_looked_up_once_and_the_cache_is_bounded(geo_db: str) -> None:
    geo = GeoIP(geo_db, cache_size=2)
    try:
        for _ in range(10):
            assert geo.fields("81.2.69.160")["userCity"] == "London"
        assert (geo.cache_info().misses, geo.cache_info().hits) == (1, 9)
        for address in ("2001:218::1", "89.160.20.1", "8.8.8.8"):
            geo.fields(address)
        assert geo.cache_info().currsize == 2
        changed = geo.fields("8.8.8.8")
        changed["userCountry"] = "XX"
        assert geo.fields("8.8.8.8") == {} == geo.lookup("8.8.8.8")
    finally:
        geo.close()


def test_a_new_address_in_a_network_looked_up_already_is_answered_from_it(tmp_path: Path) -> None:
    """The database ends every address of a network at one record: the network's answer is
    kept, so a new address in it decodes nothing, and every answer is the database's own,
    for networks nested in others, IPv4 and IPv6 alike."""
    nested = {
        "81.2.0.0/16": TOKYO,
        "81.2.69.0/24": LONDON,  # carves the /16 into /17 ... /24 pieces
        "81.2.69.128/25": COUNTRY_ONLY,
        "2001:218::/32": TOKYO,
        "2001:218:1::/48": LONDON,
        "0.0.0.0/8": OFFICE,
    }
    for version in (6, 4):
        networks = {cidr: record for cidr, record in nested.items() if version == 6 or ":" not in cidr}
        geo = GeoIP(write_db(tmp_path / f"nested{version}.mmdb", networks, ip_version=version), cache_size=64)
        try:
            assert geo.fields("81.2.69.1") == {
                "userCountry": "GB",
                "userState": "England",
                "userCity": "London",
            }
            assert geo.fields("81.2.69.200") == {"userCountry": "SE"}
            assert geo.lookups == 2
            assert geo.fields("81.2.69.2")["userCity"] == "London" and geo.lookups == 2, "the /24 known"
            assert geo.fields("81.2.69.129") == {"userCountry": "SE"} and geo.lookups == 2
            assert geo.fields("81.2.68.1")["userCountry"] == "JP" and geo.lookups == 3, "a piece of the /16"
            rng = random.Random(version)
            addresses = [f"81.2.{rng.randrange(60, 80)}.{rng.randrange(256)}" for _ in range(300)]
            addresses += [f"{rng.randrange(256)}.{rng.randrange(256)}.1.1" for _ in range(100)]
            if version == 6:
                addresses += [
                    f"2001:218:{rng.choice([0, 1, 2])}::{rng.randrange(1 << 16):x}" for _ in range(100)
                ]
                addresses += ["::1", "2002:5102:4501::1", "2001:218:1::"]
            for address in addresses:
                assert geo.fields(address) == geo.lookup(address), address
            assert geo.lookups < len(set(addresses)) / 2
            # An IPv4-mapped address is its IPv4 address, as the client address always is.
            assert geo.fields("::ffff:81.2.69.1") == geo.lookup("81.2.69.1")
        finally:
            geo.close()


def test_the_network_cache_is_bounded(geo_db: str) -> None:
    geo = GeoIP(geo_db, cache_size=2)
    try:
        for address in ("81.2.69.1", "2001:218::1", "89.160.20.1", "8.8.8.8", "81.2.69.2"):
            assert geo.fields(address) == geo.lookup(address)
        assert geo.lookups == 5, "London's network had gone, the oldest of three"
        assert sum(len(n) for lengths in geo._lengths.values() for _, _, n in lengths) == 2
    finally:
        geo.close()


def test_an_ipv4_only_database_answers_nothing_for_ipv6(tmp_path: Path) -> None:
    v4 = GeoIP(write_db(tmp_path / "v4.mmdb", {"81.2.69.0/24": LONDON}, ip_version=4))
    try:
        assert v4.fields("81.2.69.1")["userCountry"] == "GB"
        assert v4.fields("2001:218::1") == {}
    finally:
        v4.close()


# -- the client address and proxy trust -------------------------------------------------------

PROXIES = TrustedProxies(
    parse_settings(["serve", "--trusted-proxies", "10.0.0.0/8,fd00::/8,127.0.0.1"]).trusted_proxies
)


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    nobody = TrustedProxies(())
    assert nobody.client("10.0.0.1", "81.2.69.160") == "10.0.0.1"
    assert nobody.client("81.2.69.160", None) == "81.2.69.160"


def test_an_untrusted_peers_forwarded_for_is_ignored() -> None:
    assert PROXIES.client("81.2.69.160", "2001:218::1") == "81.2.69.160"
    assert PROXIES.client("10.0.0.1", None) == "10.0.0.1"  # trusted, forwarded nothing: itself


def test_a_trusted_peer_names_the_right_most_untrusted_address() -> None:
    # The left entry is whatever the client wrote in its own header: never reached.
    assert PROXIES.client("10.0.0.1", "2001:218::1, 81.2.69.160") == "81.2.69.160"
    assert PROXIES.client("127.0.0.1", "81.2.69.160") == "81.2.69.160"


def test_a_chain_of_trusted_proxies_is_walked() -> None:
    assert (
        PROXIES.client("10.0.0.2", "2001:218::1, 81.2.69.160, 10.9.9.9,fd00::7 , 10.0.0.3") == "81.2.69.160"
    )
    assert PROXIES.client("fd00::1", "2001:218::5,fd12::1") == "2001:218::5"
    # Every hop trusted: the left-most is as far as anyone said.
    assert PROXIES.client("10.0.0.2", "10.1.1.1, 10.2.2.2") == "10.1.1.1"


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("10.0.0.1", "81.2.69.160:51234", "81.2.69.160"),
        ("10.0.0.1", "[2001:218::1]:443", "2001:218::1"),
        ("10.0.0.1", "[2001:218::1]", "2001:218::1"),
        ("10.0.0.1", "::ffff:81.2.69.160", "81.2.69.160"),
        ("::ffff:10.0.0.1", "81.2.69.160", "81.2.69.160"),  # a dual-stack socket's peer
        ("::ffff:81.2.69.160", "2001:218::1", "81.2.69.160"),
        # Garbage the client wrote left of its own address is never read.
        ("10.0.0.1", "<script>, unknown, 81.2.69.160", "81.2.69.160"),
    ],
)
def test_ports_brackets_and_mapped_addresses(peer: str, forwarded: str, client: str) -> None:
    assert PROXIES.client(peer, forwarded) == client


@pytest.mark.parametrize(
    "forwarded",
    [
        "unknown",
        "81.2.69.160, unknown",
        "81.2.69.160,",
        "1.2.3",
        "81.2.69.160, 300.1.1.1",
        "fe80::1%eth0",
        "\x00",
        "é",
    ],
)
def test_garbage_in_reach_gives_no_address(forwarded: str) -> None:
    assert PROXIES.client("10.0.0.1", forwarded) is None


def test_proxies_are_remembered_and_answers_stay_the_same() -> None:
    proxies = TrustedProxies([ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")])
    cases = [
        ("10.0.0.1", "81.2.69.160, 10.0.0.7", "81.2.69.160"),
        ("10.0.0.1", "10.0.0.7", "10.0.0.7"),
        ("10.0.0.1", "", "10.0.0.1"),
        ("10.0.0.1", "unknown, 10.0.0.7", None),
        ("10.0.0.1", "10.0.0.7, 10.0.0.8:80", "10.0.0.7"),
        ("81.2.69.1", "10.0.0.7", "81.2.69.1"),
        ("fd00::1", "2001:218::5, [fd00::2]:443", "2001:218::5"),
    ]
    for _ in range(3):  # the first round parses the proxies, the next ones remember them
        for peer, forwarded, client in cases:
            assert proxies.client(peer, forwarded) == client, (peer, forwarded)
    # Many names for proxies: the memory starts over, the answers do not change.
    for i in range(3000):
        hop = f"10.{i % 256}.{i // 256}.1"
        assert proxies.client("10.0.0.1", f"81.2.69.{i % 256}, {hop}") == f"81.2.69.{i % 256}"
    assert len(proxies._proxies) <= 1024
    for peer, forwarded, client in cases:
        assert proxies.client(peer, forwarded) == client


@pytest.mark.parametrize("peer", [None, "", "not an address", "unix:/tmp/sock"])
def test_a_peer_that_is_no_address_gives_none(peer: str | None) -> None:
    assert PROXIES.client(peer, "81.2.69.160") is None


# -- the handshake's fields -------------------------------------------------------------------


@pytest.fixture(scope="module")
def enricher(geo_db: str) -> Iterator[Enricher]:
    settings = parse_settings(["serve", "--geoip-db", geo_db, "--trusted-proxies", "10.0.0.0/8"])
    enricher = Enricher(settings.geoip_db, settings.trusted_proxies)
    yield enricher
    enricher.close()


def test_the_handshake_gives_user_agent_and_location(enricher: Enricher) -> None:
    headers = {"user-agent": SAFARI_IPHONE, "x-forwarded-for": "81.2.69.160"}
    assert enricher.fields(headers, "10.0.0.1") == {
        "userAgent": SAFARI_IPHONE,
        **REAL[1][1],
        "userCountry": "GB",
        "userState": "England",
        "userCity": "London",
    }
    # Straight from the client: its own header is not believed.
    assert enricher.fields(headers, "2001:218::9") == {
        "userAgent": SAFARI_IPHONE,
        **REAL[1][1],
        "userCountry": "JP",
        "userState": "Tokyo",
        "userCity": "Tokyo",
    }


def test_only_the_fields_found_are_answered(enricher: Enricher) -> None:
    assert enricher.fields({}, "81.2.69.160") == {
        "userCountry": "GB",
        "userState": "England",
        "userCity": "London",
    }
    assert enricher.fields({"user-agent": FIREFOX_LINUX}, "8.8.8.8") == {
        "userAgent": FIREFOX_LINUX,
        **REAL[2][1],
    }
    assert enricher.fields({"user-agent": ""}, None) == {}
    assert set(enricher.fields({"user-agent": EDGE}, "89.160.20.1")) <= set(UA_FIELDS) | set(GEO_FIELDS)


def test_without_a_database_there_is_no_location() -> None:
    plain = Enricher()
    headers = {"user-agent": CHROME_WINDOWS, "x-forwarded-for": "81.2.69.160"}
    assert plain.fields(headers, "81.2.69.160") == {"userAgent": CHROME_WINDOWS, **REAL[0][1]}
    plain.close()


def test_only_the_fields_a_start_lacks_are_parsed() -> None:
    """A start that carries a field costs no parse for it: tracker.js sends every
    User-Agent field but userDevice, so its connects parse the device domain alone."""
    enricher = Enricher(ua_cache_size=16)
    registry = Registry(LiveIndex(), grace_ms=1000)
    carried = {name: value for name, value in REAL[0][1].items() if name != "userDevice"}
    carried["userAgent"] = CHROME_WINDOWS
    everything = Start(sessionID="all", **{**carried, "userDevice": "PC"})
    found = enricher.fields({"user-agent": CHROME_WINDOWS}, None)
    registry.start("p", 0, everything, 1, True, found)
    assert enricher.user_agents.parses == {BROWSER: 0, SYSTEM: 0, DEVICE: 0}, "nothing to parse"
    lacking = Start(sessionID="one", **{**carried, "userBrowser": "Mine"})
    session, _ = registry.start(
        "p", 0, lacking, 1, True, enricher.fields({"user-agent": CHROME_WINDOWS}, None)
    )
    assert session.userBrowser == "Mine", "what the tracker sends wins"
    assert session.userDevice == REAL[0][1].get("userDevice")
    info = enricher.user_agents.cache_info()
    assert (info.misses, info.currsize) == (1, 1), "one string"
    assert enricher.user_agents.parses == {BROWSER: 0, SYSTEM: 0, DEVICE: 1}, "the device domain alone"
    # Read as a whole, the mapping is every field the handshake tells.
    assert dict(enricher.fields({"user-agent": CHROME_WINDOWS}, None)) == {
        "userAgent": CHROME_WINDOWS,
        **REAL[0][1],
    }
    enricher.close()


# -- batches: what a connect storm's new strings and addresses cost ----------------------------


def test_new_strings_wait_for_one_batch_and_answer_as_parsed_alone(user_agents: UserAgents) -> None:
    """A handshake parses nothing; the first read that needs a domain parses every new string
    waiting, back to back, for the domains read since the last batch (the extractors' tables
    stay in the CPU caches), and each answers what parsing it alone answers."""
    enricher = Enricher(ua_cache_size=256)
    parses = enricher.user_agents.parses
    pool = distinct_agents(100)
    founds = [enricher.fields({"user-agent": ua}, None) for ua in pool[:40]]
    assert parses == {BROWSER: 0, SYSTEM: 0, DEVICE: 0}
    assert founds[7].get("userOs") == user_agents.parse(pool[7]).get("userOs")
    assert parses == {BROWSER: 0, SYSTEM: 40, DEVICE: 0}, "the first batch: the one domain asked"
    for ua, found in zip(pool, founds, strict=False):
        assert dict(found) == user_agents.parse(ua)
    assert parses == {BROWSER: 40, SYSTEM: 40, DEVICE: 40}, "the rest one by one, each once"
    # The next batch parses what the reads since the last one asked: all three domains.
    more = [enricher.fields({"user-agent": ua}, None) for ua in pool[40:]]
    assert more[-1].get("userAgent") == pool[-1] and parses[SYSTEM] == 40, "the text is no parse"
    assert more[-1].get("userBrowser") == user_agents.parse(pool[-1]).get("userBrowser")
    assert parses == {BROWSER: 100, SYSTEM: 100, DEVICE: 100}
    for ua, found in zip(pool[40:], more, strict=True):
        assert dict(found) == user_agents.parse(ua)
    assert parses == {BROWSER: 100, SYSTEM: 100, DEVICE: 100}, "nothing parsed twice"
    # Known strings wait for nothing.
    again = enricher.fields({"user-agent": pool[3]}, None)
    assert dict(again) == user_agents.parse(pool[3]) and parses[BROWSER] == 100


def test_a_batch_is_bounded_and_strings_past_it_are_parsed_when_read(user_agents: UserAgents) -> None:
    enricher = Enricher(ua_cache_size=2 * BATCH_MAX)
    pool = distinct_agents(BATCH_MAX + 30)
    founds = [enricher.fields({"user-agent": ua}, None) for ua in pool]
    founds[-1].get("userDevice")  # past the bound: its own parse after the batch
    assert enricher.user_agents.parses[DEVICE] == BATCH_MAX + 1
    for ua, found in zip(pool, founds, strict=True):
        assert dict(found) == user_agents.parse(ua)


def test_a_string_evicted_while_waiting_still_answers(user_agents: UserAgents) -> None:
    enricher = Enricher(ua_cache_size=4)
    pool = distinct_agents(20)
    founds = [enricher.fields({"user-agent": ua}, None) for ua in pool]
    assert enricher.user_agents.cache_info().currsize == 4
    for ua, found in zip(pool, founds, strict=True):
        assert dict(found) == user_agents.parse(ua)


def test_records_and_their_index_are_as_if_enriched_at_the_handshake(user_agents: UserAgents) -> None:
    """A storm's handshakes come before its starts, which come in any order, some tabs of one
    session, some carrying fields of their own: every record, and so every search and
    autocomplete over the index, is what an eager enrichment (a plain dict of every field
    the handshake tells, parsed alone) gives."""
    rng = random.Random(18)
    pool = distinct_agents(60)
    lazy, eager = Registry(LiveIndex(), grace_ms=1000), Registry(LiveIndex(), grace_ms=1000)
    enricher = Enricher(ua_cache_size=32)
    for storm in range(3):
        handshakes = []
        for _ in range(150):
            ua = rng.choice(pool)
            carried = {name: f"own-{name}" for name in UA_FIELDS if rng.random() < 0.2}
            sid = f"s{storm}-{rng.randrange(100)}"  # some sessions get several tabs
            handshakes.append((sid, carried, ua, enricher.fields({"user-agent": ua}, None)))
        rng.shuffle(handshakes)
        for sid, carried, ua, found in handshakes:
            made, _ = lazy.start("p", 0, Start(sessionID=sid, **carried), 1, True, found)
            want, _ = eager.start("p", 0, Start(sessionID=sid, **carried), 1, True, user_agents.parse(ua))
            assert msgspec.structs.asdict(made) == msgspec.structs.asdict(want)
    for name in UA_FIELDS:
        assert lazy.index.values("p", name, None, "", 100) == eager.index.values("p", name, None, "", 100)
    assert lazy.index.count("p") == eager.index.count("p") > 100


def test_locations_wait_for_one_batch_and_answer_as_looked_up_alone(geo_db: str) -> None:
    enricher = Enricher(geo_db, [ipaddress.ip_network("10.0.0.0/8")])
    geoip = enricher.geoip
    assert geoip is not None
    clients = ["81.2.69.160", "2001:218::7", "89.160.20.1", "8.8.8.8", "unknown", "81.2.69.161"]
    founds = [enricher.fields({"x-forwarded-for": f"{c}, 10.0.0.9"}, "10.0.0.1") for c in clients]
    founds.append(enricher.fields({"x-forwarded-for": "81.2.69.160"}, "2001:218::9"))  # not trusted
    assert geoip.cache_info().misses == 0, "a handshake looks nothing up"
    assert founds[2].get("userCountry") == "SE"
    assert geoip.cache_info().misses == 6, "the batch: every connection waiting (unknown: no address)"
    for client, found in zip([*clients, "2001:218::9"], founds, strict=True):
        assert dict(found) == (geoip.fields(client) if client != "unknown" else {})
    assert geoip.cache_info().misses == 6, "each looked up once"
    enricher.close()


def test_the_enrichment_of_every_field_in_any_order_is_the_eager_one(geo_db: str) -> None:
    enricher = Enricher(geo_db, [ipaddress.ip_network("10.0.0.0/8")], ua_cache_size=16)
    reference = Enricher(geo_db, [ipaddress.ip_network("10.0.0.0/8")])
    rng = random.Random(7)
    pool = [*distinct_agents(40), "", GARBAGE, GOOGLEBOT]
    clients = ["81.2.69.160", "2001:218::7", "89.160.20.1", "8.8.8.8", "10.20.1.1"]
    for _ in range(4):
        handshakes = []
        for _ in range(60):
            headers = {"user-agent": rng.choice(pool), "x-forwarded-for": rng.choice(clients)}
            handshakes.append((headers, enricher.fields(headers, rng.choice(["10.0.0.1", "81.2.69.7"]))))
        rng.shuffle(handshakes)
        for headers, found in handshakes:
            want = dict(reference.fields(headers, found.peer))
            names = list(ENRICHED_FIELDS)
            rng.shuffle(names)
            assert {name: found.get(name) for name in names} == {name: want.get(name) for name in names}
            assert dict(found) == want
    enricher.close()
    reference.close()


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["--geoip-db", "/nonexistent/city.mmdb"], {}, "no such file"),
        (["--geoip-db", "{readme}"], {}, "not a maxmind"),
        (["--geoip-db", "{tmp}"], {}, "geoip"),
        ([], {"HUB_GEOIP_DB": "/nonexistent/city.mmdb"}, "HUB_GEOIP_DB"),
        (["--trusted-proxies", "10.0.0.1/8"], {}, "host bits"),
        (["--trusted-proxies", "10.0.0.0/33"], {}, "trusted-proxies"),
        (["--trusted-proxies", "proxy.example.com"], {}, "trusted-proxies"),
        (["--trusted-proxies", " , "], {}, "at least one"),
        ([], {"HUB_TRUSTED_PROXIES": "10.0.0.0/8,bogus"}, "HUB_TRUSTED_PROXIES"),
    ],
)
def test_a_bad_database_or_cidr_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], env: dict[str, str], words: str
) -> None:
    readme = str(Path(__file__).parent.parent / "README.md")
    args = [a.format(readme=readme, tmp=tmp_path) for a in args]
    result = run_hub("serve", *args, env=env)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert words.lower() in lines[0].lower()


def test_settings_read_from_variables(geo_db: str) -> None:
    settings = parse_settings(["serve"], {"HUB_GEOIP_DB": geo_db, "HUB_TRUSTED_PROXIES": "10.0.0.0/8, ::1"})
    assert settings.geoip_db == geo_db
    assert [str(n) for n in settings.trusted_proxies] == ["10.0.0.0/8", "::1/128"]
    default = parse_settings(["serve"], {})
    assert (default.geoip_db, default.trusted_proxies) == (None, ())
    with pytest.raises(ConfigError, match="HUB_TRUSTED_PROXIES"):
        parse_settings(["serve"], {"HUB_TRUSTED_PROXIES": "::1/129"})
