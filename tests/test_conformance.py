"""RFC 6455 where websockets' Sans-I/O protocol leaves it to the hub, over real sockets (CONTRACT §2).

A text message that is not UTF-8 fails the connection with 1007, as soon as
a fragment shows it (RFC 6455 §8.1); a code point split across fragments is
fine. Binary frames are never parsed as JSON: they get ``unsupported_binary``.
The full conformance run is Autobahn|Testsuite: ``make conformance``
(tests/autobahn.py, BENCHMARKS.md "WebSocket conformance").
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import pytest
from websockets.frames import Frame, Opcode

from loadtest.wsraw import RawWs
from tests.helpers import API_KEY, RunningHub, http, running_hub

PATHS = {
    "tracker": ("/ws/tracker/p1", {}),
    "agent": ("/ws/agent/p1", {"Authorization": f"Bearer {API_KEY}"}),
}
START = b'{"type":"start","sessionID":"s1","pageTitle":"'


def part(opcode: Opcode, data: bytes, fin: bool) -> bytes:
    """One masked client frame, final or not."""
    return Frame(opcode, data, fin).serialize(mask=True)


async def connect(h: RunningHub, kind: str) -> RawWs:
    path, headers = PATHS[kind]
    return await RawWs.connect(h.port, path, headers)


async def close_code(ws: RawWs) -> int:
    """Frames until the hub's close frame; its code. The hub then closes the TCP connection."""
    while True:
        opcode, payload = await asyncio.wait_for(ws.recv(), 5)
        if opcode == Opcode.CLOSE:
            (code,) = struct.unpack("!H", payload[:2])
            assert await asyncio.wait_for(ws.reader.read(), 5) == b"", "TCP closed after the close frame"
            return int(code)


async def reply(ws: RawWs) -> dict[str, Any]:
    opcode, payload = await asyncio.wait_for(ws.recv(), 5)
    assert opcode == Opcode.TEXT, (opcode, payload)
    message: dict[str, Any] = json.loads(payload)
    return message


async def closed_1007(port: int, kind: str) -> float:
    text = (await http(port, "GET", "/metrics", key=None)).body.decode()
    for line in text.splitlines():
        if line.startswith("hub_connections_closed_total{") and 'code="1007"' in line and f'"{kind}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("kind", PATHS)
async def test_a_text_frame_that_is_not_utf8_closes_with_1007(kind: str) -> None:
    async with running_hub() as h:
        ws = await connect(h, kind)
        ws.writer.write(part(Opcode.TEXT, START + b'\xc3\x28"}', fin=True))
        assert await close_code(ws) == 1007
        assert await closed_1007(h.port, kind) == 1


@pytest.mark.parametrize("kind", PATHS)
async def test_invalid_utf8_in_a_middle_fragment_closes_with_1007_before_the_message_ends(kind: str) -> None:
    async with running_hub() as h:
        ws = await connect(h, kind)
        ws.writer.write(part(Opcode.TEXT, START + b"fine ", fin=False))
        ws.writer.write(part(Opcode.CONT, b"\xed\xa0\x80", fin=False))  # a UTF-16 surrogate
        # The final fragment is never sent: the hub fails fast.
        assert await close_code(ws) == 1007


@pytest.mark.parametrize("kind", PATHS)
async def test_a_message_ending_in_a_truncated_code_point_closes_with_1007(kind: str) -> None:
    async with running_hub() as h:
        ws = await connect(h, kind)
        ws.writer.write(part(Opcode.TEXT, START + b'x"}', fin=False))
        ws.writer.write(part(Opcode.CONT, b"\xe2\x82", fin=True))  # two of the euro sign's three bytes
        assert await close_code(ws) == 1007


async def test_a_code_point_split_across_fragments_is_valid_text() -> None:
    async with running_hub() as h:
        ws = await connect(h, "tracker")
        euro = "€".encode()
        ws.writer.write(part(Opcode.TEXT, START + b"price " + euro[:1], fin=False))
        ws.writer.write(part(Opcode.CONT, euro[1:2], fin=False))
        ws.writer.write(part(Opcode.CONT, euro[2:] + b' 5"}', fin=True))
        started = await reply(ws)
        assert started["type"] == "started" and started["session"]["pageTitle"] == "price € 5"
        ws.send('{"type":"start","sessionID":"s1","pageTitle":"Grüße 🎉"}'.encode())
        assert (await reply(ws))["session"]["pageTitle"] == "Grüße 🎉"
        ws.close()


@pytest.mark.parametrize("kind", PATHS)
async def test_binary_frames_are_never_parsed_as_json(kind: str) -> None:
    # A tracker's binary frames are relay payloads (before start there is no tab to relay
    # from); an agent has none to send.
    code = "not_started" if kind == "tracker" else "unsupported_binary"
    async with running_hub() as h:
        ws = await connect(h, kind)
        valid_json = b'{"type":"start","sessionID":"bin"}'
        ws.writer.write(part(Opcode.BINARY, valid_json, fin=True))
        refused = await reply(ws)
        assert refused["type"] == "error" and refused["code"] == code
        ws.writer.write(part(Opcode.BINARY, valid_json[:5], fin=False))
        ws.writer.write(part(Opcode.CONT, valid_json[5:], fin=True))
        assert (await reply(ws))["code"] == code, "a fragmented binary message too"
        ws.writer.write(part(Opcode.BINARY, b"\xff\xfe not UTF-8 is fine in binary", fin=True))
        assert (await reply(ws))["code"] == code
        # The connection stays open and nothing changed.
        assert (await h.search())["total"] == 0
        if kind == "tracker":
            ws.send(valid_json)
            assert (await reply(ws))["type"] == "started"
        ws.close()


async def test_a_close_between_fragments_is_echoed_and_the_message_dropped() -> None:
    # RFC 6455 lets control frames come between fragments (Autobahn 7.1.5); websockets alone
    # would fail this with 1002.
    async with running_hub() as h:
        ws = await connect(h, "tracker")
        ws.writer.write(part(Opcode.TEXT, START + b"never", fin=False))
        ws.writer.write(part(Opcode.CLOSE, struct.pack("!H", 1000), fin=True))
        ws.writer.write(part(Opcode.CONT, b' finished"}', fin=True))
        assert await close_code(ws) == 1000
        assert (await h.search())["total"] == 0, "the unfinished start was dropped"


async def test_a_bad_handshake_is_refused_before_an_endpoint_exists() -> None:
    # The handshake is checked before it is routed: an agent refused with 400 is never in the fan-out.
    async with running_hub() as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        writer.write(
            b"GET /ws/agent/p1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: not-a-key\r\nSec-WebSocket-Version: 13\r\n"
            + f"Authorization: Bearer {API_KEY}\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 400"), head
        writer.close()
        assert not h.hub.fanout.agents, "the refused agent left nothing behind"
