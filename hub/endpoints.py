"""The WebSocket endpoints, side by side: what a connection's messages do.

Each connects ``websocket.WebSocketConnection`` (which sends, pauses and closes) to an
I/O-free core:

- ``TrackerEndpoint`` (``/ws/tracker/{projectKey}``): ``TrackerProtocol``,
  one reply frame per message at most, nothing queued.
- ``AgentEndpoint`` (``/ws/agent/{projectKey}``): the ``FanOut``; frames in
  are subscriptions, frames out are queued by the fan-out and sent while the
  connection is not paused.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Final

from .counts import MessageCounts
from .fanout import PONG, Agent, FanOut, parse_message
from .record import encode_error
from .registry import Registry
from .tracker import TrackerProtocol
from .websocket import WebSocketConnection
from .wire import ErrorCode, InputError

# Until the relay gives binary frames a meaning (CONTRACT §7), they are refused, never parsed.
BINARY_REFUSED: Final = "binary frames are not supported here; send JSON text frames"


class TrackerEndpoint(TrackerProtocol):
    """The tracker protocol on a live connection."""

    __slots__ = ("idle_timeout",)
    # Trackers are not pinged: their silence is what the heartbeat timeout detects.
    keepalive = False

    def __init__(
        self,
        registry: Registry,
        project_key: str,
        project_id: int,
        idle_timeout: float,
        counts: MessageCounts | None = None,
        enrichment: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(registry, project_key, project_id, counts, enrichment)
        self.idle_timeout: float | None = idle_timeout

    def receive_binary(self, data: bytes, now: int) -> bytes | None:
        self.counts.error(ErrorCode.UNSUPPORTED_BINARY, BINARY_REFUSED)
        self.counts.sent["error"] += 1
        return encode_error(ErrorCode.UNSUPPORTED_BINARY, BINARY_REFUSED)

    def writable(self) -> None:
        """Trackers only get replies; nothing is queued."""


class AgentEndpoint:
    __slots__ = ("agent", "fanout", "idle_timeout", "limits", "max_filters", "project_key")
    keepalive = True

    def __init__(
        self,
        fanout: FanOut,
        conn: WebSocketConnection,
        project_key: str,
        max_filters: int,
        idle_timeout: float | None,
        limits: Counter[str],
    ) -> None:
        self.fanout = fanout
        self.project_key = project_key
        self.max_filters = max_filters
        self.idle_timeout = idle_timeout
        # The hub's count of limits reached (/metrics): over max_filters is one.
        self.limits = limits
        self.agent: Agent = fanout.add(conn)

    def receive(self, data: bytes, now: int) -> bytes | None:
        try:
            sub = parse_message(data, self.project_key, self.max_filters)
        except InputError as exc:
            # A bad subscribe changes nothing: the previous subscription stays.
            if exc.code is ErrorCode.LIMIT_EXCEEDED:
                self.limits["max_filters"] += 1
            return encode_error(exc.code, exc.message)
        if sub is None:
            return PONG
        self.fanout.subscribe(self.agent, sub)
        return None

    def receive_binary(self, data: bytes, now: int) -> bytes | None:
        return encode_error(ErrorCode.UNSUPPORTED_BINARY, BINARY_REFUSED)

    def closed(self, now: int, timed_out: bool) -> None:
        self.fanout.remove(self.agent)

    def writable(self) -> None:
        self.fanout.deliver(self.agent)
