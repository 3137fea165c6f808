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
import and compile the rules, ~30 MB of RSS). The header is cut to the
record's text limit first, which also bounds the cost of a hostile string.

What a connect storm costs. Each distinct string is parsed once, domain by
domain as its fields are needed: a bounded LRU (``UA_CACHE_SIZE``) of
``Agent`` entries keyed by the header, which browsers repeat, so a storm
parses each version of each browser once. The parse itself is a few µs when
the parser's tables are in the CPU caches and 10-20 times that when it runs
between other work, which evicts them; so new strings are parsed in batches:
a handshake only files its new string, and the first read that needs a
domain parses every string filed since the last batch, back to back, for
the domains read since that batch (``UserAgents.complete``; at most
``BATCH_MAX`` wait). In a storm the starts of many connections follow their
handshakes, so one batch serves them all. Nothing is deferred past a read:
whoever reads a field (``record.enrich`` at the start, before the record
exists) gets the parsed value, so the record, its index, what is mirrored to
the cluster and every search are what an eager parse gives. Locations work
the same way (``Enricher.locate``): the first read of a location places
every connection waiting, proxy walk included.

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
``GEO_CACHE_SIZE``) for the tabs and reloads that follow, and so is each
network's the database answered from (the prefix length of the lookup: the
database is a tree in which every address of a network reaches the same
record), so a new address in a known network decodes nothing. A new network
decodes its whole record, the costliest step here (~10-25 µs for a
GeoLite2-City record; maxminddb-rust's ``get_path`` reads the three values in
a tenth of that, but the issue names ``maxminddb``).

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
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Mapping
from socket import AF_INET, AF_INET6, inet_ntop, inet_pton
from typing import Any, Final, Generic, NamedTuple, TypeVar, overload

import maxminddb
from ua_parser import load_lazy_builtins
from ua_parser.regex import Resolver

from .record import ENRICHED_FIELDS, GEO_FIELDS, MAX_STRING

# Distinct User-Agent strings kept parsed, and addresses kept located (under 1 KB each).
UA_CACHE_SIZE: Final = 4096
GEO_CACHE_SIZE: Final = 4096
# Connections whose new User-Agent or whose location waits for the next batch, at most.
BATCH_MAX: Final = 512
# Trusted proxies' addresses kept parsed, by their text.
PROXIES_KEPT: Final = 1024


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")

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


# The parser's three domains (its extractors), as bits, and the ones each field needs.
BROWSER: Final = 1
SYSTEM: Final = 2
DEVICE: Final = 4
ALL: Final = BROWSER | SYSTEM | DEVICE
_NEEDS: Final = {
    "userAgent": 0,
    "userBrowser": BROWSER,
    "userBrowserVersion": BROWSER,
    "userOs": SYSTEM,
    "userDevice": DEVICE,
    "userDeviceType": SYSTEM | DEVICE,
}


class CacheInfo(NamedTuple):
    """As ``functools.lru_cache``'s: lookups found and not, the bound and the entries held."""

    hits: int
    misses: int
    maxsize: int
    currsize: int


class Lru(Generic[T]):
    """A bounded map, the least recently used entry out first; counts lookups found and not."""

    __slots__ = ("_items", "hits", "misses", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, T] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: str) -> T | None:
        found = self._items.get(key)
        if found is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return found

    def put(self, key: str, value: T) -> None:
        items = self._items
        items[key] = value
        if len(items) > self.size:
            items.popitem(last=False)

    def info(self) -> CacheInfo:
        return CacheInfo(self.hits, self.misses, self.size, len(self._items))


class Agent:
    """One User-Agent string and what is parsed from it so far: ``parsed`` tells the domains done,
    ``fields`` the record fields they found (shared: read, never handed out)."""

    __slots__ = ("brand", "device", "fields", "parsed", "system")

    def __init__(self, ua: str) -> None:
        self.fields: dict[str, str] = {"userAgent": ua}
        self.parsed = 0
        # What the device type is decided from, once both domains are parsed.
        self.system = ""
        self.device = ""
        self.brand: str | None = None


