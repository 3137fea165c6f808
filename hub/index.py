"""The live index: every live session, by project, searchable.

The index owns the mutation of indexed records: callers change a session
only through ``apply`` and ``touch`` so the index can keep itself in step.
No I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .search import Query, brute_force
from .session import Session


class LiveIndex:
    """Live sessions of every project (scan-based search)."""

    def __init__(self) -> None:
        self._projects: dict[str, dict[str, Session]] = {}

    def __len__(self) -> int:
        return sum(len(p) for p in self._projects.values())

    def count(self, project_key: str) -> int:
        return len(self._projects.get(project_key, ()))

    def get(self, project_key: str, session_id: str) -> Session | None:
        project = self._projects.get(project_key)
        return project.get(session_id) if project is not None else None

    def sessions(self, project_key: str) -> Iterator[Session]:
        return iter(list(self._projects.get(project_key, {}).values()))

    def projects(self) -> list[str]:
        return list(self._projects)

    def add(self, session: Session) -> None:
        self._projects.setdefault(session.projectKey, {})[session.sessionID] = session

    def remove(self, session: Session) -> None:
        project = self._projects.get(session.projectKey)
        if project is not None and project.get(session.sessionID) is session:
            del project[session.sessionID]
            if not project:
                del self._projects[session.projectKey]

    def apply(self, session: Session, changes: dict[str, Any]) -> None:
        """Set changed fields of an indexed session."""
        for name, value in changes.items():
            setattr(session, name, value)

    def touch(self, session: Session, now: int) -> None:
        """Refresh lastActiveAt only: no other field is re-indexed."""
        session.lastActiveAt = now

    def search(self, project_key: str, query: Query) -> tuple[int, list[Session]]:
        """``(total before paging, the page)`` of a project's matching sessions."""
        project = self._projects.get(project_key)
        if not project:
            return 0, []
        return brute_force(list(project.values()), query)
