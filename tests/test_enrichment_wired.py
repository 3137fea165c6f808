"""Enrichment wired into the tracker endpoint, over real sockets (CONTRACT §1).

A tracker's handshake ``User-Agent`` (and, with ``--geoip-db``, its address)
fill the record where the tracker sends nothing; what a tracker sends wins,
at its start and on a later update; ``X-Forwarded-For`` counts only from
``--trusted-proxies``. A storm of new User-Agents and addresses, parsed and
located in batches, gives every record, search and autocomplete what an eager
enrichment would, on this node and on a cluster peer. The GeoIP database is
written here with mmdb-writer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import websockets

from hub.enrich import Enricher
from hub.record import ENRICHED_FIELDS, UA_FIELDS
from loadtest.bench_enrich import distinct_agents
from tests.helpers import API_KEY, HubProcess, http, running_hub, wait_for
from tests.redis_server import RedisServer, have_redis
from tests.test_enrich import CHROME_WINDOWS, LONDON, SAFARI_IPHONE, TOKYO, write_db

CHROME_FIELDS = {
    "userAgent": CHROME_WINDOWS,
    "userBrowser": "Chrome",
    "userBrowserVersion": "124.0.0.0",
    "userOs": "Windows",
    "userDevice": None,
    "userDeviceType": "desktop",
}
# The loopback address the test's trackers come from, placed by the test's own database.
HOME = {"country": {"iso_code": "NZ"}, "city": {"names": {"en": "Loopback"}}}


@pytest.fixture(scope="module")
def geo_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("geo") / "city.mmdb"
    return write_db(path, {"127.0.0.0/8": HOME, "81.2.69.0/24": LONDON, "2001:218::/32": TOKYO})


async def start(url: str, headers: dict[str, str], **fields: Any) -> tuple[Any, dict[str, Any]]:
    ws = await websockets.connect(url, additional_headers=headers, user_agent_header=None)
    await ws.send(json.dumps({"type": "start", **fields}))
    reply = json.loads(await ws.recv())
    assert reply["type"] == "started", reply
    return ws, reply["session"]


def pick(session: dict[str, Any], names: list[str] | tuple[str, ...] | dict[str, Any]) -> dict[str, Any]:
    return {name: session[name] for name in names}


async def test_the_user_agent_header_fills_what_the_tracker_does_not_send() -> None:
    async with running_hub() as h:
        ws, s = await start(h.tracker_url(), {"User-Agent": CHROME_WINDOWS}, sessionID="a")
        async with ws:
            assert pick(s, CHROME_FIELDS) == CHROME_FIELDS
            # No database: no location.
            assert (s["userCountry"], s["userState"], s["userCity"]) == (None, None, None)
            # What the API answers is the enriched record, filterable by its fields.
            found = await h.search(
                body={"filters": [{"name": "userBrowser", "operator": "is", "value": ["chrome"]}]}
            )
            assert [x["sessionID"] for x in found["sessions"]] == ["a"]


async def test_what_the_tracker_sends_wins_at_start_and_on_later_updates() -> None:
    async with running_hub() as h:
        ws, s = await start(
            h.tracker_url(), {"User-Agent": CHROME_WINDOWS}, sessionID="b", userBrowser="MyApp", userOs=None
        )
        async with ws:
            assert (s["userBrowser"], s["userOs"], s["userBrowserVersion"]) == ("MyApp", None, "124.0.0.0")
            await ws.send(
                json.dumps({"type": "update", "userBrowserVersion": "9", "userDeviceType": "kiosk"})
            )

            async def updated() -> dict[str, Any] | None:
                found = await h.search()
                x = found["sessions"][0]
                return x if x["userDeviceType"] == "kiosk" else None

            x = await wait_for(updated, what="the update applied")
            assert (x["userBrowserVersion"], x["userBrowser"], x["userAgent"]) == (
                "9",
                "MyApp",
                CHROME_WINDOWS,
            )
            # Another tab with another browser fills nothing the record holds already.
            tab, joined = await start(h.tracker_url(), {"User-Agent": SAFARI_IPHONE}, sessionID="b")
            async with tab:
                assert joined["tabs"] == 2
                assert pick(joined, ["userBrowser", "userAgent", "userDeviceType", "userDevice"]) == {
                    "userBrowser": "MyApp",
                    "userAgent": CHROME_WINDOWS,
                    "userDeviceType": "kiosk",
                    # Chrome on Windows names no device: the iPhone tab's is taken.
                    "userDevice": "iPhone",
                }


async def test_a_tracker_without_user_agent_gets_nothing() -> None:
    async with running_hub() as h:
        ws, s = await start(h.tracker_url(), {}, sessionID="c")
        async with ws:
            assert all(s[name] is None for name in CHROME_FIELDS)


async def test_geoip_places_the_peer_and_ignores_forwarded_for_from_untrusted_peers(geo_db: str) -> None:
    async with running_hub(geoip_db=geo_db) as h:
        ws, s = await start(h.tracker_url(), {"X-Forwarded-For": "81.2.69.160"}, sessionID="d")
        async with ws:
            assert (s["userCountry"], s["userState"], s["userCity"]) == ("NZ", None, "Loopback")
        ws, s = await start(h.tracker_url(), {}, sessionID="e", userCountry="FR")
        async with ws:
            assert (s["userCountry"], s["userCity"]) == ("FR", "Loopback"), "the tracker's country wins"


async def test_forwarded_for_is_believed_from_a_trusted_proxy(geo_db: str) -> None:
    trusted = (ipaddress.ip_network("127.0.0.0/8"),)
    async with running_hub(geoip_db=geo_db, trusted_proxies=trusted) as h:
        # The client (81.2.69.160) came through a proxy of ours (127.0.0.1, also trusted).
        headers = {"X-Forwarded-For": "203.0.113.9, 81.2.69.160, 127.0.0.2", "User-Agent": CHROME_WINDOWS}
        ws, s = await start(h.tracker_url(), headers, sessionID="f")
        async with ws:
            assert (s["userCountry"], s["userState"], s["userCity"]) == ("GB", "England", "London")
            assert s["userBrowser"] == "Chrome"
        ws, s = await start(h.tracker_url(), {"X-Forwarded-For": "2001:218::1"}, sessionID="g")
        async with ws:
            assert (s["userCountry"], s["userCity"]) == ("JP", "Tokyo")
        # Nothing forwarded: the trusted peer itself is the client.
        ws, s = await start(h.tracker_url(), {}, sessionID="h")
        async with ws:
            assert s["userCity"] == "Loopback"


async def storm(url: str, handshakes: list[dict[str, str]]) -> list[tuple[Any, dict[str, Any]]]:
    """Every handshake first, then every start at once: the hub's batches span connections."""
    sockets = await asyncio.gather(
        *(websockets.connect(url, additional_headers=h, user_agent_header=None) for h in handshakes)
    )
    await asyncio.gather(
        *(ws.send(json.dumps({"type": "start", "sessionID": f"s{i}"})) for i, ws in enumerate(sockets))
    )
    replies = [json.loads(r) for r in await asyncio.gather(*(ws.recv() for ws in sockets))]
    assert all(r["type"] == "started" for r in replies)
    return [(ws, r["session"]) for ws, r in zip(sockets, replies, strict=True)]


