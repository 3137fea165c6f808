"""Fan-out of live session changes to assist agents (CONTRACT §3), without I/O.

``FanOut`` is a ``Registry`` listener. Subscriptions with the same project,
filters and sessionID share one ``Group``: the group decides once per change
whether the session matches (start / update / end "unmatched") and keeps the
set of sessionIDs that match now. Groups are indexed by (project,
sessionID), by the values of one of their ``is`` criteria (plus the
sessions each such group watches, to see a session stop matching), and the
rest by project: a change costs one match per candidate group plus one
outbox step per agent of the groups it concerns, never a scan of every
agent.

Each agent has a coalescing outbox keyed by sessionID: a pending start
encodes the latest record when it is sent, pending updates merge, a start
then end never reaches the agent. An agent whose connection is paused
therefore holds at most one entry per session it watched, and is closed
with ``CloseCode.TOO_SLOW`` past ``max_pending`` entries.

``lastActiveAt``-only changes (``session_touched``) cost one dict store per
project; ``tick`` (once per interval) sends each group one batch, encoded
once and shared by the group's agents that are not behind.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final, Protocol

import msgspec
from msgspec import Struct

from .index import LiveIndex
from .record import Session, decode_frame, valid_session_id
from .search import Criterion, Query, QueryError, convert_filters, sort_key, text_of
from .wire import CloseCode, EndReason, ErrorCode, InputError


class Snapshot(Struct, tag_field="type", tag="snapshot"):
    sessions: list[Session]


class SessionStart(Struct, tag_field="type", tag="session.start"):
    session: Session


class SessionUpdate(Struct, tag_field="type", tag="session.update"):
    sessionID: str
    changes: dict[str, Any]


class Active(Struct, gc=False):
    # Not a dict: 10k of these per tick must not set off the garbage collector.
    lastActiveAt: int


class SessionsUpdate(Struct, tag_field="type", tag="sessions.update"):
    """lastActiveAt of several sessions at once: ``changes`` by sessionID."""

    changes: dict[str, Active]


class SessionEnd(Struct, tag_field="type", tag="session.end"):
    sessionID: str
    reason: EndReason


class Subscribe(Struct, tag_field="type", tag="subscribe"):
    # Raw: converted by search.convert_filters so errors read as the HTTP API's.
    filters: Any = None
    sessionID: Any = None
    # Opt in to ``sessions.update``: one frame per interval for many sessions'
    # lastActiveAt, instead of CONTRACT §3's one ``session.update`` each.
    batch: bool = False


class Ping(Struct, tag_field="type", tag="ping"):
    """Keeps a browser agent (which cannot send WebSocket pings) within --agent-idle-timeout."""


PONG: Final = b'{"type":"pong"}'

_decoder: Final = msgspec.json.Decoder(Subscribe | Ping)
_encode: Final = msgspec.json.Encoder().encode


class Subscription(Struct, frozen=True):
    project_key: str
    criteria: tuple[Criterion, ...] = ()
    session_id: str | None = None
    batch: bool = False


def parse_message(frame: bytes, project_key: str, max_filters: int) -> Subscription | None:
    """An agent's frame: a subscription, None for a ping, or InputError (code + message)."""
    msg = decode_frame(_decoder, frame)
    return None if isinstance(msg, Ping) else subscription(msg, project_key, max_filters)


def subscription(msg: Subscribe, project_key: str, max_filters: int) -> Subscription:
    """What a ``subscribe`` frame asks for, or InputError."""
    try:
        criteria = convert_filters(msg.filters)
    except QueryError as exc:
        raise InputError(ErrorCode.INVALID_FILTERS, str(exc)) from None
    if max_filters and len(criteria) > max_filters:
        raise InputError(
            ErrorCode.LIMIT_EXCEEDED, f"{len(criteria)} filters, over the limit of {max_filters}"
        )
    session_id = msg.sessionID
    if session_id is not None and not valid_session_id(session_id):
        raise InputError(ErrorCode.INVALID_FIELD, "sessionID must be 1-64 characters of A-Za-z0-9._:-")
    return Subscription(project_key, criteria, session_id, msg.batch)


class Sink(Protocol):
    """The agent's connection, as the fan-out needs it."""

    paused: bool

    def send(self, frame: bytes) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


