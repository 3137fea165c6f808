"""OpenReplay's assist HTTP API (CONTRACT §8, hub/openreplay_api.py) over real sockets.

Sessions come from native trackers; the calls are the ones OpenReplay's
backend makes (``api/chalicelib/core/assist.py``): ``POST sockets-live/{key}``
with its filter/sort/pagination body, ``GET sockets-live/{key}/{id}``,
``GET sockets-list/{key}/{id}`` and ``GET sockets-list/{key}/autocomplete``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from hub import openapi
from hub.config import Settings
from tests.helpers import HubProcess, RunningHub, http, running_hub, wait_for
from tests.redis_server import RedisServer, have_redis

KEY = "change_me_assist-key.1"
LIVE = f"/assist/{KEY}/sockets-live"
LIST = f"/assist/{KEY}/sockets-list"

# sessionID: (timestamp, fields). Timestamps give the start order s1 < s2 < s3 < s4.
PEOPLE: dict[str, dict[str, Any]] = {
    "s1": {
        "timestamp": 1_000,
        "userID": "Ann@Example.com",
        "userBrowser": "Chrome",
        "userCountry": "FR",
        "pageTitle": "Checkout",
        "metadata": {"plan": "pro", "seats": 12},
    },
    "s2": {
        "timestamp": 2_000,
        "userID": "bob@example.com",
        "userBrowser": "Firefox",
        "userCountry": "DE",
        "pageTitle": "Home",
        "metadata": {"plan": "free", "seats": 3},
    },
    "s3": {
        "timestamp": 3_000,
        "userID": "cat@other.org",
        "userBrowser": "Chrome",
        "userCountry": "FR",
        "pageTitle": "Pricing",
        "metadata": {"plan": "Pro"},
    },
    "s4": {"timestamp": 4_000, "userBrowser": "Safari", "pageTitle": "Home", "userCountry": ""},
}


async def start(port: int, project: str, sid: str, **fields: Any) -> ClientConnection:
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws/tracker/{project}")
    await ws.send(json.dumps({"type": "start", "sessionID": sid, **fields}))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert reply["type"] == "started", reply
    return ws


@asynccontextmanager
async def people(**settings: Any) -> AsyncIterator[RunningHub]:
    """A hub serving the OpenReplay API with PEOPLE live in project p1 and one session in p2."""
    async with running_hub(assist_key=KEY, **settings) as h, AsyncExitStack() as stack:
        for sid, fields in PEOPLE.items():
            stack.push_async_callback((await start(h.port, "p1", sid, **fields)).close)
        stack.push_async_callback((await start(h.port, "p2", "x1", userID="ann@example.com")).close)
        yield h


async def live(h: RunningHub, body: Any = None, project: str = "p1", query: str = "") -> dict[str, Any]:
    reply = await http(h.port, "POST", f"{LIVE}/{project}{query}", body if body is not None else "", key=None)
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "application/json"
    data: dict[str, Any] = reply.json()["data"]
    assert set(data) == {"total", "sessions", "counter"}
    return data


async def ids(h: RunningHub, body: Any = None) -> list[str]:
    return [s["sessionID"] for s in (await live(h, body))["sessions"]]


def where(**filters: Any) -> dict[str, Any]:
    return {"filter": filters, "sort": {"key": "timestamp", "order": "asc"}}


async def test_filters_is_and_contains_on_fields_and_metadata() -> None:
    async with people() as h:
        # is: case-insensitive equality; contains: a substring; the names in any case, userId too.
        assert await ids(h, where(userId={"values": ["ann@example.com"], "operator": "is"})) == ["s1"]
        assert await ids(h, where(USERID={"values": ["EXAMPLE"], "operator": "contains"})) == ["s1", "s2"]
        assert await ids(h, where(userId={"values": ["example"], "operator": "is"})) == []
        # Values OR'ed, filters AND'ed; a metadata key is a filter name.
        assert await ids(h, where(userBrowser={"values": ["firefox", "safari"], "operator": "is"})) == [
            "s2",
            "s4",
        ]
        both = where(
            plan={"values": ["pro"], "operator": "is"}, userCountry={"values": ["fr"], "operator": "is"}
        )
        assert await ids(h, both) == ["s1", "s3"]
        assert await ids(h, where(seats={"values": [12], "operator": "is"})) == ["s1"]
        # Metadata names in any case too, as OpenReplay matches record keys.
        assert await ids(h, where(PLAN={"values": ["pro"], "operator": "is"})) == await ids(
            h, where(plan=["pro"])
        )
        # A missing operator is contains, as are the v1.7 form (an array) and a bare value.
        assert await ids(h, where(pageTitle={"values": ["o"]})) == ["s1", "s2", "s4"]
        assert await ids(h, where(pageTitle=["PRIC"])) == ["s3"]
        assert await ids(h, where(userId="other")) == ["s3"]
        # OpenReplay's aliases: sessionId, platform, userAnonymousId read the hub's fields.
        assert await ids(h, where(sessionId={"values": ["s2"], "operator": "is"})) == ["s2"]
        # Null or empty values match nothing; an empty `is` value never matches; an empty
        # `contains` value matches every session holding the field.
        nothings: list[Any] = [None, [], {"values": None}, {"values": []}, {"values": [""], "operator": "is"}]
        for nothing in nothings:
            assert await ids(h, where(userCountry=nothing)) == [], nothing
        assert await ids(h, where(userCountry={"values": [""]})) == ["s1", "s2", "s3"]
        assert await ids(h, where(userId={"values": [""], "operator": "contains"})) == ["s1", "s2", "s3"]
        # Another project's sessions are never seen; an unknown project has none.
        assert await ids(h, where(userId={"values": ["ann"]})) == ["s1"]
        assert await live(h, {}, project="nobody") == {"total": 0, "sessions": [], "counter": {}}


async def test_counter_counts_the_value_each_match_matched_first() -> None:
    async with people() as h:
        assert (await live(h, {}))["counter"] == {}
        data = await live(
            h,
            {
                "filter": {
                    "userBrowser": {"values": ["Chrome", "Firefox", "Opera"], "operator": "is"},
                    "userId": {"values": ["example.com", "ann", "org"], "operator": "contains"},
                }
            },
        )
        assert data["total"] == 3
        # Ann's userID contains both "example.com" and "ann": the first value listed counts.
        assert data["counter"] == {
            "userBrowser": {"Chrome": 2, "Firefox": 1},
            "userId": {"example.com": 2, "org": 1},
        }
        # The counter counts every match, not the page; values keep the caller's spelling.
        paged = await live(
            h,
            {
                "filter": {"plan": {"values": ["PRO"], "operator": "is"}},
                "pagination": {"page": 1, "limit": 1},
            },
        )
        assert (paged["total"], len(paged["sessions"]), paged["counter"]) == (2, 1, {"plan": {"PRO": 2}})
        none = await live(h, {"filter": {"plan": {"values": ["gold"], "operator": "is"}}})
        assert none == {"total": 0, "sessions": [], "counter": {}}


async def test_sort_and_pagination() -> None:
    async with people() as h:
        # No sort: oldest first, as OpenReplay answers; desc (any case) newest first.
        assert await ids(h) == ["s1", "s2", "s3", "s4"]
        assert await ids(h, {"sort": {"key": "TIMESTAMP", "order": "DESC"}}) == ["s4", "s3", "s2", "s1"]
        assert await ids(h, {"sort": {"order": "desc"}}) == ["s4", "s3", "s2", "s1"]
        # duration (the dashboard's default) is the live time: the reverse of the start.
        assert await ids(h, {"sort": {"key": "duration", "order": "desc"}}) == ["s1", "s2", "s3", "s4"]
        # A record field; unset values last either way, ties by sessionID.
        assert await ids(h, {"sort": {"key": "userId", "order": "asc"}}) == ["s1", "s2", "s3", "s4"]
        assert await ids(h, {"sort": {"key": "userBrowser", "order": "desc"}}) == ["s4", "s2", "s3", "s1"]
        # A metadata key: numbers by value (3 before 12), unset last in both directions.
        assert await ids(h, {"sort": {"key": "seats", "order": "asc"}}) == ["s2", "s1", "s3", "s4"]
        assert await ids(h, {"sort": {"key": "seats", "order": "desc"}}) == ["s1", "s2", "s4", "s3"]
        # Text by code point, as JavaScript compares it.
        assert await ids(h, {"sort": {"key": "plan", "order": "asc"}}) == ["s3", "s2", "s1", "s4"]
        # Pages slice [(page-1)*limit, page*limit); total counts every match.
        desc = {"sort": {"key": "timestamp", "order": "desc"}}
        pages = []
        for page in (1, 2, 3):
            data = await live(h, {**desc, "pagination": {"page": page, "limit": 3}})
            assert data["total"] == 4
            pages.append([s["sessionID"] for s in data["sessions"]])
        assert pages == [["s4", "s3", "s2"], ["s1"], []]
        # Without both page and limit, every match (up to 1000).
        for pagination in ({"page": 2}, {"limit": 1}, {"page": 0, "limit": 2}, None):
            assert len((await live(h, {"pagination": pagination}))["sessions"]) == 4
        metadata_page = {"sort": {"key": "seats", "order": "desc"}, "pagination": {"page": 2, "limit": 2}}
        assert await ids(h, metadata_page) == ["s4", "s3"]


async def test_the_answer_is_openreplay_s_session_shape() -> None:
    async with people() as h:
        (session,) = (await live(h, where(sessionId={"values": ["s1"], "operator": "is"})))["sessions"]
        # What OpenReplay's API and dashboard read of a live session.
        assert session["sessionID"] == "s1"
        assert session["projectKey"] == "p1"
        assert session["userID"] == "Ann@Example.com"
        assert session["metadata"] == {"plan": "pro", "seats": "12"}
        assert session["pageTitle"] == "Checkout"
        assert session["timestamp"] == 1_000
        assert (session["live"], session["active"], session["tabs"]) == (True, True, 1)
        assert {"userUUID", "userOs", "userBrowser", "userDevice", "userDeviceType", "userCountry"} <= set(
            session
        )
        assert "projectId" in session


async def test_one_session_and_sockets_list_answer_null_when_not_live() -> None:
    async with people() as h:
        for base in (LIVE, LIST):
            reply = await http(h.port, "GET", f"{base}/p1/s2", key=None)
            assert reply.status == 200
            assert reply.json()["data"]["userID"] == "bob@example.com"
            for missing in ("p1/nope", "p2/s2", "unknown/s2"):
                reply = await http(h.port, "GET", f"{base}/{missing}", key=None)
                assert (reply.status, reply.json()) == (200, {"data": None}), missing
        # With a filter (a GET body, as OpenReplay reads one): null unless the session matches it.
        match = {"filter": {"userBrowser": {"values": ["firefox"], "operator": "is"}}}
        miss = {"filter": {"userBrowser": {"values": ["chrome"], "operator": "is"}}}
        assert (await http(h.port, "GET", f"{LIVE}/p1/s2", match, key=None)).json()["data"][
            "sessionID"
        ] == "s2"
        assert (await http(h.port, "GET", f"{LIVE}/p1/s2", miss, key=None)).json() == {"data": None}
        # A session that ended is no longer live.
        ws = await start(h.port, "p1", "gone", userID="z")
        assert (await http(h.port, "GET", f"{LIVE}/p1/gone", key=None)).json()["data"]["userID"] == "z"
        await ws.send(json.dumps({"type": "end"}))

        async def ended() -> bool:
            reply = await http(h.port, "GET", f"{LIST}/p1/gone", key=None)
            return bool(reply.json() == {"data": None})

        await wait_for(ended)
        await ws.close()


async def test_autocomplete() -> None:
    async with people() as h:

        async def complete(query: str, base: str = LIST) -> list[dict[str, Any]]:
            reply = await http(h.port, "GET", f"{base}/p1/autocomplete?{query}", key=None)
            assert reply.status == 200, reply.body
            found: list[dict[str, Any]] = reply.json()["data"]
            return found

        # OpenReplay's call: a field's live values containing q, typed by the key upper-cased.
        assert await complete("q=chr&key=userBrowser") == [{"type": "USERBROWSER", "value": "Chrome"}]
        assert await complete("q=chr&key=userBrowser", base=LIVE) == [
            {"type": "USERBROWSER", "value": "Chrome"}
        ]
        # Most held first; a metadata key; OpenReplay's aliases.
        assert await complete("q=&key=userCountry") == [
            {"type": "USERCOUNTRY", "value": "FR"},
            {"type": "USERCOUNTRY", "value": "DE"},
        ]
        # "pro" and "Pro" are one value, as a filter compares them, spelled as one session holds it.
        (plan,) = await complete("q=PR&key=plan")
        assert plan["type"] == "PLAN" and plan["value"] in ("pro", "Pro")
        assert await complete("q=ann&key=userId") == [{"type": "USERID", "value": "Ann@Example.com"}]
        # A number field answers numbers, as OpenReplay's record holds them.
        assert await complete("q=4000&key=timestamp") == [{"type": "TIMESTAMP", "value": 4000}]
        # A metadata key in any case.
        assert await complete("q=PR&key=PLAN") == [plan]
        # Without a key: every text field and every metadata key.
        found = await complete("q=o")
        assert {"type": "USERID", "value": "bob@example.com"} in found
        assert [f for f in await complete("q=pr") if f["type"] == "PLAN"] == [plan]
        # Most held first: Home (two sessions) before Firefox (one).
        home = found.index({"type": "PAGETITLE", "value": "Home"})
        assert home < found.index({"type": "USERBROWSER", "value": "Firefox"})
        # Neither q nor key: nothing, as OpenReplay; an unknown project: nothing.
        assert await complete("") == []
        reply = await http(h.port, "GET", f"{LIST}/nobody/autocomplete?q=a&key=userId", key=None)
        assert reply.json() == {"data": []}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{", "invalid JSON"),
        ("[]", "invalid search body"),
        ({"filter": {"userId": {"values": ["a"], "operator": "startsWith"}}}, "unknown operator"),
        ({"filter": {"userId": {"values": {"a": 1}}}}, "$.filter[...].values"),
        ({"filter": {"userProperties": ["a"]}}, "cannot filter on userProperties"),
        ({"sort": {"order": "sideways"}}, "unknown sort order"),
        ({"pagination": {"page": 1, "limit": 1001}}, "limit must be between 1 and 1000"),
        ({"pagination": {"page": -1, "limit": 5}}, "pagination.page must be >= 0"),
        ({"pagination": {"page": "2", "limit": 5}}, "Expected `int | null`, got `str`"),
        ({"filter": {f"k{i}": ["v"] for i in range(51)}}, "51 filters, over the limit of 50"),
        ("[" * 40 + "]" * 40, "nested deeper than 32"),
    ],
)
async def test_a_malformed_request_is_a_400_saying_what_was_wrong(body: Any, message: str) -> None:
    async with running_hub(assist_key=KEY) as h:
        reply = await http(h.port, "POST", f"{LIVE}/p1", body, key=None)
        assert reply.status == 400, reply.body
        assert message in reply.json()["error"]


async def test_wrong_key_limits_and_routes_absent_without_a_key() -> None:
    async with running_hub(assist_key=KEY, max_http_body=4096) as h:
        # A wrong key is the 404 of a path the hub does not serve, as in OpenReplay.
        for path in ("/assist/wrong/sockets-live/p1", "/assist/wrong/sockets-live/p1/s1",
                     "/assist/wrong/sockets-list/p1/s1", "/assist/wrong/sockets-list/p1/autocomplete?q=a",
                     f"/assist/{KEY}x/sockets-live/p1/autocomplete?q=a"):  # fmt: skip
            reply = await http(h.port, "GET", path, key=None)
            assert (reply.status, reply.json()) == (404, {"error": "not found"}), path
        reply = await http(h.port, "POST", "/assist/wrong/sockets-live/p1", {}, key=None)
        assert reply.status == 404
        # Bodies are bounded by --max-http-body; a parameter given twice is ambiguous.
        reply = await http(h.port, "POST", f"{LIVE}/p1", {"filter": {"a": ["x" * 5000]}}, key=None)
        assert reply.status == 413
        reply = await http(h.port, "GET", f"{LIST}/p1/autocomplete?q=a&q=b", key=None)
        assert reply.status == 400 and "more than once" in reply.json()["error"]
        # OpenReplay's GET form: ?userId= filters with is.
        await start(h.port, "p1", "u1", userID="ann")
        await start(h.port, "p1", "u2", userID="anna")
        reply = await http(h.port, "GET", f"{LIVE}/p1?userId=ANN", key=None)
        assert [s["sessionID"] for s in reply.json()["data"]["sessions"]] == ["u1"]
        assert reply.json()["data"]["counter"] == {"userID": {"ANN": 1}}
    async with running_hub() as h:
        reply = await http(h.port, "POST", f"{LIVE}/p1", {}, key=None)
        assert reply.status == 404


async def test_unknown_projects_are_answered_as_openreplay_does_even_with_a_project_list() -> None:
    async with running_hub(assist_key=KEY, projects={"p1": 7}) as h:
        assert await live(h, {}, project="not-configured") == {"total": 0, "sessions": [], "counter": {}}
        reply = await http(h.port, "GET", f"{LIVE}/not-configured/s1", key=None)
        assert (reply.status, reply.json()) == (200, {"data": None})


async def test_every_openreplay_route_is_documented() -> None:
    async with running_hub(assist_key=KEY) as h:
        registered = {
            "/".join(route.segments): set(route.allow.split(", "))
            for routes in h.hub.routes._http.values()
            for route in routes
            if route.segments[1] == "assist"
        }
        reply = await http(h.port, "GET", openapi.PATH, key=None)
    document = reply.json()
    documented = {
        p: {m.upper() for m in ops} for p, ops in document["paths"].items() if p.startswith("/assist/")
    }
    assert documented == registered
    assert len(registered) == 5
    # The key is never in the document, which anyone may read.
    assert KEY not in reply.body.decode()
    assert not any(p.startswith("/assist/") for p in openapi.document(Settings())["paths"])


@pytest.mark.skipif(not have_redis(), reason="redis-server is not installed")
async def test_a_session_on_one_node_is_answered_by_another() -> None:
    with RedisServer() as redis:
        args = ("--redis-url", redis.url, "--assist-key", KEY, "--grace", "20")
        with HubProcess(*args, "--node-id", "a") as a, HubProcess(*args, "--node-id", "b") as b:
            a.wait_ready(path="/readyz")
            b.wait_ready(path="/readyz")
            ws = await start(a.port, "p1", "on-a", userID="ann@example.com", metadata={"plan": "pro"})
            body = {"filter": {"plan": {"values": ["pro"], "operator": "is"}}}

            async def seen_by_b() -> dict[str, Any] | None:
                reply = await http(b.port, "POST", f"{LIVE}/p1", body, key=None)
                data: dict[str, Any] = reply.json()["data"]
                return data if data["total"] else None

            data = await wait_for(seen_by_b)
            assert [s["sessionID"] for s in data["sessions"]] == ["on-a"]
            assert data["counter"] == {"plan": {"pro": 1}}
            reply = await http(b.port, "GET", f"{LIVE}/p1/on-a", key=None)
            assert reply.json()["data"]["userID"] == "ann@example.com"
            reply = await http(b.port, "GET", f"{LIST}/p1/autocomplete?q=ann&key=userId", key=None)
            assert reply.json() == {"data": [{"type": "USERID", "value": "ann@example.com"}]}
            await ws.send(json.dumps({"type": "end"}))

            async def gone_on_b() -> bool:
                reply = await http(b.port, "GET", f"{LIST}/p1/on-a", key=None)
                return bool(reply.json() == {"data": None})

            await wait_for(gone_on_b)
            await ws.close()
