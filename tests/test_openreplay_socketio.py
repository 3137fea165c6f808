"""OpenReplay's own clients against the hub (CONTRACT §8): the real tracker in Chromium, python-socketio
as OpenReplay's dashboard, side by side with the native protocol, on one node and across two.

The page loads the npm releases of ``@openreplay/tracker`` and ``@openreplay/tracker-assist``
(``tests/openreplay/dist/openreplay.js``, built by ``make``) and a stub of OpenReplay's ingest: its
``POST /ingest/v1/web/start`` answers the session id the test chose (docs/openreplay.md §6). The
page is served from ``localhost`` (the assist plugin needs a secure context) and opens the hub at
``127.0.0.1``. It records the WebSocket frames it receives (``window.framesIn``), so the test sees
what the tracker was told. The agent is python-socketio's ``AsyncClient`` with an HS512 JWT, as
OpenReplay's backend mints one.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import jwt
import pytest
import socketio
import websockets
from playwright.async_api import BrowserContext, Page

from tests import test_browser
from tests.helpers import API_KEY, FrameLog, HubProcess, MixedLog, http, running_hub, serve_site, wait_for
from tests.redis_server import RedisServer, have_redis
from tests.test_browser import browser, set_hidden

__all__ = ["browser"]  # the fixture, found by pytest in this module's namespace
needs_chromium = test_browser.pytestmark

BUNDLE = Path(__file__).parent / "openreplay" / "dist" / "openreplay.js"
KEY = "zK3dN8qP2mW5xR7tY1uA"  # an OpenReplay-style project key (20 characters)
SECRET = "a-test-secret-as-long-as-a-real-one-0123456789-0123456789-abcdef"
PATH = "/ws-assist/socket"

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>OR Shop · Home</title></head>
<body><h1>Shop</h1><button id="buy">Buy</button>
<script>
  // What the tracker is told, as it arrives (the page cannot reach the plugin's socket).
  window.framesIn = [];
  const NativeWebSocket = window.WebSocket;
  window.WebSocket = class extends NativeWebSocket {
    constructor(...args) {
      super(...args);
      this.addEventListener("message", (e) =>
        window.framesIn.push(typeof e.data === "string" ? e.data : "<binary>"));
    }
  };
</script>
<script src="/openreplay.js"></script>
<script>
  const tracker = new OpenReplay.Tracker({
    projectKey: "{{KEY}}", ingestPoint: location.origin + "/ingest", __DISABLE_SECURE_MODE: true,
  });
  tracker.use(OpenReplay.trackerAssist({socketHost: "{{HUB}}"}));
  window.started = tracker.start();
  window.tracker = tracker;
</script></body></html>
"""


def setup_module() -> None:
    if not BUNDLE.exists():
        pytest.skip(f"{BUNDLE} is not built (`make tests/openreplay/dist/openreplay.js`)")