class UserAgents:
    """``User-Agent`` header -> record fields; each distinct string parsed once, domain by domain
    as its fields are needed, new strings in batches (module docstring)."""

    def __init__(self, cache_size: int = UA_CACHE_SIZE) -> None:
        resolver = _builtin_resolver()
        self._browser = resolver.ua.extract
        self._system = resolver.os.extract
        self._device = resolver.de.extract
        self._agents: Lru[Agent] = Lru(cache_size)
        # New strings not parsed yet, and the domains read since the last batch.
        self._fresh: list[Agent] = []
        self.wanted = 0
        # Extractor runs, per domain bit (for tests and measuring).
        self.parses = {BROWSER: 0, SYSTEM: 0, DEVICE: 0}

    def agent(self, header: str) -> Agent | None:
        """The string's entry (None for an empty one), not parsed yet when it is new: it waits
        for the batch that the first read of a domain it lacks parses."""
        ua = header.strip()[:MAX_STRING]
        if not ua:
            return None
        agent = self._agents.get(ua)
        if agent is not None:
            return agent
        agent = Agent(ua)
        self._agents.put(ua, agent)
        if len(self._fresh) < BATCH_MAX:
            self._fresh.append(agent)
        return agent

    def complete(self, agent: Agent, needs: int) -> None:
        """Parse ``needs`` for ``agent``; first, back to back, every new string waiting, for
        the domains read since the last batch: a parser that runs string after string keeps
        its tables in the CPU caches, one that runs between other work finds them cold."""
        fresh = self._fresh
        if fresh:
            wanted = self.wanted | needs
            self._fresh = []
            self.wanted = 0
            for other in fresh:
                self._parse(other, wanted)
        if needs & ~agent.parsed:
            self._parse(agent, needs)

    def fields(self, header: str) -> dict[str, str]:
        """Every field a header tells; ``{}`` for an empty one."""
        agent = self.agent(header)
        if agent is None:
            return {}
        if ALL & ~agent.parsed:
            self.complete(agent, ALL)
        return dict(agent.fields)

    def parse(self, header: str) -> dict[str, str]:
        """``fields`` without the cache (for measuring)."""
        ua = header.strip()[:MAX_STRING]
        if not ua:
            return {}
        agent = Agent(ua)
        self._parse(agent, ALL)
        return agent.fields

    def cache_info(self) -> CacheInfo:
        return self._agents.info()

    def _parse(self, agent: Agent, domains: int) -> None:
        todo = domains & ~agent.parsed
        if not todo:
            return
        found = agent.fields
        ua = found["userAgent"]
        if todo & BROWSER:
            self.parses[BROWSER] += 1
            browser = self._browser(ua)
            if browser is not None and browser.family != "Other":
                found["userBrowser"] = browser.family
                parts = (browser.major, browser.minor, browser.patch, browser.patch_minor)
                version = ".".join([p for p in parts if p])
                if version:
                    found["userBrowserVersion"] = version
        if todo & SYSTEM:
            self.parses[SYSTEM] += 1
            system = self._system(ua)
            if system is not None and system.family != "Other":
                agent.system = found["userOs"] = system.family
        if todo & DEVICE:
            self.parses[DEVICE] += 1
            device = self._device(ua)
            if device is not None:
                family = agent.device = device.family or ""
                agent.brand = device.brand
                if family and family != "Other" and not family.startswith("Generic"):
                    found["userDevice"] = family
        agent.parsed |= todo
        if todo & (SYSTEM | DEVICE) and agent.parsed & (SYSTEM | DEVICE) == SYSTEM | DEVICE:
            kind = _device_type(ua, agent.system, agent.device, agent.brand)
            if kind:
                found["userDeviceType"] = kind


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
    """A MaxMind-format database, opened once (memory-mapped with the C reader when it is there).

    Each answer is kept by address (LRU) and by the database's network it came from: the
    database is a tree in which every address of a network ends at one record, so a new
    address in a network already looked up is answered without decoding its record again.
    """

    def __init__(self, path: str, cache_size: int = GEO_CACHE_SIZE) -> None:
        self._reader = maxminddb.open_database(path, maxminddb.MODE_AUTO)
        self._size = cache_size
        self._places: Lru[dict[str, str]] = Lru(cache_size)
        # Per IP version: (prefix length, shift, networks of that length by address >> shift).
        self._lengths: dict[int, list[tuple[int, int, dict[int, dict[str, str]]]]] = {4: [], 6: []}
        self._by_length: dict[int, dict[int, dict[int, dict[str, str]]]] = {4: {}, 6: {}}
        # The networks kept, oldest first (at most ``cache_size``).
        self._networks: deque[tuple[dict[int, dict[str, str]], int]] = deque()
        self.lookups = 0

    def place(self, address: _Address) -> dict[str, str]:
        """The location of an address, shared with the cache: not to change."""
        text = address[2]
        found = self._places.get(text)
        if found is not None:
            return found
        value = address[1]
        for _, shift, networks in self._lengths[address[0]]:
            found = networks.get(value >> shift)
            if found is not None:
                break
        else:
            found = self._lookup(address)
        self._places.put(text, found)
        return found

    def fields(self, address: str) -> dict[str, str]:
        """The location of an address (IPv4 or IPv6 text); ``{}`` when the database does not hold it."""
        parsed = _address(address)
        return dict(self.place(parsed)) if parsed is not None else {}

    def lookup(self, address: str) -> dict[str, str]:
        """``fields`` without the caches (for measuring)."""
        try:
            record = self._reader.get(address)
        except ValueError:  # not an address, or IPv6 in an IPv4-only database
            return {}
        return _location(record)

    def cache_info(self) -> CacheInfo:
        return self._places.info()

    def close(self) -> None:
        self._reader.close()

    def _lookup(self, address: _Address) -> dict[str, str]:
        version, value, text = address
        self.lookups += 1
        try:
            record, length = self._reader.get_with_prefix_len(text)
        except ValueError:  # IPv6 in an IPv4-only database
            return {}
        found = _location(record)
        shift = (32 if version == 4 else 128) - length
        networks = self._by_length[version].get(length)
        if networks is None:
            networks = self._by_length[version][length] = {}
            self._lengths[version].append((length, shift, networks))
        networks[value >> shift] = found
        kept = self._networks
        kept.append((networks, value >> shift))
        if len(kept) > self._size:
            oldest, key = kept.popleft()
            oldest.pop(key, None)
        return found


