"""The assist HTTP API over raw HTTP (CONTRACT §4, §5)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import websockets

from tests.helpers import API_KEY, RunningHub, http, running_hub

SESSIONS: list[dict[str, Any]] = [
    {
        "sessionID": "a1",
        "timestamp": 1000,
        "userID": "ann@example.com",
        "userBrowser": "Chrome",
        "userCountry": "DE",
        "userDeviceType": "desktop",
        "metadata": {"plan": "pro", "team": "red"},
        "pageTitle": "Checkout",
        "userOs": "Linux",
    },
    {
        "sessionID": "b2",
        "timestamp": 3000,
        "userID": "bob@example.com",
        "userBrowser": "Firefox",
        "userCountry": "FR",
        "userDeviceType": "mobile",
        "metadata": {"plan": "free"},
        "userUUID": "dev-1",
    },
    {
        "sessionID": "c3",
        "timestamp": 2000,
        "userID": "Carol@Example.com",
        "userBrowser": "chrome",
        "userCountry": "DE",
        "userDeviceType": "mobile",
        "metadata": {"plan": "Pro"},
        "active": False,
    },
    {
        "sessionID": "d4",
        "timestamp": 2000,
        "userBrowser": "Safari",
        "userCountry": "US",
        "metadata": {"team": ""},
    },
    {
        "sessionID": "e5",
        "timestamp": 5000,
        "userID": "eve@sample.org",
        "userBrowser": "Chrome",
        "userCountry": "US",
        "userDeviceType": "tablet",
        "trackerVersion": "16.1.0",
    },
]


@asynccontextmanager
async def populated(**settings: Any) -> AsyncIterator[RunningHub]:
    async with running_hub(**settings) as h, AsyncExitStack() as stack:
        for fields in SESSIONS:
            ws = await stack.enter_async_context(websockets.connect(h.tracker_url()))
            await ws.send(json.dumps({"type": "start", **fields}))
            assert json.loads(await ws.recv())["type"] == "started"
        yield h


def ids(data: dict[str, Any]) -> list[str]:
    return [s["sessionID"] for s in data["sessions"]]


async def post(h: RunningHub, body: Any, project: str = "p1", key: str | None = API_KEY) -> Any:
    return await http(h.port, "POST", f"/public/{project}/assist/sessions", body, key=key)


async def search(h: RunningHub, body: dict[str, Any]) -> dict[str, Any]:
    reply = await post(h, body)
    assert reply.status == 200, reply.body
    data: dict[str, Any] = reply.json()["data"]
    assert data["live"] is True
    return data


async def test_get_lists_with_defaults_timestamp_desc() -> None:
    async with populated() as h:
        reply = await http(h.port, "GET", "/public/p1/assist/sessions")
        assert reply.status == 200
        assert reply.headers["content-type"] == "application/json"
        data = reply.json()["data"]
        assert data["total"] == 5 and data["live"] is True
        # ties on timestamp (c3, d4 at 2000) fall by sessionID in the sort's direction
        assert ids(data) == ["e5", "b2", "d4", "c3", "a1"]
        assert all(s["live"] is True for s in data["sessions"])


async def test_get_user_id_filters_with_is_case_insensitively() -> None:
    async with populated() as h:
        reply = await http(h.port, "GET", "/public/p1/assist/sessions?userId=CAROL@example.com")
        assert ids(reply.json()["data"]) == ["c3"]
        reply = await http(h.port, "GET", "/public/p1/assist/sessions?userId=carol")
        assert reply.json()["data"]["total"] == 0, "GET userId is an exact match, not contains"


async def test_get_one_session_and_404() -> None:
    async with populated() as h:
        reply = await http(h.port, "GET", "/public/p1/assist/sessions/b2")
        assert reply.status == 200 and reply.json()["data"]["userUUID"] == "dev-1"
        reply = await http(h.port, "GET", "/public/p1/assist/sessions/zz")
        assert reply.status == 404 and "error" in reply.json()
        reply = await http(h.port, "GET", "/public/p2/assist/sessions/b2")
        assert reply.status == 404, "sessions are per project"


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ([{"name": "userBrowser", "operator": "is", "value": ["chrome"]}], {"a1", "c3", "e5"}),
        ([{"name": "USERBROWSER", "operator": "IS", "value": ["CHROME"]}], {"a1", "c3", "e5"}),
        ([{"name": "userBrowser", "value": ["fire"]}], {"b2"}),
        ([{"name": "userId", "operator": "contains", "value": ["example.com"]}], {"a1", "b2", "c3"}),
        ([{"name": "userid", "operator": "is", "value": ["carol@example.com"]}], {"c3"}),
        ([{"name": "userAnonymousId", "operator": "is", "value": ["dev-1"]}], {"b2"}),
        ([{"name": "userUuid", "operator": "is", "value": ["DEV-1"]}], {"b2"}),
        ([{"name": "platform", "operator": "is", "value": ["mobile"]}], {"b2", "c3"}),
        ([{"name": "sessionId", "operator": "is", "value": ["A1"]}], {"a1"}),
        ([{"name": "userCountry", "operator": "is", "value": ["de", "us"]}], {"a1", "c3", "d4", "e5"}),
        (
            [
                {"name": "userCountry", "operator": "is", "value": ["de", "us"]},
                {"name": "userBrowser", "operator": "is", "value": ["chrome"]},
            ],
            {"a1", "c3", "e5"},
        ),
        ([{"name": "METADATA", "source": "plan", "operator": "is", "value": ["pro"]}], {"a1", "c3"}),
        ([{"name": "metadata", "source": "plan", "value": ["re"]}], {"b2"}),
        ([{"name": "plan", "operator": "is", "value": ["FREE"]}], {"b2"}),
        ([{"name": "team", "value": []}], {"a1"}),
        ([{"name": "team"}], {"a1"}),
        ([{"name": "userID", "value": []}], {"a1", "b2", "c3", "e5"}),
        ([{"name": "trackerVersion", "value": ["16"]}], {"e5"}),
        ([{"name": "active", "operator": "is", "value": [False]}], {"c3"}),
        ([{"name": "active", "operator": "is", "value": ["true"]}], {"a1", "b2", "d4", "e5"}),
        ([{"name": "pageTitle", "value": ["check"]}], {"a1"}),
        ([{"name": "nosuchkey", "value": []}], set()),
        ([], {"a1", "b2", "c3", "d4", "e5"}),
    ],
)
async def test_post_filters(filters: list[dict[str, Any]], expected: set[str]) -> None:
    async with populated() as h:
        data = await search(h, {"filters": filters, "limit": 100})
        assert set(ids(data)) == expected
        assert data["total"] == len(expected)


async def test_sort_order_and_sessionid_tiebreak() -> None:
    async with populated() as h:
        data = await search(h, {"sort": "timestamp", "order": "ASC"})
        assert ids(data) == ["a1", "c3", "d4", "b2", "e5"]
        data = await search(h, {"sort": "userCountry", "order": "asc"})
        assert ids(data) == ["a1", "c3", "b2", "d4", "e5"]
        data = await search(h, {"sort": "USERID", "order": "desc"})
        # unset values sort last in either direction
        assert ids(data) == ["e5", "b2", "a1", "c3", "d4"]
        data = await search(h, {"sort": "sessionId"})
        assert ids(data) == ["e5", "d4", "c3", "b2", "a1"]


async def test_paging_counts_total_before_paging_and_pages_do_not_overlap() -> None:
    async with populated() as h:
        seen: list[str] = []
        for page in (1, 2, 3):
            data = await search(h, {"page": page, "limit": 2})
            assert data["total"] == 5
            seen += ids(data)
        assert seen == ["e5", "b2", "d4", "c3", "a1"]
        data = await search(h, {"page": 4, "limit": 2})
        assert data["total"] == 5 and data["sessions"] == []
        data = await search(h, {"page": 0, "limit": 0})
        assert len(data["sessions"]) == 5, "0 means the default (page 1, limit 10)"
        data = await search(h, {"page": None, "limit": None, "sort": None, "order": None})
        assert ids(data) == ["e5", "b2", "d4", "c3", "a1"]
        data = await search(h, {"limit": 1000})
        assert data["total"] == 5


async def test_default_limit_is_10() -> None:
    async with running_hub() as h, AsyncExitStack() as stack:
        for i in range(12):
            ws = await stack.enter_async_context(websockets.connect(h.tracker_url()))
            await ws.send(json.dumps({"type": "start", "sessionID": f"s{i:02}", "timestamp": i}))
            await ws.recv()
        data = await search(h, {})
        assert data["total"] == 12 and len(data["sessions"]) == 10
        assert ids(data)[0] == "s11"
        reply = await http(h.port, "GET", "/public/p1/assist/sessions?page=2")
        assert ids(reply.json()["data"]) == ["s01", "s00"]


async def test_empty_body_is_a_400() -> None:
    async with populated() as h:
        reply = await post(h, b"")
        assert reply.status == 400 and "body is required" in reply.json()["error"]


BAD_BODIES: list[tuple[Any, str]] = [
    (b"{not json", "invalid JSON"),
    (b"[1,2]", "object"),
    ({"filters": "userId"}, "filters"),
    ({"filters": [{"operator": "is", "value": ["x"]}]}, "name"),
    ({"filters": [{"name": "", "value": ["x"]}]}, "name"),
    ({"filters": [{"name": "userId", "operator": "startsWith", "value": ["x"]}]}, "operator"),
    ({"filters": [{"name": "userId", "operator": 5}]}, "operator"),
    ({"filters": [{"name": "userId", "value": [{"a": 1}]}]}, "value"),
    ({"filters": [{"name": "METADATA", "value": ["x"]}]}, "source"),
    ({"filters": [{"name": "userProperties", "value": ["x"]}]}, "userProperties"),
    ({"sort": "nosuchfield"}, "sort"),
    ({"sort": "metadata"}, "sort"),
    ({"sort": 5}, "sort"),
    ({"order": "sideways"}, "order"),
    ({"page": -1}, "page"),
    ({"page": "2"}, "page"),
    ({"page": 1.5}, "page"),
    ({"limit": 1001}, "limit"),
    ({"limit": -3}, "limit"),
    ({"limit": True}, "limit"),
]


@pytest.mark.parametrize(("body", "words"), BAD_BODIES)
async def test_malformed_post_is_a_400_that_says_what_was_wrong(body: Any, words: str) -> None:
    async with populated() as h:
        reply = await post(h, body)
        assert reply.status == 400, reply.body
        message = reply.json()["error"]
        assert words.lower() in message.lower(), message


@pytest.mark.parametrize("query", ["page=-1", "page=abc", "limit=5000", "limit=x", "sort=bogus", "order=up"])
async def test_malformed_get_is_a_400(query: str) -> None:
    async with populated() as h:
        reply = await http(h.port, "GET", f"/public/p1/assist/sessions?{query}")
        assert reply.status == 400 and reply.json()["error"]


async def test_auth_is_required_on_public_routes() -> None:
    async with populated() as h:
        for key in (None, "wrong", ""):
            reply = await post(h, {}, key=key)
            assert reply.status == 401, key
            assert "key" in reply.json()["error"].lower()
            assert reply.headers.get("www-authenticate") == "Bearer"
        reply = await http(
            h.port,
            "GET",
            "/public/p1/assist/sessions",
            headers={"Authorization": f"Basic {API_KEY}"},
            key=None,
        )
        assert reply.status == 401
        reply = await http(h.port, "GET", "/public/p1/assist/sessions/a1", key="nope")
        assert reply.status == 401
        # the key never comes back in an answer
        assert API_KEY not in reply.body.decode()


async def test_unknown_project_is_404_when_projects_are_configured() -> None:
    async with running_hub(projects={"p1": 1}) as h:
        reply = await post(h, {}, project="other")
        assert reply.status == 404 and reply.json() == {"error": "project not found"}
        reply = await post(h, {}, project="p1")
        assert reply.status == 200


async def test_health_ready_unknown_routes_and_methods() -> None:
    async with running_hub() as h:
        assert (await http(h.port, "GET", "/healthz", key=None)).status == 200
        ready = await http(h.port, "GET", "/readyz", key=None)
        assert ready.status == 200 and ready.json()["status"] == "ready"
        assert (await http(h.port, "GET", "/nope", key=None)).status == 404
        assert (await http(h.port, "GET", "/public/p1/other", key=None)).status == 404
        reply = await http(h.port, "DELETE", "/public/p1/assist/sessions")
        assert reply.status == 405 and "GET" in reply.headers["allow"]
        assert (await http(h.port, "POST", "/healthz", key=None)).status == 405


async def test_malformed_http_and_oversized_bodies() -> None:
    async with running_hub(max_http_body=1000) as h:
        reply = await http(h.port, "GET", "", raw=b"GARBAGE\r\n\r\n")
        assert reply.status == 400
        reply = await post(h, {"filters": [], "pad": "x" * 2000})
        assert reply.status == 413
        big = "x" * 20_000
        reply = await http(h.port, "GET", "/healthz", headers={"X-Big": big}, key=None)
        assert reply.status == 431


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async with populated() as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        req = f"GET /public/p1/assist/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\r\n"
        writer.write((req * 3).encode())
        for _ in range(3):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            body = json.loads(await reader.readexactly(length))
            assert body["data"]["total"] == 5
        writer.close()


# Framing: heads, bodies, pipelining, split reads (issue 15, defect 4) ------------


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response off a keep-alive stream."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        if value:
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), 5) if length else b""
    return int(status_line.split()[1]), headers, body


def get_request(path: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: x", f"Authorization: Bearer {API_KEY}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_a_body_over_max_header_is_not_a_head_over_it() -> None:
    # An `is` filter with 800 user ids: a 40 KiB body, over the 16 KiB head limit.
    async with populated() as h:
        users = [f"visitor-{i:05}-of-the-online-shop@mail.example.com" for i in range(799)]
        users.append("bob@example.com")
        body = json.dumps({"filters": [{"name": "userId", "operator": "is", "value": users}]})
        assert len(body) > 40 * 1024 > h.hub.settings.max_header
        reply = await post(h, body)
        assert reply.status == 200, reply.body
        assert ids(reply.json()["data"]) == ["b2"]


async def test_200_pipelined_gets_in_one_write_get_200_answers_in_order() -> None:
    async with populated() as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        limits = [1 + i % 5 for i in range(200)]
        writer.write(b"".join(get_request(f"/public/p1/assist/sessions?limit={n}") for n in limits))
        for n in limits:
            status, _, body = await read_reply(reader)
            assert status == 200, body
            assert len(json.loads(body)["data"]["sessions"]) == n
        writer.close()


async def test_one_head_over_max_header_is_still_a_431() -> None:
    async with running_hub(max_header=2048) as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        writer.write(get_request("/healthz") + get_request("/healthz", "X-Big: " + "y" * 3000))
        assert (await read_reply(reader))[0] == 200, "the first request is answered"
        status, headers, _ = await read_reply(reader)
        assert status == 431 and headers["connection"] == "close"
        writer.close()


async def write_in_pieces(port: int, pieces: list[bytes]) -> tuple[int, bytes]:
    """Each piece as its own segment (no Nagle, a pause between), then the one answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.002)
        status, _, body = await read_reply(reader)
        return status, body
    finally:
        writer.close()


