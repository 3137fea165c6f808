"""OpenReplay's assist protocol over Socket.IO (CONTRACT §8): the unmodified tracker and dashboard.

A thin layer over the hub's own parts (docs/openreplay.md says what it matches):

- A tab (``identity=session``) is a ``TrackerProtocol`` like a native tracker:
  its handshake's ``sessionInfo`` becomes a ``Start``, ``UPDATE_SESSION`` an
  ``Update`` (merged as OpenReplay deep-merges: metadata by key, fields
  replaced), each Engine.IO pong a ``Heartbeat``, its close the grace. One
  record and one set of rules whichever protocol a tab speaks; the registry
  is never touched here.
- An agent (``identity=agent``) is a relay ``Watcher`` joined to the one
  session its ``peerId`` names, once its token (a hub API key, or an
  OpenReplay-style HS256/384/512 JWT naming the project and session) passes.
- ``SocketIOCodec`` writes the relay's events and notices as OpenReplay's
  server emits them: a tab's events to agents as ``42["messages",{meta,data}]``
  (a Socket.IO tab's own envelope forwarded as it came), an agent's to a tab
  as ``42["click","<agent id>",{meta,data}]``, the room's changes as
  ``NEW_AGENT``, ``AGENTS_CONNECTED``/``AGENTS_INFO_CONNECTED``,
  ``AGENT_DISCONNECTED``, ``NO_AGENT``, ``SESSION_RECONNECTED``,
  ``SESSION_DISCONNECTED``. Native agents and tabs in the same session get
  the native frames (``relay.Codec``): the relay carries events between the
  protocols, on one node or across nodes.

Engine.IO 4 on the websocket transport only (the clients never poll): the
hub speaks first (``0{"sid",…}``), pings every ``ping_interval`` (the
transport's ``Heartbeat``), and a missing pong closes the connection as a
heartbeat timeout does.

Not done as OpenReplay does, on purpose: a duplicate ``tabId`` is refused only
when the first one is on this node; a tab's events go to agents, not to the
session's other tabs; ``WEBRTC_CONFIG`` goes to tabs only (with ``NEW_AGENT``
and ``AGENTS_CONNECTED``), ``WEBRTC_AGENT_CALL`` nowhere (nor does OpenReplay
deliver it); an agent's event without ``meta.tabId`` goes to every tab
(OpenReplay's: the first).
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import jwt
import msgspec
from msgspec import Raw
from websockets.frames import CloseCode as WsCloseCode

from . import socketio
from .auth import Auth, bearer_token, origin_allowed
from .config import Settings
from .counts import MessageCounts
from .enrich import Enricher
from .http_api import Request, Response, error, query_params
from .record import (
    MAX_JSON_DEPTH,
    Heartbeat,
    Start,
    Update,
    check_limits,
    too_deep,
    valid_session_id,
)
from .registry import Registry
from .relay import (
    AgentEntry,
    Codec,
    Down,
    Join,
    Out,
    Relay,
    Send,
    SessionKey,
    Tab,
    Up,
    Watcher,
    wrap,
)
from .replication import Replication
from .socketio import Packet, PacketType, ProtocolError
from .tracker import TrackerProtocol
from .websocket import Heartbeat as Pinger
from .websocket import WebSocketConnection
from .wire import InputError, RelayError, validation_code

log = logging.getLogger("hub.openreplay")

T = TypeVar("T", Start, Update)

# Paths OpenReplay's clients open: ``<prefix>/`` (engine.io-client adds the slash), and
# ``/socket/`` as OpenReplay's own proxies strip ``/ws-assist`` before the assist server.
STRIPPED_PATH: Final = "/socket"
# A socket that has not joined the namespace (CONNECT) by then is closed, as socket.io's
# connectTimeout does: a refused agent cannot hold its connection by answering pings.
CONNECT_TIMEOUT_S: Final = 45.0

# Server-to-client event names (OpenReplay's ``EVENTS_DEFINITION.emit``).
NEW_AGENT: Final = "NEW_AGENT"
NO_AGENT: Final = "NO_AGENT"
AGENT_DISCONNECTED: Final = "AGENT_DISCONNECTED"
AGENTS_CONNECTED: Final = "AGENTS_CONNECTED"
AGENTS_INFO_CONNECTED: Final = "AGENTS_INFO_CONNECTED"
SESSION_DISCONNECTED: Final = "SESSION_DISCONNECTED"
SESSION_ALREADY_CONNECTED: Final = "SESSION_ALREADY_CONNECTED"
SESSION_RECONNECTED: Final = "SESSION_RECONNECTED"
UPDATE_SESSION: Final = "UPDATE_SESSION"
WEBRTC_CONFIG: Final = "WEBRTC_CONFIG"
# What the server handles itself and never relays (``EVENTS_DEFINITION.listen``).
NOT_RELAYED: Final = frozenset({"connect_error", "connect_failed", "error", "WEBRTC_AGENT_CALL"})

AUTHENTICATION_ERROR: Final = "Authentication error"
AUTHORIZATION_ERROR: Final = "Authorization error"

# A text frame: an Engine.IO message ("4") holding a Socket.IO packet.
_MESSAGE: Final = ord("4")
_PONG: Final = ord("3")
_CLOSE: Final = ord("1")
_NOOP: Final = ord("6")
_DISCONNECT: Final = b"41"
_WRAPPED: Final = b'{"meta":'
_PLACEHOLDER: Final = {"_placeholder": True, "num": 0}
NORMAL: Final = int(WsCloseCode.NORMAL_CLOSURE)
PROTOCOL_ERROR: Final = int(WsCloseCode.PROTOCOL_ERROR)

# Fields of sessionInfo (and of UPDATE_SESSION's data) the record keeps; the rest
# (projectID, revID, isSnippet, assistOnly, agentIds, …) is OpenReplay's own.
_RECORD_FIELDS: Final = frozenset(msgspec.structs.asdict(Update()).keys())
_any_decoder: Final = msgspec.json.Decoder()
_encode: Final = msgspec.json.Encoder().encode


class Refused(Exception):
    """A handshake the hub answers with an HTTP error instead of the upgrade."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Options:
    """The adapter's settings (README, "Migrating from OpenReplay's assist server")."""

    ping_interval: float = 25.0
    ping_timeout: float = 20.0
    # Bytes of one Engine.IO packet (a frame) and so of one relayed event from a tab.
    max_payload: int = 4 << 20
    jwt_secret: str = ""
    jwt_algorithms: tuple[str, ...] = ("HS256", "HS384", "HS512")

    @classmethod
    def from_settings(cls, settings: Settings) -> Options:
        return cls(
            ping_interval=settings.openreplay_ping_interval,
            ping_timeout=settings.openreplay_ping_timeout,
            max_payload=settings.openreplay_max_payload,
            jwt_secret=settings.openreplay_jwt_secret,
        )


