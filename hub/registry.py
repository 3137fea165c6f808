"""The registry of live sessions: start, update, heartbeat, end, tabs, reconnect grace.

``Registry`` turns tracker messages into changes of the live index and
tells its listeners (agent fan-out, metrics) what changed, and its
``Replication`` what changed in the sessions this node holds. No I/O and no
clock: every call takes ``now`` in Unix ms.

In a cluster the index also holds other nodes' sessions. Each node that
holds a session contributes its tabs (0 while that node waits out the
session's grace); the indexed record carries their sum, so the same
sessionID live on two nodes is one session. ``remote_*`` apply what other
nodes published through the same index calls and listener events as local
changes, so agents on every node see every change.

The lifecycle of one session lives in its ``Holding`` (every transition is a
method of ``Registry`` named below); the registry's other dicts are indexes
over holdings, kept by those same methods:

    (absent) --start / remote_upsert--> LIVE (tabs > 0, connected)
    LIVE --last tab closes (detach, a peer's part gone)--> GRACE (tabs 0, connected false)
    GRACE --a tab comes back (start, remote_upsert)--> LIVE
    GRACE --deadline passes (sweep)--> (absent), reason disconnected or timeout
    any --end, a peer's end, node_lost--> (absent)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from types import MappingProxyType
from typing import Any, Final, Protocol

import msgspec

from .index import LiveIndex
from .record import (
    Session,
    Start,
    Strings,
    Update,
    active_time,
    changes_of,
    derived_active_time,
    enrich,
    new_session,
    session_id_or_new,
)
from .replication import LocalReplication, Replication
from .wire import EndReason, ErrorCode, InputError

# A session's identity across the hub: (projectKey, sessionID).
SessionKey = tuple[str, str]

# A connection the hub found nothing about: the start skips the enrichment step.
NO_ENRICHMENT: Final[Mapping[str, str]] = {}

# Fields a remote record may change as they are; tabs, connected and active are
# derived from every node's contribution, timestamp keeps the first start,
# activeTime is told only where listeners cannot derive it (remote_upsert).
_MIRRORED: Final = tuple(
    f.name
    for f in msgspec.structs.fields(Session)
    if f.name
    not in (
        "sessionID",
        "projectKey",
        "tabs",
        "connected",
        "active",
        "timestamp",
        "lastActiveAt",
        "activeTime",
        "live",
    )
)

_MIRRORED_SET: Final = frozenset(_MIRRORED)
# When each field of a record last changed (ms), by whichever node changed it; a field
# without a stamp has the value it started with. A session's parts on several nodes merge
# field by field, the newest change winning: a node that does not mirror the project
# reports its part with values it may not know were changed elsewhere since.
# ``metadata`` and ``userProperties`` are stamped by key ("metadata.<key>"; a removed
# key's stamp stays): tabs on two nodes may set different keys of one map.
Stamps = Mapping[str, int]
NO_STAMPS: Final[Stamps] = MappingProxyType({})
_MAPS: Final = frozenset(("metadata", "userProperties"))
_ABSENT: Final = object()


def _stamps_between(before: Session, after: Mapping[str, Any], now: int) -> Iterator[tuple[str, int]]:
    """The stamps of changing ``before``'s fields to the values in ``after``, at ``now``."""
    for name, value in after.items():
        if name in _MAPS:
            old: dict[str, Any] = getattr(before, name)
            for key in old.keys() | value.keys():
                if old.get(key, _ABSENT) != value.get(key, _ABSENT):
                    yield f"{name}.{key}", now
        elif name in _MIRRORED_SET:
            yield name, now


def _merged_map(
    name: str, ours: dict[str, Any], theirs: dict[str, Any], our_stamps: Stamps, their_stamps: Stamps
) -> dict[str, Any]:
    """``ours`` with each key of ``theirs`` changed more recently there (a tie keeps a key
    either side has: both as the session started)."""
    merged = dict(ours)
    for key in ours.keys() | theirs.keys():
        mine, other = ours.get(key, _ABSENT), theirs.get(key, _ABSENT)
        if mine == other:
            continue
        stamp = f"{name}.{key}"
        at, at_here = their_stamps.get(stamp, 0), our_stamps.get(stamp, 0)
        if at > at_here or (at == at_here and other is not _ABSENT):
            if other is _ABSENT:
                del merged[key]
            else:
                merged[key] = other
    return merged


