"""Hardening over real sockets: per-project keys, rate limit, limits, Origin (CONTRACT §2-§4)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from hub.auth import Auth
from hub.config import ConfigError, parse_projects, parse_settings
from loadtest.client import frame
from loadtest.wsraw import RawWs
from tests.helpers import API_KEY, RunningHub, http, running_hub, wait_for

P1_KEY = "p1-secret-9c1d"
P2_KEY = "p2-secret-4e7b"
PROJECTS = f"p1:1:{P1_KEY},p2:2:{P2_KEY}"


async def limit_count(port: int, limit: str) -> float:
    text = (await http(port, "GET", "/metrics", key=None)).body.decode()
    match = re.search(rf'^hub_limits_reached_total{{limit="{limit}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


async def start(ws: Any, **fields: Any) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "start", **fields}))
    reply: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 5))
    return reply


def agent(h: RunningHub, project: str, key: str) -> Any:
    return websockets.connect(h.agent_url(project), additional_headers={"Authorization": f"Bearer {key}"})


# Auth ------------------------------------------------------------------


def test_auth_scopes_keys_to_their_projects() -> None:
    auth = Auth("org", {"p1": ("k1",), "p2": ("k2", "k2b")})
    assert auth.may_read("org", "p1") and auth.may_read("org", "anything")
    assert auth.may_read("k1", "p1") and not auth.may_read("k1", "p2")
    assert auth.may_read("k2b", "p2") and not auth.may_read("k2b", "p1")
    assert not auth.may_read(None, "p1") and not auth.may_read("", "p1")
    assert not auth.may_read("k1x", "p1") and not auth.may_read("k", "p1")


def test_projects_flag_takes_api_keys_and_keeps_key_id_form() -> None:
    projects = parse_projects("a,b:7,c:8:key:with:colons")
    assert dict(projects) == {"a": 0, "b": 7, "c": 8}
    assert projects.api_keys == {"c": ("key:with:colons",)}


def test_keys_file_errors_name_the_line_never_the_key(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# comment\np1:good-key\nnot-a-line-with-secret-xyz\n")
    with pytest.raises(ConfigError) as info:
        parse_settings(["serve", "--keys-file", str(path)], {})
    assert "line 3" in str(info.value) and "secret-xyz" not in str(info.value)
    path.write_text("p9:key\n")
    with pytest.raises(ConfigError, match="p9"):
        parse_settings(["serve", "--keys-file", str(path), "--projects", "p1"], {})


async def test_a_project_key_reads_only_its_project_over_http_and_agents(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    keys = tmp_path / "keys"
    keys.write_text("p2:p2-file-key-5a\n")
    settings = parse_settings(["serve", "--projects", PROJECTS, "--keys-file", str(keys)], {})
    async with running_hub(projects=settings.projects, keys_file=settings.keys_file) as h:
        t1, t2 = await websockets.connect(h.tracker_url("p1")), await websockets.connect(h.tracker_url("p2"))
        async with t1, t2:
            await start(t1, sessionID="s1")
            await start(t2, sessionID="s2")
            path = "/public/{}/assist/sessions"
            for project, key, status in [
                ("p1", P1_KEY, 200),
                ("p2", P1_KEY, 401),
                ("p2", P2_KEY, 200),
                ("p2", "p2-file-key-5a", 200),
                ("p1", "p2-file-key-5a", 401),
                ("p1", API_KEY, 200),
                ("p2", API_KEY, 200),
            ]:
                reply = await http(h.port, "POST", path.format(project), {}, key=key)
                assert reply.status == status, (project, key, reply.body)
                if status == 200:
                    ids = [s["sessionID"] for s in reply.json()["data"]["sessions"]]
                    assert ids == [{"p1": "s1", "p2": "s2"}[project]]
            one = await http(h.port, "GET", "/public/p2/assist/sessions/s2", key=P1_KEY)
            assert one.status == 401 and b"s2" not in one.body

            with pytest.raises(InvalidStatus) as refused:
                await agent(h, "p2", P1_KEY)
            assert refused.value.response.status_code == 401
            async with agent(h, "p1", P1_KEY) as a:
                await a.send(json.dumps({"type": "subscribe"}))
                snapshot = json.loads(await asyncio.wait_for(a.recv(), 5))
                assert [s["sessionID"] for s in snapshot["sessions"]] == ["s1"]
                # Watching another project's session by ID from p1's endpoint sees nothing.
                await a.send(json.dumps({"type": "subscribe", "sessionID": "s2"}))
                snapshot = json.loads(await asyncio.wait_for(a.recv(), 5))
                assert snapshot["sessions"] == []
            token_path = f"/ws/agent/p2?token={P1_KEY}"
            with pytest.raises(InvalidStatus):
                await websockets.connect(h.url + token_path)
    # The hub's own logs (the websockets client logs its request headers at debug).
    logged = "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records if r.name.startswith("hub"))
    assert "http.request" in logged
    for secret in (P1_KEY, P2_KEY, "p2-file-key-5a", API_KEY):
        assert secret not in logged


# Flood -----------------------------------------------------------------


async def test_a_flood_past_the_rate_limit_is_closed_with_1008_and_others_carry_on() -> None:
    async with running_hub(rate_limit=20, rate_burst=40) as h:
        async with websockets.connect(h.tracker_url()) as calm, websockets.connect(h.tracker_url()) as flood:
            await start(calm, sessionID="calm")
            await start(flood, sessionID="flood")
            for _ in range(200):
                await flood.send('{"type":"heartbeat"}')
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(flood.recv(), 5)
            assert flood.close_code == 1008
            assert (await start(calm, sessionID="calm"))["type"] == "started"
        assert await limit_count(h.port, "rate_limit") == 1


async def test_a_steady_tracker_under_the_rate_is_never_closed() -> None:
    async with running_hub(rate_limit=200, rate_burst=10) as h, websockets.connect(h.tracker_url()) as ws:
        await start(ws, sessionID="steady")
        for _ in range(30):
            await ws.send('{"type":"heartbeat"}')
            await asyncio.sleep(0.01)
        assert (await start(ws, sessionID="steady"))["type"] == "started"


async def test_capped_reads_still_apply_every_message_in_order() -> None:
    """With read_batch=3, one write of 100 frames is handled over many loop turns."""
    async with running_hub(read_batch=3, rate_limit=0) as h:
        ws = await RawWs.connect(h.port, "/ws/tracker/p1")
        payload = frame(b'{"type":"start","sessionID":"b"}')
        for i in range(100):
            payload += frame(json.dumps({"type": "update", "metadata": {"i": i, f"k{i % 40}": "x"}}).encode())
        payload += frame(b'{"type":"start","sessionID":"b"}')
        ws.writer.write(payload)
        replies = [json.loads((await asyncio.wait_for(ws.recv(), 5))[1]) for _ in range(2)]
        assert [r["type"] for r in replies] == ["started", "started"]
        assert replies[1]["session"]["metadata"]["i"] == "99"
        assert len(replies[1]["session"]["metadata"]) == 41
        ws.close()


# Limits ----------------------------------------------------------------


async def test_connections_per_ip_past_the_limit_get_429() -> None:
    async with running_hub(max_conns_per_ip=2) as h:
        a = await websockets.connect(h.tracker_url())
        b = await websockets.connect(h.tracker_url())
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(h.tracker_url())
        assert refused.value.response.status_code == 429
        await a.close()
        await wait_for(lambda: h.hub.server.per_ip.open == {"127.0.0.1": 1})
        c = await websockets.connect(h.tracker_url())
        await b.close()
        await c.close()
        await wait_for(lambda: not h.hub.server.per_ip.open)
        assert await limit_count(h.port, "max_conns_per_ip") == 1


async def test_sessions_per_project_past_the_limit_get_project_full() -> None:
    async with running_hub(max_sessions_per_project=2) as h:
        conns = [await websockets.connect(h.tracker_url()) for _ in range(4)]
        assert (await start(conns[0], sessionID="a"))["type"] == "started"
        assert (await start(conns[1], sessionID="b"))["type"] == "started"
        full = await start(conns[2], sessionID="c")
        assert full["type"] == "error" and full["code"] == "project_full"
        # A second tab of a live session is not a new session.
        assert (await start(conns[3], sessionID="a"))["type"] == "started"
        other = await websockets.connect(h.tracker_url("p2"))
        assert (await start(other, sessionID="c"))["type"] == "started"
        assert (await h.search())["total"] == 2
        assert await limit_count(h.port, "max_sessions_per_project") == 1
        for ws in (*conns, other):
            await ws.close()


async def test_agents_past_the_limit_get_503() -> None:
    async with running_hub(max_agents=1) as h, agent(h, "p1", API_KEY):
        with pytest.raises(InvalidStatus) as refused:
            await agent(h, "p1", API_KEY)
        assert refused.value.response.status_code == 503
        assert await limit_count(h.port, "max_agents") == 1
        # OpenReplay's dashboard over Socket.IO counts against the same limit.
        url = (
            f"ws://127.0.0.1:{h.port}/ws-assist/socket/?EIO=4&transport=websocket&peerId=p1-s1&identity=agent"
        )
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(url)
        assert refused.value.response.status_code == 503
        assert await limit_count(h.port, "max_agents") == 2


async def test_too_many_filters_are_refused_in_searches_and_subscriptions() -> None:
    filters = [{"name": "userId", "value": [str(i)]} for i in range(3)]
    async with running_hub(max_filters=2) as h:
        reply = await http(h.port, "POST", "/public/p1/assist/sessions", {"filters": filters})
        assert reply.status == 400 and "limit of 2" in reply.json()["error"]
        two = await http(h.port, "POST", "/public/p1/assist/sessions", {"filters": filters[:2]})
        assert two.status == 200
        assert await limit_count(h.port, "max_filters") == 1
        async with agent(h, "p1", API_KEY) as a:
            await a.send(json.dumps({"type": "subscribe", "filters": filters}))
            answer = json.loads(await asyncio.wait_for(a.recv(), 5))
            assert answer["type"] == "error" and "limit of 2" in answer["message"]
            assert answer["code"] == "limit_exceeded"
        assert await limit_count(h.port, "max_filters") == 2, "the subscribe counts as well"


async def test_idle_agent_is_closed_with_4000() -> None:
    """A client that never answers the hub's keepalive ping (a raw socket) is idle."""
    async with running_hub(agent_idle_timeout=1.0) as h:
        ws = await RawWs.connect(h.port, "/ws/agent/p1", headers={"Authorization": f"Bearer {API_KEY}"})
        opcodes: list[tuple[int, bytes]] = []
        while not opcodes or opcodes[-1][0] != 0x8:
            opcodes.append(await asyncio.wait_for(ws.recv(), 5))
        assert int.from_bytes(opcodes[-1][1][:2], "big") == 4000
        ws.close()
        assert await limit_count(h.port, "idle_timeout") == 1


