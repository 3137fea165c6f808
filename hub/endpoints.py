"""The WebSocket endpoints, side by side: what a connection's messages do.

Each connects ``websocket.WebSocketConnection`` (which sends, pauses and closes) to an
I/O-free core:

- ``TrackerEndpoint`` (``/ws/tracker/{projectKey}``): ``TrackerProtocol``,
  one reply frame per message at most; a tab of the ``Relay``, which sends
  it the agents' events.
- ``AgentEndpoint`` (``/ws/agent/{projectKey}``): the ``FanOut`` and the
  ``Relay``; frames in are subscriptions and relay joins, leaves and sends;
  the fan-out's frames are queued by it and sent while the connection is not
  paused, the relay's go at once within the agent's relay buffer. In a
  cluster the agent keeps its project mirrored on this node while connected;
  until the node mirrors it (a bootstrap of that project), the agent's frames
  wait, so its first snapshot is the whole picture.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Final

import msgspec

from .clock import now_ms
from .counts import MessageCounts
from .fanout import PONG, Agent, FanOut, Ping, Subscribe, subscription
from .record import decode_frame, encode_error
from .registry import Registry
from .relay import Join, Leave, Relay, Send
from .replication import Replication
from .tracker import TrackerProtocol
from .websocket import WebSocketConnection
from .wire import ErrorCode, InputError

# Frames an agent may send before its project is mirrored here; past it, one error each.
BACKLOG_FRAMES: Final = 64
# Binary frames carry a tab's relayed payloads; an agent has none to send.
BINARY_REFUSED: Final = "binary frames are not supported here; send JSON text frames"

_agent_decoder: Final = msgspec.json.Decoder(Subscribe | Ping | Join | Leave | Send)


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
        relay: Relay | None = None,
        conn: WebSocketConnection | None = None,
    ) -> None:
        super().__init__(
            registry,
            project_key,
            project_id,
            counts,
            enrichment,
            (relay, conn) if relay is not None and conn is not None else None,
        )
        self.idle_timeout: float | None = idle_timeout

    def writable(self) -> None:
        """Trackers only get replies; nothing is queued."""


class AgentEndpoint:
    __slots__ = (
        "agent",
        "backlog",
        "conn",
        "fanout",
        "idle_timeout",
        "limits",
        "max_filters",
        "project_key",
        "relay",
        "replication",
        "watcher",
    )
    keepalive = True

    def __init__(
        self,
        fanout: FanOut,
        relay: Relay,
        conn: WebSocketConnection,
        project_key: str,
        max_filters: int,
        idle_timeout: float | None,
        limits: Counter[str],
        replication: Replication,
    ) -> None:
        self.fanout = fanout
        self.relay = relay
        self.conn = conn
        self.replication = replication
        self.project_key = project_key
        self.max_filters = max_filters
        self.idle_timeout = idle_timeout
        # The hub's count of limits reached (/metrics): over max_filters is one.
        self.limits = limits
        self.agent: Agent = fanout.add(conn)
        self.watcher = relay.add_agent(project_key, conn)
        # Frames held until this node mirrors the project (None: it does).
        self.backlog: list[tuple[bytes, int]] | None = None
        replication.follow(project_key)
        if not replication.when_mirrored(project_key, self._mirrored):
            self.backlog = []

    def _mirrored(self) -> None:
        backlog, self.backlog = self.backlog, None
        for data, now in backlog or ():
            if not self.conn.open:
                return
            reply = self.receive(data, now)
            if reply is not None:
                self.conn.send(reply)

    def receive(self, data: bytes, now: int) -> bytes | None:
        if self.backlog is not None:
            if len(self.backlog) >= BACKLOG_FRAMES:
                return encode_error(
                    ErrorCode.LIMIT_EXCEEDED, "the project is being loaded on this node; send again shortly"
                )
            self.backlog.append((data, now))
            return None
        try:
            msg = decode_frame(_agent_decoder, data)
            if isinstance(msg, Subscribe):
                self.fanout.subscribe(self.agent, subscription(msg, self.project_key, self.max_filters))
            elif isinstance(msg, Ping):
                return PONG
            elif isinstance(msg, Join):
                self.relay.join(self.watcher, msg, now / 1000)
            elif isinstance(msg, Leave):
                self.relay.leave(self.watcher, msg)
            else:
                self.relay.send(self.watcher, msg, now / 1000)
        except InputError as exc:
            # A bad frame changes nothing: the previous subscription and joins stay.
            if exc.code is ErrorCode.LIMIT_EXCEEDED:
                self.limits["max_filters"] += 1
            return encode_error(exc.code, exc.message)
        return None

    def receive_binary(self, data: bytes, now: int) -> bytes | None:
        return encode_error(ErrorCode.UNSUPPORTED_BINARY, BINARY_REFUSED)

    def closed(self, now: int, timed_out: bool) -> None:
        self.backlog = None
        self.fanout.remove(self.agent)
        self.relay.remove_agent(self.watcher)
        self.replication.unfollow(self.project_key)

    def writable(self) -> None:
        self.fanout.deliver(self.agent)
        self.relay.writable(self.watcher, now_ms() / 1000)