# What an outbox entry sends after its end (if any). Plain ints, not an enum:
# they are read for every agent of every change (an enum member lookup cost
# ~50% more per change, measured with callgrind).
NOTHING: Final = 0
START: Final = 1  # session.start with the record as it is at send time
UPDATE: Final = 2  # session.update with the merged changes
UPDATE_TOUCH: Final = 3  # the same, plus the record's current lastActiveAt
TOUCH: Final = 4  # the current lastActiveAt alone (batched with other sessions')


class _Entry:
    """What an agent has not been sent yet about one session: a small state machine.

    An entry sends ``end`` first when ``ended`` is set (the agent saw the
    session, which ended), then what ``next`` says. Every transition is a
    method below; ``(new)`` is an entry created for the event:

    =============  ============  ===============  ==============  ==================
    state          start         update(c)        touch           end(r)
    =============  ============  ===============  ==============  ==================
    (new)          START         UPDATE c         TOUCH           end r
    START          START         START            START           dropped (unseen)
    UPDATE c       START         UPDATE c+c'      UPDATE_TOUCH c  end r
    UPDATE_TOUCH   START         UPDATE_TOUCH     UPDATE_TOUCH    end r
    TOUCH          START         UPDATE_TOUCH c   TOUCH           end r
    end r          end r, START  end r            end r           end r
    end r, START   end r, START  end r, START     end r, START    end r
    =============  ============  ===============  ==============  ==================

    So an agent never gets an update before a start or after an end, and a
    start then end it never saw costs it nothing.
    """

    __slots__ = ("changes", "ended", "next", "session")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.ended: EndReason | None = None
        self.next = NOTHING
        # Merged changes of UPDATE*; never mutated (shared between agents).
        self.changes: dict[str, Any] | None = None

    def start(self, session: Session) -> None:
        self.session = session
        self.next = START
        self.changes = None

    def update(self, changes: dict[str, Any]) -> None:
        nxt = self.next
        if nxt == START or (self.ended is not None and nxt == NOTHING):
            return  # the start carries the latest record; nothing follows an end
        if nxt == NOTHING:
            self.changes, self.next = changes, UPDATE
        elif nxt == TOUCH:
            self.changes, self.next = changes, UPDATE_TOUCH
        else:
            assert self.changes is not None
            self.changes = {**self.changes, **changes}

    def touch(self) -> None:
        if self.next == UPDATE:
            self.next = UPDATE_TOUCH
        elif self.next == NOTHING and self.ended is None:
            self.next = TOUCH

    def end(self, reason: EndReason) -> bool:
        """False when the entry is to be dropped: the agent never saw the session."""
        if self.next == START:
            if self.ended is None:
                return False
        else:
            self.ended = reason
        self.next = NOTHING
        self.changes = None
        return True


class Agent:
    """One agent connection: its group, its outbox."""

    __slots__ = ("batch", "closed", "entries", "group", "sink", "snapshot_due")

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.group: Group | None = None
        self.entries: OrderedDict[str, _Entry] = OrderedDict()
        # A group's encoded lastActiveAt frames, shared, queued before ``entries``.
        self.batch: tuple[list[bytes], dict[str, Session]] | None = None
        # The snapshot is built when it can be sent: events until then are in it.
        self.snapshot_due = False
        self.closed = False

    @property
    def pending(self) -> int:
        """Sessions with something unsent (the memory a slow agent holds)."""
        return len(self.entries) + (len(self.batch[1]) if self.batch is not None else 0)

    def _entry(self, session: Session) -> _Entry:
        entry = self.entries.get(session.sessionID)
        if entry is None:
            entry = self.entries[session.sessionID] = _Entry(session)
        return entry

    def start(self, session: Session) -> None:
        self._entry(session).start(session)

    def update(self, session: Session, changes: dict[str, Any]) -> None:
        self._entry(session).update(changes)

    def end(self, session: Session, reason: EndReason) -> None:
        if not self._entry(session).end(reason):
            del self.entries[session.sessionID]

    def touch(self, session: Session) -> None:
        self._entry(session).touch()

    def fold_batch(self) -> None:
        """Turn the queued shared batch into entries (the agent is behind)."""
        if self.batch is not None:
            sessions = self.batch[1]
            self.batch = None
            for session in sessions.values():
                self.touch(session)


