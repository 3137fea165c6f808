"""Extremes of depth, size and number at every door (CONTRACT §2 and §4), over real sockets.

Each extreme gets an error frame (the connection stays open) or a 400, or a
documented fallback, and changes nothing; the hub stays fully usable after:
a search and an agent subscription still answer. The limits are written
here as the README states them, not imported, so a changed limit is a
changed test.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import msgspec
import pytest

from loadtest.client import frame
from tests.helpers import API_KEY
from tests.test_fuzz import HubThread, WsClient, assert_healthy, http_raw

# README, "Limits and error codes".
USER_PROPERTIES_DEPTH = 16  # userProperties is level 1
JSON_DEPTH = 32  # any frame or search body
DECODER_DEPTH = 990  # just under where the JSON decoder ran out of stack (Python's 1000)

_projects = itertools.count()


@pytest.fixture(scope="module")
def hub() -> Iterator[HubThread]:
    h = HubThread()
    yield h
    h.close()


def project() -> str:
    return f"x{next(_projects)}"


def nested(levels: int, leaf: str = "0") -> str:
    """A JSON value ``levels`` deep: arrays around ``leaf`` (0 levels: the leaf)."""
    return "[" * levels + leaf + "]" * levels


def props(levels: int) -> str:
    """userProperties nested ``levels`` deep, the object itself the first level."""
    return '{"a":' + nested(levels - 1) + "}"


# Clients ---------------------------------------------------------------------


class Tracker(WsClient):
    def __init__(self, hub: HubThread, project_key: str) -> None:
        super().__init__(hub.port, f"/ws/tracker/{project_key}")

    def send_text(self, payload: bytes) -> None:
        self.sock.sendall(frame(payload, 0x1))

    def ask(self, payload: bytes | str) -> dict[str, Any]:
        """Send one frame that gets a reply (start, or anything refused): the reply."""
        self.send_text(payload.encode() if isinstance(payload, str) else payload)
        opcode, data = self.recv()
        assert opcode == 0x1, (opcode, data)
        reply: dict[str, Any] = json.loads(data)
        return reply

    def refused(self, payload: bytes | str, code: str | tuple[str, ...]) -> dict[str, Any]:
        reply = self.ask(payload)
        assert reply["type"] == "error", reply
        assert reply["code"] in ((code,) if isinstance(code, str) else code), reply
        return reply


def agent(hub: HubThread, project_key: str) -> WsClient:
    return WsClient(hub.port, f"/ws/agent/{project_key}", headers={"Authorization": f"Bearer {API_KEY}"})


def agent_answer(ws: WsClient, payload: bytes) -> dict[str, Any]:
    ws.sock.sendall(frame(payload, 0x1))
    return agent_next(ws)


def agent_next(ws: WsClient, kind: str | None = None) -> dict[str, Any]:
    """The agent's next frame (of type ``kind``: others before it are skipped, at most 10)."""
    for _ in range(10):
        opcode, data = ws.recv()
        assert opcode == 0x1, (opcode, data)
        answer: dict[str, Any] = json.loads(data)
        if kind is None or answer["type"] == kind:
            return answer
    raise AssertionError(f"no {kind} frame within 10")


