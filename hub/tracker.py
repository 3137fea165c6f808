"""The tracker protocol of one connection (CONTRACT §2), without I/O.

``TrackerProtocol.receive`` takes one frame and returns the reply frame to
send, if any. Bad input gets an ``error`` frame and changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from msgspec import UNSET

from .counts import MessageCounts, tracker_counts
from .record import (
    End,
    Heartbeat,
    Session,
    Start,
    TrackerMessage,
    Update,
    decode_message,
    encode_error,
    encode_started,
    valid_session_id,
)
from .registry import Registry
from .wire import EndReason, ErrorCode, InputError

# Message class -> metrics label.
_TYPE_NAMES: Final[dict[type[TrackerMessage], str]] = {
    Start: "start",
    Update: "update",
    Heartbeat: "heartbeat",
    End: "end",
}


class TrackerProtocol:
    __slots__ = ("counts", "enrichment", "project_id", "project_key", "registry", "session")

    def __init__(
        self,
        registry: Registry,
        project_key: str,
        project_id: int,
        counts: MessageCounts | None = None,
        enrichment: Mapping[str, str] | None = None,
    ) -> None:
        self.registry = registry
        # What the hub found about this connection (enrich.Enricher.fields), under the tracker's fields.
        self.enrichment: Mapping[str, str] = enrichment or {}
        # Shared by every tracker of a hub (metrics); a throwaway one when not given.
        self.counts = counts if counts is not None else tracker_counts()
        self.project_key = project_key
        self.project_id = project_id
        self.session: Session | None = None

    def receive(self, frame: bytes | str, now: int) -> bytes | None:
        try:
            return self._receive(frame, now)
        except InputError as exc:
            self.counts.error(exc.code, exc.message)
            self.counts.sent["error"] += 1
            return encode_error(exc.code, exc.message)

    def _receive(self, frame: bytes | str, now: int) -> bytes | None:
        msg = decode_message(frame)
        self.counts.received[_TYPE_NAMES[type(msg)]] += 1
        session = self.session
        if session is not None and not self.registry.is_live(session):
            # Ended elsewhere (another tab's end, or the cluster): start again.
            session = self.session = None
        if isinstance(msg, Heartbeat):
            if session is None:
                raise InputError(ErrorCode.NOT_STARTED, "send start before heartbeat")
            self.registry.heartbeat(session, None if msg.active is UNSET else msg.active, now)
            return None
        if isinstance(msg, Start):
            if session is not None and not valid_session_id(msg.sessionID):
                msg.sessionID = session.sessionID
            elif session is not None and msg.sessionID != session.sessionID:
                raise InputError(
                    ErrorCode.ALREADY_STARTED,
                    f"this connection holds session {session.sessionID}; send end before starting another",
                )
            attach = session is None
            session, _ = self.registry.start(
                self.project_key, self.project_id, msg, now, attach, self.enrichment
            )
            self.session = session
            self.counts.sent["started"] += 1
            return encode_started(session)
        if session is None:
            raise InputError(
                ErrorCode.NOT_STARTED, f"send start before {'end' if isinstance(msg, End) else 'update'}"
            )
        if isinstance(msg, End):
            self.registry.end(session, EndReason.ENDED)
            self.session = None
            return None
        self.registry.update(session, msg, now)
        return None

    def closed(self, now: int, timed_out: bool) -> None:
        """The connection closed; a held session waits out its grace."""
        if self.session is not None:
            reason = EndReason.TIMEOUT if timed_out else EndReason.DISCONNECTED
            self.registry.detach(self.session, now, reason)
            self.session = None