# Fields a resumed session takes from its earlier record where this node has none.
_ADOPTED: Final = tuple(
    f.name for f in msgspec.structs.fields(Session) if f.name in _MIRRORED and f.default is None
)

# A tab's activity: (what it reported last, None for a new tab; what it reports now).
Activity = tuple[bool | None, bool]


def _project_of(key: SessionKey) -> str:
    return key[0]


class Listener(Protocol):
    """Receives every change of the live index, in order, per session."""

    def session_started(self, session: Session) -> None: ...

    def session_changed(self, session: Session, changes: dict[str, Any]) -> None: ...

    def session_touched(self, session: Session) -> None:
        """Only lastActiveAt changed (a plain heartbeat)."""

    def session_ended(self, session: Session, reason: EndReason) -> None: ...


class ProjectFull(InputError):
    def __init__(self, limit: int) -> None:
        super().__init__(ErrorCode.PROJECT_FULL, f"the project holds its limit of {limit} live sessions")


_NO_NODES: Final[frozenset[str]] = frozenset()


class Holding:
    """Who holds one live session: this node's tabs, each peer's tabs, and its grace."""

    __slots__ = ("deadline", "here", "idle", "idle_nodes", "reason", "remote", "stamps")

    def __init__(self) -> None:
        # This node's tabs; 0: it waits out the session's grace here; None: not held here.
        self.here: int | None = None
        # This node's tabs whose last report was inactive.
        self.idle = 0
        # Tabs each other node holds (0: waiting out its grace there).
        self.remote: dict[str, int] = {}
        # Peers whose every tab is inactive (their record's ``active`` is their part); a
        # set of its own only once there is one (an empty set is 216 bytes a session).
        self.idle_nodes: AbstractSet[str] = _NO_NODES
        # While no node holds a tab: when the grace runs out, and the end reason then.
        self.deadline: int | None = None
        self.reason = EndReason.DISCONNECTED
        # Fields changed since the session started, and when (``Stamps``): none for most.
        self.stamps: dict[str, int] | None = None

    def stamp(self, stamps: Iterable[tuple[str, int]]) -> None:
        """Keep the newest stamp of each field."""
        mine = self.stamps
        for name, at in stamps:
            if mine is None:
                mine = self.stamps = {}
            if at > mine.get(name, 0):
                mine[name] = at

    @property
    def tabs(self) -> int:
        here = self.here or 0
        return here + sum(self.remote.values()) if self.remote else here

    @property
    def active_here(self) -> bool:
        """Any tab of this node active."""
        return (self.here or 0) > self.idle

    def active(self, current: bool) -> bool:
        """The record's ``active``: any tab anywhere active; with no tab anywhere, ``current``."""
        if self.active_here:
            return True
        held = (self.here or 0) > 0
        for node, tabs in self.remote.items():
            if tabs > 0:
                if node not in self.idle_nodes:
                    return True
                held = True
        return False if held else current

    def set_idle(self, node: str, idle: bool) -> None:
        if idle:
            if node not in self.idle_nodes:
                self.idle_nodes = {*self.idle_nodes, node}
        elif node in self.idle_nodes:
            self.idle_nodes = (self.idle_nodes - {node}) or _NO_NODES

    @property
    def orphan(self) -> bool:
        """No node holds it, not even in a grace."""
        return self.here is None and not self.remote