def request(hub: HubThread, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {API_KEY}\r\n"
    if method == "POST":
        head += f"Content-Length: {len(body)}\r\n"
    status, payload = http_raw(hub.port, head.encode() + b"\r\n" + body)
    return status, json.loads(payload) if payload else None


def search(hub: HubThread, project_key: str, body: bytes = b"{}") -> tuple[int, Any]:
    return request(hub, "POST", f"/public/{project_key}/assist/sessions", body)


def assert_usable(hub: HubThread, project_key: str, sessions: int) -> list[dict[str, Any]]:
    """A search and an agent subscription of the project both answer, with ``sessions`` sessions."""
    status, answer = search(hub, project_key, b'{"limit": 1000}')
    assert status == 200, answer
    assert answer["data"]["total"] == sessions, answer
    status, answer = request(hub, "GET", f"/public/{project_key}/assist/sessions")
    assert status == 200, answer
    ws = agent(hub, project_key)
    snapshot = agent_answer(ws, b'{"type":"subscribe"}')
    ws.close()
    assert snapshot["type"] == "snapshot", snapshot
    assert len(snapshot["sessions"]) == sessions
    assert_healthy(hub)
    found: list[dict[str, Any]] = snapshot["sessions"]
    return found


# Depth (issue 15, defects 1 and 2) ---------------------------------------------


def test_user_properties_nest_at_most_16_levels(hub: HubThread) -> None:
    p = project()
    t = Tracker(hub, p)
    deepest = props(USER_PROPERTIES_DEPTH)
    reply = t.refused(f'{{"type":"start","sessionID":"s","userProperties":{props(17)}}}', "limit_exceeded")
    assert "16 levels" in reply["message"]
    assert_usable(hub, p, 0)
    assert t.ask(f'{{"type":"start","sessionID":"s","userProperties":{deepest}}}')["type"] == "started"
    # An update deeper than the limit changes nothing, the stored value stays.
    t.refused(f'{{"type":"update","userProperties":{{"b":{nested(16)}}}}}', "limit_exceeded")
    (session,) = assert_usable(hub, p, 1)
    assert session["userProperties"] == json.loads(deepest)
    t.close()


def test_user_properties_nested_to_the_decoders_limit_cannot_break_a_project(hub: HubThread) -> None:
    """Defect 1: such a start was accepted, then every search of the project was a 500
    and every agent subscription dropped."""
    p = project()
    t = Tracker(hub, p)
    assert t.ask('{"type":"start","sessionID":"ok"}')["type"] == "started"
    other = Tracker(hub, p)
    deep = f'{{"type":"start","sessionID":"deep","userProperties":{props(983)}}}'
    other.refused(deep, ("invalid_json", "limit_exceeded"))
    assert [s["sessionID"] for s in assert_usable(hub, p, 1)] == ["ok"]
    t.close()
    other.close()


@pytest.mark.parametrize(
    "payload",
    [
        '{"type":"start","sessionID":"s","extra":' + nested(DECODER_DEPTH) + "}",
        '{"type":"heartbeat","extra":' + nested(DECODER_DEPTH) + "}",
        '{"type":"update","metadata":{"k":' + nested(DECODER_DEPTH) + "}}",
        nested(DECODER_DEPTH),
        '{"a":' * 5000,
        nested(JSON_DEPTH + 1),
    ],
    ids=["unknown-field", "heartbeat", "metadata", "array", "unclosed", "just-past"],
)
def test_deep_json_in_a_tracker_frame_is_an_error_frame(hub: HubThread, payload: str) -> None:
    """Defect 2: the connection dropped (1006) with a traceback logged for each frame."""
    p = project()
    t = Tracker(hub, p)
    assert t.ask('{"type":"start","sessionID":"s","userID":"u"}')["type"] == "started"
    before = hub.hub.index.get(p, "s")
    assert before is not None
    seen = msgspec.to_builtins(before)
    t.refused(payload, "invalid_json")
    t.refused(payload, "invalid_json")  # still open, still answered
    assert msgspec.to_builtins(hub.hub.index.get(p, "s")) == seen  # lastActiveAt too
    (session,) = assert_usable(hub, p, 1)
    assert session["userID"] == "u"
    t.close()


def test_json_within_the_depth_limit_is_parsed(hub: HubThread) -> None:
    t = Tracker(hub, project())
    # 32 levels: the frame (1), an unknown field 31 deep: ignored, as any unknown field.
    reply = t.ask('{"type":"start","sessionID":"s","extra":' + nested(JSON_DEPTH - 1) + "}")
    assert reply["type"] == "started", reply
    # Brackets inside strings do not nest.
    reply = t.ask('{"type":"start","sessionID":"s","userID":"' + "[{" * 500 + '"}')
    assert reply["type"] == "started", reply
    t.close()


@pytest.mark.parametrize(
    "payload",
    [
        '{"type":"subscribe","filters":' + nested(DECODER_DEPTH) + "}",
        '{"type":"subscribe","filters":[{"name":"userId","value":' + nested(DECODER_DEPTH) + "}]}",
        '{"type":"ping","x":' + nested(DECODER_DEPTH) + "}",
        nested(JSON_DEPTH + 1),
    ],
    ids=["filters", "value", "unknown-field", "just-past"],
)
def test_deep_json_in_an_agent_frame_is_an_error_frame(hub: HubThread, payload: str) -> None:
    p = project()
    t = Tracker(hub, p)
    assert t.ask('{"type":"start","sessionID":"s"}')["type"] == "started"
    ws = agent(hub, p)
    assert agent_answer(ws, b'{"type":"subscribe","sessionID":"s"}')["type"] == "snapshot"
    for _ in range(2):
        answer = agent_answer(ws, payload.encode())
        assert (answer["type"], answer["code"]) == ("error", "invalid_json"), answer
    # The connection and its subscription are as before: the session's end still arrives.
    t.send_text(b'{"type":"end"}')
    assert agent_next(ws, "session.end")["sessionID"] == "s"
    ws.close()
    t.close()
    assert_usable(hub, p, 0)


@pytest.mark.parametrize(
    "body",
    [
        '{"filters":' + nested(DECODER_DEPTH) + "}",
        '{"unknown":' + nested(DECODER_DEPTH) + "}",
        '{"filters":[{"name":"x","value":[' + nested(DECODER_DEPTH) + "]}]}",
        nested(JSON_DEPTH + 1),
    ],
    ids=["filters", "unknown-field", "value", "just-past"],
)
def test_deep_json_in_a_search_body_is_a_400(hub: HubThread, body: str) -> None:
    """Defect 2: a 500."""
    p = project()
    status, answer = search(hub, p, body.encode())
    assert status == 400, answer
    assert "nested deeper than 32 levels" in answer["error"]
    assert_usable(hub, p, 0)


def test_the_deepest_and_largest_accepted_record_encodes_in_every_answer(hub: HubThread) -> None:
    """Whatever a tracker can store encodes in `started`, a search answer, one
    session's answer, an agent snapshot, session.update frames and the
    cluster's msgpack record: no stored record can make an answer fail."""
    p = project()
    deepest = json.loads(props(USER_PROPERTIES_DEPTH))
    deepest["n"] = [2**64 - 1, -(2**63), 1.7976931348623157e308, 5e-324, -0.0]
    deepest["s"] = "\u2028\x00\ud7ff\U0010ffff" + "x" * 1000
    filler = 16 * 1024 - len(msgspec.json.encode(deepest)) - len(',"z":""')
    deepest["z"] = "z" * filler
    assert len(msgspec.json.encode(deepest)) == 16 * 1024
    start = {"type": "start", "sessionID": "x" * 64, "userProperties": deepest}
    start |= {"metadata": {"k" * 128: "v" * 1024, **{f"m{i}": 2**70 + i for i in range(49)}}}
    ws = agent(hub, p)
    assert agent_answer(ws, b'{"type":"subscribe"}') == {"type": "snapshot", "sessions": []}
    t = Tracker(hub, p)
    reply = t.ask(json.dumps(start))
    assert reply["type"] == "started", reply
    assert reply["session"]["userProperties"] == deepest
    assert reply["session"]["metadata"]["m0"] == str(2**70)
    assert agent_next(ws, "session.start")["session"]["userProperties"] == deepest
    t.send_text(json.dumps({"type": "update", "userProperties": {"a": deepest["a"], "n": None}}).encode())
    assert "n" not in agent_next(ws, "session.update")["changes"]["userProperties"]
    status, one = request(hub, "GET", f"/public/{p}/assist/sessions/{'x' * 64}")
    assert status == 200 and one["data"]["userProperties"]["a"] == deepest["a"]
    (session,) = assert_usable(hub, p, 1)
    assert session["userProperties"]["z"] == deepest["z"]
    stored = hub.hub.index.get(p, "x" * 64)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(stored), type=type(stored)) == stored
    ws.close()
    t.close()


