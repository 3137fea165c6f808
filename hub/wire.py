"""The hub's wire vocabulary, in one place: close codes, error codes, end reasons.

As websockets keeps ``Opcode`` and ``CloseCode`` in ``frames.py``, every
code a client or a peer node can see is an enum here; modules never write
them as bare literals. The README's "Close codes" and "Limits and error
codes" tables list the same members.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Final

from websockets.frames import CloseCode as WsCloseCode


class CloseCode(IntEnum):
    """Close codes the hub sends: RFC 6455's (from websockets) and its own 4xxx."""

    INVALID_DATA = WsCloseCode.INVALID_DATA  # 1007: a text frame that is not UTF-8
    POLICY = WsCloseCode.POLICY_VIOLATION  # 1008: rate or relay limits
    TOO_BIG = WsCloseCode.MESSAGE_TOO_BIG  # 1009: a message over --max-frame
    RESTART = WsCloseCode.SERVICE_RESTART  # 1012: draining; reconnect elsewhere
    IDLE_TIMEOUT = 4000  # heartbeat timeout (trackers), idle timeout (agents)
    TOO_SLOW = 4008  # an agent too far behind


# Never sent on the wire: the metrics label of a connection dropped without a close frame.
CLOSE_ABNORMAL: Final = int(WsCloseCode.ABNORMAL_CLOSURE)


class ErrorCode(StrEnum):
    """``{"type":"error","code":…}`` of a refused tracker or agent message."""

    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TYPE = "unknown_type"
    NOT_STARTED = "not_started"
    ALREADY_STARTED = "already_started"
    INVALID_FIELD = "invalid_field"
    LIMIT_EXCEEDED = "limit_exceeded"
    PROJECT_FULL = "project_full"
    INVALID_FILTERS = "invalid_filters"
    # A binary frame: binary carries relay payloads (CONTRACT §7), never a JSON message.
    UNSUPPORTED_BINARY = "unsupported_binary"


class EndReason(StrEnum):
    """Why a session left the live index (``session.end`` ``reason``)."""

    ENDED = "ended"  # the tracker sent end
    DISCONNECTED = "disconnected"  # its grace ran out after a close
    TIMEOUT = "timeout"  # its grace ran out after a heartbeat timeout
    NODE_LOST = "node_lost"  # the node holding it died
    UNMATCHED = "unmatched"  # to one agent: it stopped matching the subscription


class InputError(Exception):
    """A message that must be refused whole, with a stable code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def validation_code(text: str) -> ErrorCode:
    """The error code of a msgspec ``ValidationError`` message (``… - at `$.field` ``)."""
    if "at `$.type`" in text or "field `type`" in text:
        return ErrorCode.UNKNOWN_TYPE
    if "`$" not in text:
        return ErrorCode.INVALID_MESSAGE
    if "length <=" in text:
        return ErrorCode.LIMIT_EXCEEDED
    return ErrorCode.INVALID_FIELD


class BatchKind(IntEnum):
    """What a cluster batch on Redis pub/sub carries (README, "Cluster")."""

    OPS = 0  # changes of the sender's sessions
    RELOAD = 1  # the sender rewrote its records: read them
    BYE = 2  # the sender drains: its sessions wait out their grace for their trackers
    HOLDS = 3  # (control channel) the sender now has sessions in these partitions


class WebhookType(StrEnum):
    """The ``type`` of a webhook's body (README, "Webhooks")."""

    STARTED = "session.started"
    ENDED = "session.ended"


class RelayError(StrEnum):
    """Error codes of the live relay (CONTRACT §7), in ``{"type":"error","code":…}``."""

    NOT_FOUND = "not_found"  # join: no live session with that sessionID in the agent's project
    NOT_JOINED = "not_joined"  # send: the agent is not joined to that session
    TOO_MANY_JOINS = "too_many_joins"  # join: over --relay-max-joins sessions at once


class RelayType(StrEnum):
    """The ``type`` of relay frames (CONTRACT §7)."""

    JOIN = "join"
    JOINED = "joined"
    LEAVE = "leave"
    SEND = "send"
    EMIT = "emit"
    AGENTS = "agents"
    AGENT_EVENT = "agent.event"
    SESSION_EVENT = "session.event"
    SESSION_GAP = "session.gap"
