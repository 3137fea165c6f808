"""Server-side enrichment of a tracker's record from its handshake (CONTRACT §1).

``Enricher.fields(headers, peer)`` answers the record fields the hub can tell
about a tracker connection without asking it, looked up lazily: only the
fields a ``start`` lacks are parsed or located (tracker.js sends all the
User-Agent fields but ``userDevice``, so its connects parse one of the
parser's three domains). From the ``User-Agent`` header
``userAgent``, ``userOs``, ``userBrowser``, ``userBrowserVersion``,
``userDevice``, ``userDeviceType``; with a GeoIP database ``userCountry``,
``userState``, ``userCity``. Only the fields found are in the answer (an
unknown is absent, never ``"Other"``), so the record code can merge it under
what the tracker sent: the tracker always wins. No I/O at call time: the
database is opened (memory-mapped) once, the parser's rules are compiled once.

User-Agent parser: ``ua-parser`` 1.0 (uap-core's rules from
``ua-parser-builtins``, matched by its Rust accelerator ``ua-parser-rs``). The
alternative, ``user-agents`` 2.2 (last release 2020), wraps the same rules
through ua-parser's pure-Python legacy API and adds only device-type guesses.
On eight real strings (BENCHMARKS.md, "Record enrichment") both name the same
browsers, systems and devices, but ``user-agents`` takes 2-5 ms per uncached
string and 20-40 ms on a 2 KB garbage string, ``ua-parser-rs`` 50-150 µs and
~0.1 ms (cut to 1 KB): only the accelerated parser keeps a storm of new
strings cheap. Its price is paid once per process, at start (~0.4 s CPU to
import and compile the rules, ~30 MB of RSS). Each distinct string is parsed once: a bounded LRU
(``UA_CACHE_SIZE``) keyed by the header, which browsers repeat, so a connect
storm parses each version of each browser once. The header is cut to the
record's text limit first, which also bounds the cost of a hostile string.

Field by field, as OpenReplay's assist server fills them (from ua-parser-js):
``userBrowser`` the browser family ("Chrome", "Mobile Safari", "Samsung
Internet"), ``userBrowserVersion`` its dotted version ("124.0.0.0"),
``userOs`` the system family without version ("Windows", "iOS", "Mac OS X"),
``userDevice`` the device ("iPhone", "Pixel 8", "Spider" for a crawler; the
rules' placeholders "Other" and "Generic …" are left out) and
``userDeviceType`` one of OpenReplay's values, decided in this order
(uap-core names devices but not their kind):

- "console": Xbox, PlayStation or Nintendo in the string;
- "smarttv": a TV's token (SmartTV, SMART-TV, HbbTV, Android TV, GoogleTV,
  Apple TV, CrKey, BRAVIA, Web0S, NetCast); a TV that names none is taken
  for what its system says;
- "tablet": an iPad, a Kindle, a tablet by uap-core's rules, or Android
  without "Mobi" in the string (Google's rule for its tablets);
- "mobile": "Mobi" in the string (MDN's advice), a phone, or a phone system;
- "desktop": a desktop system (Windows, macOS, Linux, ChromeOS, the BSDs) or
  its token ("Windows NT", "Macintosh", "X11");
- otherwise (curl, a library, garbage) absent. A crawler gets the type of
  the device it poses as, if it names one. OpenReplay says "desktop" for
  anything it cannot place; the hub leaves it unknown, so a filter on
  "desktop" finds desktops.

GeoIP (optional, ``--geoip-db``): a MaxMind-format database (GeoIP2/GeoLite2
City or Country, DB-IP's, or one of your own) read with ``maxminddb``;
``userCountry`` is the ISO 3166-1 code (``country.iso_code``), ``userState``
the English name of the first subdivision and ``userCity`` the English city
name, as OpenReplay takes them. An address the database does not hold gives
nothing; private addresses are not special (a database of one's own may
place an office network). Each address's answer is kept (bounded LRU,
``GEO_CACHE_SIZE``) for the tabs and reloads that follow; a new address
decodes its whole record, the costliest step here (~10-25 µs for a
GeoLite2-City record; maxminddb-rust's ``get_path`` reads the three values in
a tenth of that, should it ever matter).

The client address is the socket's peer, unless the peer is a trusted proxy
(``--trusted-proxies``): then ``X-Forwarded-For`` is read from the right,
skipping trusted proxies, and the first address that is not one is the
client; when every address is trusted the left-most is (the peer itself when
it forwarded nothing). Entries the client wrote itself stand left of its own
address and are never reached (OpenReplay takes the left-most entry, which a
client can forge). An entry that is not an address (``unknown``, garbage)
ends the walk with no address: a location is never guessed from a header that
cannot be read. Ports (``1.2.3.4:80``, ``[2001:db8::1]:443``) are dropped; an
IPv4-mapped IPv6 address counts as its IPv4 address. Of repeated
``X-Forwarded-For`` headers give the last: the nearest proxy wrote it.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from socket import AF_INET, AF_INET6, inet_ntop, inet_pton
from typing import Any, Final

import maxminddb
from ua_parser import Domain, load_lazy_builtins
from ua_parser.regex import Resolver

from .record import ENRICHED_FIELDS, GEO_FIELDS, MAX_STRING

# Distinct User-Agent strings kept parsed, and addresses kept located (under 1 KB each).
UA_CACHE_SIZE: Final = 4096
GEO_CACHE_SIZE: Final = 4096


Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_CONSOLE_TOKENS: Final = ("Xbox", "PlayStation", "Nintendo")
_TV_TOKENS: Final = (
    "SmartTV",
    "SMART-TV",
    "HbbTV",
    "Android TV",
    "GoogleTV",
    "Apple TV",
    "AppleTV",
    "CrKey",
    "BRAVIA",
    "Web0S",
    "NetCast",
)
_TABLETS: Final = frozenset({"iPad", "Kindle", "Generic Tablet"})
_PHONES: Final = frozenset({"iPhone", "iPod", "Generic Smartphone", "Generic Feature Phone"})
_PHONE_SYSTEMS: Final = frozenset(
    {"iOS", "Android", "Windows Phone", "BlackBerry OS", "KaiOS", "Firefox OS", "Symbian OS"}
)
_DESKTOP_SYSTEMS: Final = frozenset(
    {
        "Windows",
        "Mac OS X",
        "Linux",
        "Ubuntu",
        "Debian",
        "Fedora",
        "Red Hat",
        "SUSE",
        "Linux Mint",
        "Chrome OS",
        "FreeBSD",
        "OpenBSD",
        "NetBSD",
        "Solaris",
    }
)
_DESKTOP_TOKENS: Final = ("Windows NT", "Macintosh", "X11")


@functools.cache
def _builtin_resolver() -> Resolver:
    """uap-core's rules, compiled once per process (~0.3 s CPU): every hub of a process shares them."""
    return Resolver(load_lazy_builtins())


