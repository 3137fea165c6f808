"""OpenReplay's Socket.IO protocol without a socket (hub/openreplay.py): the handshake, the token,
and tabs and agents driven frame by frame through a real Registry and Relay, with a fake clock.

Each connection is a ``Conn`` recording what the endpoint sends (what the transport would write);
``now`` is the Unix ms each call takes. The transport's Engine.IO heartbeat itself is
``websocket.Heartbeat``'s (tests/test_transport.py); here a pong is a frame like any other.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from typing import Any

import jwt
import msgspec
import pytest

from hub.auth import Auth
from hub.config import Settings
from hub.counts import tracker_counts
from hub.http_api import Request
from hub.openreplay import (
    AgentAuth,
    AgentEndpoint,
    AgentHello,
    Refused,
    SocketIOCodec,
    TabEndpoint,
    TabHello,
    paths,
    read_handshake,
    split_peer_id,
    start_of,
    update_of,
)
from hub.relay import Codec, Join, Limits, Relay, Up, codec_of
from hub.replication import LocalReplication
from hub.wire import EndReason, InputError
from tests.helpers import recording_registry

KEY = "zK3dN8qP2mW5xR7tY1uA"
SECRET = "unit-secret-unit-secret-unit-secret-unit-secret-unit-secret-0001"
T0 = 1_800_000_000_000


class Conn:
    """A WebSocketConnection as the endpoints use it: frames recorded, nothing sent."""

    def __init__(self) -> None:
        self.text: list[bytes] = []
        self.binary: list[bytes] = []
        self.closed: tuple[int, str] | None = None
        self.pongs = 0
        self.windows: list[bool] = []
        self.joined = False  # the peer's CONNECT was accepted (the connect deadline is off)

    def send(self, frame: bytes) -> None:
        assert self.closed is None, "a frame after the close"
        self.text.append(frame)

    def send_binary(self, data: bytes) -> None:
        self.binary.append(data)

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def buffered(self) -> int:
        return 0

    def answered(self) -> None:
        self.pongs += 1

    def connected(self) -> None:
        self.joined = True

    def watched(self, on: bool) -> None:
        self.windows.append(on)

    def events(self) -> list[list[Any]]:
        """The Socket.IO events sent (``42[…]``), decoded."""
        return [json.loads(f[2:]) for f in self.text if f.startswith(b"42")]

    def names(self) -> list[str]:
        return [e[0] for e in self.events()]


def request(**query: str) -> Request:
    query.setdefault("EIO", "4")
    query.setdefault("transport", "websocket")
    return Request("GET", "/ws-assist/socket/", urllib.parse.urlencode(query), {"user-agent": "x"})


def info(session_id: str, **fields: Any) -> str:
    return json.dumps(
        {
            "pageTitle": "Home",
            "active": True,
            "sessionID": session_id,
            "metadata": {"plan": "pro"},
            "userID": None,
            "timestamp": 1_700_000_000_000,
            "projectID": "1",
            "userUUID": "u-1",
            "projectKey": KEY,
            "revID": "",
            "trackerVersion": "19.0.1",
            "isSnippet": False,
            **fields,
        }
    )


class World:
    """A registry, a relay with OpenReplay's codec, and connections made on them."""

    def __init__(self, grace_ms: int = 5_000, jwt_secret: str = SECRET) -> None:
        self.registry, self.events, _ = recording_registry(grace_ms=grace_ms)
        self.relay = Relay(Limits(), lambda p, s: self.registry.index.get(p, s) is not None)
        self.registry.listeners.append(self.relay)
        self.codec = SocketIOCodec(1 << 20)
        self.auth = AgentAuth(Auth("hub-key"), jwt_secret, ("HS256", "HS384", "HS512"))
        self.counts = tracker_counts()

    def tab(self, sid: str, tab_id: str, now: int = T0, **fields: Any) -> tuple[TabEndpoint, Conn]:
        hello = read_handshake(
            request(
                peerId=f"{KEY}-{sid}-{tab_id}",
                identity="session",
                tabId=tab_id,
                sessionInfo=info(sid, **fields),
            ),
            Settings(),
        )
        assert isinstance(hello, TabHello)
        conn = Conn()
        endpoint = TabEndpoint(conn, self.codec, hello, self.registry, self.relay, 0, self.counts, {})  # type: ignore[arg-type]
        endpoint.receive(b"40", now)
        return endpoint, conn

    def agent(self, sid: str, token: str, now: int = T0, **agent_info: Any) -> tuple[AgentEndpoint, Conn]:
        hello = read_handshake(
            request(peerId=f"{KEY}-{sid}", identity="agent", agentInfo=json.dumps(agent_info)), Settings()
        )
        assert isinstance(hello, AgentHello)
        conn = Conn()
        endpoint = AgentEndpoint(
            conn,
            self.codec,
            hello,
            self.relay,
            self.auth,
            lambda: now / 1000,
            LocalReplication(),  # type: ignore[arg-type]
        )
        endpoint.receive(b"40" + json.dumps({"token": token}).encode(), now)
        return endpoint, conn

    def session(self, sid: str) -> Any:
        return self.registry.index.get(KEY, sid)