async def test_a_storm_of_new_user_agents_is_searched_as_if_each_were_parsed_alone() -> None:
    rng = random.Random(18)
    pool = distinct_agents(40)
    drawn = [rng.choice(pool) for _ in range(120)]
    reference = Enricher()
    want = [dict(reference.fields({"user-agent": ua}, None)) for ua in drawn]
    async with running_hub() as h:
        started = await storm(h.tracker_url(), [{"User-Agent": ua} for ua in drawn])
        for (_, session), fields in zip(started, want, strict=True):
            assert pick(session, UA_FIELDS) == {name: fields.get(name) for name in UA_FIELDS}
        browsers = Counter(f["userBrowser"] for f in want)
        reply = await http(h.port, "GET", "/public/p1/assist/autocomplete?key=userBrowser&limit=100")
        assert {e["value"]: e["count"] for e in reply.json()["data"]} == browsers
        for kind in {f["userDeviceType"] for f in want if "userDeviceType" in f}:
            body = {"filters": [{"name": "userDeviceType", "operator": "is", "value": [kind]}], "limit": 200}
            found = await h.search(body=body)
            assert sorted(s["sessionID"] for s in found["sessions"]) == sorted(
                f"s{i}" for i, f in enumerate(want) if f.get("userDeviceType") == kind
            )
        for ws, _ in started:
            await ws.close()


@pytest.mark.skipif(not have_redis(), reason="redis-server is not installed")
async def test_a_cluster_peer_sees_the_enriched_records(geo_db: str) -> None:
    """Enrichment happens on the node the tracker connected to, before its record is mirrored."""
    rng = random.Random(5)
    pool = distinct_agents(20)
    clients = ["81.2.69.160", "2001:218::7", "81.2.69.9", "8.8.8.8"]
    handshakes = [
        {"User-Agent": rng.choice(pool), "X-Forwarded-For": f"{rng.choice(clients)}, 127.0.0.9"}
        for _ in range(30)
    ]
    reference = Enricher(geo_db, [ipaddress.ip_network("127.0.0.0/8")])
    want = [dict(reference.fields({k.lower(): v for k, v in h.items()}, "127.0.0.1")) for h in handshakes]
    with RedisServer() as redis, ExitStack() as stack:
        common = ("--redis-url", redis.url, "--api-key", API_KEY, "--grace", "20")
        enriching = ("--geoip-db", geo_db, "--trusted-proxies", "127.0.0.0/8")
        nodes = [
            stack.enter_context(HubProcess(*common, "--node-id", "n0", *enriching)),
            stack.enter_context(HubProcess(*common, "--node-id", "n1")),
        ]
        for node in nodes:
            node.wait_ready(path="/readyz")
        started = await storm(f"ws://127.0.0.1:{nodes[0].port}/ws/tracker/p1", handshakes)

        async def mirrored() -> dict[str, Any] | None:
            reply = await http(nodes[1].port, "POST", "/public/p1/assist/sessions", {"limit": 100})
            sessions = {s["sessionID"]: s for s in reply.json()["data"]["sessions"]}
            return sessions if len(sessions) == len(handshakes) else None

        seen = await wait_for(mirrored, what="every record on the peer")
        for i, fields in enumerate(want):
            eager = {name: fields.get(name) for name in ENRICHED_FIELDS}
            assert pick(seen[f"s{i}"], ENRICHED_FIELDS) == eager == pick(started[i][1], ENRICHED_FIELDS)
        assert {f.get("userCountry") for f in want} == {"GB", "JP", None}
        for ws, _ in started:
            await ws.close()
    reference.close()