def _location(record: Any) -> dict[str, str]:
    """A database record's fields (GeoIP2/GeoLite2 City or Country layout)."""
    found: dict[str, str] = {}
    if not isinstance(record, dict):
        return found
    country = _get(record, "country", "iso_code")
    if country:
        found["userCountry"] = country
    subdivisions = record.get("subdivisions")
    if isinstance(subdivisions, list) and subdivisions:
        state = _get(subdivisions[0], "names", "en")
        if state:
            found["userState"] = state
    city = _get(record, "city", "names", "en")
    if city:
        found["userCity"] = city
    return found


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
        # The proxies met, by the text naming them (a peer, an X-Forwarded-For entry): the
        # same few on every connection, each parsed and checked once.
        self._proxies: dict[str, _Address] = {}

    def trusts(self, address: _Address) -> bool:
        value = address[1]
        # A loop, not any() over a generator: half the cost on this per-connection path.
        for net, mask in self._by_version[address[0]]:  # noqa: SIM110
            if value & mask == net:
                return True
        return False

    def client(self, peer: str | None, forwarded_for: str | None) -> str | None:
        """The client's address: the peer, or the right-most untrusted address it forwarded."""
        address = self.address(peer, forwarded_for)
        return address[2] if address is not None else None

    def address(self, peer: str | None, forwarded_for: str | None) -> _Address | None:
        """``client``, parsed."""
        if not peer:
            return None
        proxies = self._proxies
        address = proxies.get(peer)
        if address is None:
            address = _address(peer)
            if address is None or not self.trusts(address):
                return address
            self._met(peer, address)
        if not forwarded_for:
            return address
        for entry in reversed(forwarded_for.split(",")):
            text = entry.strip()
            hop = proxies.get(text)
            if hop is None:
                hop = _address(text)
                if hop is None:
                    return None
                if not self.trusts(hop):
                    return hop
                self._met(text, hop)
            address = hop
        return address

    def _met(self, text: str, proxy: _Address) -> None:
        if len(self._proxies) >= PROXIES_KEPT:
            self._proxies.clear()  # many proxies, or many names for them: start over
        self._proxies[text] = proxy


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
        # Connections not located yet: the first read of a location places them all.
        self._unplaced: list[Found] = []

    def fields(self, headers: Mapping[str, str], peer: str | None) -> Found:
        """The fields found for a connection (looked up when read): ``headers`` by lower-case
        name, ``peer`` the socket's host."""
        ua = headers.get("user-agent")
        found = Found(self, self.user_agents.agent(ua) if ua else None, peer, headers.get("x-forwarded-for"))
        if self.geoip is not None and len(self._unplaced) < BATCH_MAX:
            self._unplaced.append(found)
        return found

    def locate(self, found: Found) -> Mapping[str, str]:
        """``found``'s location; first, back to back, that of every connection waiting."""
        geoip = self.geoip
        if geoip is None:
            return _NOWHERE
        waiting = self._unplaced
        self._unplaced = []
        waiting.append(found)
        client = self.trusted.address
        for each in waiting:
            if each.place is None:
                address = client(each.peer, each.forwarded)
                each.place = geoip.place(address) if address is not None else _NOWHERE
        assert found.place is not None
        return found.place

    def close(self) -> None:
        if self.geoip is not None:
            self.geoip.close()


