"""The live relay of one node (CONTRACT §7), without I/O.

Tabs (tracker connections) emit events; agents ``join`` sessions and get
them as ``session.event`` frames (a tab's binary frame as a binary frame
behind a small routing header), and ``send`` events back to one tab or all.
Each session with a tab or a joined agent on this node has a ``Room``: its
local tabs, its local joined agents, and what the ``RelayBus`` told of other
nodes (their agents joined to it, their tabs of it). Every call takes
``now`` (monotonic seconds); nothing here reads a clock, a socket or a task.

The hot path (an emit) costs one encode and one size check plus one send per
joined agent: the ``session.event`` frame is encoded once, a binary frame's
header is built once per tab (it never changes) and concatenated once per
emit. An unwatched session's emit costs the rate check alone.

Back-pressure: before each send the core asks the agent's sink how many
bytes it has queued. Past ``agent_buffer`` the agent is "over": its events
are dropped (counted per session) until its queue is back under half the
bound, when it is sent one ``session.gap`` per session that lost events and
resumes. An agent over the bound for ``agent_stall`` seconds is closed with
``CloseCode.TOO_SLOW``. No other agent and no tab waits for it. A tab past
``max_event`` bytes in one event or its token bucket (``rate`` bytes/s,
``burst`` bytes) is closed with ``CloseCode.POLICY``.

Across nodes (``relay_bus``): a join of a session with no tab on this node
is answered once the nodes of its tabs list them, or after ``join_wait``
(a session in its grace has no tab anywhere); a join of a session with a
tab here is answered at once, with the tabs known so far.

Authorization: an agent joins only sessions of its own project (the join is
looked up under the agent's project key, so another project's session is
``not_found``); agent events reach only the tabs of the session they name.

Protocols: the core moves protocol-neutral events (``Up``: a tab's event, its
name, its JSON data and binary parts; ``Down``: an agent's event) and leaves
how they are written to each connection's ``Codec``: the native one here
(CONTRACT §7), OpenReplay's Socket.IO one in ``openreplay``. A native agent
watching a Socket.IO tab gets ``session.event`` frames, a Socket.IO agent
``42[…]`` frames, whichever protocol the tab speaks. An emit is encoded at
most once per codec in use; the bus carries its parts, not a frame.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Final, Protocol, TypeVar

import msgspec
from msgspec import Meta, Raw, Struct

from .record import Emit, Session, decode_frame, valid_session_id
from .relay_bus import LocalBus, RelayBus
from .wire import CloseCode, EndReason, ErrorCode, InputError, RelayError, RelayType

SessionKey = tuple[str, str]
T = TypeVar("T", "Tab", "Watcher")

EventName = Annotated[str, Meta(min_length=1, max_length=64)]
Id = Annotated[str, Meta(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]

# The binary header's length field: 2 bytes, big-endian.
HEADER_LEN_BYTES: Final = 2


# -- frames (tags are ``RelayType`` values: msgspec takes a str, not a StrEnum) --


class Join(Struct, tag_field="type", tag=RelayType.JOIN.value):
    sessionID: Id
    agent: dict[str, Any] = {}


class Leave(Struct, tag_field="type", tag=RelayType.LEAVE.value):
    sessionID: Id


class Send(Struct, tag_field="type", tag=RelayType.SEND.value):
    sessionID: Id
    event: EventName
    data: Raw = Raw(b"null")
    tab: Id | None = None


AgentMessage = Join | Leave | Send


class Joined(Struct, tag_field="type", tag=RelayType.JOINED.value):
    sessionID: str
    tabs: list[str]


class AgentEntry(Struct):
    id: str
    agent: dict[str, Any]


class Agents(Struct, tag_field="type", tag=RelayType.AGENTS.value):
    count: int
    agents: list[AgentEntry]


class AgentEvent(Struct, tag_field="type", tag=RelayType.AGENT_EVENT.value):
    agent: str
    event: str
    data: Raw


class SessionEvent(Struct, tag_field="type", tag=RelayType.SESSION_EVENT.value):
    sessionID: str
    tab: str
    event: str
    data: Raw


class SessionGap(Struct, tag_field="type", tag=RelayType.SESSION_GAP.value):
    sessionID: str
    dropped: int


class RelayErrorFrame(Struct, tag_field="type", tag="error"):
    code: str
    message: str
    sessionID: str


class _Header(Struct, omit_defaults=True):
    sessionID: str
    tab: str
    # A Socket.IO binary event's name; a native tab's binary frame has none.
    event: str | None = None


class _Envelope(Struct):
    """What an OpenReplay tab or agent wraps its events in: ``{"meta":{"tabId"},"data"}``."""

    # Raw alone: msgspec takes no union with it.
    meta: Raw = Raw(b"null")
    data: Raw = Raw(b"null")


class _Meta(Struct):
    tabId: str


class _Wrap(Struct):
    meta: _Meta
    data: Raw


_agent_decoder: Final = msgspec.json.Decoder(AgentMessage)
_envelope_decoder: Final = msgspec.json.Decoder(_Envelope)
_encode: Final = msgspec.json.Encoder().encode
NULL: Final = Raw(b"null")


def parse_agent_message(frame: bytes) -> Join | Leave | Send:
    """An agent's relay frame (``join``, ``leave``, ``send``), or InputError (code + message)."""
    return decode_frame(_agent_decoder, frame)


