"""Fuzzing over real sockets: random and mutated input at every door of one hub.

Trackers get valid frames, mutations of them and random bytes; the HTTP API
gets random methods, paths, query strings, headers and bodies; agents get
random subscriptions. After each input: the hub answers, nothing is a 500,
nothing is logged as an exception, and the tracker's session in the index
equals a model of what the valid frames did (validity is decided by the
pure decoder, the effects by the small model below, written from CONTRACT §2).

``FUZZ_EXAMPLES`` sets examples per test (the suite's short mode by
default); ``loadtest/bench_fuzz.py`` runs the long mode.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub.record import (
    DESCRIPTIVE_FIELDS,
    MAX_METADATA_KEYS,
    MAX_USER_PROPERTIES_BYTES,
    Emit,
    End,
    Heartbeat,
    InputError,
    Start,
    decode_message,
    valid_session_id,
)
from hub.websocket import is_utf8
from loadtest.client import frame, handshake
from tests.helpers import API_KEY, running_hub

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
MARKER = b'{"type":"fuzz-sync"}'  # always an unknown_type error: marks the end of a batch
_projects = itertools.count()
# Inputs thrown at each door, printed at the end (loadtest/bench_fuzz.py reads the line).
INPUTS = {"tracker_frames": 0, "http_requests": 0, "agent_frames": 0}


class _Failures(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


class HubThread:
    """One in-process hub on its own event loop thread, shared by a module's tests.

    ``failures`` holds what the hub logged as an error or with a traceback.
    """

    def __init__(self) -> None:
        self.failures = _Failures()
        logging.getLogger("hub").addHandler(self.failures)
        self.port = 0
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._run(),), daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    async def _run(self) -> None:
        self.stop = asyncio.Event()
        async with running_hub() as h:
            self.hub = h.hub
            self.port = h.port
            self.ready.set()
            await self.stop.wait()

    def close(self) -> None:
        assert self.stop is not None
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(15)
        logging.getLogger("hub").removeHandler(self.failures)


@pytest.fixture(scope="module")
def hub() -> Iterator[HubThread]:
    h = HubThread()
    yield h
    h.close()
    print("fuzz inputs:", json.dumps(INPUTS))


def assert_healthy(h: HubThread) -> None:
    status, _ = http_raw(h.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200
    records = h.failures.records
    assert not records, [r.getMessage() for r in records]


# Raw clients (blocking sockets: the hub runs in its own thread) ---------


def http_raw(port: int, request: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 "), data[:100]
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


class WsClient:
    def __init__(self, port: int, path: str, headers: dict[str, str] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(handshake("127.0.0.1", port, path, list((headers or {}).items())))
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the hub")
        return chunk

    def _need(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += self._recv()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, payload: bytes) -> None:
        try:
            payload.decode("utf-8")
            self.sock.sendall(frame(payload, 0x1))
        except UnicodeDecodeError:
            self.sock.sendall(frame(payload, 0x2))

    def recv(self) -> tuple[int, bytes]:
        b0, b1 = self._need(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._need(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._need(8))
        return b0 & 0x0F, self._need(n)

    def replies_until_marker(self) -> list[dict[str, Any]]:
        self.send(MARKER)
        replies: list[dict[str, Any]] = []
        while True:
            opcode, payload = self.recv()
            if opcode == 0x8:
                raise ConnectionError(f"closed by the hub: {payload!r}")
            reply = json.loads(payload)
            if reply.get("type") == "error" and "fuzz-sync" in reply.get("message", ""):
                return replies
            replies.append(reply)

    def close(self) -> None:
        self.sock.close()


# The tracker model -------------------------------------------------------


def meta_text(value: object) -> str:
    """README, Trackers: metadata numbers and booleans become their text, as JavaScript prints them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e21 else json.dumps(value)
    return str(value)