def paths(prefix: str) -> list[str]:
    """Every path the adapter answers for the setting ``prefix`` (``/ws-assist/socket``)."""
    found: list[str] = []
    for base in (prefix.rstrip("/"), STRIPPED_PATH):
        for path in (base + "/", base):
            if path and path not in found:
                found.append(path)
    return found


# -- the handshake (no I/O) ---------------------------------------------------------


@dataclass(frozen=True)
class TabHello:
    project: str
    session_id: str
    tab_id: str
    start: Start


@dataclass(frozen=True)
class AgentHello:
    project: str
    session_id: str
    info: dict[str, Any]
    # A key or token given in the handshake itself (``Authorization``, ``?token=``).
    token: str | None


def split_peer_id(
    peer_id: str, tab_id: str | None, projects: Mapping[str, int] | None
) -> tuple[str, str, str]:
    """``peerId`` as ``(projectKey, sessionID, tabId)`` (tab ``""`` for an agent's two parts).

    OpenReplay splits on every ``-``; the hub's keys and sessionIDs may hold one, so the
    project is the longest configured key the id starts with (else what precedes the first
    ``-``), the tab is the ``tabId`` query parameter when the id ends with it (else what
    follows the last ``-`` of a three-part id), and the session is what is between.
    """
    if projects:
        keys = [k for k in projects if peer_id.startswith(k + "-")]
        project = max(keys, key=len) if keys else peer_id.partition("-")[0]
    else:
        project = peer_id.partition("-")[0]
    rest = peer_id[len(project) + 1 :]
    if tab_id is not None:
        if rest.endswith("-" + tab_id):
            return project, rest[: -len(tab_id) - 1], tab_id
        return project, rest, tab_id
    return project, rest, ""