async def test_frame_body_header_and_handshake_limits_are_counted() -> None:
    async with running_hub(max_frame=1024, max_http_body=100, max_header=2048, handshake_timeout=1.0) as h:
        async with websockets.connect(h.tracker_url()) as ws:
            await ws.send("x" * 2000)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == 1009
        big = await http(h.port, "POST", "/public/p1/assist/sessions", "x" * 200)
        assert big.status == 413
        tall = await http(h.port, "GET", "/healthz", headers={"X-Big": "y" * 3000})
        assert tall.status == 431
        # OpenReplay's handshake carries its sessionInfo JSON in the query: 64 KiB of head there.
        info = json.dumps({"sessionID": "s1", "metadata": {f"note{i}": "n" * 1000 for i in range(30)}})
        query = urlencode({"EIO": 4, "transport": "websocket", "peerId": "p1-s1-t1", "identity": "session",
                           "tabId": "t1", "sessionInfo": info})  # fmt: skip
        async with websockets.connect(f"ws://127.0.0.1:{h.port}/ws-assist/socket/?{query}") as sio:
            assert (await asyncio.wait_for(sio.recv(), 5))[:1] == "0", "the Engine.IO open packet"
        too_tall = await http(h.port, "GET", "/ws-assist/socket/", headers={"X-Big": "y" * 70_000})
        assert too_tall.status == 431
        _, writer = await asyncio.open_connection("127.0.0.1", h.port)
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # and never the rest
        await wait_for(lambda: h.hub.server.limits["handshake_timeout"] == 1)
        writer.close()
        await wait_for(lambda: h.hub.server.limits["max_frame"] == 1)
        expected = {"max_frame": 1, "max_http_body": 1, "max_header": 2, "handshake_timeout": 1}
        for name, count in expected.items():
            assert await limit_count(h.port, name) == count, name