class Model:
    """What a connection's valid frames did to its session (CONTRACT §1-§2)."""

    def __init__(self) -> None:
        self.record: dict[str, Any] | None = None
        self.errors = 0

    def apply(self, payload: bytes) -> None:
        if not is_utf8(payload):
            # WsClient sends it as a binary frame: never parsed as JSON; a started tab's is
            # relayed (to nobody here), before start it is refused (not_started).
            if self.record is None:
                self.errors += 1
            return
        try:
            msg = decode_message(payload)
            self._apply(msg)
        except InputError:
            self.errors += 1

    def _apply(self, msg: Any) -> None:
        rec = self.record
        if isinstance(msg, Heartbeat):
            if rec is None:
                raise InputError("not_started", "")
            if msg.active is not msgspec.UNSET:
                rec["active"] = msg.active
            return
        if isinstance(msg, End):
            if rec is None:
                raise InputError("not_started", "")
            self.record = None
            return
        if isinstance(msg, Start):
            if rec is not None and valid_session_id(msg.sessionID) and msg.sessionID != rec["sessionID"]:
                raise InputError("already_started", "")
            if rec is None:
                sid = msg.sessionID if valid_session_id(msg.sessionID) else None
                rec = {"sessionID": sid, "metadata": {}, "userProperties": {}, "active": True}
                rec.update(dict.fromkeys(DESCRIPTIVE_FIELDS))
            self._merge(rec, msg)
            self.record = rec
            return
        if rec is None:
            raise InputError("not_started", "")
        if isinstance(msg, Emit):
            return  # relayed to the joined agents (none here): the record is untouched
        self._merge(rec, msg)

    def _merge(self, rec: dict[str, Any], msg: Any) -> None:
        new = dict(rec)
        for name in DESCRIPTIVE_FIELDS:
            value = getattr(msg, name)
            if value is not msgspec.UNSET:
                new[name] = value
        if msg.active is not msgspec.UNSET:
            new["active"] = msg.active
        if msg.metadata is not msgspec.UNSET:
            meta = dict(rec["metadata"])
            for k, v in msg.metadata.items():
                if v is None:
                    meta.pop(k, None)
                else:
                    meta[k] = meta_text(v)
            if len(meta) > MAX_METADATA_KEYS:
                raise InputError("limit_exceeded", "")
            new["metadata"] = meta
        if msg.userProperties is not msgspec.UNSET:
            props = dict(rec["userProperties"])
            for k, v in msg.userProperties.items():
                if v is None:
                    props.pop(k, None)
                else:
                    props[k] = v
            if len(msgspec.json.encode(props)) > MAX_USER_PROPERTIES_BYTES:
                raise InputError("limit_exceeded", "")
            new["userProperties"] = props
        rec.update(new)


# Strategies ----------------------------------------------------------------

texts = st.text(max_size=12)
scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | texts
field_values = scalars | st.text(min_size=1020, max_size=1030)  # around the 1 KiB string limit
valid_messages = st.fixed_dictionaries(
    {"type": st.sampled_from(["start", "update", "heartbeat", "end"])},
    optional={
        "sessionID": st.sampled_from(["s1", "s2", "", "bad id!", 7]),
        "userID": field_values,
        "pageTitle": field_values,
        **{name: scalars for name in DESCRIPTIVE_FIELDS if name not in ("userID", "pageTitle")},
        "active": scalars,
        "timestamp": scalars,
        "metadata": st.dictionaries(
            st.sampled_from(["plan", "team", "", "k" * 130]),
            scalars | st.floats(allow_nan=False, allow_infinity=False),
            max_size=3,
        )
        | st.dictionaries(texts, st.just("v"), min_size=20, max_size=30)
        | scalars,
        "userProperties": st.dictionaries(texts, scalars | st.lists(scalars, max_size=3), max_size=3),
    },
).map(lambda d: json.dumps(d).encode())


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(valid_messages))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.sampled_from([b"{", b"}", b'"', b",", b":", b"null", b"\\u0000", b"\xff"]))
        elif data:
            del data[i]
    return bytes(data)


json_values = st.recursive(
    scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
frames = (
    valid_messages | mutated() | st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode())
)


# Tests ----------------------------------------------------------------------


