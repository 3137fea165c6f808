"""Enrichment wired into the tracker endpoint, over real sockets (CONTRACT §1).

A tracker's handshake ``User-Agent`` (and, with ``--geoip-db``, its address)
fill the record where the tracker sends nothing; what a tracker sends wins,
at its start and on a later update; ``X-Forwarded-For`` counts only from
``--trusted-proxies``. The GeoIP database is written here with mmdb-writer.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
import websockets

from tests.helpers import running_hub, wait_for
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