def new_tab_id() -> str:
    return secrets.token_hex(8)


def tab_id_or_new(value: object) -> str:
    """A tracker's ``tabId`` if valid (1-64 of ``[A-Za-z0-9._:-]``), else a new one."""
    return value if valid_session_id(value) else new_tab_id()  # type: ignore[return-value]


def binary_header(session_id: str, tab: str, event: str | None = None) -> bytes:
    """CONTRACT §7's routing header of a relayed binary frame: length, then JSON."""
    head = _encode(_Header(session_id, tab, event))
    return len(head).to_bytes(HEADER_LEN_BYTES, "big") + head


def unwrap(envelope: Raw) -> Raw:
    """The ``data`` of an OpenReplay envelope (``{"meta":…,"data":…}``); null when it has none."""
    try:
        return _envelope_decoder.decode(envelope).data
    except (msgspec.DecodeError, msgspec.ValidationError):
        return envelope


def wrap(tab: str, data: Raw) -> Raw:
    """``data`` in OpenReplay's envelope, naming ``tab``."""
    return Raw(_encode(_Wrap(_Meta(tab), data)))


# -- events, as the core moves them between protocols -----------------------------


class Up(Struct, gc=False):
    """One tab event on its way to the agents, in parts no protocol owns.

    ``name`` is None for a native tab's binary frame (its bytes the one blob).
    The JSON data is ``data``, or ``envelope`` when a Socket.IO tab sent it
    wrapped: each form is derived from the other only when a codec needs it
    (``payload``, ``wrapped``), so a Socket.IO event reaches Socket.IO agents
    as it came. ``blobs`` are binary parts (a Socket.IO binary event's
    attachments, which its JSON's placeholders name). A Struct: built in C,
    on the hot path of every watched emit.
    """

    session_id: str
    tab: str
    name: str | None
    data: Raw | None = None
    envelope: Raw | None = None
    blobs: tuple[bytes, ...] = ()
    # The native binary header of the tab (built once per tab), when it is local.
    header: bytes | None = None

    def payload(self) -> Raw:
        """The event's data (unwrapped from its envelope at the first need)."""
        data = self.data
        if data is None:
            data = self.data = NULL if self.envelope is None else unwrap(self.envelope)
        return data

    def wrapped(self) -> Raw:
        """The event's data in OpenReplay's envelope (built at the first need)."""
        envelope = self.envelope
        if envelope is None:
            envelope = self.envelope = wrap(self.tab, self.payload())
        return envelope


class Down(Struct, gc=False):
    """One agent event on its way to a session's tabs (``tab``: one of them, None: all)."""

    agent: str
    name: str
    data: Raw
    tab: str | None


# What a codec writes for one event: its bytes, its first frame and whether that is binary,
# then binary frames that follow (a Socket.IO binary event's attachments).
Out = tuple[int, bytes, bool, tuple[bytes, ...]]


