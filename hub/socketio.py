"""Engine.IO 4 and Socket.IO 5 packets on the websocket transport, without I/O.

What socket.io v3/v4 clients (OpenReplay's tracker and dashboard) put in
WebSocket frames (docs/openreplay.md §5):

- Engine.IO: one packet a frame. A text frame is a type digit and its data
  (``0`` open, ``1`` close, ``2`` ping, ``3`` pong, ``4`` message, ``5``
  upgrade, ``6`` noop); a binary frame is a message's raw bytes.
- Socket.IO rides in Engine.IO messages:
  ``4<type>[<attachments>-][<nsp>,][<ack id>][<JSON>]``, e.g. ``42["messages",{…}]``;
  a binary event's text (``451-[…{"_placeholder":true,"num":0}…]``) is
  followed by one binary frame per attachment.

Event arguments stay JSON text (``msgspec.Raw``, a view of the frame): the hot
path relays a tab's ``messages`` without building its objects (a third of
the cost: the depth scan and the object tree are skipped), and an encoded
``Raw`` is copied verbatim. ``materialize`` builds one argument's objects,
placeholders replaced by their bytes. Input is bounded: a frame's size by
the transport; the nesting of whatever is built by ``record.MAX_JSON_DEPTH``
(of what is only split, by msgspec's recursion guard); attachments by
``MAX_ATTACHMENTS`` (10, as socket.io's parser). Anything that is not the
protocol raises ``ProtocolError``, after which the connection is closed (as
socket.io does on a parse error).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import Any, Final

import msgspec
from msgspec import Raw, Struct

from .record import MAX_JSON_DEPTH, too_deep

# socket.io-parser's default (``maxAttachments``).
MAX_ATTACHMENTS: Final = 10
# Longest namespace accepted: OpenReplay uses only "/".
MAX_NAMESPACE: Final = 128
# Ack ids are JavaScript numbers: at most 2^53 - 1, 16 digits.
MAX_ACK_ID: Final = 2**53 - 1

# Names a client may not emit (socket.io-parser ``RESERVED_EVENTS``).
RESERVED_EVENTS: Final = frozenset(
    {"connect", "connect_error", "disconnect", "disconnecting", "newListener", "removeListener"}
)


class ProtocolError(ValueError):
    """A frame that is not Engine.IO 4 / Socket.IO 5: the connection should be closed."""


class EngineType(IntEnum):
    OPEN = 0
    CLOSE = 1
    PING = 2
    PONG = 3
    MESSAGE = 4
    UPGRADE = 5
    NOOP = 6


class PacketType(IntEnum):
    CONNECT = 0
    DISCONNECT = 1
    EVENT = 2
    ACK = 3
    CONNECT_ERROR = 4
    BINARY_EVENT = 5
    BINARY_ACK = 6


# Whole Engine.IO frames the server sends or expects.
PING: Final = b"2"
PONG: Final = b"3"
CLOSE: Final = b"1"
NOOP: Final = b"6"

_ZERO: Final = 0x30  # ord("0")
_SLASH: Final = 0x2F
_NOT_IN_NAMESPACE: Final = frozenset(b'"[]{},')
_BINARY_TYPES: Final = (PacketType.BINARY_EVENT, PacketType.BINARY_ACK)
_MAY_CARRY_BINARY: Final = (PacketType.EVENT, PacketType.ACK, *_BINARY_TYPES)
_AS_BINARY: Final = {PacketType.EVENT: PacketType.BINARY_EVENT, PacketType.ACK: PacketType.BINARY_ACK}
_PLACEHOLDER: Final = "_placeholder"

_args_decoder: Final = msgspec.json.Decoder(list[Raw])
_any_decoder: Final = msgspec.json.Decoder()
_str_decoder: Final = msgspec.json.Decoder(str)
_encode: Final = msgspec.json.Encoder().encode


class Packet(Struct, gc=False):
    """One decoded Socket.IO packet.

    ``name`` and ``args`` are an event's (``args`` also an ack's), each argument
    JSON text; ``data`` is a CONNECT's or CONNECT_ERROR's payload, decoded;
    ``attachments`` a binary packet's frames, in order.
    """

    type: PacketType
    nsp: str = "/"
    id: int | None = None
    name: str | None = None
    args: list[Raw] = []
    data: Any = None
    attachments: list[bytes] = []


# -- Engine.IO -----------------------------------------------------------------


def engine_type(frame: bytes) -> EngineType:
    """The Engine.IO type of a text frame."""
    if not frame:
        raise ProtocolError("empty Engine.IO packet")
    kind = frame[0] - _ZERO
    if not 0 <= kind <= 6:
        raise ProtocolError(f"unknown Engine.IO packet type {frame[:1]!r}")
    return EngineType(kind)


def encode_open(sid: str, ping_interval_ms: int, ping_timeout_ms: int, max_payload: int) -> bytes:
    """The server's first frame: ``0{"sid",…}``; a websocket-only connection offers no upgrade."""
    return b"0" + _encode(
        {
            "sid": sid,
            "upgrades": [],
            "pingInterval": ping_interval_ms,
            "pingTimeout": ping_timeout_ms,
            "maxPayload": max_payload,
        }
    )