# Origin ----------------------------------------------------------------


async def test_tracker_origin_allow_list() -> None:
    async with running_hub(tracker_origins=("https://shop.example",)) as h:
        async with websockets.connect(h.tracker_url(), origin="https://SHOP.example") as ws:  # type: ignore[arg-type]
            assert (await start(ws, sessionID="ok"))["type"] == "started"
        for origin in ("https://evil.example", None):
            with pytest.raises(InvalidStatus) as refused:
                await websockets.connect(h.tracker_url(), origin=origin)  # type: ignore[arg-type]
            assert refused.value.response.status_code == 403
        # Agents authenticate with a key; the allow-list is for trackers only.
        async with agent(h, "p1", API_KEY):
            pass
        assert await limit_count(h.port, "tracker_origin") == 2


# CORS (issue 15, defect 8) ------------------------------------------------

DASHBOARD = "https://dash.example"
PREFLIGHT = {
    "Origin": DASHBOARD,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}


def access_control(headers: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in headers.items() if name.startswith("access-control-")}


@pytest.mark.parametrize(
    "path", ["/public/p1/assist/sessions", "/public/p1/assist/sessions/s1", "/openapi.json"]
)
async def test_a_preflight_from_an_allowed_origin_is_a_204_without_a_key(path: str) -> None:
    async with running_hub(cors_origins=(DASHBOARD, "http://localhost:3000")) as h:
        reply = await http(h.port, "OPTIONS", path, key=None, headers=PREFLIGHT)
        assert reply.status == 204 and reply.body == b""
        granted = access_control(reply.headers)
        assert granted["access-control-allow-origin"] == DASHBOARD
        methods = {m.strip() for m in granted["access-control-allow-methods"].split(",")}
        assert {"GET", "POST", "HEAD", "OPTIONS"} <= methods
        allowed = {m.strip().lower() for m in granted["access-control-allow-headers"].split(",")}
        assert {"authorization", "content-type"} <= allowed
        assert int(granted["access-control-max-age"]) > 0
        assert reply.headers["vary"] == "Origin"