class Codec:
    """How one protocol writes the relay's frames: here, the native protocol (CONTRACT §7).

    One instance per protocol (its identity keys the per-event encoding cache).
    A connection's codec is its sink's ``relay_codec`` attribute, if it has one.
    """

    # Whether ``agent_event`` depends on the tab it goes to (else encoded once for all tabs).
    per_tab = False
    # Whether this protocol's agents stay joined to a session that is not (or no longer)
    # live, waiting for its tabs, as OpenReplay's rooms do.
    waits = False
    # Bytes of one event from a tab of this protocol at most; None: the relay's limit.
    max_event: int | None = None

    # -- hot: cached per event --

    def session_event(self, ev: Up) -> Out:
        name = ev.name
        if name is None:
            frame = (ev.header or binary_header(ev.session_id, ev.tab)) + ev.blobs[0]
            return len(frame), frame, True, ()
        if ev.blobs:
            head = binary_header(ev.session_id, ev.tab, name)
            frames = [head + blob for blob in ev.blobs]
            return sum(map(len, frames)), frames[0], True, tuple(frames[1:])
        data = ev.data
        text = _encode(SessionEvent(ev.session_id, ev.tab, name, data if data is not None else ev.payload()))
        return len(text), text, False, ()

    def agent_event(self, ev: Down, tab: Tab) -> Out:
        text = _encode(AgentEvent(ev.agent, ev.name, ev.data))
        return len(text), text, False, ()

    # -- notices --

    def opened(self, tab: Tab, entries: list[AgentEntry]) -> None:
        """A tab opened; ``entries``: the agents joined to its session."""
        if entries:
            tab.sink.send_text(_encode(Agents(len(entries), entries)))

    def agents(self, tabs: list[Tab], entries: list[AgentEntry]) -> None:
        """The agents joined to these tabs' session changed."""
        frame = _encode(Agents(len(entries), entries))
        for tab in tabs:
            tab.sink.send_text(frame)

    def joined(self, agent: Watcher, session_id: str, tabs: list[str]) -> None:
        agent.sink.send_text(_encode(Joined(session_id, tabs)))

    def gap(self, agent: Watcher, session_id: str, dropped: int) -> None:
        agent.sink.send_text(_encode(SessionGap(session_id, dropped)))

    def error(self, agent: Watcher, code: RelayError, message: str, session_id: str) -> None:
        agent.sink.send_text(_encode(RelayErrorFrame(code, message, session_id)))

    def room_tabs(self, agent: Watcher, key: SessionKey, tabs: list[str]) -> None:
        """The tabs of a session ``agent`` joined changed (native agents are not told)."""

    def room_agents(self, agent: Watcher, key: SessionKey, entries: list[AgentEntry]) -> None:
        """The agents joined to a session ``agent`` joined changed (native agents are not told)."""


NATIVE: Final = Codec()
NATIVE_ONLY: Final = frozenset({NATIVE})


def codec_of(sink: object) -> Codec:
    codec = getattr(sink, "relay_codec", None)
    return codec if isinstance(codec, Codec) else NATIVE


# -- the core ------------------------------------------------------------------


class Sink(Protocol):
    """A connection as the relay needs it: sends never block, ``buffered`` is what is queued."""

    def buffered(self) -> int: ...

    def send_text(self, frame: bytes) -> None: ...

    def send_binary(self, frame: bytes) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


class TabSink(Sink, Protocol):
    """A tab's connection: also told when agents start and stop watching it."""

    def watched(self, on: bool) -> None: ...


@dataclass(frozen=True)
class Limits:
    """The relay's settings (README, "Live relay")."""

    max_joins: int = 10  # sessions one agent may be joined to at once
    agent_buffer: int = 1 << 20  # bytes queued to an agent before its events drop
    agent_stall: float = 10.0  # seconds over the buffer before 4008
    rate: float = 1 << 20  # a tab's relay bytes/s ...
    burst: int = 4 << 20  # ... and burst
    max_event: int = 256 << 10  # bytes of one emitted event or binary frame
    join_wait: float = 0.5  # seconds a cross-node join waits for the tabs' nodes to answer