# -- Socket.IO: decoding ---------------------------------------------------------


def decode_packet(frame: bytes, start: int = 1) -> tuple[Packet, int]:
    """The Socket.IO packet in a text frame from ``start`` (1: past the Engine.IO ``4``),
    and the number of binary attachments that follow it (``Decoder`` collects them).
    """
    end = len(frame)
    if start >= end:
        raise ProtocolError("empty Socket.IO packet")
    kind = frame[start] - _ZERO
    if not 0 <= kind <= 6:
        raise ProtocolError(f"unknown Socket.IO packet type {frame[start : start + 1]!r}")
    ptype = PacketType(kind)
    i = start + 1
    count = 0
    if ptype in _BINARY_TYPES:
        dash = frame.find(b"-", i, i + 3)
        if dash <= i or not frame[i:dash].isdigit():
            raise ProtocolError("binary packet without its attachment count")
        count = int(frame[i:dash])
        if count > MAX_ATTACHMENTS:
            raise ProtocolError(f"more than {MAX_ATTACHMENTS} attachments")
        i = dash + 1
    nsp = "/"
    if i < end and frame[i] == _SLASH:
        comma = frame.find(b",", i)
        stop = end if comma < 0 else comma
        if stop - i > MAX_NAMESPACE:
            raise ProtocolError(f"namespace longer than {MAX_NAMESPACE} bytes")
        raw_nsp = frame[i:stop]
        if not _NOT_IN_NAMESPACE.isdisjoint(raw_nsp):
            raise ProtocolError("invalid namespace")
        # A v2-style query after the namespace ("/admin?x=1") is dropped, as socket.io does.
        nsp = raw_nsp.split(b"?", 1)[0].decode()
        i = stop + 1
    ack: int | None = None
    digits = i
    while digits < end and 0x30 <= frame[digits] <= 0x39:
        digits += 1
    if digits > i:
        if digits - i > 16 or (ack := int(frame[i:digits])) > MAX_ACK_ID:
            raise ProtocolError("ack id out of range")
        i = digits
    packet = Packet(ptype, nsp, ack)
    _payload(packet, frame, i, count)
    return packet, count


def _payload(packet: Packet, frame: bytes, i: int, count: int) -> None:
    """Decode and check the JSON payload from ``i`` (socket.io-parser ``isPayloadValid``).

    Event and ack arguments are only split (``Raw``), not built: their nesting is left to
    msgspec's own recursion guard here and to ``materialize``'s depth check when one is
    built; every other payload is depth-checked before it is decoded.
    """
    ptype = packet.type
    has_json = i < len(frame)
    view = memoryview(frame)[i:]
    try:
        if ptype is PacketType.CONNECT:
            if has_json:
                data = _decode_checked(frame, view)
                if not isinstance(data, dict):
                    raise ProtocolError("CONNECT payload must be an object")
                packet.data = data
        elif ptype is PacketType.DISCONNECT:
            if has_json:
                raise ProtocolError("DISCONNECT takes no payload")
        elif ptype is PacketType.CONNECT_ERROR:
            data = _decode_checked(frame, view) if has_json else None
            if not isinstance(data, dict | str):
                raise ProtocolError("CONNECT_ERROR payload must be an object or a string")
            packet.data = data
        else:
            if not has_json:
                raise ProtocolError(f"{ptype.name} needs an array payload")
            args = _args_decoder.decode(view)
            if ptype is PacketType.EVENT or ptype is PacketType.BINARY_EVENT:
                if not args:
                    raise ProtocolError("event without a name")
                try:
                    name = _str_decoder.decode(args[0])
                except msgspec.ValidationError:
                    # socket.io also allows a number; no OpenReplay client sends one.
                    raise ProtocolError("event name must be a string") from None
                if name in RESERVED_EVENTS:
                    raise ProtocolError(f"reserved event name {name!r}")
                packet.name = name
                args = args[1:]
            packet.args = args
            if ptype in _BINARY_TYPES:
                _check_placeholders(frame, view, count)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"invalid JSON payload: {exc}") from None
    except RecursionError:
        raise ProtocolError("JSON nested too deep") from None


def _decode_checked(frame: bytes, view: memoryview) -> Any:
    """The JSON at ``view`` (the end of ``frame``), refused unbuilt when nested too deep.

    The whole frame is scanned, not a copy of its JSON: what precedes it (digits, "-",
    a namespace without quotes or brackets, ",") is invisible to the scan.
    """
    if too_deep(frame):
        raise ProtocolError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels, or malformed")
    return _any_decoder.decode(view)


def _check_placeholders(frame: bytes, view: memoryview, count: int) -> None:
    """Every placeholder names an attachment that will come (socket.io-parser ``_reconstructPacket``)."""
    _walk_placeholders(_decode_checked(frame, view), count)