def token(sid: str, project: str = KEY, secret: str = SECRET, algorithm: str = "HS512", **extra: Any) -> str:
    claims = {"projectKey": project, "projectId": 1, "sessionId": sid, "aud": "openreplay:agent", **extra}
    return jwt.encode(claims, secret, algorithm=algorithm)


# -- the handshake ---------------------------------------------------------------------------


def test_peer_ids_split_as_openreplay_means_them_even_with_dashes() -> None:
    assert split_peer_id(f"{KEY}-123-tabA", "tabA", None) == (KEY, "123", "tabA")
    assert split_peer_id(f"{KEY}-123", None, None) == (KEY, "123", "")
    # The hub's session ids may hold a dash; the tab comes from its own parameter.
    assert split_peer_id(f"{KEY}-a-b-c-tab-1", "tab-1", None) == (KEY, "a-b-c", "tab-1")
    # A configured project key with a dash is found whole.
    assert split_peer_id("my-shop-42-t", "t", {"my-shop": 1}) == ("my-shop", "42", "t")
    assert split_peer_id("my-shop-42", None, {"my-shop": 1, "my": 2}) == ("my-shop", "42", "")


def test_a_tabs_session_info_is_a_start_and_the_rest_is_openreplays_own() -> None:
    start = start_of("123", "tabA", json.loads(info("123", userID="ann@x.com")))
    assert (start.sessionID, start.tabId, start.timestamp) == ("123", "tabA", 1_700_000_000_000)
    assert (start.pageTitle, start.userID, start.userUUID, start.trackerVersion) == (
        "Home",
        "ann@x.com",
        "u-1",
        "19.0.1",
    )
    assert start.metadata == {"plan": "pro"} and start.active is True
    with pytest.raises(InputError):
        start_of("123", "tabA", {"userID": 5})
    update = update_of({"active": False, "agentIds": [], "isCallActive": False, "timestamp": 5})
    assert update.active is False and msgspec.structs.asdict(update)["pageTitle"] is msgspec.UNSET


