"""The Engine.IO 4 / Socket.IO 5 codec (hub/socketio.py) without a socket.

Wire strings are the protocol documents' own examples (socketio/engine.io-protocol,
socketio/socket.io-protocol) and OpenReplay's frames (docs/openreplay.md); python-socketio's
packet classes, the reference Python implementation, decode what the hub encodes and
the other way round.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from socketio import packet as sio

from hub.socketio import (
    MAX_ATTACHMENTS,
    Decoder,
    EngineType,
    Packet,
    PacketType,
    ProtocolError,
    encode_event,
    encode_open,
    encode_packet,
    engine_type,
    event_frame,
    materialize,
)


def decode(*frames: bytes | str) -> Packet:
    """Feed frames (str = text, bytes = binary) to a fresh decoder; the last one completes a packet."""
    decoder = Decoder()
    result = None
    for i, frame in enumerate(frames):
        result = decoder.text(frame.encode()) if isinstance(frame, str) else decoder.binary(frame)
        if i < len(frames) - 1:
            assert result is None and decoder.waiting
    assert result is not None and not decoder.waiting
    return result


def args(packet: Packet) -> list[Any]:
    return [materialize(a, packet.attachments) for a in packet.args]


# -- Engine.IO -------------------------------------------------------------------


def test_open_packet() -> None:
    frame = encode_open("lv_VI97HAXpY6yYWAAAC", 25000, 20000, 1_000_000)
    assert frame[:1] == b"0"
    assert json.loads(frame[1:]) == {
        "sid": "lv_VI97HAXpY6yYWAAAC",
        "upgrades": [],
        "pingInterval": 25000,
        "pingTimeout": 20000,
        "maxPayload": 1000000,
    }


@pytest.mark.parametrize(
    ("frame", "kind"),
    [(b"0{}", EngineType.OPEN), (b"1", EngineType.CLOSE), (b"2", EngineType.PING), (b"3", EngineType.PONG),
     (b"3probe", EngineType.PONG), (b'42["a"]', EngineType.MESSAGE), (b"5", EngineType.UPGRADE),
     (b"6", EngineType.NOOP)],
)  # fmt: skip
def test_engine_types(frame: bytes, kind: EngineType) -> None:
    assert engine_type(frame) is kind


@pytest.mark.parametrize("frame", [b"", b"7", b"x", b"/"])
def test_engine_type_refused(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        engine_type(frame)


# -- Socket.IO decoding ---------------------------------------------------------------


def test_connect() -> None:
    assert decode("40") == Packet(PacketType.CONNECT)
    agent = decode('40{"token":"Bearer x.y.z"}')
    assert agent.nsp == "/" and agent.data == {"token": "Bearer x.y.z"}
    admin = decode('40/admin,{"token":"123"}')
    assert (admin.nsp, admin.data) == ("/admin", {"token": "123"})
    assert decode("40/admin,").nsp == "/admin"
    assert decode("40/admin").nsp == "/admin"
    # A v2-style query after the namespace is not part of it.
    assert decode("40/admin?x=1,").nsp == "/admin"


def test_disconnect_and_connect_error() -> None:
    assert decode("41") == Packet(PacketType.DISCONNECT)
    assert decode("41/admin,").nsp == "/admin"
    assert decode('44{"message":"Not authorized"}').data == {"message": "Not authorized"}
    assert decode('44"v2 style"').data == "v2 style"


def test_event() -> None:
    frame = '42["messages",{"meta":{"tabId":"t1"},"data":[[0,1],[4,"x"]]}]'
    packet = decode(frame)
    assert (packet.type, packet.nsp, packet.id, packet.name) == (PacketType.EVENT, "/", None, "messages")
    assert args(packet) == [{"meta": {"tabId": "t1"}, "data": [[0, 1], [4, "x"]]}]
    # Arguments stay the frame's JSON text: forwarded verbatim.
    assert bytes(packet.args[0]) == b'{"meta":{"tabId":"t1"},"data":[[0,1],[4,"x"]]}'
    assert decode('42["NO_AGENT"]').args == []
    assert args(decode('42["NEW_AGENT","sid1",{"id":7}]')) == ["sid1", {"id": 7}]


def test_acks() -> None:
    event = decode('4212["foo"]')
    assert (event.type, event.id, event.name) == (PacketType.EVENT, 12, "foo")
    ack = decode('4312["bar"]')
    assert (ack.type, ack.id, ack.name, args(ack)) == (PacketType.ACK, 12, None, ["bar"])
    assert decode("4313[]").args == []
    admin = decode('43/admin,13["bar"]')
    assert (admin.nsp, admin.id, args(admin)) == ("/admin", 13, ["bar"])
    assert decode(f'42{2**53 - 1}["x"]').id == 2**53 - 1


def test_binary_event() -> None:
    gz = b"\x1f\x8b\x08\x00binary"
    packet = decode('451-["messages_gz",{"meta":{"tabId":"t1"},"data":{"_placeholder":true,"num":0}}]', gz)
    assert (packet.type, packet.name, packet.attachments) == (PacketType.BINARY_EVENT, "messages_gz", [gz])
    assert args(packet) == [{"meta": {"tabId": "t1"}, "data": gz}]


def test_binary_attachments_in_order() -> None:
    packet = decode(
        '452-/admin,["baz",{"_placeholder":true,"num":1},{"_placeholder":true,"num":0}]', b"\x01\x02", b"\x03"
    )
    assert packet.nsp == "/admin"
    assert args(packet) == [b"\x03", b"\x01\x02"]
    ack = decode('461-15["bar",{"_placeholder":true,"num":0}]', b"\x01\x02\x03\x04")
    assert (ack.type, ack.id, args(ack)) == (PacketType.BINARY_ACK, 15, ["bar", b"\x01\x02\x03\x04"])
    # Labelled binary but nothing follows: complete at once.
    assert decode('450-["x",1]').attachments == []


def test_decoder_continues_after_a_binary_packet() -> None:
    decoder = Decoder()
    assert decoder.text(b'451-["a",{"_placeholder":true,"num":0}]') is None
    done = decoder.binary(b"\x00")
    assert done is not None and done.attachments == [b"\x00"]
    nxt = decoder.text(b'42["b"]')
    assert nxt is not None and nxt.name == "b" and nxt.attachments == []


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        ("4", "empty Socket.IO packet"),
        ("47", "unknown Socket.IO packet type"),
        ("4x", "unknown Socket.IO packet type"),
        ('40["a"]', "CONNECT payload must be an object"),
        ('41{"a":1}', "DISCONNECT takes no payload"),
        ("44", "CONNECT_ERROR payload"),
        ("442", "CONNECT_ERROR payload"),
        ("42", "EVENT needs an array payload"),
        ('42{"a":1}', "invalid JSON payload"),
        ("42[]", "event without a name"),
        ("42[1]", "event name must be a string"),
        ('42["disconnect"]', "reserved event name"),
        ('42["newListener",1]', "reserved event name"),
        ('42["a",', "invalid JSON payload"),
        ('42["a"]x', "invalid JSON payload"),
        ('42["a"]["b"]', "malformed"),
        ('43{"a":1}', "invalid JSON payload"),
        ('45["a"]', "attachment count"),
        ('45x-["a"]', "attachment count"),
        ('4511-["a"]', "more than 10 attachments"),
        ('45100-["a"]', "attachment count"),
        ('451-["a",{"_placeholder":true,"num":1}]', "placeholder names no attachment"),
        ('451-["a",{"_placeholder":true,"num":-1}]', "placeholder names no attachment"),
        ('451-["a",{"_placeholder":true,"num":true}]', "placeholder names no attachment"),
        ('451-["a",{"_placeholder":true}]', "placeholder names no attachment"),
        ('451-["a",[{"x":{"_placeholder":true,"num":"0"}}]]', "placeholder names no attachment"),
        ("42" + "1" * 17 + '["a"]', "ack id out of range"),
        (f'42{2**53}["a"]', "ack id out of range"),
        ("40/" + "a" * 200 + ",", "namespace longer"),
        ('42/a[b,["a"]', "invalid namespace"),
        ('40{"a":' + "[" * 40 + "]" * 40 + "}", "nested deeper than 32"),
        ('451-["a",' + "[" * 40 + '{"_placeholder":true,"num":0}' + "]" * 40 + "]", "nested deeper than 32"),
        ('42["a",' + "[" * 5000 + "]" * 5000 + "]", "nested too deep"),
    ],
)
def test_refused(frame: str, error: str) -> None:
    with pytest.raises(ProtocolError, match=error.replace("(", r"\(")):
        Decoder().text(frame.encode())


def test_nesting_of_event_arguments_checked_when_built() -> None:
    # Relayed arguments are only split; building one applies the hub's depth limit.
    packet = decode('42["a",' + "[" * 40 + "]" * 40 + "]")
    with pytest.raises(ProtocolError, match="nested deeper than 32"):
        materialize(packet.args[0])
    assert materialize(decode('42["a",' + "[" * 31 + "]" * 31 + "]").args[0]) is not None


def test_out_of_order_frames_refused() -> None:
    with pytest.raises(ProtocolError, match="no binary packet awaiting"):
        Decoder().binary(b"\x00")
    decoder = Decoder()
    decoder.text(b'452-["a",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]')
    decoder.binary(b"\x00")
    with pytest.raises(ProtocolError, match="text frame while binary attachments are due"):
        decoder.text(b'42["b"]')


def test_non_placeholder_objects_are_data() -> None:
    # Only `"_placeholder": true` marks an attachment, as in socket.io-parser.
    packet = decode('451-["a",{"_placeholder":false,"num":5},{"_placeholder":true,"num":0}]', b"z")
    assert args(packet) == [{"_placeholder": False, "num": 5}, b"z"]


# -- Socket.IO encoding ---------------------------------------------------------------


def test_encode_examples() -> None:
    assert encode_packet(PacketType.CONNECT, {"sid": "wZX3oN0bSVIhsaknAAAI"}) == [
        b'40{"sid":"wZX3oN0bSVIhsaknAAAI"}'
    ]
    assert encode_packet(PacketType.CONNECT, {"sid": "x"}, nsp="/admin") == [b'40/admin,{"sid":"x"}']
    assert encode_packet(PacketType.CONNECT_ERROR, {"message": "Not authorized"}) == [
        b'44{"message":"Not authorized"}'
    ]
    assert encode_packet(PacketType.DISCONNECT) == [b"41"]
    assert encode_packet(PacketType.DISCONNECT, nsp="/admin") == [b"41/admin,"]
    assert encode_event("foo") == [b'42["foo"]']
    assert encode_event("bar", nsp="/admin") == [b'42/admin,["bar"]']
    assert encode_event("foo", id=12) == [b'4212["foo"]']
    assert encode_packet(PacketType.ACK, ["bar"], nsp="/admin", id=13) == [b'43/admin,13["bar"]']
    assert encode_packet(PacketType.ACK, [], id=12) == [b"4312[]"]


def test_encode_binary() -> None:
    assert encode_event("baz", b"\x01\x02\x03\x04") == [
        b'451-["baz",{"_placeholder":true,"num":0}]',
        b"\x01\x02\x03\x04",
    ]
    assert encode_event("baz", b"\x01\x02", bytearray(b"\x03\x04"), nsp="/admin") == [
        b'452-/admin,["baz",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]',
        b"\x01\x02",
        b"\x03\x04",
    ]
    assert encode_packet(PacketType.ACK, ["bar", b"\x01"], id=15) == [
        b'461-15["bar",{"_placeholder":true,"num":0}]',
        b"\x01",
    ]
    nested = {"meta": {"tabId": "t"}, "data": memoryview(b"gz")}
    frames = encode_event("messages_gz", nested)
    assert frames == [
        b'451-["messages_gz",{"meta":{"tabId":"t"},"data":{"_placeholder":true,"num":0}}]',
        b"gz",
    ]
    # The caller's data is not changed.
    assert isinstance(nested["data"], memoryview)


def test_raw_arguments_forwarded_verbatim() -> None:
    received = decode('42["messages",{"meta":{"tabId":"t1"},"data":[1, 2]}]')
    assert event_frame("messages", *received.args) == b'42["messages",{"meta":{"tabId":"t1"},"data":[1, 2]}]'
    assert (
        event_frame("click", "agent-sid", msgspec.Raw(b'{"data":[3,4]}'))
        == b'42["click","agent-sid",{"data":[3,4]}]'
    )
    # A binary event forwarded as received: its placeholders and attachments unchanged.
    gz = decode('451-["messages_gz",{"meta":{"tabId":"t1"},"data":{"_placeholder":true,"num":0}}]', b"gz")
    frames = encode_packet(PacketType.EVENT, [gz.name, *gz.args], attachments=gz.attachments)
    assert frames == [
        b'451-["messages_gz",{"meta":{"tabId":"t1"},"data":{"_placeholder":true,"num":0}}]',
        b"gz",
    ]
    # With an agent's id put before it, as OpenReplay's server forwards an agent's event.
    frames = encode_packet(PacketType.EVENT, [gz.name, "a1", *gz.args], attachments=gz.attachments)
    assert args(decode(frames[0].decode(), frames[1])) == ["a1", {"meta": {"tabId": "t1"}, "data": b"gz"}]


# -- Against python-socketio --------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
with_binary = st.recursive(
    json_values | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "data", "é"]), inner, max_size=3)
    ),
    max_leaves=8,
)
event_names = st.text(min_size=1, max_size=12).filter(lambda n: n not in {"connect", "disconnect"})
namespaces = st.sampled_from(["/", "/admin", "/a/b"])
ack_ids = st.none() | st.integers(0, 2**53 - 1)


def _theirs_decode(frames: list[bytes]) -> sio.Packet:
    """python-socketio's decoding of the hub's frames (its text without the Engine.IO "4")."""
    packet = sio.Packet(encoded_packet=frames[0][1:].decode())
    for attachment in frames[1:]:
        packet.add_attachment(attachment)
    return packet


@given(event_names, st.lists(with_binary, max_size=3), namespaces, ack_ids)
def test_python_socketio_decodes_ours(name: str, arguments: list[Any], nsp: str, ack: int | None) -> None:
    frames = encode_event(name, *arguments, nsp=nsp, id=ack)
    theirs = _theirs_decode(frames)
    assert theirs.data == [name, *[_plain(a) for a in arguments]]
    assert (theirs.namespace or "/", theirs.id) == (nsp, ack)
    assert theirs.packet_type == (PacketType.BINARY_EVENT if len(frames) > 1 else PacketType.EVENT)


@given(event_names, st.lists(with_binary, max_size=3), namespaces, ack_ids)
def test_we_decode_python_socketio(name: str, arguments: list[Any], nsp: str, ack: int | None) -> None:
    # Past MAX_ATTACHMENTS binary parts the hub refuses the packet, as socket.io's parser does
    # (test_attachment_limit_matches_socketio_parser): hypothesis found 11 in 3 arguments.
    assume(sum(_blobs(a) for a in arguments) <= MAX_ATTACHMENTS)
    encoded = sio.Packet(sio.EVENT, [name, *arguments], namespace=nsp, id=ack).encode()
    parts = encoded if isinstance(encoded, list) else [encoded]
    packet = decode("4" + parts[0], *parts[1:])
    assert (packet.name, packet.nsp, packet.id) == (name, nsp, ack)
    assert args(packet) == [_plain(a) for a in arguments]


def _blobs(value: Any) -> int:
    """Binary leaves in ``value`` (each one attachment)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return 1
    if isinstance(value, list | tuple):
        return sum(_blobs(v) for v in value)
    if isinstance(value, dict):
        return sum(_blobs(v) for v in value.values())
    return 0


def _plain(value: Any) -> Any:
    """``value`` as it comes out of a decoder: bytes-likes as bytes, tuples as lists."""
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def test_attachment_limit_matches_socketio_parser() -> None:
    frames = encode_event("a", *[b"x"] * MAX_ATTACHMENTS)
    assert len(decode(frames[0].decode(), *frames[1:]).attachments) == MAX_ATTACHMENTS