class Counts:
    """Plain ints for /metrics."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "dropped",
        "emitted",
        "gaps",
        "policy_closes",
        "relayed",
        "sent",
        "slow_closes",
    )

    def __init__(self) -> None:
        self.emitted = 0  # tab events accepted (text and binary)
        self.bytes_in = 0  # their bytes
        self.relayed = 0  # frames sent to agents
        self.bytes_out = 0  # their bytes
        self.dropped = 0  # frames dropped for agents over their buffer
        self.gaps = 0  # session.gap frames sent
        self.sent = 0  # agent events delivered to tabs
        self.slow_closes = 0  # agents closed with 4008
        self.policy_closes = 0  # tabs closed with 1008


class Tab:
    __slots__ = ("closed", "codec", "header", "id", "key", "room", "sink", "stamp", "tokens")

    def __init__(self, room: Room, tab_id: str, sink: TabSink, tokens: float, now: float) -> None:
        key = self.key = room.key
        # Its room lives as long as it does: an emit needs no lookup.
        self.room = room
        self.id = tab_id
        self.sink = sink
        self.codec = codec_of(sink)
        self.header = binary_header(key[1], tab_id)
        self.tokens = tokens
        self.stamp = now
        self.closed = False


class Watcher:
    """One agent connection: its project, its joins, its back-pressure state."""

    __slots__ = ("closed", "codec", "dropped", "id", "info", "joins", "over_since", "project", "sink")

    def __init__(self, project: str, sink: Sink) -> None:
        self.id = secrets.token_hex(8)
        self.project = project
        self.sink = sink
        self.codec = codec_of(sink)
        self.info: dict[str, Any] = {}
        self.joins: set[SessionKey] = set()
        # When its queue went past the bound (None: not over), and events lost per session since.
        self.over_since: float | None = None
        self.dropped: dict[SessionKey, int] = {}
        self.closed = False


class Room:
    """One session as this node's relay knows it."""

    __slots__ = ("agents", "codecs", "key", "pending", "remote_agents", "remote_tabs", "tabs")

    def __init__(self, key: SessionKey) -> None:
        self.key = key
        self.tabs: dict[str, Tab] = {}
        self.agents: dict[str, Watcher] = {}
        # The codecs of ``agents``: what an emit is encoded for (``NATIVE_ONLY`` itself when
        # every agent speaks the native protocol, the hot path's one check).
        self.codecs: frozenset[Codec] = frozenset()
        # Agents of other nodes joined to it: id -> (node, info). Kept only while it has tabs here.
        self.remote_agents: dict[str, tuple[str, dict[str, Any]]] = {}
        # Its tabs on other nodes, as they announced them (known while agents here are joined).
        self.remote_tabs: dict[str, list[str]] = {}
        # Joins waiting for the tabs' nodes to answer: (agent, deadline); the agents are in ``agents``.
        self.pending: list[tuple[Watcher, float]] = []

    @property
    def empty(self) -> bool:
        return not (self.tabs or self.agents)

    def tab_ids(self) -> list[str]:
        ids = list(self.tabs)
        for tabs in self.remote_tabs.values():
            ids.extend(tabs)
        return sorted(set(ids))

    def entries(self) -> list[AgentEntry]:
        """Every agent joined to it, here and on other nodes."""
        entries = [AgentEntry(a.id, a.info) for a in self.agents.values()]
        entries.extend(AgentEntry(aid, info) for aid, (_, info) in self.remote_agents.items())
        return entries


def _codecs(codecs: frozenset[Codec]) -> frozenset[Codec]:
    return NATIVE_ONLY if codecs == NATIVE_ONLY else codecs


def _by_codec(items: Iterable[T]) -> dict[Codec, list[T]]:
    groups: dict[Codec, list[T]] = {}
    for item in items:
        groups.setdefault(item.codec, []).append(item)
    return groups