def test_handshakes_are_read_or_refused_with_a_status() -> None:
    hello = read_handshake(
        request(peerId=f"{KEY}-9-t1", identity="session", tabId="t1", sessionInfo=info("9")), Settings()
    )
    assert isinstance(hello, TabHello) and (hello.project, hello.session_id, hello.tab_id) == (KEY, "9", "t1")
    agent = read_handshake(request(peerId=f"{KEY}-9", identity="agent", agentInfo='{"name":"A"}'), Settings())
    assert isinstance(agent, AgentHello) and agent.info == {"name": "A"} and agent.token is None
    refusals = [
        (request(EIO="3", peerId=f"{KEY}-9", identity="agent"), 400),
        (request(transport="polling", peerId=f"{KEY}-9", identity="agent"), 400),
        (request(peerId=f"{KEY}-9", identity="tab"), 400),
        (request(peerId=f"{KEY}-9-t", identity="session", tabId="t"), 400),  # no sessionInfo
        (request(peerId=f"{KEY}-9-t", identity="session", tabId="t", sessionInfo="{"), 400),
        (request(peerId=f"{KEY}-9-t", identity="session", tabId="t", sessionInfo="[" * 40 + "]" * 40), 400),
        (request(peerId=f"{KEY}-bad id-t", identity="session", tabId="t", sessionInfo="{}"), 400),
        (request(peerId=f"{KEY}-9-t t", identity="session", tabId="t t", sessionInfo="{}"), 400),
        (request(peerId=f"{KEY}-9", identity="agent", agentInfo="[]"), 400),
        (request(peerId="unknown-9", identity="agent"), 404),
    ]
    for req, status in refusals:
        settings = Settings(projects={KEY: 1}) if status == 404 else Settings()
        with pytest.raises(Refused) as refused:
            read_handshake(req, settings)
        assert refused.value.status == status, req.query


def test_paths_with_and_without_the_slash_and_as_openreplays_proxy_strips_them() -> None:
    assert paths("/ws-assist/socket") == ["/ws-assist/socket/", "/ws-assist/socket", "/socket/", "/socket"]
    assert paths("/socket/") == ["/socket/", "/socket"]


def test_agent_tokens_a_hub_key_or_openreplays_jwt_for_that_session() -> None:
    auth = AgentAuth(Auth("hub-key", {"other": ("other-key",)}), SECRET, ("HS256", "HS384", "HS512"))
    assert auth.check("hub-key", KEY, "9") is None
    assert auth.check("Bearer hub-key", KEY, "9") is None
    assert auth.check("other-key", KEY, "9") == "Authentication error"  # another project's key
    for algorithm in ("HS256", "HS384", "HS512"):
        assert auth.check(token("9", algorithm=algorithm), KEY, "9") is None, algorithm
    assert auth.check(token(9), KEY, "9") is None  # OpenReplay's Go API writes the id as a number
    assert auth.check(token("8"), KEY, "9") == "Authorization error"
    assert auth.check(token("9", project="elsewhere"), KEY, "9") == "Authorization error"
    assert auth.check(token("9", secret="x" * 64), KEY, "9") == "Authentication error"
    assert auth.check(token("9", exp=int(time.time()) - 5), KEY, "9") == "Authentication error"
    assert auth.check(None, KEY, "9") == "Authentication error"
    without_secret = AgentAuth(Auth("hub-key"), "", ("HS512",))
    assert without_secret.check(token("9"), KEY, "9") == "Authentication error"


def test_a_refused_agent_keeps_its_connect_deadline_an_accepted_one_does_not() -> None:
    world = World()
    _, refused = world.agent("9", "wrong-key")
    assert refused.text[-1].startswith(b"44") and not refused.joined, "the connect deadline still runs"
    _, accepted = world.agent("9", "hub-key")
    assert accepted.text[0].startswith(b"40") and accepted.joined


# -- tabs and agents, frame by frame ----------------------------------------------------------