def _json_object(text: str, what: str) -> dict[str, Any]:
    if too_deep(text):
        raise Refused(400, f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = _any_decoder.decode(text)
    except msgspec.DecodeError:
        raise Refused(400, f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise Refused(400, f"{what} is not a JSON object")
    return value


def record_fields(value: Mapping[str, Any]) -> dict[str, Any]:
    """What of OpenReplay's session object the hub's record keeps."""
    return {k: v for k, v in value.items() if k in _RECORD_FIELDS}


def _convert(fields: dict[str, Any], kind: type[T]) -> T:
    try:
        msg = msgspec.convert(fields, kind)
    except msgspec.ValidationError as exc:
        raise InputError(validation_code(str(exc)), str(exc)) from None
    check_limits(msg)
    return msg


def start_of(session_id: str, tab_id: str, info: Mapping[str, Any]) -> Start:
    """The ``Start`` a tab's ``sessionInfo`` stands for; InputError as a native start's."""
    fields = record_fields(info)
    fields.update(type="start", sessionID=session_id, tabId=tab_id, timestamp=info.get("timestamp"))
    return _convert(fields, Start)


def update_of(data: Mapping[str, Any]) -> Update:
    """The ``Update`` an ``UPDATE_SESSION``'s data stands for (what OpenReplay deep-merges:
    the record merges metadata by key and replaces the other fields)."""
    fields = record_fields(data)
    fields["type"] = "update"
    return _convert(fields, Update)


def read_handshake(request: Request, settings: Settings) -> TabHello | AgentHello:
    """What a Socket.IO handshake asks for, or ``Refused``."""
    query = query_params(request.query)
    if query.get("EIO") != "4" or query.get("transport", "websocket") != "websocket":
        raise Refused(400, "only Engine.IO 4 on the websocket transport (EIO=4&transport=websocket)")
    peer_id = query.get("peerId", "")
    identity = query.get("identity")
    if not peer_id or identity not in ("session", "agent"):
        raise Refused(400, "peerId and identity (session or agent) are required")
    tab_query = query.get("tabId") if identity == "session" else None
    project, session_id, tab_id = split_peer_id(peer_id, tab_query, settings.projects)
    if settings.project_id(project) is None:
        raise Refused(404, "project not found")
    if not valid_session_id(session_id):
        raise Refused(400, "peerId names no valid sessionID (1-64 of A-Za-z0-9._:-)")
    if identity == "agent":
        info = _json_object(query["agentInfo"], "agentInfo") if query.get("agentInfo") else {}
        if query.get("config"):
            # The dashboard's ICE servers (JSON text), for the tabs' calls: it travels with the
            # agent's info (OpenReplay's AgentInfo type has the field) to every node's tabs.
            info["config"] = query["config"]
        token = bearer_token(request.headers) or query.get("token") or None
        return AgentHello(project, session_id, info, token)
    if not valid_session_id(tab_id):
        raise Refused(400, "tabId must be 1-64 of A-Za-z0-9._:-")
    if "sessionInfo" not in query:
        raise Refused(400, "a tab's handshake needs sessionInfo")
    info = _json_object(query["sessionInfo"], "sessionInfo")
    try:
        start = start_of(session_id, tab_id, info)
    except InputError as exc:
        raise Refused(400, f"sessionInfo: {exc.message}") from None
    return TabHello(project, session_id, tab_id, start)


class AgentAuth:
    """Who may watch a session: a hub API key for its project, or OpenReplay's agent JWT."""

    def __init__(self, auth: Auth, secret: str, algorithms: tuple[str, ...]) -> None:
        self.auth = auth
        self.secret = secret
        self.algorithms = list(algorithms)

    def check(self, token: str | None, project: str, session_id: str) -> str | None:
        """None when ``token`` opens the session, else OpenReplay's error message."""
        if not token:
            return AUTHENTICATION_ERROR
        if token.startswith("Bearer "):
            token = token[7:]
        if self.auth.may_read(token, project):
            return None
        if not self.secret:
            return AUTHENTICATION_ERROR
        try:
            # OpenReplay's tokens carry aud "openreplay:agent" and an issuer; neither is checked.
            claims = jwt.decode(token, self.secret, algorithms=self.algorithms, options={"verify_aud": False})
        except jwt.PyJWTError:
            return AUTHENTICATION_ERROR
        if str(claims.get("projectKey")) != project or str(claims.get("sessionId")) != session_id:
            return AUTHORIZATION_ERROR
        return None


# -- the codec ------------------------------------------------------------------------


def _event(name: str, *args: Any) -> bytes:
    return socketio.event_frame(name, *args)


def _binary_event(name: str, arg: Any, count: int) -> bytes:
    return b"45%d-" % count + _encode([name, arg])


class SocketIOCodec(Codec):
    """The relay's events and notices as OpenReplay's assist server emits them."""

    # An agent's event names the tab it goes to in its envelope.
    per_tab = True
    # An agent's socket is a room: it stays for the session to come (back).
    waits = True

    def __init__(self, max_event: int) -> None:
        self.max_event = max_event

    def session_event(self, ev: Up) -> Out:
        name = ev.name
        if name is None:
            # A native tab's binary frame: a binary event of its own name.
            payload = ev.blobs[0]
            text = _binary_event("binary", wrap(ev.tab, Raw(_encode(_PLACEHOLDER))), 1)
            return len(text) + len(payload), text, False, (payload,)
        if ev.blobs:
            text = _binary_event(name, ev.wrapped(), len(ev.blobs))
            return len(text) + sum(map(len, ev.blobs)), text, False, ev.blobs
        text = _event(name, ev.wrapped())
        return len(text), text, False, ()

    def agent_event(self, ev: Down, tab: Tab) -> Out:
        text = _event(ev.name, ev.agent, wrap(tab.id, ev.data))
        return len(text), text, False, ()

    def opened(self, tab: Tab, entries: list[AgentEntry]) -> None:
        sink = _tab_sink(tab)
        sink.agents_seen = {e.id: e.agent for e in entries}
        if entries:
            # What OpenReplay tells a tab that connects to a watched session: it restarts and streams.
            configs = [e.agent["config"] for e in entries if isinstance(e.agent.get("config"), str)]
            if configs:
                sink.send_text(_event(WEBRTC_CONFIG, configs[-1]))
            sink.send_text(_event(AGENTS_CONNECTED, [e.id for e in entries]))
            sink.send_text(_event(AGENTS_INFO_CONNECTED, [{**e.agent, "socketId": e.id} for e in entries]))

    def agents(self, tabs: list[Tab], entries: list[AgentEntry]) -> None:
        now = {e.id: e.agent for e in entries}
        for tab in tabs:
            sink = _tab_sink(tab)
            seen, sink.agents_seen = sink.agents_seen, now
            for agent_id in seen.keys() - now.keys():
                sink.send_text(_event(AGENT_DISCONNECTED, agent_id))
            for agent_id, info in now.items():
                if agent_id not in seen:
                    if isinstance(info.get("config"), str):
                        sink.send_text(_event(WEBRTC_CONFIG, info["config"]))
                    sink.send_text(_event(NEW_AGENT, agent_id, info))
            if seen and not now:
                sink.send_text(_event(NO_AGENT))

    def joined(self, agent: Watcher, session_id: str, tabs: list[str]) -> None:
        sink = _agent_sink(agent)
        sink.tabs_seen = set(tabs)
        if not tabs:
            sink.send_text(_event(SESSION_DISCONNECTED))

    def gap(self, agent: Watcher, session_id: str, dropped: int) -> None:
        """OpenReplay's player has no word for lost events: the next snapshot mends it."""

    def error(self, agent: Watcher, code: RelayError, message: str, session_id: str) -> None:
        agent.sink.send_text(_event("error", message))

    def room_tabs(self, agent: Watcher, key: SessionKey, tabs: list[str]) -> None:
        sink = _agent_sink(agent)
        seen = sink.tabs_seen
        if seen is None:
            return  # its join is not answered yet: the answer says
        sink.tabs_seen = now = set(tabs)
        for tab_id in tabs:
            if tab_id not in seen:
                sink.send_text(_event(SESSION_RECONNECTED, tab_id))
        if seen and not now:
            sink.send_text(_event(SESSION_DISCONNECTED))

    def room_agents(self, agent: Watcher, key: SessionKey, entries: list[AgentEntry]) -> None:
        sink = _agent_sink(agent)
        now = {e.id: e.agent for e in entries if e.id != agent.id}
        seen, sink.agents_seen = sink.agents_seen, now
        if seen is None:
            return  # the agents already there when it joined: OpenReplay does not list them
        for agent_id in seen.keys() - now.keys():
            sink.send_text(_event(AGENT_DISCONNECTED, agent_id))
        for agent_id, info in now.items():
            if agent_id not in seen:
                sink.send_text(_event(NEW_AGENT, agent_id, info))


def _tab_sink(tab: Tab) -> TabEndpoint:
    sink = tab.sink
    assert isinstance(sink, TabEndpoint)
    return sink


def _agent_sink(agent: Watcher) -> AgentEndpoint:
    sink = agent.sink
    assert isinstance(sink, AgentEndpoint)
    return sink


# -- the endpoints -----------------------------------------------------------------------


class _Connection:
    """What a tab's and an agent's Socket.IO connection share: Engine.IO and the relay sink."""

    # The transport closes nothing for silence: the Engine.IO heartbeat decides.
    idle_timeout: float | None = None
    keepalive = False

    def __init__(self, conn: WebSocketConnection, codec: SocketIOCodec) -> None:
        self.conn = conn
        self.relay_codec = codec
        self.decoder = socketio.Decoder()
        self.connected = False
        self.sid = secrets.token_urlsafe(15)

    # The relay's sink: sends never block; what the transport holds is the back-pressure.

    def buffered(self) -> int:
        return self.conn.buffered()

    def send_text(self, frame: bytes) -> None:
        self.conn.send(frame)

    def send_binary(self, frame: bytes) -> None:
        self.conn.send_binary(frame)

    def close(self, code: int, reason: str) -> None:
        self.conn.close(code, reason)

    # The transport's endpoint.

    def receive(self, data: bytes, now: int) -> bytes | None:
        try:
            kind = data[0] if data else -1
            if kind == _MESSAGE:
                packet = self.decoder.text(data)
                if packet is not None:
                    self._packet(packet, len(data), now)
            elif kind == _PONG:
                self.conn.answered()
                self._pong(now)
            elif kind == _CLOSE:
                self.conn.close(NORMAL, "")
            elif kind != _NOOP:
                # The client pings in Engine.IO 3, not 4; an open or upgrade is no client's.
                raise ProtocolError(f"unexpected Engine.IO packet {data[:1]!r}")
        except ProtocolError as exc:
            self._fail(str(exc))
        return None

    def receive_binary(self, data: bytes, now: int) -> bytes | None:
        try:
            packet = self.decoder.binary(data)
            if packet is not None:
                size = sum(map(len, packet.args)) + sum(map(len, packet.attachments))
                self._packet(packet, size, now)
        except ProtocolError as exc:
            self._fail(str(exc))
        return None

    def _fail(self, reason: str) -> None:
        log.debug("openreplay.protocol_error", extra={"fields": {"reason": reason}})
        self.conn.close(PROTOCOL_ERROR, reason[:120])

    def _packet(self, packet: Packet, size: int, now: int) -> None:
        ptype = packet.type
        if packet.nsp != "/":
            # OpenReplay serves the main namespace only.
            if ptype is PacketType.CONNECT:
                self.send_text(b"44" + packet.nsp.encode() + b"," + _encode({"message": "Invalid namespace"}))
            return
        if ptype is PacketType.CONNECT:
            if self.connected:
                raise ProtocolError("CONNECT on a connected namespace")
            self._connect(packet.data if isinstance(packet.data, dict) else {}, now)
        elif not self.connected:
            raise ProtocolError(f"{ptype.name} before CONNECT")
        elif ptype is PacketType.DISCONNECT:
            self.connected = False
            self._disconnect(now)
        elif ptype is PacketType.EVENT or ptype is PacketType.BINARY_EVENT:
            assert packet.name is not None
            self._event(packet.name, packet.args, tuple(packet.attachments), size, now)
        # ACKs: nothing the hub emits asks for one.

    def _connected(self, sid: str) -> None:
        self.connected = True
        self.conn.connected()
        self.send_text(b"40" + _encode({"sid": sid}))

    def _connect(self, auth: dict[str, Any], now: int) -> None:
        raise NotImplementedError

    def _disconnect(self, now: int) -> None:
        raise NotImplementedError

    def _event(self, name: str, args: list[Raw], blobs: tuple[bytes, ...], size: int, now: int) -> None:
        raise NotImplementedError

    def _pong(self, now: int) -> None:
        pass

    def writable(self) -> None:
        pass


def _first(args: list[Raw]) -> Raw | None:
    return args[0] if args else None


def _wrapped(arg: Raw) -> bool:
    """Whether a tab's argument is OpenReplay's envelope (``{"meta":…}``), read without parsing
    on the hot path: the tracker writes ``meta`` first."""
    head = bytes(memoryview(arg)[: len(_WRAPPED)])
    return head == _WRAPPED or (head[:1] == b"{" and isinstance(_envelope_meta(arg), dict))


def _envelope_meta(arg: Raw) -> Any:
    try:
        value = socketio.materialize(arg)
    except ProtocolError:
        return None
    return value.get("meta") if isinstance(value, dict) else None


class TabEndpoint(_Connection):
    """A tracker's Socket.IO connection: a tab of the session its handshake names."""

    def __init__(
        self,
        conn: WebSocketConnection,
        codec: SocketIOCodec,
        hello: TabHello,
        registry: Registry,
        relay: Relay,
        project_id: int,
        counts: MessageCounts,
        enrichment: Mapping[str, str],
    ) -> None:
        super().__init__(conn, codec)
        self.hello = hello
        self.relay = relay
        # What the relay told this tab last of the agents watching it (``SocketIOCodec``).
        self.agents_seen: dict[str, dict[str, Any]] = {}
        self.protocol = TrackerProtocol(
            registry, hello.project, project_id, counts, enrichment, (relay, self)
        )

    def watched(self, on: bool) -> None:
        self.conn.watched(on)

    def _connect(self, auth: dict[str, Any], now: int) -> None:
        hello = self.hello
        self._connected(self.sid)
        if self.relay.has_tab(hello.project, hello.session_id, hello.tab_id):
            # As OpenReplay: the second socket of a tab is told, then disconnected (no retry).
            self.send_text(_event(SESSION_ALREADY_CONNECTED))
            self.send_text(_DISCONNECT)
            self.connected = False
            self.conn.close(NORMAL, "session already connected")
            return
        self._start(now)

    def _start(self, now: int) -> bool:
        start = msgspec.structs.replace(self.hello.start)
        try:
            self.protocol.handle(start, 0, now)
        except InputError as exc:
            # The project is full: a native tracker gets the same error.
            log.info("openreplay.tab_refused", extra={"fields": {"code": exc.code, "message": exc.message}})
            self.protocol.counts.error(exc.code, exc.message)
            self.send_text(_DISCONNECT)
            self.connected = False
            self.conn.close(NORMAL, exc.message[:120])
            return False
        return True

    def _live(self, now: int) -> bool:
        """The session is held (a session ended elsewhere, e.g. a native tab's end, starts again)."""
        protocol = self.protocol
        session = protocol.session
        if session is not None and protocol.registry.is_live(session):
            return True
        return self._start(now)

    def _pong(self, now: int) -> None:
        if self.connected and self._live(now):
            self.protocol.handle(Heartbeat(), 1, now)

    def _event(self, name: str, args: list[Raw], blobs: tuple[bytes, ...], size: int, now: int) -> None:
        if name in NOT_RELAYED or not self._live(now):
            return
        arg = _first(args)
        wrapped = arg is not None and _wrapped(arg)
        if name == UPDATE_SESSION:
            self._update(arg, wrapped, now)
        tab = self.protocol.tab
        if tab is None:
            return
        self.protocol.counts.received["emit"] += 1
        hello = self.hello
        if wrapped:
            ev = Up(hello.session_id, tab.id, name, None, arg, blobs)
        else:
            # A payload without meta (the tracker's raw emits) is wrapped by the codecs that need it.
            ev = Up(hello.session_id, tab.id, name, arg, None, blobs)
        self.relay.publish(tab, ev, size, now / 1000)

    def _update(self, arg: Raw | None, wrapped: bool, now: int) -> None:
        if arg is None:
            return
        try:
            value = socketio.materialize(arg)
        except ProtocolError:
            return
        data = value.get("data") if wrapped and isinstance(value, dict) else value
        if not isinstance(data, dict):
            return
        try:
            update = update_of(data)
            self.protocol.handle(update, len(arg), now)
        except InputError as exc:
            # Bad fields change nothing, as a native update's; OpenReplay has no error to send.
            self.protocol.counts.error(exc.code, exc.message)

    def _disconnect(self, now: int) -> None:
        self.protocol.closed(now, False)

    def closed(self, now: int, timed_out: bool) -> None:
        self.protocol.closed(now, timed_out)


class AgentEndpoint(_Connection):
    """A dashboard's Socket.IO connection: an agent watching the session its handshake names."""

    def __init__(
        self,
        conn: WebSocketConnection,
        codec: SocketIOCodec,
        hello: AgentHello,
        relay: Relay,
        auth: AgentAuth,
        clock: Callable[[], float],
        replication: Replication,
    ) -> None:
        super().__init__(conn, codec)
        self.hello = hello
        self.relay = relay
        self.auth = auth
        self.clock = clock
        self.watcher: Watcher | None = None
        # In a cluster the agent keeps its project mirrored here while connected: its join
        # waits until this node holds the session's whole picture.
        self.replication: Replication | None = replication
        replication.follow(hello.project)
        # What the relay told it last of the session's tabs and other agents (``SocketIOCodec``).
        self.tabs_seen: set[str] | None = None
        self.agents_seen: dict[str, dict[str, Any]] | None = None

    def _connect(self, auth: dict[str, Any], now: int) -> None:
        hello = self.hello
        token = auth.get("token")
        refusal = self.auth.check(
            token if isinstance(token, str) else hello.token, hello.project, hello.session_id
        )
        if refusal is not None:
            self.send_text(b"44" + _encode({"message": refusal}))
            return
        watcher = self.watcher = self.relay.add_agent(hello.project, self)
        # Its Socket.IO id is its relay id: tabs name it in control answers (``control_granted``).
        self._connected(watcher.id)
        if self.replication is None or self.replication.when_mirrored(hello.project, self._join):
            self._join()

    def _join(self) -> None:
        if self.watcher is not None:
            self.relay.join(self.watcher, Join(self.hello.session_id, self.hello.info), self.clock())

    def _event(self, name: str, args: list[Raw], blobs: tuple[bytes, ...], size: int, now: int) -> None:
        watcher = self.watcher
        if watcher is None or name in NOT_RELAYED or name == UPDATE_SESSION or blobs:
            return
        arg = _first(args)
        data: Raw = arg if arg is not None else Raw(b"null")
        tab: str | None = None
        if arg is not None and bytes(memoryview(arg)[:1]) == b"{":
            # Agents' events are small (a click, a call's signal): read their envelope.
            try:
                value = socketio.materialize(arg)
            except ProtocolError:
                value = None
            if isinstance(value, dict) and isinstance(value.get("meta"), dict):
                target = value["meta"].get("tabId")
                tab = target if isinstance(target, str) else None
                data = Raw(_encode(value.get("data")))
        self.relay.send(watcher, Send(self.hello.session_id, name, data, tab), now / 1000)

    def _disconnect(self, now: int) -> None:
        self._leave()

    def _leave(self) -> None:
        if self.watcher is not None:
            self.relay.remove_agent(self.watcher)
            self.watcher = None

    def closed(self, now: int, timed_out: bool) -> None:
        self._leave()
        if self.replication is not None:
            self.replication.unfollow(self.hello.project)
            self.replication = None

    def writable(self) -> None:
        if self.watcher is not None:
            self.relay.writable(self.watcher, self.clock())


# -- the adapter the app routes to ---------------------------------------------------------


class OpenReplay:
    """Routes Socket.IO handshakes to tab and agent endpoints (one per hub process)."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        relay: Relay,
        enricher: Enricher,
        auth: Auth,
        counts: MessageCounts,
        limits: Counter[str],
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        # The hub's count of limits reached (/metrics): a tab from a refused origin is one.
        self.limits = limits
        self.options = Options.from_settings(settings)
        self.registry = registry
        self.relay = relay
        self.enricher = enricher
        # A tab's event over the relay's burst could never pass its rate check.
        self.codec = SocketIOCodec(min(self.options.max_payload, settings.relay_burst))
        self.auth = AgentAuth(auth, self.options.jwt_secret, self.options.jwt_algorithms)
        self.counts = counts
        self.clock = clock

    def route(self, request: Request, conn: WebSocketConnection) -> TabEndpoint | AgentEndpoint | Response:
        try:
            hello = read_handshake(request, self.settings)
        except Refused as refused:
            return error(refused.status, refused.message)
        options = self.options
        endpoint: TabEndpoint | AgentEndpoint
        if isinstance(hello, TabHello):
            if not origin_allowed(self.settings, request.headers):
                self.limits["tracker_origin"] += 1
                return error(403, "origin not allowed")
            project_id = self.settings.project_id(hello.project)
            assert project_id is not None  # read_handshake checked the project exists
            enrichment = self.enricher.fields(request.headers, conn.peer or None)
            endpoint = TabEndpoint(
                conn, self.codec, hello, self.registry, self.relay, project_id, self.counts, enrichment
            )
        else:
            endpoint = AgentEndpoint(
                conn, self.codec, hello, self.relay, self.auth, self.clock, self.registry.replication
            )
        # OpenReplay's first snapshot of a page is one message: frames as large as its payloads.
        conn.ws.max_message_size = options.max_payload
        opening = socketio.encode_open(
            secrets.token_urlsafe(15),
            int(options.ping_interval * 1000),
            int(options.ping_timeout * 1000),
            options.max_payload,
        )
        conn.greet(
            opening, Pinger(socketio.PING, options.ping_interval, options.ping_timeout, CONNECT_TIMEOUT_S)
        )
        return endpoint