class Relay:
    """The relay of one node. ``live(project, sessionID)``: whether the session is live anywhere."""

    def __init__(self, limits: Limits, live: Callable[[str, str], bool], bus: RelayBus | None = None) -> None:
        self.limits = limits
        self.live = live
        self.bus: RelayBus = bus if bus is not None else LocalBus()
        self.counts = Counts()
        self.rooms: dict[SessionKey, Room] = {}
        # Agents over their buffer and rooms with joins waiting: what ``tick`` looks at.
        self._over: set[Watcher] = set()
        self._waiting: set[Room] = set()
        self.bus.attach(self)

    # -- tabs --------------------------------------------------------------------

    def add_tab(self, project: str, session_id: str, tab_id: str, sink: TabSink, now: float) -> Tab:
        """A tracker started (``tab_id`` from ``tab_id_or_new``); InputError if the tab is open here."""
        key = (project, session_id)
        room = self._room(key)
        if tab_id in room.tabs:
            raise InputError(ErrorCode.INVALID_FIELD, f"tabId {tab_id!r} is already open in this session")
        tab = room.tabs[tab_id] = Tab(room, tab_id, sink, float(self.limits.burst), now)
        watched = bool(room.agents or room.remote_agents)
        if watched:
            sink.watched(True)
        tab.codec.opened(tab, room.entries() if watched else [])
        self._tabs_changed(room)
        return tab

    def has_tab(self, project: str, session_id: str, tab_id: str) -> bool:
        """Whether this node holds that tab of the session."""
        room = self.rooms.get((project, session_id))
        return room is not None and tab_id in room.tabs

    def remove_tab(self, tab: Tab) -> None:
        if tab.closed:
            return
        tab.closed = True
        room = tab.room
        if room.tabs.get(tab.id) is not tab:
            return
        del room.tabs[tab.id]
        self._tabs_changed(room)
        if not room.tabs and room.remote_agents:
            # Joins of other nodes are kept only with a tab here; a tab back later learns them again.
            room.remote_agents.clear()
            self.bus.unlisten(room.key)
        self._gc(room)

    def emit(self, tab: Tab, msg: Emit, size: int, now: float) -> None:
        """A tracker's ``emit`` (``size``: its frame's bytes)."""
        if not self._admit(tab, size, now):
            return
        room = tab.room
        if room.agents:
            if room.codecs is NATIVE_ONLY:
                # The common case, as cheap as before codecs: one frame for every agent.
                text = _encode(SessionEvent(tab.key[1], tab.id, msg.event, msg.data))
                self._deliver(room, room.agents.values(), len(text), text, False, (), now)
            else:
                self._to_agents(room, Up(tab.key[1], tab.id, msg.event, msg.data), now)
        if room.remote_agents:
            self.bus.up(room.key, Up(tab.key[1], tab.id, msg.event, msg.data))

    def emit_binary(self, tab: Tab, payload: bytes, now: float) -> None:
        """A tracker's binary frame, relayed as it is behind the tab's header."""
        if not self._admit(tab, len(payload), now):
            return
        room = tab.room
        if room.agents:
            if room.codecs is NATIVE_ONLY:
                frame = tab.header + payload
                self._deliver(room, room.agents.values(), len(frame), frame, True, (), now)
            else:
                self._to_agents(room, Up(tab.key[1], tab.id, None, None, None, (payload,), tab.header), now)
        if room.remote_agents:
            self.bus.up(room.key, Up(tab.key[1], tab.id, None, None, None, (payload,)))

    def publish(self, tab: Tab, ev: Up, size: int, now: float) -> None:
        """Another protocol's tab event (``ev`` of ``tab``; ``size``: its bytes)."""
        if not self._admit(tab, size, now):
            return
        room = tab.room
        if room.agents:
            self._to_agents(room, ev, now)
        if room.remote_agents:
            self.bus.up(room.key, ev)

    def watched(self, tab: Tab) -> bool:
        """Whether an agent (here or elsewhere) is joined to the tab's session."""
        room = tab.room
        return bool(room.agents or room.remote_agents)

    def _admit(self, tab: Tab, size: int, now: float) -> bool:
        if tab.closed:
            return False
        limits = self.limits
        max_event = tab.codec.max_event or limits.max_event
        if size > max_event:
            self._close_tab(tab, f"relay event of {size} bytes, over the limit of {max_event}")
            return False
        tokens = min(float(limits.burst), tab.tokens + (now - tab.stamp) * limits.rate)
        tab.stamp = now
        if tokens < size:
            self._close_tab(tab, f"over the relay rate of {limits.rate:g} bytes/s")
            return False
        tab.tokens = tokens - size
        self.counts.emitted += 1
        self.counts.bytes_in += size
        return True

    def _close_tab(self, tab: Tab, reason: str) -> None:
        self.counts.policy_closes += 1
        self.remove_tab(tab)
        tab.sink.close(CloseCode.POLICY, reason)

    # -- agents ------------------------------------------------------------------

    def add_agent(self, project: str, sink: Sink) -> Watcher:
        """An agent connection of ``project`` (the project key it holds)."""
        return Watcher(project, sink)

    def remove_agent(self, agent: Watcher) -> None:
        if agent.closed:
            return
        agent.closed = True
        self._over.discard(agent)
        for key in list(agent.joins):
            self._unjoin(agent, key)

    def join(self, agent: Watcher, msg: Join, now: float) -> None:
        key = (agent.project, msg.sessionID)
        codec = agent.codec
        if key not in agent.joins and len(agent.joins) >= self.limits.max_joins:
            codec.error(
                agent, RelayError.TOO_MANY_JOINS, f"over {self.limits.max_joins} sessions", msg.sessionID
            )
            return
        if not codec.waits and not self.live(*key):
            # Another project's session is not_found too: its existence is not this agent's to know.
            codec.error(agent, RelayError.NOT_FOUND, "no live session with this sessionID", msg.sessionID)
            return
        agent.info = msg.agent
        room = self._room(key)
        first = not room.agents
        room.agents[agent.id] = agent
        room.codecs = _codecs(room.codecs | {codec})
        agent.joins.add(key)
        if first:
            self.bus.watch(key)
        self.bus.joined(key, [(agent.id, agent.info)])
        self._agents_changed(room)
        if self.bus.remote and not room.tabs and not room.remote_tabs:
            # The tabs are on other nodes, which answer the join with them.
            room.pending.append((agent, now + self.limits.join_wait))
            self._waiting.add(room)
        else:
            codec.joined(agent, msg.sessionID, room.tab_ids())

    def leave(self, agent: Watcher, msg: Leave) -> None:
        key = (agent.project, msg.sessionID)
        if key in agent.joins:
            self._unjoin(agent, key)

    def send(self, agent: Watcher, msg: Send, now: float) -> None:
        key = (agent.project, msg.sessionID)
        room = self.rooms.get(key)
        if room is None or key not in agent.joins:
            agent.codec.error(agent, RelayError.NOT_JOINED, "join the session first", msg.sessionID)
            return
        ev = Down(agent.id, msg.event, msg.data, msg.tab)
        self._to_tabs(room, ev)
        if room.remote_tabs and (msg.tab is None or msg.tab not in room.tabs):
            self.bus.down(key, ev)

    def writable(self, agent: Watcher, now: float) -> None:
        """The agent's queue drained (the transport's low-water mark): resume it if it was over."""
        bound = self.limits.agent_buffer
        if agent.over_since is not None and not agent.closed and agent.sink.buffered() <= bound // 2:
            self._resume(agent)

    def tick(self, now: float) -> None:
        """Periodic: close agents over their buffer too long; answer joins whose wait ran out."""
        stall = self.limits.agent_stall
        for agent in [a for a in self._over if a.over_since is not None and now - a.over_since >= stall]:
            self._close_slow(agent)
        for room in [r for r in self._waiting if any(p[1] <= now for p in r.pending)]:
            due = [p for p in room.pending if p[1] <= now]
            room.pending = [p for p in room.pending if p[1] > now]
            self._answer(room, due)

    def _unjoin(self, agent: Watcher, key: SessionKey) -> None:
        agent.joins.discard(key)
        agent.dropped.pop(key, None)
        room = self.rooms.get(key)
        if room is None or room.agents.pop(agent.id, None) is None:
            return
        room.codecs = _codecs(frozenset(a.codec for a in room.agents.values()))
        if room.pending:
            room.pending = [p for p in room.pending if p[0] is not agent]
            if not room.pending:
                self._waiting.discard(room)
        self.bus.left(key, agent.id)
        if not room.agents:
            self.bus.unwatch(key)
            room.remote_tabs.clear()
        self._agents_changed(room)
        self._gc(room)

    def _to_agents(self, room: Room, ev: Up, now: float) -> None:
        """``ev`` to the agents here, encoded once per codec in use."""
        codecs = room.codecs
        if len(codecs) == 1:
            for codec in codecs:
                self._deliver(room, room.agents.values(), *codec.session_event(ev), now)
            return
        for codec in codecs:
            agents = [a for a in room.agents.values() if a.codec is codec]
            self._deliver(room, agents, *codec.session_event(ev), now)

    def _deliver(
        self,
        room: Room,
        agents: Iterable[Watcher],
        size: int,
        frame: bytes,
        binary: bool,
        rest: tuple[bytes, ...],
        now: float,
    ) -> None:
        """One encoded event (``Out``) to ``agents``, each within its relay buffer."""
        bound = self.limits.agent_buffer
        counts = self.counts
        slow: list[Watcher] | None = None
        for agent in agents:
            sink = agent.sink
            queued = sink.buffered()
            if agent.over_since is not None:
                if queued <= bound // 2:
                    self._resume(agent)
                else:
                    if now - agent.over_since >= self.limits.agent_stall:
                        if slow is None:
                            slow = []
                        slow.append(agent)
                    self._drop(agent, room.key)
                    continue
            # An agent with nothing queued always gets the next event, however large.
            if queued and queued + size > bound:
                agent.over_since = now
                self._over.add(agent)
                self._drop(agent, room.key)
                continue
            if binary:
                sink.send_binary(frame)
            else:
                sink.send_text(frame)
            if rest:
                for part in rest:
                    sink.send_binary(part)
            counts.relayed += 1
            counts.bytes_out += size
        if slow:
            for agent in slow:
                self._close_slow(agent)

    def _drop(self, agent: Watcher, key: SessionKey) -> None:
        agent.dropped[key] = agent.dropped.get(key, 0) + 1
        self.counts.dropped += 1

    def _resume(self, agent: Watcher) -> None:
        agent.over_since = None
        self._over.discard(agent)
        dropped, agent.dropped = agent.dropped, {}
        for (_, sid), n in dropped.items():
            agent.codec.gap(agent, sid, n)
            self.counts.gaps += 1

    def _close_slow(self, agent: Watcher) -> None:
        self.counts.slow_closes += 1
        self.remove_agent(agent)
        agent.sink.close(CloseCode.TOO_SLOW, f"too slow: over {self.limits.agent_buffer} relay bytes queued")

    def _to_tabs(self, room: Room, ev: Down) -> None:
        tab_id = ev.tab
        if tab_id is None:
            tabs: Iterable[Tab] = room.tabs.values()
        else:
            one = room.tabs.get(tab_id)
            if one is None:
                return
            tabs = (one,)
        codec: Codec | None = None
        out: Out = (0, b"", False, ())
        for tab in tabs:
            if tab.codec is not codec or codec.per_tab:
                codec = tab.codec
                out = codec.agent_event(ev, tab)
            _, frame, binary, rest = out
            sink = tab.sink
            if binary:
                sink.send_binary(frame)
            else:
                sink.send_text(frame)
            for part in rest:
                sink.send_binary(part)
            self.counts.sent += 1

    # -- rooms ---------------------------------------------------------------------

    def _room(self, key: SessionKey) -> Room:
        room = self.rooms.get(key)
        if room is None:
            room = self.rooms[key] = Room(key)
        return room

    def _gc(self, room: Room) -> None:
        if room.empty and self.rooms.get(room.key) is room:
            del self.rooms[room.key]

    def _agents_changed(self, room: Room) -> None:
        """Tell the session's tabs here who watches it now (and agents that are told so)."""
        if not (room.tabs or room.agents):
            return
        entries = room.entries()
        if room.tabs:
            watched = bool(entries)
            for tab in room.tabs.values():
                tab.sink.watched(watched)
            for codec, tabs in _by_codec(room.tabs.values()).items():
                codec.agents(tabs, entries)
        for agent in list(room.agents.values()):
            agent.codec.room_agents(agent, room.key, entries)

    def _tabs_changed(self, room: Room) -> None:
        if room.remote_agents:
            self.bus.tabs(room.key, list(room.tabs))
        self._tell_tabs(room)

    def _tell_tabs(self, room: Room) -> None:
        if room.agents:
            tabs = room.tab_ids()
            for agent in list(room.agents.values()):
                agent.codec.room_tabs(agent, room.key, tabs)

    def _answer(self, room: Room, joins: Iterable[tuple[Watcher, float]]) -> None:
        if not room.pending:
            self._waiting.discard(room)
        tabs = room.tab_ids()
        for agent, _ in joins:
            if not agent.closed and room.key in agent.joins:
                agent.codec.joined(agent, room.key[1], tabs)

    # -- what the bus brings from other nodes --------------------------------------

    def remote_joined(self, node: str, key: SessionKey, agents: list[tuple[str, dict[str, Any]]]) -> None:
        """Agents of ``node`` joined ``key`` (or re-sent their joins): kept if a tab is here."""
        room = self.rooms.get(key)
        if room is None or not room.tabs:
            return
        if not room.remote_agents:
            self.bus.listen(key)
        changed = False
        for agent_id, info in agents:
            if room.remote_agents.get(agent_id) != (node, info):
                room.remote_agents[agent_id] = (node, info)
                changed = True
        # Also the answer to the join: the agent's node lists these tabs in ``joined``.
        self.bus.tabs(key, list(room.tabs))
        if changed:
            self._agents_changed(room)

    def remote_left(self, node: str, key: SessionKey, agent_id: str) -> None:
        room = self.rooms.get(key)
        if room is None or room.remote_agents.pop(agent_id, None) is None:
            return
        if not room.remote_agents:
            self.bus.unlisten(key)
        self._agents_changed(room)

    def remote_tabs(self, node: str, key: SessionKey, tabs: list[str]) -> None:
        """``node``'s tabs of ``key`` (an answer to a join, or they changed)."""
        room = self.rooms.get(key)
        if room is None or not room.agents:
            return
        if tabs:
            room.remote_tabs[node] = tabs
        else:
            room.remote_tabs.pop(node, None)
        if room.pending:
            pending, room.pending = room.pending, []
            self._answer(room, pending)
        self._tell_tabs(room)

    def remote_up(
        self,
        key: SessionKey,
        tab: str,
        name: str | None,
        json: Raw,
        wrapped: bool,
        blobs: tuple[bytes, ...],
        now: float,
    ) -> None:
        """A session event from the node of one of its tabs (``Up``'s parts: ``json`` is its
        tab's envelope when ``wrapped``, else its data)."""
        room = self.rooms.get(key)
        if room is not None and room.agents:
            data, envelope = (None, json) if wrapped else (json, None)
            self._to_agents(room, Up(key[1], tab, name, data, envelope, blobs), now)

    def remote_down(self, key: SessionKey, agent: str, name: str, data: Raw, tab: str | None) -> None:
        """An agent's event (``Down``'s parts) for the session's tabs here."""
        room = self.rooms.get(key)
        if room is not None:
            self._to_tabs(room, Down(agent, name, data, tab))

    def node_gone(self, node: str) -> None:
        """``node`` left or died: forget its agents and tabs."""
        for room in list(self.rooms.values()):
            if room.remote_tabs.pop(node, None) is not None:
                self._tell_tabs(room)
            gone = [aid for aid, (n, _) in room.remote_agents.items() if n == node]
            if gone:
                for aid in gone:
                    del room.remote_agents[aid]
                if not room.remote_agents:
                    self.bus.unlisten(room.key)
                self._agents_changed(room)

    def rejoin(self, key: SessionKey) -> None:
        """Re-send this node's joins of ``key``: a node that newly holds one of its tabs learns them."""
        room = self.rooms.get(key)
        if room is not None and room.agents:
            self.bus.joined(key, [(a.id, a.info) for a in room.agents.values()])

    def resync(self) -> None:
        """The bus (re)connected: re-send every join of this node's agents."""
        for key in [k for k, r in self.rooms.items() if r.agents]:
            self.rejoin(key)

    # -- registry listener: a tab moving to another node ---------------------------

    def session_started(self, session: Session) -> None:
        # Agents waiting for the session (``Codec.waits``): its tab's node learns of them.
        self.rejoin((session.projectKey, session.sessionID))

    def session_changed(self, session: Session, changes: dict[str, Any]) -> None:
        if "tabs" in changes:
            self.rejoin((session.projectKey, session.sessionID))

    def session_touched(self, session: Session) -> None:
        pass

    def session_ended(self, session: Session, reason: EndReason) -> None:
        """Joins of an ended session are let go (the agent's subscription tells it the end),
        but for agents whose protocol waits for the session to come back."""
        room = self.rooms.get((session.projectKey, session.sessionID))
        if room is not None:
            for agent in list(room.agents.values()):
                if not agent.codec.waits:
                    self._unjoin(agent, room.key)