# The parser's domains each field needs (userDeviceType reads the system and the device).
_DOMAINS: Final = {
    "userAgent": Domain(0),
    "userBrowser": Domain.USER_AGENT,
    "userBrowserVersion": Domain.USER_AGENT,
    "userOs": Domain.OS,
    "userDevice": Domain.DEVICE,
    "userDeviceType": Domain.OS | Domain.DEVICE,
}


class UserAgents:
    """``User-Agent`` header -> record fields, each distinct string parsed once per set of domains."""

    def __init__(self, cache_size: int = UA_CACHE_SIZE) -> None:
        self._resolver = _builtin_resolver()
        self._cached = functools.lru_cache(maxsize=cache_size)(self._pairs)

    def fields(self, header: str) -> dict[str, str]:
        """The fields a header tells; ``{}`` for an empty one."""
        return dict(self._cached(header.strip()[:MAX_STRING], Domain.ALL))

    def field(self, header: str, name: str) -> str | None:
        """One field a header tells, parsing only the domains it needs."""
        return dict(self._cached(header.strip()[:MAX_STRING], _DOMAINS[name])).get(name)

    def parse(self, header: str) -> dict[str, str]:
        """``fields`` without the cache (for measuring)."""
        return dict(self._pairs(header.strip()[:MAX_STRING], Domain.ALL))

    def cache_info(self) -> functools._CacheInfo:
        return self._cached.cache_info()

    def _pairs(self, ua: str, domains: Domain) -> tuple[tuple[str, str], ...]:
        # A tuple: the cached value is shared, so it must not be mutable.
        if not ua:
            return ()
        found: dict[str, str] = {"userAgent": ua}
        if not domains:
            return tuple(found.items())
        result = self._resolver(ua, domains)
        browser, system, device = result.user_agent, result.os, result.device
        if browser is not None and browser.family != "Other":
            found["userBrowser"] = browser.family
            parts = [p for p in (browser.major, browser.minor, browser.patch, browser.patch_minor) if p]
            if parts:
                found["userBrowserVersion"] = ".".join(parts)
        system_family = system.family if system is not None and system.family != "Other" else ""
        if system_family:
            found["userOs"] = system_family
        family = device.family if device is not None else ""
        if family and family != "Other" and not family.startswith("Generic"):
            found["userDevice"] = family
        if Domain.OS in domains and Domain.DEVICE in domains:
            kind = _device_type(ua, system_family, family, device.brand if device is not None else None)
            if kind:
                found["userDeviceType"] = kind
        return tuple(found.items())


