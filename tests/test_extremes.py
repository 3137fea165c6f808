"""Extremes of depth, size and number at every door (CONTRACT §2 and §4), over real sockets
(and, for two decisions the contract leaves open, the tracker protocol with a fake clock).

Each extreme gets an error frame (the connection stays open) or a 400, or a
documented fallback, and changes nothing; the hub stays fully usable after:
a search and an agent subscription still answer. The limits are written
here as the README states them, not imported, so a changed limit is a
changed test.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any, NamedTuple
from urllib.parse import quote

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.index import LiveIndex
from hub.record import too_deep
from hub.registry import Registry
from hub.tracker import TrackerProtocol
from loadtest.client import frame
from tests.helpers import API_KEY
from tests.test_fuzz import FUZZ, MARKER, HubThread, WsClient, assert_healthy, http_raw, meta_text

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


def now_ms() -> int:
    return int(time.time() * 1000)


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

    def replies(self) -> tuple[list[dict[str, Any]], int | None]:
        """Replies to the frames sent so far (up to a marker's), and the close code if the hub closed."""
        with contextlib.suppress(OSError):  # closed already: its close frame is still to read
            self.send_text(MARKER)
        out: list[dict[str, Any]] = []
        while True:
            opcode, data = self.recv()
            if opcode == 0x8:
                return out, int.from_bytes(data[:2], "big")
            reply: dict[str, Any] = json.loads(data)
            if reply.get("type") == "error" and "fuzz-sync" in reply.get("message", ""):
                return out, None
            out.append(reply)

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


# The depth scan against the depth itself ----------------------------------------

# Strings full of what a scan could take for structure: brackets, quotes, backslashes.
tricky_text = st.text(alphabet='[]{}"\\\x00a/é🎉', max_size=6)
json_trees = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | tricky_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky_text, inner, max_size=3),
    max_leaves=30,
)


