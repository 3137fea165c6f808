"""The tracker protocol of one connection (CONTRACT §2, §7), without I/O.

``TrackerProtocol.receive`` takes one frame and returns the reply frame to
send, if any. Bad input gets an ``error`` frame and changes nothing.

The connection is a tab: ``started`` names it, and with a ``Relay`` its
``emit`` frames and binary frames go to the agents joined to its session
(without one, as in a benchmark of the registry alone, nobody can watch
and they go nowhere).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from msgspec import UNSET, UnsetType

from .counts import MessageCounts, tracker_counts
from .record import (
    Emit,
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
from .registry import NO_ENRICHMENT, Activity, Registry
from .relay import Relay, Tab, TabSink, new_tab_id, tab_id_or_new
from .wire import EndReason, ErrorCode, InputError

# Message class -> metrics label.
_TYPE_NAMES: Final[dict[type[TrackerMessage], str]] = {
    Start: "start",
    Update: "update",
    Heartbeat: "heartbeat",
    End: "end",
    Emit: "emit",
}


class TrackerProtocol:
    __slots__ = (
        "active",
        "counts",
        "enrichment",
        "project_id",
        "project_key",
        "registry",
        "relay",
        "session",
        "sink",
        "tab",
        "tab_id",
    )

    def __init__(
        self,
        registry: Registry,
        project_key: str,
        project_id: int,
        counts: MessageCounts | None = None,
        enrichment: Mapping[str, str] | None = None,
        relay: tuple[Relay, TabSink] | None = None,
    ) -> None:
        self.registry = registry
        # What the hub found about this connection (enrich.Enricher.fields), under the tracker's fields.
        self.enrichment: Mapping[str, str] = enrichment if enrichment is not None else NO_ENRICHMENT
        # Shared by every tracker of a hub (metrics); a throwaway one when not given.
        self.counts = counts if counts is not None else tracker_counts()
        self.project_key = project_key
        self.project_id = project_id
        self.session: Session | None = None
        # This tab's last report of ``active`` (None before its start); the record's is any tab's.
        self.active: bool | None = None
        # The relay and this connection as its sink; the tab while a session is started.
        self.relay: Relay | None = relay[0] if relay is not None else None
        self.sink: TabSink | None = relay[1] if relay is not None else None
        self.tab: Tab | None = None
        self.tab_id: str | None = None

    def receive(self, frame: bytes | str, now: int) -> bytes | None:
        try:
            return self.handle(decode_message(frame), len(frame), now)
        except InputError as exc:
            return self._refuse(exc)

    def receive_binary(self, data: bytes, now: int) -> bytes | None:
        """A binary frame: relayed as it is to the session's joined agents."""
        if self.tab is None:
            return self._refuse(InputError(ErrorCode.NOT_STARTED, "send start before a binary frame"))
        assert self.relay is not None
        self.relay.emit_binary(self.tab, data, now / 1000)
        return None

    def _refuse(self, exc: InputError) -> bytes:
        self.counts.error(exc.code, exc.message)
        self.counts.sent["error"] += 1
        return encode_error(exc.code, exc.message)

    def handle(self, msg: TrackerMessage, size: int, now: int) -> bytes | None:
        """One decoded message (``size``: its frame's bytes): the native reply, or InputError.

        Another protocol's adapter (e.g. Socket.IO) drives a tab through here too: one
        record and one set of rules whichever protocol the tab speaks.
        """
        self.counts.received[_TYPE_NAMES[type(msg)]] += 1
        session = self.session
        if session is not None and not self.registry.is_live(session):
            # Ended elsewhere (another tab's end, or the cluster): start again.
            session = self.session = None
            self.active = None
            self._close_tab()
        if isinstance(msg, Heartbeat):
            if session is None:
                raise InputError(ErrorCode.NOT_STARTED, "send start before heartbeat")
            active = msg.active
            if active is UNSET:
                self.registry.heartbeat(session, None, now)
            else:
                self.registry.heartbeat(session, active, now, self.active)
                self.active = active
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
                self.project_key, self.project_id, msg, now, attach, self.enrichment, self._report(msg.active)
            )
            self.session = session
            self.counts.sent["started"] += 1
            return encode_started(session, self._open_tab(session, msg.tabId, now))
        if session is None:
            raise InputError(ErrorCode.NOT_STARTED, f"send start before {msg.__struct_config__.tag}")
        if isinstance(msg, Emit):
            if self.tab is not None:
                assert self.relay is not None
                self.relay.emit(self.tab, msg, size, now / 1000)
            return None
        if isinstance(msg, End):
            self.registry.end(session, EndReason.ENDED)
            self.session = None
            self.active = None
            self._close_tab()
            return None
        self.registry.update(session, msg, now, self._report(msg.active))
        return None

    def _report(self, active: bool | UnsetType) -> Activity:
        """This tab's activity as of a message (a new tab is active unless it says not)."""
        was = self.active
        self.active = active if isinstance(active, bool) else (True if was is None else was)
        return was, self.active

    def _open_tab(self, session: Session, wanted: object, now: int) -> str:
        """This connection's tab in ``session``: kept across starts of the same session."""
        tab = self.tab
        if tab is not None and not tab.closed and tab.key == (session.projectKey, session.sessionID):
            return tab.id
        self._close_tab()
        # A tab keeps its id across sessions of one connection unless it asks for another.
        tab_id = tab_id_or_new(wanted) if wanted is not None or self.tab_id is None else self.tab_id
        relay = self.relay
        if relay is not None and self.sink is not None:
            if relay.has_tab(session.projectKey, session.sessionID, tab_id):
                # A duplicated browser tab copies sessionStorage, tab id included: it gets its own.
                tab_id = new_tab_id()
            self.tab = relay.add_tab(session.projectKey, session.sessionID, tab_id, self.sink, now / 1000)
        self.tab_id = tab_id
        return tab_id

    def _close_tab(self) -> None:
        if self.tab is not None:
            assert self.relay is not None
            self.relay.remove_tab(self.tab)
            self.tab = None

    def closed(self, now: int, timed_out: bool) -> None:
        """The connection closed; a held session waits out its grace."""
        self._close_tab()
        # An adapter's endpoint is its own sink (openreplay.TabEndpoint): let go of it, or
        # the two stay a reference cycle for the collector to find (collector.py).
        self.sink = None
        if self.session is not None:
            reason = EndReason.TIMEOUT if timed_out else EndReason.DISCONNECTED
            self.registry.detach(self.session, now, reason, self.active is not False)
            self.session = None