async def test_a_request_one_byte_at_a_time_gets_the_same_answer() -> None:
    async with populated() as h:
        raw = get_request("/public/p1/assist/sessions/b2")
        whole = await write_in_pieces(h.port, [raw])
        assert whole[0] == 200
        assert await write_in_pieces(h.port, [raw[i : i + 1] for i in range(len(raw))]) == whole


async def test_a_request_split_at_every_byte_boundary_gets_the_same_answer() -> None:
    async with running_hub() as h:
        raw = b"POST /public/p1/assist/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n"
        raw += f"Authorization: Bearer {API_KEY}\r\n\r\n".encode() + b'{"limit": 1}'
        whole = await write_in_pieces(h.port, [raw])
        assert whole[0] == 200
        for cut in range(1, len(raw)):
            assert await write_in_pieces(h.port, [raw[:cut], raw[cut:]]) == whole, cut


# Expect: 100-continue, HEAD (issue 15, defect 9) ------------------------------------


async def test_expect_100_continue_is_answered_before_the_body_is_sent() -> None:
    async with populated() as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        body = b'{"limit": 2}'
        head = (
            "POST /public/p1/assist/sessions HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
        )
        writer.write(head.encode())
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        status, _, answer = await read_reply(reader)
        assert status == 200 and len(json.loads(answer)["data"]["sessions"]) == 2
        writer.close()


async def test_expect_100_continue_with_a_body_over_the_limit_is_a_413_without_100() -> None:
    async with running_hub(max_http_body=100) as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        writer.write(
            b"POST /public/p1/assist/sessions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 101\r\nExpect: 100-continue\r\n\r\n"
        )
        status, headers, _ = await read_reply(reader)
        assert status == 413 and headers["connection"] == "close"
        writer.close()


@pytest.mark.parametrize("path", ["/public/p1/assist/sessions?limit=2", "/public/p1/assist/sessions/a1"])
async def test_head_on_public_routes_answers_like_get_without_a_body(path: str) -> None:
    async with populated() as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        head_request = get_request(path).replace(b"GET ", b"HEAD ", 1)
        writer.write(head_request + get_request(path))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        got = await read_reply(reader)
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert got[0] == 200
        # The GET's Content-Length, and the next answer follows the head at once: no body.
        assert f"Content-Length: {len(got[2])}".encode() in head
        writer.close()
        missing = await http(h.port, "HEAD", "/public/p1/assist/sessions/nope")
        assert missing.status == 404 and missing.body == b""
        assert (await http(h.port, "HEAD", path, key=None)).status == 401