class Group:
    """Agents with the same subscription, and the sessions matching it now."""

    __slots__ = ("agents", "key", "query", "sub", "watched")

    def __init__(self, sub: Subscription, index: LiveIndex) -> None:
        self.sub = sub
        self.query = Query(criteria=sub.criteria)
        self.agents: set[Agent] = set()
        # An "is" criterion: a session can only match with one of its values, so
        # the group is found by value instead of being matched on every change.
        exact = [c for c in sub.criteria if c.op == "is" and c.values]
        self.key: Criterion | None = (
            min(exact, key=lambda c: len(c.values)) if exact and sub.session_id is None else None
        )
        if sub.session_id is not None:
            one = index.get(sub.project_key, sub.session_id)
            found = [] if one is None or not self.query.matches(one) else [one]
        else:
            found = index.matching(sub.project_key, sub.criteria)
        self.watched: set[str] = {s.sessionID for s in found}

    def matches(self, session: Session) -> bool:
        sid = self.sub.session_id
        return (sid is None or sid == session.sessionID) and self.query.matches(session)


class FanOut:
    """Registry listener delivering session changes to subscribed agents."""

    def __init__(self, index: LiveIndex, max_pending: int, wake: Callable[[], None]) -> None:
        self.index = index
        self.max_pending = max_pending
        # Called when agents have frames to send; the caller then runs ``flush``.
        self._wake = wake
        self.agents: set[Agent] = set()
        self._groups: dict[Subscription, Group] = {}
        # Filter groups without an "is" criterion: matched on every change of the project.
        self._by_project: dict[str, set[Group]] = {}
        # Groups with one: project -> (field, metadata key) -> value -> groups.
        self._by_value: dict[str, dict[tuple[str, str | None], dict[str, set[Group]]]] = {}
        # (project, sessionID) -> groups of one session, and value-indexed groups watching it.
        self._by_session: dict[tuple[str, str], set[Group]] = {}
        self._watching: dict[tuple[str, str], set[Group]] = {}
        self._dirty: dict[Agent, None] = {}
        # Sessions touched since the last tick, per project.
        self._touched: dict[str, dict[str, Session]] = {}
        # Frames encoded during one flush, shared by agents: id(object) -> (object, frame).
        self._frames: dict[int, tuple[object, bytes]] = {}

    # Agents -------------------------------------------------------------

    def add(self, sink: Sink) -> Agent:
        agent = Agent(sink)
        self.agents.add(agent)
        return agent

    def remove(self, agent: Agent) -> None:
        agent.closed = True
        self._leave(agent)
        self.agents.discard(agent)
        self._dirty.pop(agent, None)
        agent.entries.clear()
        agent.batch = None

    def subscribe(self, agent: Agent, sub: Subscription) -> None:
        """Replace the agent's subscription; a snapshot goes out first."""
        self._leave(agent)
        group = self._groups.get(sub)
        if group is None:
            group = self._groups[sub] = Group(sub, self.index)
            self._register(group)
        group.agents.add(agent)
        agent.group = group
        agent.entries.clear()
        agent.batch = None
        agent.snapshot_due = True
        self.deliver(agent)

    def _leave(self, agent: Agent) -> None:
        group, agent.group = agent.group, None
        if group is None:
            return
        group.agents.discard(agent)
        if group.agents:
            return
        del self._groups[group.sub]
        self._unregister(group)

    def _register(self, group: Group) -> None:
        project, sid, key = group.sub.project_key, group.sub.session_id, group.key
        if sid is not None:
            self._by_session.setdefault((project, sid), set()).add(group)
        elif key is None:
            self._by_project.setdefault(project, set()).add(group)
        else:
            values = self._by_value.setdefault(project, {}).setdefault((key.field, key.key), {})
            for value in key.values:
                values.setdefault(value, set()).add(group)
            for watched in group.watched:
                self._watching.setdefault((project, watched), set()).add(group)

    def _unregister(self, group: Group) -> None:
        project, sid, key = group.sub.project_key, group.sub.session_id, group.key
        if sid is not None:
            _discard(self._by_session, (project, sid), group)
        elif key is None:
            _discard(self._by_project, project, group)
        else:
            by_field = self._by_value[project]
            values = by_field[(key.field, key.key)]
            for value in key.values:
                _discard(values, value, group)
            if not values:
                del by_field[(key.field, key.key)]
                if not by_field:
                    del self._by_value[project]
            for watched in group.watched:
                _discard(self._watching, (project, watched), group)

    def _watch(self, group: Group, sid: str) -> None:
        group.watched.add(sid)
        if group.key is not None:
            self._watching.setdefault((group.sub.project_key, sid), set()).add(group)

    def _unwatch(self, group: Group, sid: str) -> None:
        group.watched.discard(sid)
        if group.key is not None:
            _discard(self._watching, (group.sub.project_key, sid), group)

    def _groups_of(self, session: Session) -> list[Group]:
        """Groups the session may matter to: it matches them, or did."""
        project = session.projectKey
        groups = list(self._by_project.get(project, ()))
        at = (project, session.sessionID)
        groups.extend(self._by_session.get(at, ()))
        by_field = self._by_value.get(project)
        if by_field:
            found = set(self._watching.get(at, ()))
            for (field, key), values in by_field.items():
                text = text_of(session, field, key)
                if text is not None:
                    found.update(values.get(text, ()))
            groups.extend(found)
        return groups

    # Registry listener --------------------------------------------------

    def session_started(self, session: Session) -> None:
        for group in self._groups_of(session):
            if group.matches(session):
                self._watch(group, session.sessionID)
                self._each(group, lambda a: a.start(session))

    def session_changed(self, session: Session, changes: dict[str, Any]) -> None:
        touched = self._touched.get(session.projectKey)
        if touched is not None and "lastActiveAt" in changes:
            # The update carries lastActiveAt; a change without it (a tab closing)
            # must not swallow the heartbeat waiting for the next tick.
            touched.pop(session.sessionID, None)
        groups = self._groups_of(session)
        if not groups:
            return
        # One copy shared by every agent: the registry's dict is not ours to keep.
        changes = dict(changes)
        sid = session.sessionID
        for group in groups:
            was, now = sid in group.watched, group.matches(session)
            if was and now:
                self._each(group, lambda a: a.update(session, changes))
            elif now:
                self._watch(group, sid)
                self._each(group, lambda a: a.start(session))
            elif was:
                self._unwatch(group, sid)
                self._each(group, lambda a: a.end(session, EndReason.UNMATCHED))

    def session_touched(self, session: Session) -> None:
        project = session.projectKey
        if (
            project in self._by_project
            or project in self._by_value
            or (project, session.sessionID) in self._by_session
        ):
            self._touched.setdefault(project, {})[session.sessionID] = session

    def session_ended(self, session: Session, reason: EndReason) -> None:
        touched = self._touched.get(session.projectKey)
        if touched is not None:
            touched.pop(session.sessionID, None)
        sid = session.sessionID
        for group in self._groups_of(session):
            if sid in group.watched:
                self._unwatch(group, sid)
                self._each(group, lambda a: a.end(session, reason))

    def _each(self, group: Group, step: Callable[[Agent], None]) -> None:
        over: list[Agent] = []
        for agent in group.agents:
            if agent.snapshot_due:
                continue  # the snapshot, built later, will show this change
            step(agent)
            self._mark(agent)
            if self._behind(agent):
                over.append(agent)
        for agent in over:
            self._drop(agent)

    def _behind(self, agent: Agent) -> bool:
        # A burst fills any outbox until the next flush: only a paused one is behind.
        return agent.sink.paused and len(agent.entries) > self.max_pending

    def _mark(self, agent: Agent) -> None:
        if not self._dirty:
            self._wake()
        self._dirty[agent] = None

    def _drop(self, agent: Agent) -> None:
        sink = agent.sink
        self.remove(agent)
        sink.close(CloseCode.TOO_SLOW, f"too slow: over {self.max_pending} sessions with unsent changes")

    # Periodic lastActiveAt batches ---------------------------------------

    def tick(self) -> None:
        """Send what was touched since the last tick, one batch per group."""
        touched, self._touched = self._touched, {}
        over: list[Agent] = []
        for project, sessions in touched.items():
            for group in self._touch_groups(project, sessions):
                watched = group.watched
                if len(watched) < len(sessions):
                    batch = {sid: sessions[sid] for sid in watched if sid in sessions}
                else:
                    batch = {sid: s for sid, s in sessions.items() if sid in watched}
                if batch:
                    self._offer(group, batch, over)
        for agent in over:
            self._drop(agent)
        self.flush()

    def _touch_groups(self, project: str, sessions: dict[str, Session]) -> list[Group]:
        groups = list(self._by_project.get(project, ()))
        if self._by_session or self._watching:
            found: set[Group] = set()
            for sid in sessions:
                found.update(self._by_session.get((project, sid), ()))
                found.update(self._watching.get((project, sid), ()))
            groups.extend(found)
        return groups

    def _offer(self, group: Group, batch: dict[str, Session], over: list[Agent]) -> None:
        frames: list[bytes] | None = None
        for agent in group.agents:
            if agent.snapshot_due:
                continue
            if agent.batch is None and not agent.entries:
                if frames is None:
                    frames = _touch_frames({sid: s.lastActiveAt for sid, s in batch.items()}, group.sub.batch)
                agent.batch = (frames, batch)
            else:
                # Behind: keep only the latest lastActiveAt per session, in the outbox.
                agent.fold_batch()
                for session in batch.values():
                    agent.touch(session)
                if self._behind(agent):
                    over.append(agent)
            self._mark(agent)

    # Delivery -----------------------------------------------------------

    def flush(self) -> None:
        """Send queued frames to every agent that has some, until it pauses."""
        dirty, self._dirty = self._dirty, {}
        try:
            for agent in dirty:
                self._send(agent)
        finally:
            self._frames.clear()

    def deliver(self, agent: Agent) -> None:
        """Send one agent's queued frames now (subscribed, or its buffer drained)."""
        try:
            self._send(agent)
        finally:
            self._frames.clear()

    def _send(self, agent: Agent) -> None:
        sink = agent.sink
        if agent.closed or sink.paused:
            return
        if agent.snapshot_due:
            agent.snapshot_due = False
            sink.send(self._snapshot(agent))
            if sink.paused:
                return
        if agent.batch is not None:
            frames, _ = agent.batch
            agent.batch = None
            for frame in frames:
                sink.send(frame)
        entries = agent.entries
        touches: dict[str, int] = {}
        while entries and not sink.paused:
            sid, entry = entries.popitem(last=False)
            session, nxt = entry.session, entry.next
            if entry.ended is not None:
                sink.send(_encode(SessionEnd(sid, entry.ended)))
            if nxt == START:
                sink.send(self._start_frame(session))
            elif nxt == UPDATE:
                assert entry.changes is not None
                sink.send(self._update_frame(sid, entry.changes))
            elif nxt == UPDATE_TOUCH:
                changes = {**(entry.changes or {}), "lastActiveAt": session.lastActiveAt}
                sink.send(_encode(SessionUpdate(sid, changes)))
            elif nxt == TOUCH:
                touches[sid] = session.lastActiveAt
        if touches:
            for frame in _touch_frames(touches, agent.group is not None and agent.group.sub.batch):
                sink.send(frame)

    # One encoding per object per flush: the same change goes to many agents.
    # Keyed by id(); the object is kept alongside so the id stays its own.

    def _start_frame(self, session: Session) -> bytes:
        hit = self._frames.get(id(session))
        if hit is None or hit[0] is not session:
            hit = self._frames[id(session)] = (session, _encode(SessionStart(session)))
        return hit[1]

    def _update_frame(self, sid: str, changes: dict[str, Any]) -> bytes:
        hit = self._frames.get(id(changes))
        if hit is None or hit[0] is not changes:
            hit = self._frames[id(changes)] = (changes, _encode(SessionUpdate(sid, changes)))
        return hit[1]

    def _snapshot(self, agent: Agent) -> bytes:
        group = agent.group
        sessions: list[Session] = []
        if group is not None:
            get = self.index.get
            for sid in group.watched:
                session = get(group.sub.project_key, sid)
                if session is not None:
                    sessions.append(session)
        sessions.sort(key=sort_key("timestamp", True), reverse=True)
        return _encode(Snapshot(sessions))


def _discard(index: dict[Any, set[Group]], key: Any, group: Group) -> None:
    groups = index.get(key)
    if groups is not None:
        groups.discard(group)
        if not groups:
            del index[key]


def _touch_frames(touches: dict[str, int], batch: bool) -> list[bytes]:
    if batch and len(touches) > 1:
        return [_encode(SessionsUpdate({sid: Active(at) for sid, at in touches.items()}))]
    return [_encode(SessionUpdate(sid, {"lastActiveAt": at})) for sid, at in touches.items()]