def _device_type(ua: str, system: str, family: str, brand: str | None) -> str:
    if any(token in ua for token in _CONSOLE_TOKENS):
        return "console"
    if any(token in ua for token in _TV_TOKENS):
        return "smarttv"
    if family in _TABLETS or brand == "Generic_Android_Tablet" or (system == "Android" and "Mobi" not in ua):
        return "tablet"
    if "Mobi" in ua or family in _PHONES or system in _PHONE_SYSTEMS:
        return "mobile"
    if system in _DESKTOP_SYSTEMS or any(token in ua for token in _DESKTOP_TOKENS):
        return "desktop"
    return ""


class GeoIP:
    """A MaxMind-format database, opened once (memory-mapped with the C reader when it is there)."""

    def __init__(self, path: str, cache_size: int = GEO_CACHE_SIZE) -> None:
        self._reader = maxminddb.open_database(path, maxminddb.MODE_AUTO)
        self._cached = functools.lru_cache(maxsize=cache_size)(self._pairs)

    def fields(self, address: str) -> dict[str, str]:
        """The location of an address (IPv4 or IPv6 text); ``{}`` when the database does not hold it."""
        return dict(self._cached(address))

    def lookup(self, address: str) -> dict[str, str]:
        """``fields`` without the cache (for measuring)."""
        return dict(self._pairs(address))

    def cache_info(self) -> functools._CacheInfo:
        return self._cached.cache_info()

    def close(self) -> None:
        self._reader.close()

    def _pairs(self, address: str) -> tuple[tuple[str, str], ...]:
        try:
            record = self._reader.get(address)
        except ValueError:  # not an address, or IPv6 in an IPv4-only database
            return ()
        if not isinstance(record, dict):
            return ()
        found: list[tuple[str, str]] = []
        country = _get(record, "country", "iso_code")
        if country:
            found.append(("userCountry", country))
        subdivisions = record.get("subdivisions")
        if isinstance(subdivisions, list) and subdivisions:
            state = _get(subdivisions[0], "names", "en")
            if state:
                found.append(("userState", state))
        city = _get(record, "city", "names", "en")
        if city:
            found.append(("userCity", city))
        return tuple(found)


def _get(value: Any, *path: str) -> str | None:
    """A string at ``path`` in nested maps; None when any step is missing or of another kind."""
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value if isinstance(value, str) and value else None


# An address: IP version, its value, and its text to look up (ports and brackets dropped).
_Address = tuple[int, int, str]
_V4_MAPPED: Final = bytes(10) + b"\xff\xff"


