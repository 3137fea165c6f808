"""The agent WebSocket endpoint: ``/ws/agent/{projectKey}`` on a live connection.

It only connects ``server.Connection`` (which sends, pauses and closes) to
the ``FanOut`` core: frames in are subscriptions, frames out are queued by
the fan-out and sent while the connection is not paused.
"""

from __future__ import annotations

from collections import Counter

from .agents import PONG, Agent, FanOut, parse_message
from .server import Connection
from .session import InputError, encode_error


class AgentEndpoint:
    __slots__ = ("agent", "fanout", "idle_timeout", "limits", "max_filters", "project_key")
    keepalive = True

    def __init__(
        self,
        fanout: FanOut,
        conn: Connection,
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
            if exc.code == "limit_exceeded":
                self.limits["max_filters"] += 1
            return encode_error(exc.code, exc.message)
        if sub is None:
            return PONG
        self.fanout.subscribe(self.agent, sub)
        return None

    def closed(self, now: int, timed_out: bool) -> None:
        self.fanout.remove(self.agent)

    def writable(self) -> None:
        self.fanout.deliver(self.agent)