@FUZZ
@given(batch=st.lists(frames, min_size=1, max_size=25))
def test_tracker_frames_leave_the_index_as_the_model_says(hub: HubThread, batch: list[bytes]) -> None:
    project = f"fz{next(_projects)}"
    ws = WsClient(hub.port, f"/ws/tracker/{project}")
    model = Model()
    for payload in batch:
        ws.send(payload)
        model.apply(payload)
    INPUTS["tracker_frames"] += len(batch)
    replies = ws.replies_until_marker()
    assert sum(r["type"] == "error" for r in replies) == model.errors, (replies, batch)
    sessions = list(hub.hub.index.sessions(project))
    if model.record is None:
        assert sessions == []
    else:
        assert len(sessions) == 1
        got = msgspec.to_builtins(sessions[0])
        want = model.record
        if want["sessionID"] is None:  # generated by the hub
            want["sessionID"] = got["sessionID"]
        for key, value in want.items():
            assert got[key] == value, (key, batch)
    ws.close()
    assert_healthy(hub)


methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "G\x00T"])
paths = st.sampled_from(
    ["/public/p1/assist/sessions", "/public/p1/assist/sessions/s1", "/healthz", "/readyz", "/metrics", "/"]
) | st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF), max_size=40).map(lambda s: "/" + s)
queries = (
    st.none()
    | st.text(max_size=40)
    | st.dictionaries(
        st.sampled_from(["userId", "sort", "order", "page", "limit", "token", "x"]), texts, max_size=4
    ).map(lambda d: "&".join(f"{k}={v}" for k, v in d.items()))
)
bodies = (
    st.none()
    | st.binary(max_size=200)
    | json_values.map(json.dumps)
    | st.fixed_dictionaries(
        {},
        optional={
            "filters": st.lists(
                st.dictionaries(
                    st.sampled_from(["name", "operator", "value", "source"]), json_values, max_size=4
                ),
                max_size=4,
            )
            | json_values,
            "sort": json_values,
            "order": json_values,
            "page": json_values,
            "limit": json_values,
        },
    ).map(json.dumps)
)
headers = st.dictionaries(
    st.text(
        alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
        min_size=1,
        max_size=12,
    ),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
    max_size=4,
)


@FUZZ
@given(method=methods, path=paths, query=queries, hdrs=headers, body=bodies, auth=st.booleans())
def test_http_never_answers_500(
    hub: HubThread, method: str, path: str, query: str | None, hdrs: dict[str, str], body: Any, auth: bool
) -> None:
    target = path + ("?" + query if query is not None else "")
    lines = [f"{method} {target} HTTP/1.1", "Host: x", "Connection: close"]
    if auth:
        lines.append(f"Authorization: Bearer {API_KEY}")
    lines += [
        f"{k}: {v}" for k, v in hdrs.items() if k.lower() not in ("content-length", "transfer-encoding")
    ]
    data = body.encode() if isinstance(body, str) else (body or b"")
    lines.append(f"Content-Length: {len(data)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + data
    status, _ = http_raw(hub.port, raw)
    INPUTS["http_requests"] += 1
    assert 200 <= status < 500 or status == 503, (status, raw)
    assert_healthy(hub)


subscriptions = st.fixed_dictionaries(
    {"type": st.sampled_from(["subscribe", "subscribe", "other"])},
    optional={
        "filters": st.lists(
            st.fixed_dictionaries(
                {
                    "name": st.sampled_from(["userId", "METADATA", "userBrowser", "nope", "", "active"])
                    | json_values
                },
                optional={
                    "operator": st.sampled_from(["is", "contains", "like"]) | json_values,
                    "value": st.lists(scalars, max_size=3) | json_values,
                    "source": texts | json_values,
                },
            ),
            max_size=4,
        )
        | json_values,
        "sessionID": texts | json_values,
    },
).map(lambda d: json.dumps(d).encode())


@FUZZ
@given(batch=st.lists(subscriptions | frames, min_size=1, max_size=10))
def test_agent_subscriptions_get_a_snapshot_or_an_error(hub: HubThread, batch: list[bytes]) -> None:
    ws = WsClient(hub.port, "/ws/agent/p1", headers={"Authorization": f"Bearer {API_KEY}"})
    for payload in batch:
        ws.send(payload)
    INPUTS["agent_frames"] += len(batch)
    # Each frame gets exactly one answer: a snapshot (p1 has no sessions) or an error.
    for _ in batch:
        opcode, data = ws.recv()
        assert opcode == 0x1, (opcode, data)
        assert json.loads(data)["type"] in ("snapshot", "error")
    ws.close()
    assert_healthy(hub)