_NOWHERE: Final[Mapping[str, str]] = {}


class Found(Mapping[str, str]):
    """A connection's enrichment as a mapping whose fields are parsed or located when read:
    a start that carries a field costs nothing for it (``record.enrich`` reads only the
    fields a start lacks). Iterating it reads them all."""

    __slots__ = ("agent", "enricher", "forwarded", "peer", "place")

    def __init__(
        self, enricher: Enricher, agent: Agent | None, peer: str | None, forwarded: str | None
    ) -> None:
        self.enricher = enricher
        self.agent = agent
        self.peer = peer
        self.forwarded = forwarded
        # The location once worked out (the batch of ``Enricher.locate``).
        self.place: Mapping[str, str] | None = None

    def get_field(self, name: str) -> str | None:
        needs = _NEEDS.get(name)
        if needs is not None:
            agent = self.agent
            if agent is None:
                return None
            if needs:
                user_agents = self.enricher.user_agents
                user_agents.wanted |= needs
                if needs & ~agent.parsed:
                    user_agents.complete(agent, needs)
            return agent.fields.get(name)
        place = self.place
        if place is None:
            if self.enricher.geoip is None or name not in GEO_FIELDS:
                return None
            place = self.enricher.locate(self)
        return place.get(name)

    @overload
    def get(self, name: str, /) -> str | None: ...
    @overload
    def get(self, name: str, /, default: str | T) -> str | T: ...
    def get(self, name: str, /, default: object = None) -> object:
        """As a mapping's, without a KeyError for each field not found."""
        value = self.get_field(name)
        return default if value is None else value

    def __getitem__(self, name: str) -> str:
        value = self.get_field(name)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return (name for name in ENRICHED_FIELDS if self.get_field(name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)
