"""Session lifecycle: start, update, heartbeat, end, tabs, reconnect grace.

``Registry`` turns tracker messages into changes of the live index and
tells its listeners (agent fan-out, cluster mirror, metrics) what changed.
No I/O and no clock: every call takes ``now`` in Unix ms.
"""

from __future__ import annotations

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

REASONS: Final = ("ended", "disconnected", "timeout", "node_lost", "unmatched")


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
        self._grace: dict[tuple[str, str], tuple[int, str]] = {}

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
            self.index.add(session)
            for listener in self.listeners:
                listener.session_started(session)
            return session, True
        changes = changes_of(msg, session)
        if attach:
            changes["tabs"] = session.tabs + 1 if session.connected else 1
        if not session.connected:
            changes["connected"] = True
            self._grace.pop((project_key, session_id), None)
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
        self.index.remove(session)
        self._grace.pop((session.projectKey, session.sessionID), None)
        for listener in self.listeners:
            listener.session_ended(session, reason)

    def detach(self, session: Session, now: int, reason: str = "disconnected") -> None:
        """A tracker connection holding ``session`` closed without ``end``."""
        if not self.is_live(session) or not session.connected:
            return
        if session.tabs > 1:
            self._change(session, {"tabs": session.tabs - 1}, now)
            return
        self._grace[(session.projectKey, session.sessionID)] = (now + self.grace_ms, reason)
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
