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
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Final, Protocol

import msgspec
from msgspec import Meta, Raw, Struct

from .record import Emit, Session, decode_frame, valid_session_id
from .relay_bus import LocalBus, RelayBus
from .wire import CloseCode, EndReason, ErrorCode, InputError, RelayError, RelayType

SessionKey = tuple[str, str]

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


class _Header(Struct):
    sessionID: str
    tab: str


_agent_decoder: Final = msgspec.json.Decoder(AgentMessage)
_encode: Final = msgspec.json.Encoder().encode


def parse_agent_message(frame: bytes) -> Join | Leave | Send:
    """An agent's relay frame (``join``, ``leave``, ``send``), or InputError (code + message)."""
    return decode_frame(_agent_decoder, frame)


def new_tab_id() -> str:
    return secrets.token_hex(8)


def tab_id_or_new(value: object) -> str:
    """A tracker's ``tabId`` if valid (1-64 of ``[A-Za-z0-9._:-]``), else a new one."""
    return value if valid_session_id(value) else new_tab_id()  # type: ignore[return-value]


def binary_header(session_id: str, tab: str) -> bytes:
    """CONTRACT §7's routing header of a relayed binary frame: length, then JSON."""
    head = _encode(_Header(session_id, tab))
    return len(head).to_bytes(HEADER_LEN_BYTES, "big") + head


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
    __slots__ = ("closed", "header", "id", "key", "room", "sink", "stamp", "tokens")

    def __init__(self, room: Room, tab_id: str, sink: TabSink, tokens: float, now: float) -> None:
        key = self.key = room.key
        # Its room lives as long as it does: an emit needs no lookup.
        self.room = room
        self.id = tab_id
        self.sink = sink
        self.header = binary_header(key[1], tab_id)
        self.tokens = tokens
        self.stamp = now
        self.closed = False


class Watcher:
    """One agent connection: its project, its joins, its back-pressure state."""

    __slots__ = ("closed", "dropped", "id", "info", "joins", "over_since", "project", "sink")

    def __init__(self, project: str, sink: Sink) -> None:
        self.id = secrets.token_hex(8)
        self.project = project
        self.sink = sink
        self.info: dict[str, Any] = {}
        self.joins: set[SessionKey] = set()
        # When its queue went past the bound (None: not over), and events lost per session since.
        self.over_since: float | None = None
        self.dropped: dict[SessionKey, int] = {}
        self.closed = False