def _walk_placeholders(value: Any, count: int) -> None:
    if isinstance(value, dict):
        if value.get(_PLACEHOLDER) is True:
            num = value.get("num")
            if type(num) is not int or not 0 <= num < count:
                raise ProtocolError("placeholder names no attachment")
            return
        for item in value.values():
            _walk_placeholders(item, count)
    elif isinstance(value, list):
        for item in value:
            _walk_placeholders(item, count)


def materialize(arg: Raw, attachments: Sequence[bytes] = ()) -> Any:
    """One argument's value: its JSON decoded, each placeholder replaced by its attachment."""
    text = bytes(arg)
    if too_deep(text):
        raise ProtocolError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    value = _any_decoder.decode(text)
    return _rebuild(value, attachments) if attachments else value


def _rebuild(value: Any, attachments: Sequence[bytes]) -> Any:
    if isinstance(value, dict):
        if value.get(_PLACEHOLDER) is True:
            num = value.get("num")
            if type(num) is not int or not 0 <= num < len(attachments):
                raise ProtocolError("placeholder names no attachment")
            return attachments[num]
        return {k: _rebuild(v, attachments) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebuild(v, attachments) for v in value]
    return value


class Decoder:
    """One connection's Socket.IO packets: text frames and the binary frames that follow them."""

    __slots__ = ("_due", "_pending")

    def __init__(self) -> None:
        self._pending: Packet | None = None
        self._due = 0

    @property
    def waiting(self) -> bool:
        """A binary packet is waiting for attachments."""
        return self._pending is not None

    def text(self, frame: bytes) -> Packet | None:
        """An Engine.IO message's text frame (``4…``): its packet, or None while attachments are due."""
        if self._pending is not None:
            raise ProtocolError("text frame while binary attachments are due")
        packet, due = decode_packet(frame)
        if due:
            self._pending, self._due = packet, due
            return None
        return packet

    def binary(self, data: bytes) -> Packet | None:
        """A binary frame: the packet it completes, or None while more are due."""
        packet = self._pending
        if packet is None:
            raise ProtocolError("binary frame with no binary packet awaiting it")
        packet.attachments.append(data)
        if len(packet.attachments) < self._due:
            return None
        self._pending = None
        return packet


# -- Socket.IO: encoding ---------------------------------------------------------


def encode_packet(
    ptype: PacketType,
    data: Any = None,
    *,
    nsp: str = "/",
    id: int | None = None,
    attachments: Sequence[bytes] | None = None,
) -> list[bytes]:
    """The frames of one packet: its text frame (``4…``), then one binary frame per attachment.

    An EVENT or ACK whose data holds bytes becomes a BINARY_EVENT or BINARY_ACK, the
    bytes replaced by placeholders. With ``attachments`` given, ``data`` already holds
    their placeholders (e.g. a received binary event's ``Raw`` arguments, forwarded).
    ``Raw`` values are written verbatim.
    """
    if attachments is None:
        found: list[bytes] = []
        if ptype in _MAY_CARRY_BINARY and _has_binary(data):
            data = _extract(data, found)
        attachments = found
    if attachments:
        ptype = _AS_BINARY.get(ptype, ptype)
    head = b"4%d" % ptype
    if ptype in _BINARY_TYPES:
        head += b"%d-" % len(attachments)
    if nsp != "/":
        head += nsp.encode() + b","
    if id is not None:
        head += b"%d" % id
    text = head if data is None else head + _encode(data)
    return [text, *attachments] if attachments else [text]


def encode_event(name: str, *args: Any, nsp: str = "/", id: int | None = None) -> list[bytes]:
    """``42["name",…args]`` (binary arguments make it a ``45N-`` packet and its frames)."""
    return encode_packet(PacketType.EVENT, [name, *args], nsp=nsp, id=id)


def event_frame(name: str, *args: Any) -> bytes:
    """The one text frame of an event on "/" (the hot path: no walk for bytes).

    Its arguments must hold no bytes (msgspec would write them as base64 strings):
    JSON values and ``Raw`` only, e.g. a received event's arguments.
    """
    return b"42" + _encode([name, *args])


def _has_binary(value: Any) -> bool:
    """Whether ``value`` holds a bytes-like anywhere in plain dicts, lists and tuples.

    A loop with exact type tests: 4x faster than a recursive ``isinstance`` walk.
    """
    stack = [value]
    pop, push = stack.pop, stack.extend
    while stack:
        item = pop()
        kind = type(item)
        if kind is dict:
            push(item.values())
        elif kind is list or kind is tuple:
            push(item)
        elif kind is bytes or kind is bytearray or kind is memoryview:
            return True
    return False


def _extract(value: Any, found: list[bytes]) -> Any:
    """A copy of ``value`` with each bytes-like replaced by a placeholder, appended to ``found``."""
    if isinstance(value, bytes | bytearray | memoryview):
        found.append(bytes(value))
        return {_PLACEHOLDER: True, "num": len(found) - 1}
    if isinstance(value, list | tuple):
        return [_extract(v, found) for v in value]
    if isinstance(value, dict):
        return {k: _extract(v, found) for k, v in value.items()}
    return value