def test_a_tab_registers_updates_heartbeats_and_waits_out_its_grace() -> None:
    world = World(grace_ms=5_000)
    tab, conn = world.tab("9", "t1", T0)
    assert conn.text[0].startswith(b'40{"sid":')
    session = world.session("9")
    assert (session.pageTitle, session.trackerVersion, session.tabs, session.lastActiveAt) == (
        "Home",
        "19.0.1",
        1,
        T0,
    )
    assert world.events.take()[0] == ("started", "9")

    # Each pong is a heartbeat: lastActiveAt moves with the fake clock.
    tab.receive(b"3", T0 + 25_000)
    assert conn.pongs == 1 and world.session("9").lastActiveAt == T0 + 25_000

    # UPDATE_SESSION merges as OpenReplay deep-merges: metadata by key, fields replaced.
    update = {"meta": {"tabId": "t1"}, "data": {"metadata": {"seat": "12A"}, "userID": "ann@x.com"}}
    tab.receive(b"42" + json.dumps(["UPDATE_SESSION", update]).encode(), T0 + 26_000)
    session = world.session("9")
    assert session.metadata == {"plan": "pro", "seat": "12A"} and session.userID == "ann@x.com"
    tab.receive(b'42["UPDATE_SESSION",{"meta":{"tabId":"t1"},"data":{"active":false}}]', T0 + 27_000)
    assert world.session("9").active is False
    # Bad fields change nothing (and are counted), as a native update's.
    tab.receive(b'42["UPDATE_SESSION",{"meta":{"tabId":"t1"},"data":{"userID":7}}]', T0 + 28_000)
    assert world.session("9").userID == "ann@x.com" and world.counts.errors

    # A close starts the grace; the sweep ends it at the deadline, not before.
    tab.closed(T0 + 30_000, timed_out=False)
    assert world.session("9").connected is False and world.session("9").tabs == 0
    world.registry.sweep(T0 + 34_999)
    assert world.session("9") is not None
    world.registry.sweep(T0 + 35_000)
    assert world.session("9") is None
    assert world.events.take()[-1] == ("ended", "9", EndReason.DISCONNECTED)


def test_a_ping_timeout_ends_as_a_timeout_and_a_reload_resumes_within_the_grace() -> None:
    world = World(grace_ms=5_000)
    tab, _ = world.tab("9", "t1", T0)
    tab.closed(T0 + 1_000, timed_out=True)
    again, _ = world.tab("9", "t1", T0 + 3_000)
    assert world.session("9").connected is True and world.session("9").tabs == 1
    world.registry.sweep(T0 + 60_000)
    assert world.session("9") is not None
    assert not [e for e in world.events.take() if e[0] == "ended"]
    again.closed(T0 + 61_000, timed_out=True)
    world.registry.sweep(T0 + 66_000)
    assert world.events.take()[-1] == ("ended", "9", EndReason.TIMEOUT)


def test_the_second_socket_of_a_tab_is_told_and_disconnected() -> None:
    world = World()
    world.tab("9", "t1")
    _, conn = world.tab("9", "t1")
    assert conn.text[0].startswith(b'40{"sid":')
    assert conn.names() == ["SESSION_ALREADY_CONNECTED"] and conn.text[-1] == b"41"
    assert conn.closed is not None and world.session("9").tabs == 1