class Room:
    """One session as this node's relay knows it."""

    __slots__ = ("agents", "key", "pending", "remote_agents", "remote_tabs", "tabs")

    def __init__(self, key: SessionKey) -> None:
        self.key = key
        self.tabs: dict[str, Tab] = {}
        self.agents: dict[str, Watcher] = {}
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
        if room.agents or room.remote_agents:
            sink.watched(True)
            sink.send_text(self._agents_frame(room))
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
        if not (room.agents or room.remote_agents):
            return
        frame = _encode(SessionEvent(tab.key[1], tab.id, msg.event, msg.data))
        if room.agents:
            self._to_agents(room, frame, False, now)
        if room.remote_agents:
            self.bus.up(room.key, frame, False)

    def emit_binary(self, tab: Tab, payload: bytes, now: float) -> None:
        """A tracker's binary frame, relayed as it is behind the tab's header."""
        if not self._admit(tab, len(payload), now):
            return
        room = tab.room
        if not (room.agents or room.remote_agents):
            return
        frame = tab.header + payload
        if room.agents:
            self._to_agents(room, frame, True, now)
        if room.remote_agents:
            self.bus.up(room.key, frame, True)

    def _admit(self, tab: Tab, size: int, now: float) -> bool:
        if tab.closed:
            return False
        limits = self.limits
        if size > limits.max_event:
            self._close_tab(tab, f"relay event of {size} bytes, over the limit of {limits.max_event}")
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
        if key not in agent.joins and len(agent.joins) >= self.limits.max_joins:
            self._error(
                agent, RelayError.TOO_MANY_JOINS, f"over {self.limits.max_joins} sessions", msg.sessionID
            )
            return
        if not self.live(*key):
            # Another project's session is not_found too: its existence is not this agent's to know.
            self._error(agent, RelayError.NOT_FOUND, "no live session with this sessionID", msg.sessionID)
            return
        agent.info = msg.agent
        room = self._room(key)
        first = not room.agents
        room.agents[agent.id] = agent
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
            agent.sink.send_text(_encode(Joined(msg.sessionID, room.tab_ids())))

    def leave(self, agent: Watcher, msg: Leave) -> None:
        key = (agent.project, msg.sessionID)
        if key in agent.joins:
            self._unjoin(agent, key)

    def send(self, agent: Watcher, msg: Send, now: float) -> None:
        key = (agent.project, msg.sessionID)
        room = self.rooms.get(key)
        if room is None or key not in agent.joins:
            self._error(agent, RelayError.NOT_JOINED, "join the session first", msg.sessionID)
            return
        frame = _encode(AgentEvent(agent.id, msg.event, msg.data))
        self._to_tabs(room, msg.tab, frame)
        if room.remote_tabs and (msg.tab is None or msg.tab not in room.tabs):
            self.bus.down(key, msg.tab, frame)

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

    def _to_agents(self, room: Room, frame: bytes, binary: bool, now: float) -> None:
        bound = self.limits.agent_buffer
        size = len(frame)
        counts = self.counts
        slow: list[Watcher] | None = None
        for agent in room.agents.values():
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
            if queued + size > bound:
                agent.over_since = now
                self._over.add(agent)
                self._drop(agent, room.key)
                continue
            if binary:
                sink.send_binary(frame)
            else:
                sink.send_text(frame)
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
            agent.sink.send_text(_encode(SessionGap(sid, n)))
            self.counts.gaps += 1

    def _close_slow(self, agent: Watcher) -> None:
        self.counts.slow_closes += 1
        self.remove_agent(agent)
        agent.sink.close(CloseCode.TOO_SLOW, f"too slow: over {self.limits.agent_buffer} relay bytes queued")

    def _to_tabs(self, room: Room, tab_id: str | None, frame: bytes) -> None:
        if tab_id is None:
            for tab in room.tabs.values():
                tab.sink.send_text(frame)
                self.counts.sent += 1
        else:
            one = room.tabs.get(tab_id)
            if one is not None:
                one.sink.send_text(frame)
                self.counts.sent += 1

    def _error(self, agent: Watcher, code: RelayError, message: str, session_id: str) -> None:
        agent.sink.send_text(_encode(RelayErrorFrame(code, message, session_id)))

    # -- rooms ---------------------------------------------------------------------

    def _room(self, key: SessionKey) -> Room:
        room = self.rooms.get(key)
        if room is None:
            room = self.rooms[key] = Room(key)
        return room

    def _gc(self, room: Room) -> None:
        if room.empty and self.rooms.get(room.key) is room:
            del self.rooms[room.key]

    def _agents_frame(self, room: Room) -> bytes:
        entries = [AgentEntry(a.id, a.info) for a in room.agents.values()]
        entries.extend(AgentEntry(aid, info) for aid, (_, info) in room.remote_agents.items())
        return _encode(Agents(len(entries), entries))

    def _agents_changed(self, room: Room) -> None:
        """Tell the session's tabs here who watches it now."""
        if room.tabs:
            frame = self._agents_frame(room)
            watched = bool(room.agents or room.remote_agents)
            for tab in room.tabs.values():
                tab.sink.watched(watched)
                tab.sink.send_text(frame)

    def _tabs_changed(self, room: Room) -> None:
        if room.remote_agents:
            self.bus.tabs(room.key, list(room.tabs))

    def _answer(self, room: Room, joins: Iterable[tuple[Watcher, float]]) -> None:
        if not room.pending:
            self._waiting.discard(room)
        tabs = room.tab_ids()
        for agent, _ in joins:
            if not agent.closed and room.key in agent.joins:
                agent.sink.send_text(_encode(Joined(room.key[1], tabs)))

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

    def remote_up(self, key: SessionKey, frame: bytes, binary: bool, now: float) -> None:
        """A session event (already encoded) from the node of one of its tabs."""
        room = self.rooms.get(key)
        if room is not None and room.agents:
            self._to_agents(room, frame, binary, now)

    def remote_down(self, key: SessionKey, tab_id: str | None, frame: bytes) -> None:
        """An agent's ``agent.event`` (already encoded) for the session's tabs here."""
        room = self.rooms.get(key)
        if room is not None:
            self._to_tabs(room, tab_id, frame)

    def node_gone(self, node: str) -> None:
        """``node`` left or died: forget its agents and tabs."""
        for room in list(self.rooms.values()):
            room.remote_tabs.pop(node, None)
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
        pass

    def session_changed(self, session: Session, changes: dict[str, Any]) -> None:
        if "tabs" in changes:
            self.rejoin((session.projectKey, session.sessionID))

    def session_touched(self, session: Session) -> None:
        pass

    def session_ended(self, session: Session, reason: EndReason) -> None:
        """Joins of an ended session are let go (the agent's subscription tells it the end)."""
        room = self.rooms.get((session.projectKey, session.sessionID))
        if room is not None:
            for agent in list(room.agents.values()):
                self._unjoin(agent, room.key)