def depth_of(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    return 0


@settings(max_examples=500, deadline=None)
@given(tree=json_trees, wraps=st.lists(st.sampled_from("[{"), max_size=45), limit=st.integers(0, 40))
def test_the_depth_scan_is_exact_on_valid_json(tree: Any, wraps: list[str], limit: int) -> None:
    for kind in wraps:
        tree = [tree] if kind == "[" else {"[k": tree}
    for data in (
        json.dumps(tree).encode(),
        json.dumps(tree, ensure_ascii=False).encode(),
        msgspec.json.encode(tree),
    ):
        assert too_deep(data, limit) == (depth_of(tree) > limit), data


# Property: every extreme at every door -----------------------------------------
#
# Each case carries the outcome the README promises, computed here from the
# documented limits: refused with one of some codes (and nothing changed), or
# accepted with the stored values it names.


class Refused(NamedTuple):
    codes: tuple[str, ...]


class Accepted(NamedTuple):
    fields: dict[str, Any]


NOW = object()  # the hub's clock at the time of the message (a timestamp's fallback)
GENERATED = object()  # a sessionID the hub made (a UUIDv4)
BAD_UTF8 = Refused(("invalid_json",))  # or the connection closed with 1007 (RFC 6455 §8.1)
Case = tuple[str, bytes, Refused | Accepted]  # (start | update, frame, outcome)

# A session every update case starts from.
BASE_START = '{"type":"start","sessionID":"s","metadata":{"keep":"1"},"userProperties":{"keep":1}}'
BASE_META = {"keep": "1"}
BASE_PROPS = {"keep": 1}

INT_EDGES = [0, 1, -5, 2**53 - 1, 2**53, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**64 + 1]
INT_EDGES += [-(2**63), -(2**63) - 1, 10**30, -(10**30), 8_640_000_000_000_000, 8_640_000_000_000_001]
FLOAT_EDGES = [1e300, -1e300, 1.7976931348623157e308, 5e-324, 2.5, 5.0, 1e21, -0.0, 1e16]
# Numbers no JSON decoder of the hub holds: past a double, past 4300 digits.
UNDECODABLE = ["1e309", "-1e309", "1" + "0" * 4400]
number_literals = (
    st.sampled_from(INT_EDGES) | st.integers(-(2**66), 2**66) | st.sampled_from(FLOAT_EDGES)
).map(json.dumps) | st.sampled_from(UNDECODABLE)
edge_depths = st.sampled_from([0, 1, 14, 15, 16, 17, 30, 31, 32, 33, 989, 990, 999, 1000, 1001, 3000])
depths = edge_depths | st.integers(0, 1100)


def number_of(literal: str) -> int | float | None:
    return None if literal in UNDECODABLE else json.loads(literal)  # type: ignore[no-any-return]


def nested_in(levels: int, kind: str, leaf: str = "0") -> str:
    return nested(levels, leaf) if kind == "[" else '{"k":' * levels + leaf + "}" * levels


def update(fields: str) -> bytes:
    return ('{"type":"update",' + fields + "}").encode()


@st.composite
def depth_cases(draw: st.DrawFn) -> Case:
    levels, kind = draw(depths), draw(st.sampled_from("[{"))
    where = draw(st.sampled_from(["userProperties", "unknown", "metadata", "unclosed"]))
    value = nested_in(levels, kind)
    if where == "userProperties":
        frame_depth, props_depth = levels + 2, levels + 1
        outcome: Refused | Accepted = (
            Refused(("invalid_json",))
            if frame_depth > JSON_DEPTH
            else Refused(("limit_exceeded",))
            if props_depth > USER_PROPERTIES_DEPTH
            else Accepted({"userProperties": BASE_PROPS | {"a": json.loads(value)}})
        )
        return "update", update(f'"userProperties":{{"a":{value}}}'), outcome
    if where == "unknown":
        ok = levels + 1 <= JSON_DEPTH
        return "update", update(f'"zz":{value}'), Accepted({}) if ok else Refused(("invalid_json",))
    if where == "metadata":
        outcome = (
            Refused(("invalid_json",))
            if levels + 2 > JSON_DEPTH
            else Refused(("invalid_field",))
            if levels
            else Accepted({"metadata": BASE_META | {"k": "0"}})
        )
        return "update", update(f'"metadata":{{"k":{value}}}'), outcome
    return (
        "update",
        update(f'"userProperties":{{"a":{value[: len(value) // 2 + 1]}'),
        Refused(("invalid_json",)),
    )


@st.composite
def number_cases(draw: st.DrawFn) -> Case:
    literal = draw(number_literals)
    v = number_of(literal)
    where = draw(st.sampled_from(["timestamp", "sessionID", "metadata", "userProperties"]))
    if v is None:
        kind = "start" if where in ("timestamp", "sessionID") else "update"
        body = f'"{where}":{literal}' if kind == "start" else f'"{where}":{{"n":{literal}}}'
        return kind, ('{"type":"' + kind + '",' + body + "}").encode(), Refused(("invalid_field",))
    if where == "timestamp":
        ts = int(v) if 0 <= v <= 8_640_000_000_000_000 else NOW
        return (
            "start",
            f'{{"type":"start","sessionID":"t","timestamp":{literal}}}'.encode(),
            Accepted({"timestamp": ts}),
        )
    if where == "sessionID":
        return (
            "start",
            f'{{"type":"start","sessionID":{literal}}}'.encode(),
            Accepted({"sessionID": GENERATED}),
        )
    if where == "metadata":
        return (
            "update",
            update(f'"metadata":{{"n":{literal}}}'),
            Accepted({"metadata": BASE_META | {"n": meta_text(v)}}),
        )
    if isinstance(v, int) and not -(2**63) <= v <= 2**64 - 1:
        return "update", update(f'"userProperties":{{"n":[{literal}]}}'), Refused(("invalid_field",))
    return (
        "update",
        update(f'"userProperties":{{"n":[{literal}]}}'),
        Accepted({"userProperties": BASE_PROPS | {"n": [v]}}),
    )


@st.composite
def size_cases(draw: st.DrawFn) -> Case:
    where = draw(st.sampled_from(["field", "metaKey", "metaValue", "metaKeys", "sessionID", "props"]))
    if where == "field":
        name = draw(st.sampled_from(["pageTitle", "userID", "url", "userAgent"]))
        n, char = draw(st.sampled_from([0, 1, 1023, 1024, 1025, 3000])), draw(st.sampled_from("xé🎉"))
        outcome: Refused | Accepted = (
            Accepted({name: char * n}) if n <= 1024 else Refused(("limit_exceeded",))
        )
        return "update", update(f'"{name}":{json.dumps(char * n)}'), outcome
    if where == "metaKey":
        n = draw(st.sampled_from([0, 1, 127, 128, 129, 500]))
        key = "k" * n
        outcome = (
            Refused(("invalid_field",))
            if n == 0
            else Accepted({"metadata": BASE_META | {key: "v"}})
            if n <= 128
            else Refused(("limit_exceeded",))
        )
        return "update", update(f'"metadata":{{"{key}":"v"}}'), outcome
    if where == "metaValue":
        n = draw(st.sampled_from([1023, 1024, 1025]))
        outcome = (
            Accepted({"metadata": BASE_META | {"v": "é" * n}}) if n <= 1024 else Refused(("limit_exceeded",))
        )
        return "update", update(f'"metadata":{{"v":"{"é" * n}"}}'), outcome
    if where == "metaKeys":
        n = draw(st.sampled_from([48, 49, 50, 51, 60]))  # and "keep": 50 at most in all
        added = {f"m{i}": "v" for i in range(n)}
        outcome = Accepted({"metadata": BASE_META | added}) if n + 1 <= 50 else Refused(("limit_exceeded",))
        return "update", update(f'"metadata":{json.dumps(added)}'), outcome
    if where == "sessionID":
        n = draw(st.sampled_from([1, 63, 64, 65, 300]))
        sid = "S" * n
        return (
            "start",
            f'{{"type":"start","sessionID":"{sid}"}}'.encode(),
            Accepted({"sessionID": sid if n <= 64 else GENERATED}),
        )
    size = draw(st.sampled_from([16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1, 40_000]))
    # Merged with BASE_PROPS it encodes as {"keep":1,"z":"xx…"}: 17 bytes and the filler.
    filler = "x" * (size - 17)
    outcome = (
        Accepted({"userProperties": BASE_PROPS | {"z": filler}})
        if size <= 16 * 1024
        else Refused(("limit_exceeded",))
    )
    return "update", update(f'"userProperties":{{"z":"{filler}"}}'), outcome


@st.composite
def utf8_cases(draw: st.DrawFn) -> Case:
    bad = draw(
        st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80"])
    )
    field = draw(
        st.sampled_from([b'"pageTitle":"a%sb"', b'"metadata":{"a%sb":"v"}', b'"userProperties":{"k":["%s"]}'])
    )
    return "update", b'{"type":"update",' + field.replace(b"%s", bad) + b"}", BAD_UTF8


tracker_cases = depth_cases() | number_cases() | size_cases() | utf8_cases()


def records(hub: HubThread, project_key: str) -> dict[str, dict[str, Any]]:
    return {s.sessionID: msgspec.to_builtins(s) for s in hub.hub.index.sessions(project_key)}


@FUZZ
@given(case=tracker_cases)
def test_tracker_extremes_are_refused_or_fall_back_and_change_nothing(hub: HubThread, case: Case) -> None:
    kind, payload, outcome = case
    p = project()
    t = Tracker(hub, p)
    if kind == "update":
        assert t.ask(BASE_START)["type"] == "started"
    before = records(hub, p)
    sent_at = now_ms()
    t.send_text(payload)
    replies, close = t.replies()
    after = records(hub, p)
    if isinstance(outcome, Refused):
        if close is not None:  # the transport's answer to bad UTF-8 in a text frame
            assert outcome is BAD_UTF8 and close == 1007, close
            for record in (*before.values(), *after.values()):
                del record["connected"], record["tabs"]
        else:
            assert len(replies) == 1 and replies[0]["type"] == "error", replies
            assert replies[0]["code"] in outcome.codes, (replies, outcome)
        assert after == before  # lastActiveAt too: a refused message is no activity
    else:
        assert close is None
        assert [r["type"] for r in replies] == (["started"] if kind == "start" else []), replies
        (record,) = after.values()
        for name, want in outcome.fields.items():
            if want is NOW:
                assert sent_at <= record[name] <= now_ms(), (name, record[name])
            elif want is GENERATED:
                assert uuid.UUID(record[name]).version == 4
            else:
                assert record[name] == want, name
    t.close()
    assert_usable(hub, p, len(after))


@st.composite
def search_cases(draw: st.DrawFn) -> tuple[str, str, bytes, bool]:
    """(method, query, body, whether a 200 is due: else a 400)."""
    where = draw(st.sampled_from(["page", "limit", "value", "depth", "utf8", "getPage", "getLimit"]))
    if where in ("page", "limit", "value"):
        literal = draw(number_literals)
        v = number_of(literal)
        if where == "value":
            return "POST", "", f'{{"filters":[{{"name":"n","value":[{literal}]}}]}}'.encode(), v is not None
        ok = isinstance(v, int) and (v >= 0 if where == "page" else 0 <= v <= 1000)
        return "POST", "", f'{{"{where}":{literal}}}'.encode(), ok
    if where == "depth":
        levels, kind = draw(depths), draw(st.sampled_from("[{"))
        # body (1), filters (2), a filter (3), then the unknown field's levels
        body = f'{{"filters":[{{"name":"x","zz":{nested_in(levels, kind)}}}]}}'
        return "POST", "", body.encode(), levels + 3 <= JSON_DEPTH
    if where == "utf8":
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf"]))
        body = draw(st.sampled_from([b'{"sort":"a%sb"}', b'{"filters":[{"name":"x","value":["%s"]}]}']))
        return "POST", "", body.replace(b"%s", bad), False
    digits = str(draw(st.sampled_from([0, 1, 1000, 1001, 2**63, 2**64 + 1, 10**30]) | st.integers(0, 2**70)))
    digits = draw(st.just(digits) | st.just("9" * 4400))
    ok = len(digits) <= 4300 and (where == "getPage" or int(digits) <= 1000)
    return "GET", f"?{'page' if where == 'getPage' else 'limit'}={digits}", b"", ok


@FUZZ
@given(case=search_cases())
def test_search_extremes_are_a_400_or_an_answer(hub: HubThread, case: tuple[str, str, bytes, bool]) -> None:
    method, query, body, ok = case
    p = project()
    trackers = [Tracker(hub, p) for _ in range(2)]
    for i, t in enumerate(trackers):
        assert t.ask(f'{{"type":"start","sessionID":"s{i}","metadata":{{"n":"{i}"}}}}')["type"] == "started"
    before = records(hub, p)
    status, answer = request(hub, method, f"/public/{p}/assist/sessions{query}", body)
    if ok:
        assert status == 200, answer
        assert answer["data"]["total"] <= 2 and answer["data"]["live"] is True
    else:
        assert status == 400, answer
        assert answer["error"]
    assert records(hub, p) == before
    for t in trackers:
        t.close()
    assert_usable(hub, p, 2)


@st.composite
def agent_cases(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """(a frame, the error code it gets: None for a snapshot)."""
    where = draw(st.sampled_from(["depth", "sessionID", "value", "utf8"]))
    if where == "depth":
        levels, kind = draw(depths), draw(st.sampled_from("[{"))
        frame_ = f'{{"type":"subscribe","filters":[{{"name":"x","zz":{nested_in(levels, kind)}}}]}}'
        return frame_.encode(), None if levels + 3 <= JSON_DEPTH else "invalid_json"
    if where in ("sessionID", "value"):
        literal = draw(number_literals)
        if where == "sessionID":
            return f'{{"type":"subscribe","sessionID":{literal}}}'.encode(), "invalid_field"
        frame_ = f'{{"type":"subscribe","filters":[{{"name":"n","value":[{literal}]}}]}}'
        return frame_.encode(), None if number_of(literal) is not None else "invalid_field"
    bad = draw(st.sampled_from([b"\xff", b"\xed\xa0\x80", b"\xc0\xaf"]))
    return b'{"type":"subscribe","filters":[{"name":"a%sb"}]}'.replace(b"%s", bad), "invalid_json"


@FUZZ
@given(case=agent_cases())
def test_agent_extremes_get_an_error_frame_and_keep_the_subscription(
    hub: HubThread, case: tuple[bytes, str | None]
) -> None:
    payload, code = case
    p = project()
    t = Tracker(hub, p)
    assert t.ask('{"type":"start","sessionID":"s","metadata":{"n":"1"}}')["type"] == "started"
    ws = agent(hub, p)
    ws.sock.sendall(frame(payload, 0x1))
    opcode, data = ws.recv()
    if opcode == 0x8:  # bad UTF-8 in a text frame: the transport closes with 1007
        assert code == "invalid_json" and int.from_bytes(data[:2], "big") == 1007, data
    else:
        answer = json.loads(data)
        if code is None:
            assert answer["type"] == "snapshot", answer
        else:
            assert (answer["type"], answer["code"]) == ("error", code), answer
            # The connection still subscribes.
            assert agent_answer(ws, b'{"type":"subscribe"}')["type"] == "snapshot"
    ws.close()
    t.close()
    assert_usable(hub, p, 1)


# Two points the contract leaves open, decided in the README (Trackers) --------
# Driven without a socket, with a fake clock: the times are exact.


def tracker_tab(index: LiveIndex) -> TrackerProtocol:
    return TrackerProtocol(Registry(index, grace_ms=30_000), "p", 0)


def test_a_refused_message_does_not_refresh_last_active_at() -> None:
    """A refused message changes nothing, lastActiveAt included: it is no activity of the session."""
    index = LiveIndex()
    t = tracker_tab(index)
    assert (
        json.loads(t.receive(b'{"type":"start","sessionID":"s","metadata":{"a":"1"}}', 1000) or b"")["type"]
        == "started"
    )
    seen = msgspec.to_builtins(index.get("p", "s"))
    refused = [
        b"{not json",
        ("[" * 40 + "]" * 40).encode(),
        b'{"type":"nope"}',
        b'{"type":"update","pageTitle":5}',
        b'{"type":"update","pageTitle":"' + b"x" * 1025 + b'"}',
        json.dumps({"type": "update", "metadata": {f"k{i}": "v" for i in range(50)}}).encode(),
        b'{"type":"update","userProperties":{"a":' + nested(16).encode() + b"}}",
        b'{"type":"update","userProperties":{"a":18446744073709551616}}',
        b'{"type":"start","sessionID":"other"}',
        b'{"type":"heartbeat","active":"yes"}',
    ]
    for now, frame_ in enumerate(refused, start=5000):
        reply = json.loads(t.receive(frame_, now) or b"")
        assert reply["type"] == "error", (frame_, reply)
        assert msgspec.to_builtins(index.get("p", "s")) == seen, frame_
    assert t.receive(b'{"type":"update","userID":"u"}', 9000) is None
    session = index.get("p", "s")
    assert session is not None and session.lastActiveAt == 9000


@pytest.mark.parametrize(
    ("timestamp", "stored"),
    [
        ("-5", None),
        ("-0.5", None),
        ("1e300", None),
        ("-1e300", None),
        ("8640000000000001", None),  # past what a JavaScript Date holds
        ("9007199254740993", None),
        ("18446744073709551616", None),
        ('"NaN"', None),
        ('"1715000000000"', None),
        ("true", None),
        ("null", None),
        ("[]", None),
        ("{}", None),
        ("0", 0),
        ("1715000000000.9", 1715000000000),
        ("8640000000000000", 8_640_000_000_000_000),
    ],
)
def test_an_absurd_timestamp_falls_back_to_now(timestamp: str, stored: int | None) -> None:
    index = LiveIndex()
    t = tracker_tab(index)
    frame_ = f'{{"type":"start","sessionID":"s","timestamp":{timestamp}}}'.encode()
    reply = json.loads(t.receive(frame_, 1234) or b"")
    assert reply["type"] == "started", reply
    assert reply["session"]["timestamp"] == (1234 if stored is None else stored)


@pytest.mark.parametrize("timestamp", ["1e309", "-1e309", "1" + "0" * 4400])
def test_a_timestamp_no_decoder_holds_refuses_the_start(timestamp: str) -> None:
    index = LiveIndex()
    t = tracker_tab(index)
    reply = json.loads(t.receive(f'{{"type":"start","timestamp":{timestamp}}}'.encode(), 1234) or b"")
    assert (reply["type"], reply["code"]) == ("error", "invalid_field"), reply
    assert len(index) == 0