def test_an_agent_joins_and_the_room_hears_it_as_openreplay_tells_it() -> None:
    world = World()
    tab, tab_conn = world.tab("9", "t1")
    agent, agent_conn = world.agent("9", token("9"), name="Ann")
    sid = json.loads(agent_conn.text[0][2:])["sid"]
    assert agent.watcher is not None and sid == agent.watcher.id
    assert tab_conn.events() == [["NEW_AGENT", sid, {"name": "Ann"}]] and tab_conn.windows == [True]
    assert agent_conn.events() == []  # a tab is there: no SESSION_DISCONNECTED

    # The tab's envelope goes to the agent as it came; a raw payload is wrapped.
    frame = b'42["messages",{"meta":{"tabId":"t1"},"data":[[0,1]]}]'
    tab.receive(frame, T0 + 1)
    assert agent_conn.text[-1] == frame
    tab.receive(b'42["webrtc_call_answer",{"from":"x","answer":"y"}]', T0 + 2)
    assert agent_conn.events()[-1] == [
        "webrtc_call_answer",
        {"meta": {"tabId": "t1"}, "data": {"from": "x", "answer": "y"}},
    ]
    # A binary event: its text, then its attachment.
    tab.receive(b'451-["messages_gz",{"meta":{"tabId":"t1"},"data":{"_placeholder":true,"num":0}}]', T0 + 3)
    tab.receive_binary(b"\x1f\x8bgz", T0 + 3)
    assert agent_conn.text[-1].startswith(b'451-["messages_gz"') and agent_conn.binary == [b"\x1f\x8bgz"]

    # The agent's event reaches the tab it names, with the agent's id.
    agent.receive(b'42["click",{"meta":{"tabId":"t1"},"data":[5,6]}]', T0 + 4)
    assert tab_conn.events()[-1] == ["click", sid, {"meta": {"tabId": "t1"}, "data": [5, 6]}]
    agent.receive(b'42["UPDATE_SESSION",{"meta":{"tabId":"t1"},"data":{"userID":"evil"}}]', T0 + 5)
    assert world.session("9").userID is None  # an agent's update is ignored

    # A second agent: the first hears NEW_AGENT, then AGENT_DISCONNECTED; the tab hears both.
    other, _ = world.agent("9", "hub-key", name="Bo")
    assert other.watcher is not None
    other_id = other.watcher.id
    assert agent_conn.events()[-1] == ["NEW_AGENT", other_id, {"name": "Bo"}]
    other.closed(T0 + 6, timed_out=False)
    assert agent_conn.events()[-1] == ["AGENT_DISCONNECTED", other_id]
    agent.receive(b"41", T0 + 7)
    assert tab_conn.names()[-2:] == ["AGENT_DISCONNECTED", "NO_AGENT"] and tab_conn.windows[-1] is False


def test_an_agent_waits_for_its_session_and_hears_the_tabs_come_and_go() -> None:
    world = World(grace_ms=5_000)
    agent, agent_conn = world.agent("9", token("9"), T0)
    assert agent_conn.names() == ["SESSION_DISCONNECTED"]  # no tab, not even a session yet
    tab, tab_conn = world.tab("9", "t1", T0 + 1_000)
    assert agent_conn.names()[-1] == "SESSION_RECONNECTED" and agent_conn.events()[-1][1] == "t1"
    # The tab connects to a watched session: told who watches, so it restarts and streams.
    assert agent.watcher is not None
    assert tab_conn.events() == [
        ["AGENTS_CONNECTED", [agent.watcher.id]],
        ["AGENTS_INFO_CONNECTED", [{"socketId": agent.watcher.id}]],
    ]
    tab.closed(T0 + 2_000, timed_out=False)
    assert agent_conn.names()[-1] == "SESSION_DISCONNECTED"
    world.registry.sweep(T0 + 7_000)  # the session ends; the agent stays, as in an OpenReplay room
    assert world.session("9") is None and (KEY, "9") in agent.watcher.joins
    world.tab("9", "t1", T0 + 8_000)
    assert agent_conn.names()[-1] == "SESSION_RECONNECTED"


def test_a_refused_connect_says_why_and_joins_nothing() -> None:
    world = World()
    world.tab("9", "t1")
    agent, conn = world.agent("9", token("8"))
    assert conn.text == [b'44{"message":"Authorization error"}'] and agent.watcher is None
    agent.receive(b'42["click",{}]', T0)  # before a CONNECT: a protocol error closes it
    assert conn.closed is not None and conn.closed[0] == 1002


def test_protocol_errors_close_the_connection() -> None:
    world = World()
    for frame in (b"2", b"0", b"5", b"4x", b'42["connect"]', b"9"):
        tab, conn = world.tab("9", "t1")
        tab.receive(frame, T0)
        assert conn.closed is not None and conn.closed[0] == 1002, frame
        tab.closed(T0, False)
    tab, conn = world.tab("9", "t1")
    tab.receive(b"40/admin,", T0)  # another namespace: refused, the connection stays
    assert conn.text[-1] == b'44/admin,{"message":"Invalid namespace"}' and conn.closed is None
    tab.receive(b"6", T0)  # noop
    tab.receive(b"1", T0)  # Engine.IO close
    assert conn.closed == (1000, "")