@contextmanager
def openreplay_site(hub_port: int, session_id: str) -> Iterator[str]:
    """The page and OpenReplay's ingest stub; every start gets ``session_id``. Yields its origin."""
    html = PAGE.replace("{{KEY}}", KEY).replace("{{HUB}}", f"127.0.0.1:{hub_port}").encode()
    bundle = BUNDLE.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/openreplay.js":
                self._send(200, "application/javascript", bundle)
            elif self.path == "/favicon.ico":
                self._send(404, "text/plain", b"")
            else:
                self._send(200, "text/html; charset=utf-8", html)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.endswith("/v1/web/start"):
                answer = {
                    "token": "ingest-token",
                    "userUUID": "uuid-1",
                    "sessionID": session_id,
                    "projectID": "1",
                    "delay": 0,
                    "startTimestamp": int(time.time() * 1000),
                    "assistOnly": True,
                }
                self._send(200, "application/json", json.dumps(answer).encode())
            else:
                self._send(200, "application/json", b"{}")

        def do_OPTIONS(self) -> None:
            self._send(204, "text/plain", b"")

        def _send(self, status: int, kind: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Access-Control-Allow-Headers", "*")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    with serve_site(Handler) as origin:
        yield origin


async def open_page(browser: BrowserContext, site: str) -> Page:
    page = await browser.new_page()
    await page.goto(site + "/")
    await page.wait_for_function("window.framesIn.some(f => f.startsWith('40{'))", timeout=15_000)
    return page


async def told(page: Page, prefix: str) -> list[Any]:
    """The Socket.IO events the page received whose frame starts with ``prefix`` (e.g. ``42["NEW_AGENT"``)."""
    frames: list[str] = await page.evaluate("window.framesIn")
    return [json.loads(f[2:]) for f in frames if f.startswith(prefix)]


# OpenReplay's backend reads the same sessions through its assist API (sockets-live).
ASSIST_KEY = "or-assist-key"


async def session(port: int, session_id: str, assist: bool = False, **expect: Any) -> dict[str, Any]:
    """The live session (through /public/, and with ``assist`` through OpenReplay's
    ``sockets-live`` too), once it has ``expect``'s fields in both."""

    async def check() -> dict[str, Any] | None:
        reply = await http(port, "GET", f"/public/{KEY}/assist/sessions/{session_id}")
        if reply.status != 200:
            return None
        data: dict[str, Any] = reply.json()["data"]
        if not all(data.get(k) == v for k, v in expect.items()):
            return None
        if assist:
            path = f"/assist/{ASSIST_KEY}/sockets-live/{KEY}/{session_id}"
            live = (await http(port, "GET", path, key=None)).json()["data"]
            if live is None or not all(live.get(k) == v for k, v in expect.items()):
                return None
        return data

    found: dict[str, Any] = await wait_for(check, timeout=10, what=f"session {session_id} with {expect}")
    return found


def agent_token(session_id: str, project: str = KEY, algorithm: str = "HS512", ttl: int = 3600) -> str:
    """An agent token as OpenReplay's backend mints one (api/chalicelib/core/assist.py)."""
    now = int(time.time())
    claims = {
        "projectKey": project,
        "projectId": 1,
        "sessionId": session_id,
        "iat": now,
        "exp": now + ttl,
        "iss": "openreplay-oss",
        "aud": "openreplay:agent",
    }
    return jwt.encode(claims, SECRET, algorithm=algorithm)


class Agent:
    """OpenReplay's dashboard as python-socketio plays it: every event it receives, in order."""

    def __init__(self) -> None:
        self.client = socketio.AsyncClient(reconnection=False)
        self.events: list[tuple[str, tuple[Any, ...]]] = []

        # What a refused CONNECT said (OpenReplay's ``44{"message":…}``).
        self.refused: Any = None

        @self.client.on("*")
        async def record(event: str, *args: Any) -> None:
            self.events.append((event, args))

        @self.client.on("connect_error")
        async def refused(data: Any) -> None:
            self.refused = data

    def of(self, name: str) -> list[tuple[Any, ...]]:
        return [args for event, args in self.events if event == name]

    @property
    def sid(self) -> str:
        sid = self.client.get_sid()
        assert sid is not None
        return sid


async def connect(a: Agent, port: int, session_id: str, token: str | None, info: dict[str, Any]) -> None:
    agent_info = json.dumps(info or {"name": "Ann"})
    query = urllib.parse.urlencode(
        {"peerId": f"{KEY}-{session_id}", "identity": "agent", "agentInfo": agent_info}
    )
    await a.client.connect(
        f"http://127.0.0.1:{port}/?{query}",
        socketio_path=PATH,
        transports=["websocket"],
        auth={"token": token if token is not None else agent_token(session_id)},
        wait_timeout=5,
    )


@asynccontextmanager
async def agent(port: int, session_id: str, token: str | None = None, **info: Any) -> AsyncIterator[Agent]:
    a = Agent()
    await connect(a, port, session_id, token, info)
    try:
        yield a
    finally:
        await a.client.disconnect()


async def refusal(port: int, session_id: str, token: str) -> Any:
    """What the hub answers an agent's CONNECT with ``token`` (it must refuse it)."""
    a = Agent()
    with pytest.raises(socketio.exceptions.ConnectionError):
        await connect(a, port, session_id, token, {})
    await a.client.disconnect()
    return a.refused


# -- the real tracker in Chromium ----------------------------------------------------------


@needs_chromium
async def test_the_tracker_registers_its_session_with_openreplays_fields(browser: BrowserContext) -> None:
    sid = "7100000000000001"
    async with running_hub(grace=1.0, assist_key=ASSIST_KEY) as h:
        with openreplay_site(h.port, sid) as site:
            page = await open_page(browser, site)
            found = await session(h.port, sid, True, pageTitle="OR Shop · Home")
            assert found["projectKey"] == KEY and found["trackerVersion"] == "19.0.1"
            assert found["userOs"] == "Linux" and found["userBrowser"]
            assert found["userUUID"] == "uuid-1" and found["active"] is True and found["tabs"] == 1
            await page.evaluate("tracker.setUserID('ann@example.com')")
            await page.evaluate("tracker.setMetadata('plan', 'pro')")
            await session(h.port, sid, True, userID="ann@example.com", metadata={"plan": "pro"})
            await set_hidden(page, True)
            await session(h.port, sid, True, active=False)
            await set_hidden(page, False)
            await session(h.port, sid, True, active=True)
            # OpenReplay's backend lists it too, with its filter on a metadata key.
            body = {"filter": {"plan": {"values": ["pro"], "operator": "is"}}}
            reply = await http(h.port, "POST", f"/assist/{ASSIST_KEY}/sockets-live/{KEY}", body, key=None)
            assert [s["sessionID"] for s in reply.json()["data"]["sessions"]] == [sid]

            # A second tab of the same session; a reload resumes.
            second = await open_page(browser, site)
            await session(h.port, sid, True, tabs=2)
            await second.reload()
            await second.wait_for_function("window.framesIn.some(f => f.startsWith('40{'))")
            await session(h.port, sid, True, tabs=2, connected=True)

            # Closed: connected false, then ended after the grace.
            await second.close()
            await page.close()
            await session(h.port, sid, True, connected=False, tabs=0)

            async def gone() -> bool:
                path = f"/assist/{ASSIST_KEY}/sockets-live/{KEY}/{sid}"
                answer = (await http(h.port, "GET", path, key=None)).json()
                return (await http(h.port, "GET", f"/public/{KEY}/assist/sessions/{sid}")).status == 404 and (
                    answer == {"data": None}
                )

            await wait_for(gone, timeout=10, what="the session ends after its grace")


@needs_chromium
async def test_an_agent_with_a_jwt_watches_the_page_and_reaches_it(browser: BrowserContext) -> None:
    sid = "7100000000000002"
    async with running_hub(openreplay_jwt_secret=SECRET) as h:
        with openreplay_site(h.port, sid) as site:
            page = await open_page(browser, site)
            await session(h.port, sid, tabs=1)
            assert await told(page, '42["NEW_AGENT"') == []
            async with agent(h.port, sid, name="Ann", email="ann@example.com") as a:
                # The page is told, restarts and streams; the agent gets its messages.
                new = await wait_for(lambda: told(page, '42["NEW_AGENT"'), what="NEW_AGENT on the page")
                assert new == [["NEW_AGENT", a.sid, {"name": "Ann", "email": "ann@example.com"}]]
                await wait_for(lambda: len(a.of("messages")) >= 3, what="the page's messages")
                envelope = a.of("messages")[0][0]
                tab_id = envelope["meta"]["tabId"]
                assert isinstance(envelope["data"], list) and envelope["data"]
                assert a.of("SESSION_DISCONNECTED") == []
                # The restart's UPDATE_SESSION reaches agents too.
                await wait_for(lambda: a.of("UPDATE_SESSION"), what="UPDATE_SESSION")

                # The agent's event reaches the tab, naming the agent, in OpenReplay's envelope.
                await a.client.emit("_agent_name", {"meta": {"tabId": tab_id}, "data": "Ann"})
                got = await wait_for(lambda: told(page, '42["_agent_name"'), what="the agent's event")
                assert got == [["_agent_name", a.sid, {"meta": {"tabId": tab_id}, "data": "Ann"}]]

                # A bad token is refused as OpenReplay refuses it; another session's token too.
                assert await refusal(h.port, sid, "not-a-token") == {"message": "Authentication error"}
                other = agent_token("7100000000000999")
                assert await refusal(h.port, sid, other) == {"message": "Authorization error"}
                expired = agent_token(sid, ttl=-10)
                assert await refusal(h.port, sid, expired) == {"message": "Authentication error"}
            # The agent left: the page is told.
            await wait_for(lambda: told(page, '42["AGENT_DISCONNECTED"'), what="AGENT_DISCONNECTED")
            await wait_for(lambda: told(page, '42["NO_AGENT"'), what="NO_AGENT")
            await page.close()


@needs_chromium
@pytest.mark.skipif(not have_redis(), reason="redis-server is not installed")
async def test_across_two_nodes_the_page_on_one_its_agents_on_the_other(browser: BrowserContext) -> None:
    sid = "7100000000000003"
    common = ("--api-key", API_KEY, "--openreplay-jwt-secret", SECRET, "--log-level", "warning")
    with (
        RedisServer() as redis,
        HubProcess("--redis-url", redis.url, *common) as a,
        HubProcess("--redis-url", redis.url, *common) as b,
    ):
        a.wait_ready(path="/readyz")
        b.wait_ready(path="/readyz")
        with openreplay_site(a.port, sid) as site:
            page = await open_page(browser, site)
            await session(b.port, sid, tabs=1, trackerVersion="19.0.1")  # node B's index has it
            async with (
                agent(b.port, sid, name="Bo") as watcher,
                websockets.connect(f"ws://127.0.0.1:{b.port}/ws/agent/{KEY}?token={API_KEY}") as ws,
            ):
                native = FrameLog(ws)
                await ws.send(json.dumps({"type": "join", "sessionID": sid, "agent": {"name": "Nat"}}))
                await wait_for(lambda: told(page, '42["NEW_AGENT"'), what="NEW_AGENT across nodes")
                await wait_for(lambda: len(watcher.of("messages")) >= 2, what="messages across nodes")
                tab_id = watcher.of("messages")[0][0]["meta"]["tabId"]
                events = await wait_for(
                    lambda: [f for f in native.frames if f.get("type") == "session.event"],
                    what="a native agent's session.event across nodes",
                )
                assert events[0]["sessionID"] == sid and events[0]["tab"] == tab_id
                assert {e["event"] for e in events} <= {"messages", "UPDATE_SESSION", "webrtc_canvas_restart"}
                await watcher.client.emit("_agent_name", {"meta": {"tabId": tab_id}, "data": "Bo"})
                got = await wait_for(lambda: told(page, '42["_agent_name"'), what="the agent's event on A")
                assert got[0][1] == watcher.sid
                # A native agent's event, to every tab: each gets it in its own envelope.
                await ws.send(
                    json.dumps({"type": "send", "sessionID": sid, "event": "_agent_name", "data": "Nat"})
                )

                async def from_native() -> list[Any]:
                    return [e for e in await told(page, '42["_agent_name"') if e[2]["data"] == "Nat"]

                got = await wait_for(from_native, what="the native agent's event on the page")
                assert got[0][2]["meta"] == {"tabId": tab_id}
            await page.close()


# -- side by side with the native protocol (python-socketio plays the tab) -------------------


def session_info(session_id: str, **fields: Any) -> str:
    """What tracker 19.0.1 sends as ``sessionInfo`` (docs/openreplay.md §6)."""
    info = {
        "pageTitle": "Checkout",
        "active": True,
        "assistOnly": True,
        "sessionID": session_id,
        "metadata": {},
        "userID": None,
        "timestamp": 1_700_000_000_000,
        "projectID": "1",
        "userUUID": "uuid-9",
        "projectKey": KEY,
        "revID": "",
        "trackerVersion": "19.0.1",
        "isSnippet": False,
        **fields,
    }
    return json.dumps(info)


@asynccontextmanager
async def sio_tab(port: int, session_id: str, tab_id: str, **fields: Any) -> AsyncIterator[Agent]:
    """A tab as tracker-assist opens it (the recorder is the same as an agent's)."""
    tab = Agent()
    query = urllib.parse.urlencode(
        {
            "peerId": f"{KEY}-{session_id}-{tab_id}",
            "identity": "session",
            "tabId": tab_id,
            "sessionInfo": session_info(session_id, **fields),
        }
    )
    await tab.client.connect(
        f"http://127.0.0.1:{port}/?{query}",
        socketio_path=PATH + "/",
        transports=["websocket"],
        wait_timeout=5,
    )
    try:
        yield tab
    finally:
        await tab.client.disconnect()


async def test_a_native_agent_watches_a_socketio_tab() -> None:
    sid = "7100000000000004"
    async with (
        running_hub() as h,
        sio_tab(h.port, sid, "tabA") as tab,
        websockets.connect(f"ws://127.0.0.1:{h.port}/ws/agent/{KEY}?token={API_KEY}") as ws,
    ):
        native = MixedLog(ws)
        await ws.send(json.dumps({"type": "join", "sessionID": sid, "agent": {"name": "Nat"}}))
        joined = await wait_for(lambda: native.of("joined"), what="joined")
        assert joined == [{"type": "joined", "sessionID": sid, "tabs": ["tabA"]}]
        new = await wait_for(lambda: tab.of("NEW_AGENT"), what="NEW_AGENT on the Socket.IO tab")
        agent_id = new[0][0]
        assert new == [(agent_id, {"name": "Nat"})]

        # The tab's events: unwrapped for the native agent, a binary event as a binary frame.
        await tab.client.emit("messages", {"meta": {"tabId": "tabA"}, "data": [[0, 1], [118, "tabA"]]})
        await tab.client.emit("webrtc_call_answer", {"from": "x", "answer": "sdp"})  # raw: no meta
        await tab.client.emit("messages_gz", {"meta": {"tabId": "tabA"}, "data": b"\x1f\x8b\x00gz"})
        events = await wait_for(lambda: len(native.of("session.event")) == 2 and native.of("session.event"))
        assert events == [
            {
                "type": "session.event",
                "sessionID": sid,
                "tab": "tabA",
                "event": "messages",
                "data": [[0, 1], [118, "tabA"]],
            },
            {
                "type": "session.event",
                "sessionID": sid,
                "tab": "tabA",
                "event": "webrtc_call_answer",
                "data": {"from": "x", "answer": "sdp"},
            },
        ]
        await wait_for(lambda: native.binary, what="the binary event")
        n = int.from_bytes(native.binary[0][:2], "big")
        header = json.loads(native.binary[0][2 : 2 + n])
        assert header == {"sessionID": sid, "tab": "tabA", "event": "messages_gz"}
        assert native.binary[0][2 + n :] == b"\x1f\x8b\x00gz"

        # The native agent's events reach the tab in OpenReplay's shape.
        await ws.send(
            json.dumps({"type": "send", "sessionID": sid, "event": "click", "data": [3, 4], "tab": "tabA"})
        )
        clicks = await wait_for(lambda: tab.of("click"), what="the click on the tab")
        assert clicks == [(agent_id, {"meta": {"tabId": "tabA"}, "data": [3, 4]})]

        # One record, whichever protocol: the native agent's subscription sees the tab's update.
        await ws.send(json.dumps({"type": "subscribe", "sessionID": sid}))
        snapshot = await wait_for(lambda: native.of("snapshot"), what="the snapshot")
        assert snapshot[0]["sessions"][0]["pageTitle"] == "Checkout"
        await tab.client.emit("UPDATE_SESSION", {"meta": {"tabId": "tabA"}, "data": {"pageTitle": "Paid"}})
        update = await wait_for(lambda: native.of("session.update"), what="the update")
        assert update[0]["changes"]["pageTitle"] == "Paid"
        native.task.cancel()


async def test_a_socketio_agent_with_a_hub_key_watches_a_native_tab() -> None:
    sid = "7100000000000005"
    async with running_hub() as h, websockets.connect(f"ws://127.0.0.1:{h.port}/ws/tracker/{KEY}") as ws:
        tracker = MixedLog(ws)
        await ws.send(json.dumps({"type": "start", "sessionID": sid, "tabId": "t-1", "pageTitle": "Native"}))
        await wait_for(lambda: tracker.of("started"), what="started")
        async with agent(h.port, sid, token=f"Bearer {API_KEY}", name="Ann") as a:
            notice = await wait_for(lambda: tracker.of("agents"), what="the agents notice")
            assert notice[-1]["agents"] == [{"id": a.sid, "agent": {"name": "Ann"}}]
            await ws.send(json.dumps({"type": "emit", "event": "click", "data": {"path": "main > a"}}))
            await ws.send(b"\x00\x01binary")
            clicks = await wait_for(lambda: a.of("click"), what="the click at the agent")
            assert clicks == [({"meta": {"tabId": "t-1"}, "data": {"path": "main > a"}},)]
            binary = await wait_for(lambda: a.of("binary"), what="the binary frame at the agent")
            assert binary == [({"meta": {"tabId": "t-1"}, "data": b"\x00\x01binary"},)]

            await a.client.emit("request_control", {"meta": {"tabId": "t-1"}, "data": {"name": "Ann"}})
            events = await wait_for(lambda: tracker.of("agent.event"), what="the agent's event at the tab")
            assert events == [
                {"type": "agent.event", "agent": a.sid, "event": "request_control", "data": {"name": "Ann"}}
            ]

            # A second tab of the session connects: the Socket.IO agent is told.
            async with sio_tab(h.port, sid, "tabB"):
                await wait_for(lambda: a.of("SESSION_RECONNECTED"), what="SESSION_RECONNECTED")
                found = await session(h.port, sid, tabs=2)
                assert found["pageTitle"] == "Checkout"  # the later start's fields, as a native start's
            await ws.close()
            await wait_for(lambda: a.of("SESSION_DISCONNECTED"), what="SESSION_DISCONNECTED")
            await session(h.port, sid, tabs=0, connected=False)
        tracker.task.cancel()


async def test_a_duplicate_tab_is_refused_as_openreplay_refuses_it() -> None:
    sid = "7100000000000006"
    async with running_hub() as h, sio_tab(h.port, sid, "tabA") as first:
        second = Agent()
        query = urllib.parse.urlencode(
            {
                "peerId": f"{KEY}-{sid}-tabA",
                "identity": "session",
                "tabId": "tabA",
                "sessionInfo": session_info(sid),
            }
        )
        await second.client.connect(
            f"http://127.0.0.1:{h.port}/?{query}",
            socketio_path="/socket",
            transports=["websocket"],
            wait_timeout=5,
        )
        await wait_for(lambda: second.of("SESSION_ALREADY_CONNECTED"), what="SESSION_ALREADY_CONNECTED")
        await wait_for(lambda: not second.client.connected, what="the second socket disconnected")
        assert first.client.connected
        found = await session(h.port, sid, tabs=1)
        assert found["connected"] is True


async def test_handshakes_the_hub_refuses() -> None:
    async with running_hub(projects={"known": 1}) as h:
        for query, status in (
            ("EIO=3&transport=websocket&peerId=known-1-t&identity=session&tabId=t&sessionInfo={}", 400),
            ("EIO=4&transport=websocket&peerId=other-1-t&identity=session&tabId=t&sessionInfo={}", 404),
            ("EIO=4&transport=websocket&peerId=known-1-t&identity=session&tabId=t", 400),
            ("EIO=4&transport=websocket&peerId=known-1-t&identity=session&tabId=t&sessionInfo=[1]", 400),
            ("EIO=4&transport=websocket&peerId=known-1&identity=spy", 400),
        ):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(f"ws://127.0.0.1:{h.port}{PATH}/?{query}"):
                    pass
            assert refused.value.response.status_code == status, query
