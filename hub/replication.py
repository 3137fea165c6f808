"""The replication seam: how a node tells others about the sessions it holds.

``Registry`` calls a ``Replication`` only for changes that started on this
node (its own trackers, its own grace running out), never for what it
applies from peers, so an implementation never has to filter echoes. As
centrifuge separates its broker and presence managers from the node, the
seam has a local implementation (one process: nothing to tell anyone) and a
Redis one (``cluster.Cluster``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import anyio

from .record import Session
from .wire import EndReason

# Registers a gauge or counter read at scrape time: (name, help, read).
AddMetric = Callable[[str, str, Callable[[], float]], None]


class Replication(Protocol):
    """What the registry and the hub process need of a replication backend."""

    @property
    def ready(self) -> bool:
        """Bootstrapped: this node's index holds what the others hold (``/readyz``)."""

    def held(self, session: Session) -> None:
        """This node's part of ``session`` changed (a field, its tabs here): publish its record."""

    def touched(self, session: Session) -> None:
        """Only ``lastActiveAt`` of a session this node holds changed."""

    def released(self, session: Session, reason: EndReason | None) -> None:
        """This node no longer holds ``session``: it ended (``reason``) or went to other nodes (None)."""

    async def run(self) -> None:
        """Long-lived work (connect, bootstrap, mirror), run in the hub's task group."""

    async def leave(self) -> None:
        """A drain: tell the others that this node's sessions are moving."""

    def add_metrics(self, gauge: AddMetric, counter: AddMetric) -> None:
        """Register the backend's own metrics."""

    def mirrors(self, project_key: str) -> bool:
        """Whether this node's index holds the project's whole picture (not only its own part)."""

    def when_mirrored(self, project_key: str, then: Callable[[], None]) -> bool:
        """This node serves the project now (a search): True when it mirrors it; else False,
        and ``then`` runs once it does (or cannot: Redis unreachable)."""

    def follow(self, project_key: str) -> None:
        """An agent of this node follows the project: it stays mirrored until ``unfollow``."""

    def unfollow(self, project_key: str) -> None:
        """One ``follow`` less."""


class LocalReplication:
    """One process holds everything: nothing to publish, always ready."""

    ready = True

    def held(self, session: Session) -> None:
        pass

    def touched(self, session: Session) -> None:
        pass

    def released(self, session: Session, reason: EndReason | None) -> None:
        pass

    async def run(self) -> None:
        pass

    async def leave(self) -> None:
        pass

    def add_metrics(self, gauge: AddMetric, counter: AddMetric) -> None:
        pass

    def mirrors(self, project_key: str) -> bool:
        return True

    def when_mirrored(self, project_key: str, then: Callable[[], None]) -> bool:
        return True

    def follow(self, project_key: str) -> None:
        pass

    def unfollow(self, project_key: str) -> None:
        pass


async def mirrored(replication: Replication, project_key: str) -> None:
    """Until ``replication`` mirrors the project (at once when it does)."""
    event = anyio.Event()
    if not replication.when_mirrored(project_key, event.set):
        await event.wait()