def _address(text: str) -> _Address | None:
    """An IP address from text, or None for anything else."""
    if ":" not in text:
        family, host = AF_INET, text
    elif text.startswith("["):  # [v6] or [v6]:port
        family, host = AF_INET6, text[1:].partition("]")[0]
    elif text.count(":") == 1:  # v4:port
        family, host = AF_INET, text.partition(":")[0]
    else:
        family, host = AF_INET6, text
    try:
        packed = inet_pton(family, host)
    except (OSError, ValueError):
        return None
    if family == AF_INET:
        return 4, int.from_bytes(packed, "big"), host
    if packed[:12] == _V4_MAPPED:
        return 4, int.from_bytes(packed[12:], "big"), inet_ntop(AF_INET, packed[12:])
    return 6, int.from_bytes(packed, "big"), host


class TrustedProxies:
    """CIDRs whose ``X-Forwarded-For`` is believed; integer compares, no ipaddress objects per call."""

    def __init__(self, networks: Iterable[Network]) -> None:
        nets = [(n.version, int(n.network_address), int(n.netmask)) for n in networks]
        self._by_version = {
            v: tuple((net, mask) for version, net, mask in nets if version == v) for v in (4, 6)
        }

    def trusts(self, address: _Address) -> bool:
        value = address[1]
        # A loop, not any() over a generator: half the cost on this per-connection path.
        for net, mask in self._by_version[address[0]]:  # noqa: SIM110
            if value & mask == net:
                return True
        return False

    def client(self, peer: str | None, forwarded_for: str | None) -> str | None:
        """The client's address: the peer, or the right-most untrusted address it forwarded."""
        address = _address(peer) if peer else None
        if address is None:
            return None
        if forwarded_for and self.trusts(address):
            for entry in reversed(forwarded_for.split(",")):
                hop = _address(entry.strip())
                if hop is None:
                    return None
                address = hop
                if not self.trusts(address):
                    break
        return address[2]


class Enricher:
    """The handshake's enrichment: User-Agent fields always, location with a database."""

    def __init__(
        self,
        geoip_db: str | None = None,
        trusted_proxies: Iterable[Network] = (),
        ua_cache_size: int = UA_CACHE_SIZE,
    ) -> None:
        self.user_agents = UserAgents(ua_cache_size)
        self.geoip = GeoIP(geoip_db) if geoip_db else None
        self.trusted = TrustedProxies(trusted_proxies)

    def fields(self, headers: Mapping[str, str], peer: str | None) -> Found:
        """The fields found for a connection (looked up when read): ``headers`` by lower-case
        name, ``peer`` the socket's host."""
        return Found(self, headers.get("user-agent") or "", peer, headers.get("x-forwarded-for"))

    def close(self) -> None:
        if self.geoip is not None:
            self.geoip.close()


class Found(Mapping[str, str]):
    """A connection's enrichment as a mapping whose fields are parsed or located when read:
    a start that carries a field costs nothing for it (``record.enrich`` reads only the
    fields a start lacks). Iterating it reads them all."""

    __slots__ = ("_address", "_enricher", "_forwarded", "_peer", "_ua")

    def __init__(self, enricher: Enricher, ua: str, peer: str | None, forwarded: str | None) -> None:
        self._enricher = enricher
        self._ua = ua
        self._peer = peer
        self._forwarded = forwarded
        # The client's address once worked out ("" for none).
        self._address: str | None = None

    def get_field(self, name: str) -> str | None:
        enricher = self._enricher
        if name in _DOMAINS:
            return enricher.user_agents.field(self._ua, name) if self._ua else None
        if enricher.geoip is None or name not in GEO_FIELDS:
            return None
        if self._address is None:
            self._address = enricher.trusted.client(self._peer, self._forwarded) or ""
        return enricher.geoip.fields(self._address).get(name) if self._address else None

    def __getitem__(self, name: str) -> str:
        value = self.get_field(name)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return (name for name in ENRICHED_FIELDS if self.get_field(name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)