def test_user_properties_integers_outside_64_bits_are_refused(hub: HubThread) -> None:
    """An integer no encoder of a record can carry (the cluster's msgpack stops at 64 bits)."""
    p = project()
    t = Tracker(hub, p)
    for number in (2**64, -(2**63) - 1, 10**30):
        payload = f'{{"type":"start","sessionID":"s","userProperties":{{"a":[{{"b":{number}}}]}}}}'
        t.refused(payload, "invalid_field")
    t.refused('{"type":"start","sessionID":"s","userProperties":{"a":1e400}}', "invalid_field")
    assert_usable(hub, p, 0)
    t.close()


# Numbers (issue 15, defect 3) ------------------------------------------------


@pytest.mark.parametrize(
    ("method", "query", "body"),
    [
        ("GET", "?sort=lastActiveAt&page=10000000000000000000", ""),
        ("GET", "?sort=tabs&page=9223372036854775807", ""),
        ("GET", "?page=18446744073709551617&limit=1000", ""),
        ("GET", "?sort=userID&page=" + "9" * 400, ""),
        ("POST", "", '{"page":4611686018427387904,"sort":"lastActiveAt"}'),
        ("POST", "", '{"page":18446744073709551616,"sort":"timestamp","order":"asc"}'),
        ("POST", "", '{"page":9223372036854775808,"limit":1000,"sort":"userID","filters":[{"name":"u"}]}'),
        ("POST", "", '{"page":9223372036854775807,"filters":[{"name":"plan"}],"sort":"tabs"}'),
    ],
)
def test_a_page_past_the_end_is_empty_whatever_its_number(
    hub: HubThread, method: str, query: str, body: str
) -> None:
    """Defect 3: a 500 (ValueError in the int-order pager)."""
    p = project()
    trackers = [Tracker(hub, p) for _ in range(3)]
    for i, t in enumerate(trackers):
        start = {"type": "start", "sessionID": f"s{i}", "metadata": {"plan": "pro", "u": str(i)}}
        assert t.ask(json.dumps(start))["type"] == "started"
    status, answer = request(hub, method, f"/public/{p}/assist/sessions{query}", body.encode())
    assert status == 200, answer
    assert answer == {"data": {"total": 3, "sessions": [], "live": True}}
    assert_usable(hub, p, 3)
    for t in trackers:
        t.close()