class Registry:
    def __init__(
        self,
        index: LiveIndex,
        grace_ms: int,
        max_sessions_per_project: int = 0,
        replication: Replication | None = None,
    ) -> None:
        self.index = index
        self.grace_ms = grace_ms
        self.max_sessions_per_project = max_sessions_per_project
        self.listeners: list[Listener] = []
        # One copy of each recurring text value of the records held.
        self.strings = Strings()
        self.replication: Replication = replication if replication is not None else LocalReplication()
        # One Holding per indexed session.
        self._holdings: dict[SessionKey, Holding] = {}
        # Indexes over holdings: those held here, those in their grace, each peer's.
        self._local: set[SessionKey] = set()
        self._waiting: dict[SessionKey, Holding] = {}
        # Each peer's sessions by partition (``part_of``): a partition is synced, moved and
        # forgotten alone. The cluster sets ``part_of``; by default a project is one.
        self._by_node: dict[str, dict[str, set[SessionKey]]] = {}
        self.part_of: Callable[[SessionKey], str] = _project_of
        # Whether local changes are stamped (``Stamps``): the cluster merges parts by them.
        self.stamping = False

    def is_live(self, session: Session) -> bool:
        return self.index.get(session.projectKey, session.sessionID) is session

    # -- transitions of a Holding (the only writers of its fields) ------------

    def _set_here(self, key: SessionKey, h: Holding, tabs: int | None) -> None:
        h.here = tabs
        if tabs is None:
            self._local.discard(key)
        else:
            self._local.add(key)

    def _set_remote(self, key: SessionKey, h: Holding, node: str, tabs: int | None) -> None:
        if tabs is None:
            h.remote.pop(node, None)
            h.set_idle(node, False)
            self._unindex(node, key)
        else:
            if node not in h.remote:
                self._by_node.setdefault(node, {}).setdefault(self.part_of(key), set()).add(key)
            h.remote[node] = tabs

    def _unindex(self, node: str, key: SessionKey) -> None:
        parts = self._by_node.get(node)
        if parts is not None:
            part = self.part_of(key)
            keys = parts.get(part)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del parts[part]

    def _begin_grace(self, key: SessionKey, h: Holding, deadline: int, reason: EndReason) -> None:
        """No tab left anywhere; a grace already running keeps its deadline."""
        if h.deadline is None:
            h.deadline = deadline
            h.reason = reason
            self._waiting[key] = h

    def _end_grace(self, key: SessionKey, h: Holding) -> None:
        h.deadline = None
        self._waiting.pop(key, None)

    def _forget(self, key: SessionKey) -> Holding | None:
        h = self._holdings.pop(key, None)
        if h is not None:
            self._local.discard(key)
            self._waiting.pop(key, None)
            for node in h.remote:
                self._unindex(node, key)
        return h

    # -- this node's trackers -------------------------------------------------

    def start(
        self,
        project_key: str,
        project_id: int,
        msg: Start,
        now: int,
        attach: bool,
        enrichment: Mapping[str, str] = NO_ENRICHMENT,
        activity: Activity | None = None,
    ) -> tuple[Session, bool]:
        """Start or join a session; ``attach`` counts a new tab. Returns (session, created).

        ``enrichment``: what the hub found about the tracker's connection
        (``enrich.Enricher.fields``), taken where neither this start nor the
        record has a value. ``activity``: the starting tab's (``active`` is any
        tab's); without it, the record's ``active`` is what this start says.
        """
        session_id = session_id_or_new(msg.sessionID)
        key = (project_key, session_id)
        session = self.index.get(project_key, session_id)
        if enrichment is not NO_ENRICHMENT:
            enrich(msg, enrichment, session)
        if session is None:
            limit = self.max_sessions_per_project
            if limit and self.index.count(project_key) >= limit:
                raise ProjectFull(limit)
            session = new_session(msg, session_id, project_key, project_id, now)
            self.strings.share(session)
            h = self._holdings[key] = Holding()
            self._set_here(key, h, 1)
            h.idle = 0 if session.active else 1
            self.index.add(session)
            for listener in self.listeners:
                listener.session_started(session)
            self.replication.held(session)
            return session, True
        changes = changes_of(msg, session)
        h = self._holdings[key]
        if attach:
            self._set_here(key, h, (h.here or 0) + 1)
            changes["tabs"] = h.tabs
        if not session.connected:
            changes["connected"] = True
            self._end_grace(key, h)
        if activity is None and attach:
            activity = (None, msg.active if isinstance(msg.active, bool) else True)
        self._activity(session, h, activity, changes)
        self._change(session, changes, now)
        return session, False

    def update(self, session: Session, msg: Update, now: int, activity: Activity | None = None) -> None:
        """``activity``: the tab's, when it speaks of it (else ``msg.active`` is the record's)."""
        changes = changes_of(msg, session)
        h = self._holdings.get((session.projectKey, session.sessionID))
        self._activity(session, h, activity, changes)
        self._change(session, changes, now)

    def heartbeat(self, session: Session, active: bool | None, now: int, was: bool | None = None) -> None:
        """``active``: what the tab reports (None: nothing); ``was``: its previous report."""
        if active is not None and active != was:
            changes: dict[str, Any] = {} if was is not None else {"active": active}
            h = self._holdings.get((session.projectKey, session.sessionID))
            self._activity(session, h, None if was is None else (was, active), changes)
            if changes:
                self._change(session, changes, now)
                return
        self._touch(session, now)

    def _activity(
        self, session: Session, h: Holding | None, activity: Activity | None, changes: dict[str, Any]
    ) -> None:
        """Count the tab's activity; the record's ``active`` becomes any tab's (in ``changes``).

        Without ``activity`` (a caller that keeps no tab state) a reported ``active``
        in ``changes`` speaks for every tab of this node.
        """
        if h is None:
            return
        if activity is not None:
            was, now_active = activity
            h.idle += (not now_active) - (0 if was is None else (not was))
        elif "active" in changes:
            h.idle = 0 if changes["active"] else (h.here or 0)
        else:
            return
        merged = h.active(session.active)
        if merged != session.active:
            changes["active"] = merged
        else:
            changes.pop("active", None)

    def _change(self, session: Session, changes: dict[str, Any], now: int) -> None:
        if not changes:
            self._touch(session, now)
            return
        self.strings.share_changes(changes)
        # activeTime moves with lastActiveAt while active, a rule listeners apply
        # themselves (README, "The session record"): it is in the changes only
        # when that rule would be wrong, on a resume (a grace never counts).
        spent = active_time(session, now)
        if spent != derived_active_time(session, now):
            changes["activeTime"] = spent
        changes["lastActiveAt"] = now
        h = self._holdings.get((session.projectKey, session.sessionID)) if self.stamping else None
        if h is not None:
            h.stamp(_stamps_between(session, changes, now))
        self.index.apply(session, changes)
        if spent != session.activeTime:
            self.index.apply(session, {"activeTime": spent})
        for listener in self.listeners:
            listener.session_changed(session, changes)
        self.replication.held(session)

    def _touch(self, session: Session, now: int) -> None:
        # activeTime moves with lastActiveAt; peers and agents derive it from a touch alike.
        self.index.touch(session, now, active_time(session, now))
        for listener in self.listeners:
            listener.session_touched(session)
        self.replication.touched(session)

    def end(self, session: Session, reason: EndReason) -> None:
        """The session leaves the live index at once (a tracker's end, its grace run out here)."""
        self._end(session, reason, local=True)

    def _end(self, session: Session, reason: EndReason, local: bool) -> None:
        if not self.is_live(session):
            return
        h = self._forget((session.projectKey, session.sessionID))
        self.index.remove(session)
        for listener in self.listeners:
            listener.session_ended(session, reason)
        if h is not None and h.here is not None:
            # Ended here: say why. Ended by a peer: this node only lets go of its part.
            self.replication.released(session, reason if local else None)

    def detach(
        self, session: Session, now: int, reason: EndReason = EndReason.DISCONNECTED, active: bool = True
    ) -> None:
        """A tracker connection holding ``session`` closed without ``end`` (``active``: its last report)."""
        key = (session.projectKey, session.sessionID)
        h = self._holdings.get(key)
        if h is None or not self.is_live(session) or not session.connected:
            return
        # This node keeps 0 (its grace) only if the last tab anywhere closes here.
        here = (h.here or 0) - 1
        self._set_here(key, h, here if here > 0 else None)
        h.idle = max(0, h.idle - (not active)) if here > 0 else 0
        tabs = h.tabs
        if tabs > 0:
            # A closing tab is no message from the session: lastActiveAt stays.
            changes: dict[str, Any] = {"tabs": tabs}
            merged = h.active(session.active)
            if merged != session.active:
                # activeTime counts up to lastActiveAt, which stays: the step after it is
                # counted with the new ``active`` (off by at most one heartbeat interval).
                changes["active"] = merged
            self._apply(session, changes)
            if h.here is None:
                self.replication.released(session, None)  # its other tabs are on other nodes
            else:
                self.replication.held(session)
            return
        self._set_here(key, h, 0)
        self._begin_grace(key, h, now + self.grace_ms, reason)
        self._apply(session, {"connected": False, "tabs": 0})
        self.replication.held(session)

    def _apply(self, session: Session, changes: dict[str, Any]) -> None:
        self.index.apply(session, changes)
        for listener in self.listeners:
            listener.session_changed(session, changes)

    def sweep(self, now: int) -> int:
        """End sessions whose grace has run out; returns how many."""
        expired = [(k, h) for k, h in self._waiting.items() if h.deadline is not None and h.deadline <= now]
        for key, h in expired:
            self._end_grace(key, h)
            session = self.index.get(*key)
            if session is not None and not session.connected:
                self._end(session, h.reason, local=True)
        return len(expired)

    @property
    def waiting(self) -> int:
        """Sessions in their reconnect grace."""
        return len(self._waiting)

    # -- cluster: this node's part and other nodes' sessions -------------------

    def holds(self, key: SessionKey) -> bool:
        """Whether this node's trackers hold the session (or it waits out its grace here)."""
        return key in self._local

    def local_tabs(self, key: SessionKey) -> int:
        h = self._holdings.get(key)
        return (h.here or 0) if h is not None else 0

    def stamps(self, key: SessionKey) -> Stamps:
        """When the session's fields changed since it started (what a record goes out with)."""
        h = self._holdings.get(key)
        return (h.stamps if h is not None else None) or NO_STAMPS

    def local_active(self, key: SessionKey, current: bool) -> bool:
        """Any of this node's tabs active; ``current`` while it holds none."""
        h = self._holdings.get(key)
        return h.active_here if h is not None and h.here else current

    def held(self) -> list[Session]:
        """Sessions this node holds."""
        found = (self.index.get(*key) for key in self._local)
        return [s for s in found if s is not None]

    def sessions_of(self, node: str, part: str | None = None) -> set[SessionKey]:
        """``node``'s sessions as this node mirrors them (of one partition, or all)."""
        parts = self._by_node.get(node, {})
        if part is not None:
            return set(parts.get(part, ()))
        return {key for keys in parts.values() for key in keys}

    def remote_upsert(self, node: str, record: Session, now: int, stamps: Stamps = NO_STAMPS) -> None:
        """``node`` holds ``record`` with ``record.tabs`` tabs; ``record`` may be indexed as is.
        ``stamps``: when its fields changed; one older than this node's keeps this node's value."""
        self.strings.share(record)
        key = (record.projectKey, record.sessionID)
        h = self._holdings.get(key)
        session = self.index.get(*key)
        if h is None or session is None:
            self._hold_new(node, key, record, now, stamps)
            self.index.add(record)
            for listener in self.listeners:
                listener.session_started(record)
            return
        self._set_remote(key, h, node, record.tabs)
        h.set_idle(node, not record.active)
        released = record.tabs > 0 and h.here == 0
        if released:
            # Resumed on that node: this node's grace for it is over.
            self._set_here(key, h, None)
        changes: dict[str, Any] = {}
        mine = h.stamps or NO_STAMPS
        for name in _MIRRORED:
            value = getattr(record, name)
            current = getattr(session, name)
            if value == current:
                continue
            if name in _MAPS:
                value = _merged_map(name, current, value, mine, stamps)
                if value != current:
                    changes[name] = value
            elif stamps.get(name, 0) >= mine.get(name, 0):
                changes[name] = value
        if stamps:
            h.stamp(stamps.items())
        if record.timestamp != session.timestamp and (
            record.timestamp < session.timestamp or (len(h.remote) == 1 and h.here is None)
        ):
            changes["timestamp"] = record.timestamp
        self._derive(session, key, h, changes, now)
        newer = record.lastActiveAt > session.lastActiveAt
        # activeTime as for local changes: told only where listeners would derive another
        # value; an older record's is older than ours.
        derived = newer and record.activeTime == derived_active_time(session, record.lastActiveAt)
        if newer and not derived:
            changes["activeTime"] = record.activeTime
        if changes:
            if newer:
                changes["lastActiveAt"] = record.lastActiveAt
            self._apply(session, changes)
            if derived and record.activeTime != session.activeTime:
                self.index.apply(session, {"activeTime": record.activeTime})
        elif newer:
            self.index.touch(session, record.lastActiveAt, record.activeTime)
            for listener in self.listeners:
                listener.session_touched(session)
        if released:
            self.replication.released(session, None)

    def _derive(
        self, session: Session, key: SessionKey, h: Holding, changes: dict[str, Any], now: int
    ) -> None:
        """Add tabs, connected and active, derived from every node's part, to ``changes``."""
        tabs = h.tabs
        if tabs != session.tabs:
            changes["tabs"] = tabs
        if (tabs > 0) != session.connected:
            changes["connected"] = tabs > 0
        active = h.active(session.active)
        if active != session.active:
            changes["active"] = active
        if tabs > 0:
            self._end_grace(key, h)
        else:
            self._begin_grace(key, h, now + self.grace_ms, EndReason.DISCONNECTED)

    def _retab(self, session: Session, key: SessionKey, h: Holding, now: int) -> None:
        changes: dict[str, Any] = {}
        self._derive(session, key, h, changes, now)
        if changes:
            self._apply(session, changes)

    def remote_touch(self, project_key: str, session_id: str, last_active: int) -> None:
        session = self.index.get(project_key, session_id)
        if session is not None and last_active > session.lastActiveAt:
            # The publisher moved activeTime by the same rule, without publishing it.
            self.index.touch(session, last_active, active_time(session, last_active))
            for listener in self.listeners:
                listener.session_touched(session)

    def remote_remove(
        self, node: str, project_key: str, session_id: str, reason: EndReason | None, now: int
    ) -> None:
        """``node`` ended the session (``reason``) or let it go to other nodes (None)."""
        key = (project_key, session_id)
        h = self._holdings.get(key)
        session = self.index.get(*key)
        if h is None or session is None:
            return
        self._set_remote(key, h, node, None)
        if reason is EndReason.ENDED or (h.orphan and reason is None):
            self._end(session, EndReason.ENDED, local=False)
        elif reason is not None and h.orphan:
            # Its grace ran out there and no other node holds a part. A tab that resumed
            # elsewhere keeps it, and so does another part waiting out its own grace: a node
            # that does not mirror the project began its grace when its own tab left, not
            # when the session's last tab closed (this node's sweep ends it then).
            self._end(session, reason, local=False)
        else:
            self._retab(session, key, h, now)

    def drop_node(
        self, node: str, reason: EndReason, now: int, keys: Iterable[SessionKey] | None = None
    ) -> int:
        """Forget ``node``'s sessions (all, or ``keys``): those no other node holds end with ``reason``."""
        dropped = 0
        for key in list(self.sessions_of(node) if keys is None else keys):
            h = self._holdings.get(key)
            session = self.index.get(*key)
            if h is None or session is None:
                continue
            self._set_remote(key, h, node, None)
            if h.orphan:
                self._end(session, reason, local=False)
                dropped += 1
            else:
                self._retab(session, key, h, now)
        if keys is None:
            self._by_node.pop(node, None)
        return dropped

    def move_node(self, node: str, now: int, part: str | None = None) -> None:
        """``node`` is leaving (its sessions of one partition, or all): they wait out their
        grace for their trackers to come back."""
        for key in self.sessions_of(node, part):
            h = self._holdings.get(key)
            session = self.index.get(*key)
            if h is None or session is None:
                continue
            self._set_remote(key, h, node, None)
            self._retab(session, key, h, now)

    def adopt(self, record: Session, now: int, stamps: Stamps = NO_STAMPS) -> bool:
        """``record``: another node's part of a session this node started without knowing of it
        (its project is not mirrored here), read from Redis with its ``stamps``. The start was a
        resume: the session goes on from the record (its first start, page views, active time,
        and fields this node's trackers have not set). Returns whether the session changed."""
        key = (record.projectKey, record.sessionID)
        session = self.index.get(*key)
        if session is None or key not in self._local:
            return False
        changes: dict[str, Any] = {}
        if record.timestamp < session.timestamp:
            changes["timestamp"] = record.timestamp
        # This node counted the page it started on: the same page as the record's is no new one.
        changes["pageViews"] = record.pageViews + session.pageViews - (session.url == record.url)
        changes["activeTime"] = record.activeTime + session.activeTime
        for name in _ADOPTED:
            if getattr(session, name) is None and getattr(record, name) is not None:
                changes[name] = getattr(record, name)
        if record.metadata:
            changes["metadata"] = record.metadata | session.metadata
        if record.userProperties:
            changes["userProperties"] = record.userProperties | session.userProperties
        changes = {k: v for k, v in changes.items() if getattr(session, k) != v}
        if changes:
            self._apply(session, changes)
        # The record's values kept their stamps; this node's that stay (its tracker's start)
        # are the newest.
        h = self._holdings[key]
        h.stamp(stamps.items())
        kept = {n: getattr(session, n) for n in _MIRRORED if getattr(session, n) != getattr(record, n)}
        h.stamp(_stamps_between(record, kept, now))
        if not changes:
            return False
        self.replication.held(session)
        return True

    def _hold_new(
        self, node: str, key: SessionKey, record: Session, now: int, stamps: Stamps = NO_STAMPS
    ) -> None:
        """A holding for ``node``'s ``record``, a session not in the index yet (the caller
        indexes it)."""
        h = self._holdings[key] = Holding()
        if stamps:
            h.stamp(stamps.items())
        self._set_remote(key, h, node, record.tabs)
        h.set_idle(node, not record.active)
        record.tabs = h.tabs
        record.connected = record.tabs > 0
        if not record.connected:
            self._begin_grace(key, h, now + self.grace_ms, EndReason.DISCONNECTED)

    def forget_part(self, part: str, now: int) -> int:
        """Stop mirroring partition ``part``: other nodes' parts of its sessions are forgotten,
        not ended. No listener hears of a session that leaves the index this way (it lives on
        where it is held, and no agent of this node follows the project); one this node holds
        keeps only its part here. Returns how many sessions left the index."""
        forgotten = 0
        kept: set[SessionKey] = set()
        for node in list(self._by_node):
            for key in list(self._by_node[node].get(part, ())):
                h = self._holdings.get(key)
                session = self.index.get(*key)
                if h is None or session is None:
                    continue
                self._set_remote(key, h, node, None)
                if h.orphan:
                    self._forget(key)
                    self.index.remove(session)
                    forgotten += 1
                else:
                    kept.add(key)
        for key in kept:
            h = self._holdings.get(key)
            session = self.index.get(*key)
            if h is not None and session is not None:
                self._retab(session, key, h, now)
        return forgotten

    def reconcile(
        self,
        node: str,
        records: list[Session],
        now: int,
        part: str | None = None,
        stamps: Mapping[str, Stamps] | None = None,
    ) -> None:
        """``node`` holds exactly ``records`` (its snapshot, of one partition or all): add,
        change and end to match. ``stamps``: each record's (by sessionID), where it has any."""
        stamps = stamps or {}
        keys = {(r.projectKey, r.sessionID) for r in records}
        gone = [key for key in self.sessions_of(node, part) if key not in keys]
        for project_key, session_id in gone:
            self.remote_remove(node, project_key, session_id, None, now)
        new: list[Session] = []
        for record in records:
            key = (record.projectKey, record.sessionID)
            if self.index.get(*key) is not None:
                # Held already (by this node or another).
                self.remote_upsert(node, record, now, stamps.get(record.sessionID, NO_STAMPS))
            elif key in keys:
                keys.discard(key)  # once: a snapshot names each session once
                self.strings.share(record)
                self._hold_new(node, key, record, now, stamps.get(record.sessionID, NO_STAMPS))
                new.append(record)
        # A partition read whole mostly lands in an empty index: indexed in one go.
        self.index.add_new(new)
        for record in new:
            for listener in self.listeners:
                listener.session_started(record)
