"""Session lifecycle: start, update, heartbeat, end, tabs, reconnect grace.

``Registry`` turns tracker messages into changes of the live index and
tells its listeners (agent fan-out, cluster mirror, metrics) what changed.
No I/O and no clock: every call takes ``now`` in Unix ms.

In a cluster the index also holds other nodes' sessions. Each node that
holds a session contributes its tabs (0 while that node waits out the
session's grace); the indexed record carries their sum, so the same
sessionID live on two nodes is one session. ``remote_*`` apply what other
nodes published through the same index calls and listener events as local
changes, so agents on every node see every change.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final, Protocol

from .index import LiveIndex
from .session import (
    InputError,
    Session,
    Start,
    Update,
    changes_of,
    new_session,
    session_id_or_new,
)

Key = tuple[str, str]

# Fields a remote record may change as they are; tabs and connected are
# derived from every node's contribution, timestamp keeps the first start.
_MIRRORED: Final = tuple(
    f
    for f in Session.__struct_fields__
    if f not in ("sessionID", "projectKey", "tabs", "connected", "timestamp", "lastActiveAt", "live")
)


class Listener(Protocol):
    """Receives every change of the live index, in order, per session."""

    def session_started(self, session: Session) -> None: ...

    def session_changed(self, session: Session, changes: dict[str, Any]) -> None: ...

    def session_touched(self, session: Session) -> None:
        """Only lastActiveAt changed (a plain heartbeat)."""

    def session_ended(self, session: Session, reason: str) -> None: ...


class ProjectFull(InputError):
    def __init__(self, limit: int) -> None:
        super().__init__("project_full", f"the project holds its limit of {limit} live sessions")


class Registry:
    def __init__(self, index: LiveIndex, grace_ms: int, max_sessions_per_project: int = 0) -> None:
        self.index = index
        self.grace_ms = grace_ms
        self.max_sessions_per_project = max_sessions_per_project
        self.listeners: list[Listener] = []
        # Disconnected sessions waiting out their grace: key -> (deadline, reason).
        self._grace: dict[Key, tuple[int, str]] = {}
        # Tabs this node's trackers hold per session (0: in this node's grace).
        self._here: dict[Key, int] = {}
        # Tabs other nodes hold per session, and the sessions of each node.
        self._remote: dict[Key, dict[str, int]] = {}
        self._by_node: dict[str, set[Key]] = {}

    def is_live(self, session: Session) -> bool:
        return self.index.get(session.projectKey, session.sessionID) is session

    def start(
        self, project_key: str, project_id: int, msg: Start, now: int, attach: bool
    ) -> tuple[Session, bool]:
        """Start or join a session; ``attach`` counts a new tab. Returns (session, created)."""
        session_id = session_id_or_new(msg.sessionID)
        session = self.index.get(project_key, session_id)
        if session is None:
            limit = self.max_sessions_per_project
            if limit and self.index.count(project_key) >= limit:
                raise ProjectFull(limit)
            session = new_session(msg, session_id, project_key, project_id, now)
            self._here[(project_key, session_id)] = 1
            self.index.add(session)
            for listener in self.listeners:
                listener.session_started(session)
            return session, True
        changes = changes_of(msg, session)
        key = (project_key, session_id)
        if attach:
            self._here[key] = self._here.get(key, 0) + 1
            changes["tabs"] = self._tabs(key)
        if not session.connected:
            changes["connected"] = True
            self._grace.pop(key, None)
        self._change(session, changes, now)
        return session, False

    def update(self, session: Session, msg: Update, now: int) -> None:
        self._change(session, changes_of(msg, session), now)

    def heartbeat(self, session: Session, active: bool | None, now: int) -> None:
        if active is not None and active != session.active:
            self._change(session, {"active": active}, now)
            return
        self.index.touch(session, now)
        for listener in self.listeners:
            listener.session_touched(session)

    def _change(self, session: Session, changes: dict[str, Any], now: int) -> None:
        if changes:
            changes["lastActiveAt"] = now
            self.index.apply(session, changes)
            for listener in self.listeners:
                listener.session_changed(session, changes)
        else:
            self.index.touch(session, now)
            for listener in self.listeners:
                listener.session_touched(session)

    def end(self, session: Session, reason: str) -> None:
        if not self.is_live(session):
            return
        key = (session.projectKey, session.sessionID)
        self.index.remove(session)
        self._grace.pop(key, None)
        self._here.pop(key, None)
        for node in self._remote.pop(key, ()):
            self._by_node[node].discard(key)
        for listener in self.listeners:
            listener.session_ended(session, reason)

    def detach(self, session: Session, now: int, reason: str = "disconnected") -> None:
        """A tracker connection holding ``session`` closed without ``end``."""
        if not self.is_live(session) or not session.connected:
            return
        key = (session.projectKey, session.sessionID)
        here = self._here.get(key, 0) - 1
        if here > 0:
            self._here[key] = here
        else:
            # This node no longer holds it, unless it waits out the grace here.
            self._here.pop(key, None)
        tabs = self._tabs(key)
        if tabs > 0:
            # A closing tab is no message from the session: lastActiveAt stays.
            self.index.apply(session, {"tabs": tabs})
            for listener in self.listeners:
                listener.session_changed(session, {"tabs": tabs})
            return
        self._here[key] = 0
        self._grace[key] = (now + self.grace_ms, reason)
        self.index.apply(session, {"connected": False, "tabs": 0})
        for listener in self.listeners:
            listener.session_changed(session, {"connected": False, "tabs": 0})

    def sweep(self, now: int) -> int:
        """End sessions whose grace has run out; returns how many."""
        expired = [(k, r) for k, (deadline, r) in self._grace.items() if deadline <= now]
        for (project_key, session_id), reason in expired:
            del self._grace[(project_key, session_id)]
            session = self.index.get(project_key, session_id)
            if session is not None and not session.connected:
                self.end(session, reason)
        return len(expired)

    @property
    def waiting(self) -> int:
        """Sessions in their reconnect grace."""
        return len(self._grace)

    # -- cluster: this node's part and other nodes' sessions -------------------

    def _tabs(self, key: Key) -> int:
        here = self._here.get(key, 0)
        remote = self._remote.get(key)
        return here + sum(remote.values()) if remote else here

    def holds(self, key: Key) -> bool:
        """Whether this node's trackers hold the session (or it waits out its grace here)."""
        return key in self._here

    def local_tabs(self, key: Key) -> int:
        return self._here.get(key, 0)

    def held(self) -> list[Session]:
        """Sessions this node holds."""
        found = (self.index.get(*key) for key in self._here)
        return [s for s in found if s is not None]

    def sessions_of(self, node: str) -> set[Key]:
        return set(self._by_node.get(node, ()))

    def remote_upsert(self, node: str, record: Session, now: int) -> None:
        """``node`` holds ``record`` with ``record.tabs`` tabs; ``record`` may be indexed as is."""
        key = (record.projectKey, record.sessionID)
        remote = self._remote.setdefault(key, {})
        if node not in remote:
            self._by_node.setdefault(node, set()).add(key)
        remote[node] = record.tabs
        if record.tabs > 0 and self._here.get(key) == 0:
            # Resumed on that node: this node's grace for it is over.
            del self._here[key]
        tabs = self._tabs(key)
        session = self.index.get(*key)
        if session is None:
            record.tabs = tabs
            record.connected = tabs > 0
            if not record.connected:
                self._grace.setdefault(key, (now + self.grace_ms, "disconnected"))
            self.index.add(record)
            for listener in self.listeners:
                listener.session_started(record)
            return
        changes: dict[str, Any] = {}
        for name in _MIRRORED:
            value = getattr(record, name)
            if value != getattr(session, name):
                changes[name] = value
        if record.timestamp != session.timestamp and (
            record.timestamp < session.timestamp or (len(remote) == 1 and key not in self._here)
        ):
            changes["timestamp"] = record.timestamp
        self._derive(session, key, changes, now)
        newer = record.lastActiveAt > session.lastActiveAt
        if changes:
            if newer:
                changes["lastActiveAt"] = record.lastActiveAt
            self.index.apply(session, changes)
            for listener in self.listeners:
                listener.session_changed(session, changes)
        elif newer:
            self.index.touch(session, record.lastActiveAt)
            for listener in self.listeners:
                listener.session_touched(session)

    def _derive(self, session: Session, key: Key, changes: dict[str, Any], now: int) -> None:
        """Add tabs and connected, derived from every node's part, to ``changes``."""
        tabs = self._tabs(key)
        if tabs != session.tabs:
            changes["tabs"] = tabs
        if (tabs > 0) != session.connected:
            changes["connected"] = tabs > 0
        if tabs > 0:
            self._grace.pop(key, None)
        else:
            self._grace.setdefault(key, (now + self.grace_ms, "disconnected"))

    def _retab(self, session: Session, key: Key, now: int) -> None:
        changes: dict[str, Any] = {}
        self._derive(session, key, changes, now)
        if changes:
            self.index.apply(session, changes)
            for listener in self.listeners:
                listener.session_changed(session, changes)

    def remote_touch(self, project_key: str, session_id: str, last_active: int) -> None:
        session = self.index.get(project_key, session_id)
        if session is not None and last_active > session.lastActiveAt:
            self.index.touch(session, last_active)
            for listener in self.listeners:
                listener.session_touched(session)

    def _forget(self, node: str, key: Key) -> bool:
        """Drop ``node``'s part of a session; True when no node holds it any more."""
        remote = self._remote.get(key)
        if remote is not None:
            remote.pop(node, None)
            if not remote:
                del self._remote[key]
        nodes = self._by_node.get(node)
        if nodes is not None:
            nodes.discard(key)
        return key not in self._here and key not in self._remote

    def remote_remove(
        self, node: str, project_key: str, session_id: str, reason: str | None, now: int
    ) -> None:
        """``node`` ended the session (``reason``) or let it go to other nodes (None)."""
        key = (project_key, session_id)
        orphan = self._forget(node, key)
        session = self.index.get(*key)
        if session is None:
            return
        if reason == "ended" or (orphan and reason is None):
            self.end(session, "ended")
        elif reason is not None and (orphan or self._tabs(key) == 0):
            # Its grace ran out there; a tab that resumed elsewhere keeps it.
            self.end(session, reason)
        else:
            self._retab(session, key, now)

    def drop_node(self, node: str, reason: str, now: int, keys: Iterable[Key] | None = None) -> int:
        """Forget ``node``'s sessions (all, or ``keys``): those no other node holds end with ``reason``."""
        dropped = 0
        for key in list(self._by_node.get(node, ()) if keys is None else keys):
            orphan = self._forget(node, key)
            session = self.index.get(*key)
            if session is None:
                continue
            if orphan:
                self.end(session, reason)
                dropped += 1
            else:
                self._retab(session, key, now)
        if keys is None:
            self._by_node.pop(node, None)
        return dropped

    def move_node(self, node: str, now: int) -> None:
        """``node`` is leaving: its sessions wait out their grace for their trackers to come back."""
        for key in self._by_node.pop(node, ()):
            self._forget(node, key)
            session = self.index.get(*key)
            if session is not None:
                self._retab(session, key, now)

    def reconcile(self, node: str, records: list[Session], now: int) -> None:
        """``node`` holds exactly ``records`` (its snapshot): add, change and end to match."""
        keys = {(r.projectKey, r.sessionID) for r in records}
        gone = [key for key in self._by_node.get(node, ()) if key not in keys]
        for project_key, session_id in gone:
            self.remote_remove(node, project_key, session_id, None, now)
        for record in records:
            self.remote_upsert(node, record, now)