async def test_answers_to_an_allowed_origin_carry_allow_origin_errors_included() -> None:
    async with running_hub(cors_origins=(DASHBOARD,), projects={"p1": 1}) as h:
        origin = {"Origin": DASHBOARD}
        answers = [
            await http(h.port, "GET", "/public/p1/assist/sessions", headers=origin),
            await http(h.port, "POST", "/public/p1/assist/sessions", {"limit": 1}, headers=origin),
            await http(h.port, "HEAD", "/public/p1/assist/sessions", headers=origin),
            await http(h.port, "GET", "/public/p1/assist/sessions", headers=origin, key=None),
            await http(h.port, "GET", "/public/nope/assist/sessions", headers=origin),
            await http(h.port, "GET", "/public/p1/assist/sessions/missing", headers=origin),
            await http(h.port, "GET", "/public/p1/assist/sessions?limit=x", headers=origin),
            await http(h.port, "DELETE", "/public/p1/assist/sessions", headers=origin),
            await http(h.port, "GET", "/openapi.json", headers=origin, key=None),
        ]
        assert [a.status for a in answers] == [200, 200, 200, 401, 404, 404, 400, 405, 200]
        for answer in answers:
            assert answer.headers["access-control-allow-origin"] == DASHBOARD
            assert answer.headers["vary"] == "Origin"


async def test_other_origins_and_no_configuration_get_no_access_control_headers() -> None:
    async with running_hub(cors_origins=(DASHBOARD,)) as h:
        other = {**PREFLIGHT, "Origin": "https://evil.example"}
        reply = await http(h.port, "OPTIONS", "/public/p1/assist/sessions", key=None, headers=other)
        assert reply.status == 204 and access_control(reply.headers) == {}
        reply = await http(
            h.port, "GET", "/public/p1/assist/sessions", headers={"Origin": "https://evil.example"}
        )
        assert reply.status == 200 and access_control(reply.headers) == {}
        assert (await http(h.port, "OPTIONS", "/healthz", key=None, headers=PREFLIGHT)).status == 405
    async with running_hub() as h:
        reply = await http(h.port, "OPTIONS", "/public/p1/assist/sessions", key=None, headers=PREFLIGHT)
        assert reply.status == 204 and access_control(reply.headers) == {}
        assert "OPTIONS" in reply.headers["allow"]
        reply = await http(h.port, "GET", "/public/p1/assist/sessions", headers={"Origin": DASHBOARD})
        assert reply.status == 200 and access_control(reply.headers) == {} and "vary" not in reply.headers


async def test_cors_star_allows_any_origin() -> None:
    async with running_hub(cors_origins=("*",)) as h:
        reply = await http(h.port, "OPTIONS", "/public/p1/assist/sessions", key=None, headers=PREFLIGHT)
        assert reply.headers["access-control-allow-origin"] == DASHBOARD
        reply = await http(h.port, "GET", "/public/p1/assist/sessions", headers={"Origin": "null"})
        assert reply.headers["access-control-allow-origin"] == "null"


def test_cors_origins_setting() -> None:
    settings = parse_settings(["serve", "--cors-origins", "https://Dash.example/, http://localhost:3000"], {})
    assert settings.cors_origins == ("https://dash.example", "http://localhost:3000")
    assert parse_settings(["serve"], {"HUB_CORS_ORIGINS": "*"}).cors_origins == ("*",)
    assert parse_settings(["serve"], {}).cors_origins is None
    for bad in ("dash.example", "https://dash.example/app", "ftp://x", "https://x:99999", ","):
        with pytest.raises(ConfigError, match="cors-origins"):
            parse_settings(["serve", "--cors-origins", bad], {})