# -- the codec -----------------------------------------------------------------------------------


def test_the_codec_writes_every_kind_of_event_once_and_as_openreplay_does() -> None:
    codec = SocketIOCodec(1 << 20)
    native = Up("9", "t1", "click", msgspec.Raw(b'{"x":1}'))
    size, frame, binary, rest = codec.session_event(native)
    assert frame == b'42["click",{"meta":{"tabId":"t1"},"data":{"x":1}}]' and not binary and rest == ()
    assert size == len(frame)
    raw = Up("9", "t1", None, blobs=(b"\x00\x01",))
    _, frame, _, rest = codec.session_event(raw)
    assert frame == b'451-["binary",{"meta":{"tabId":"t1"},"data":{"_placeholder":true,"num":0}}]'
    assert rest == (b"\x00\x01",)
    # A Socket.IO envelope is unwrapped only for a native agent.
    wrapped = Up("9", "t1", "messages", envelope=msgspec.Raw(b'{"meta":{"tabId":"t1","v":2},"data":[1]}'))
    assert codec.session_event(wrapped)[1] == b'42["messages",{"meta":{"tabId":"t1","v":2},"data":[1]}]'
    text = Codec().session_event(wrapped)[1]
    assert json.loads(text) == {
        "type": "session.event",
        "sessionID": "9",
        "tab": "t1",
        "event": "messages",
        "data": [1],
    }
    assert codec_of(object()) is not codec and isinstance(codec_of(object()), Codec)


def test_a_mixed_room_encodes_each_emit_once_per_protocol() -> None:
    world = World()
    relay = world.relay
    tab, _ = world.tab("9", "t1")
    _, sio_conn = world.agent("9", token("9"))
    _, sio_conn2 = world.agent("9", token("9"))

    class NativeSink:
        def __init__(self) -> None:
            self.text: list[bytes] = []

        def buffered(self) -> int:
            return 0

        def send_text(self, frame: bytes) -> None:
            self.text.append(frame)

        def send_binary(self, frame: bytes) -> None:
            raise AssertionError("no binary here")

        def close(self, code: int, reason: str) -> None:
            raise AssertionError("closed")

    natives = [NativeSink(), NativeSink()]
    for sink in natives:
        relay.join(relay.add_agent(KEY, sink), Join("9", {}), T0 / 1000)
    tab.receive(b'42["messages",{"meta":{"tabId":"t1"},"data":[7]}]', T0)
    # Both Socket.IO agents got the very same bytes object, both native agents theirs.
    assert sio_conn.text[-1] is sio_conn2.text[-1]
    assert natives[0].text[-1] is natives[1].text[-1]
    assert json.loads(natives[0].text[-1])["data"] == [7]
    assert relay.counts.relayed == 4


def test_an_agents_ice_servers_reach_the_tabs_before_it_does() -> None:
    world = World()
    _, tab_conn = world.tab("9", "t1")
    hello = read_handshake(
        request(peerId=f"{KEY}-9", identity="agent", agentInfo='{"name":"A"}', config='[{"urls":"turn:x"}]'),
        Settings(),
    )
    assert isinstance(hello, AgentHello) and hello.info == {"name": "A", "config": '[{"urls":"turn:x"}]'}
    world.agent("9", token("9"), name="A", config='[{"urls":"turn:x"}]')
    assert tab_conn.names() == ["WEBRTC_CONFIG", "NEW_AGENT"]
    assert tab_conn.events()[0] == ["WEBRTC_CONFIG", '[{"urls":"turn:x"}]']
    _, late = world.tab("9", "t2")
    assert late.names() == ["WEBRTC_CONFIG", "AGENTS_CONNECTED", "AGENTS_INFO_CONNECTED"]
