"""Plain counts of what the hub saw, bumped on hot paths (a dict increment, ~0.03 µs).

No Prometheus here: ``metrics.HubCollector`` turns these into metric
families at scrape time, so the I/O-free cores (tracker protocol, registry
listeners) count without importing a metrics library.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any, Final

from .record import Session

log = logging.getLogger("hub.errors")

# At most one warning line per error code per interval: a client sending garbage
# in a loop must not turn into a disk-filling log.
WARN_INTERVAL_S: Final = 10.0

# Label values of the connection kinds.
TRACKER: Final = "tracker"
AGENT: Final = "agent"


class MessageCounts:
    """Messages of one kind of client: received and sent by type, refused by error code."""

    __slots__ = ("_next_warning", "_suppressed", "errors", "kind", "received", "sent")

    def __init__(self, kind: str, received: Iterable[str] = (), sent: Iterable[str] = ()) -> None:
        self.kind = kind
        # Seeded with the known types so every series exists from the first scrape.
        # ``received`` is a plain dict (an increment costs ~0.03 µs, a Counter's ~0.08):
        # only seeded types may be counted there.
        self.received: dict[str, int] = dict.fromkeys(received, 0)
        self.sent: Counter[str] = Counter(dict.fromkeys(sent, 0))
        self.errors: Counter[str] = Counter()
        self._next_warning: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def error(self, code: str, message: str) -> None:
        """Count a refused message; log it at warning, throttled per code."""
        self.errors[code] += 1
        now = time.monotonic()
        if now < self._next_warning.get(code, 0.0):
            self._suppressed[code] += 1
            return
        self._next_warning[code] = now + WARN_INTERVAL_S
        log.warning(
            "protocol.error",
            extra={
                "fields": {
                    "kind": self.kind,
                    "code": code,
                    "message": message,
                    "suppressed": self._suppressed.pop(code, 0),
                }
            },
        )


def tracker_counts() -> MessageCounts:
    """Counts seeded with every tracker message type and reply."""
    return MessageCounts(
        TRACKER, received=("start", "update", "heartbeat", "end", "emit"), sent=("started", "error")
    )


class ConnectionCounts:
    """WebSocket connections opened and closed by kind, HTTP responses by status."""

    __slots__ = ("closed", "http_responses", "opened")

    def __init__(self) -> None:
        self.opened: Counter[str] = Counter({TRACKER: 0, AGENT: 0})
        # (kind, close code) -> connections
        self.closed: Counter[tuple[str, int]] = Counter()
        self.http_responses: Counter[int] = Counter()

    def open_now(self, kind: str) -> int:
        return self.opened[kind] - sum(n for (k, _), n in self.closed.items() if k == kind)


class SessionCounts:
    """A Registry listener: sessions that entered and left the index, by end reason."""

    __slots__ = ("ended", "started")

    def __init__(self) -> None:
        self.started = 0
        self.ended: Counter[str] = Counter()

    def session_started(self, session: Session) -> None:
        self.started += 1

    def session_changed(self, session: Session, changes: dict[str, Any]) -> None:
        pass

    def session_touched(self, session: Session) -> None:
        pass

    def session_ended(self, session: Session, reason: str) -> None:
        self.ended[reason] += 1