# Search input (issue 15, defect 9) ---------------------------------------------


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ("", "body is required"),
        ("  \r\n", "body is required"),
        ('{"filters":[{"name":"userId","value":5}]}', "filters[0].value"),
        ('{"filters":[{"name":"userId","value":"ann"}]}', "filters[0].value"),
        ('{"filters":[{"name":"userId","value":true}]}', "filters[0].value"),
        ('{"filters":[{"name":"userId","value":{"a":1}}]}', "filters[0].value"),
        ('{"filters":[{"name":"userId","value":["a",null]}]}', "filters[0].value[1]"),
    ],
)
def test_a_malformed_search_body_is_a_400(hub: HubThread, body: str, words: str) -> None:
    """Defect 9: a value that is not a list was taken as a one-item list, an empty body as {}."""
    p = project()
    t = Tracker(hub, p)
    assert t.ask('{"type":"start","sessionID":"s","userID":"5"}')["type"] == "started"
    status, answer = search(hub, p, body.encode())
    assert status == 400, answer
    assert words in answer["error"], answer
    # The same filters from an agent: an error frame, its subscription unchanged.
    if body.strip():
        ws = agent(hub, p)
        sub = json.dumps({"type": "subscribe", "filters": json.loads(body)["filters"]}).encode()
        answer = agent_answer(ws, sub)
        assert (answer["type"], answer["code"]) == ("error", "invalid_filters"), answer
        assert words in answer["message"], answer
        ws.close()
    assert_usable(hub, p, 1)
    t.close()


@pytest.mark.parametrize("name", ["page", "limit"])
@pytest.mark.parametrize("value", ["٣", "1_0", "+5", "-1", " 5", "5 ", "0x5", "²", "5.0", "1e2", "9" * 5000])
def test_numbers_in_a_get_query_are_ascii_digits(hub: HubThread, name: str, value: str) -> None:
    """Defect 9: int() took "٣" (Arabic-Indic three), "1_0" and "+5"."""
    p = project()
    status, answer = request(hub, "GET", f"/public/{p}/assist/sessions?{name}={quote(value)}")
    assert status == 400, answer
    assert name in answer["error"], answer
    status, answer = request(hub, "GET", f"/public/{p}/assist/sessions?{name}=5")
    assert status == 200, answer
