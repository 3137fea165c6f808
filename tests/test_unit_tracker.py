"""The tracker protocol without a socket (CONTRACT §2): ``receive(frame, now)`` and
``closed(now, timed_out)`` over a real Registry and LiveIndex, with a fake clock.

The transport's part (a heartbeat timeout closing the connection with 4000,
frames over the size limit) is tested end to end in test_tracker.py.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import msgspec
import pytest

from hub.record import Session
from hub.registry import Registry
from hub.tracker import TrackerProtocol
from hub.wire import EndReason
from tests.helpers import Events, RecordingReplication, recording_registry

GRACE = 30_000


def frame(**msg: Any) -> bytes:
    return json.dumps(msg).encode()


def reply(raw: bytes | None) -> dict[str, Any]:
    assert raw is not None, "no reply"
    decoded: dict[str, Any] = json.loads(raw)
    return decoded


def tab(registry: Registry, project_key: str = "p1", project_id: int = 0) -> TrackerProtocol:
    """One tracker connection."""
    return TrackerProtocol(registry, project_key, project_id)


def start(t: TrackerProtocol, now: int, **fields: Any) -> dict[str, Any]:
    answer = reply(t.receive(frame(type="start", **fields), now))
    assert answer["type"] == "started", answer
    return answer


def live(registry: Registry, sid: str) -> Session:
    session = registry.index.get("p1", sid)
    assert session is not None, f"{sid} is not live"
    return session


@pytest.fixture
def hub() -> tuple[Registry, Events, RecordingReplication]:
    return recording_registry(GRACE)


def test_start_answers_started_with_the_record(hub: tuple[Registry, Events, RecordingReplication]) -> None:
    registry, events, _ = hub
    t = tab(registry, project_id=7)
    answer = start(t, 1000, sessionID="s1", userID="ann", metadata={"n": 3, "b": True}, timestamp=500)
    s = answer["session"]
    assert answer["sessionID"] == "s1" == s["sessionID"]
    assert (s["projectKey"], s["projectId"], s["timestamp"], s["lastActiveAt"]) == ("p1", 7, 500, 1000)
    assert s["metadata"] == {"n": "3", "b": "true"}
    assert (s["tabs"], s["connected"], s["live"], s["active"]) == (1, True, True, True)
    assert events.take() == [("started", "s1")]
    assert t.counts.received["start"] == 1 and t.counts.sent["started"] == 1


@pytest.mark.parametrize("ts", ["1700000000000", None, True, [1], -5, 1e300])
def test_a_timestamp_that_is_not_a_usable_number_is_now(ts: Any) -> None:
    registry, _, _ = recording_registry()
    assert start(tab(registry), 4242, sessionID="t", timestamp=ts)["session"]["timestamp"] == 4242


@pytest.mark.parametrize("sid", [None, "", "has space", "x" * 65, 5])
def test_a_missing_or_invalid_session_id_gets_a_uuid4(sid: Any) -> None:
    registry, _, _ = recording_registry()
    fields = {} if sid is None else {"sessionID": sid}
    answer = start(tab(registry), 1, **fields)
    assert uuid.UUID(answer["sessionID"]).version == 4
    assert registry.index.get("p1", answer["sessionID"]) is not None


def test_heartbeat_and_update_refresh_last_active_without_a_reply(
    hub: tuple[Registry, Events, RecordingReplication],
) -> None:
    registry, events, _ = hub
    t = tab(registry)
    start(t, 1000, sessionID="s", metadata={"a": "1"})
    events.take()
    assert t.receive(frame(type="heartbeat"), 2000) is None
    assert live(registry, "s").lastActiveAt == 2000
    assert t.receive(frame(type="update", pageTitle="Cart", metadata={"b": 2, "a": None}), 3000) is None
    s = live(registry, "s")
    assert (s.pageTitle, s.metadata, s.lastActiveAt) == ("Cart", {"b": "2"}, 3000)
    assert events.take() == [
        ("touched", "s", 2000),
        ("changed", "s", {"pageTitle": "Cart", "metadata": {"b": "2"}, "lastActiveAt": 3000}),
    ]


REFUSED = [
    ("{", "invalid_json"),
    ("[]", "invalid_message"),
    ('{"type":"teleport"}', "unknown_type"),
    ('{"type":"update","pageTitle":5}', "invalid_field"),
    ('{"type":"heartbeat","active":1}', "invalid_field"),
    (json.dumps({"type": "update", "pageTitle": "x" * 1025}), "limit_exceeded"),
    (json.dumps({"type": "update", "metadata": {f"k{i}": "v" for i in range(50)}}), "limit_exceeded"),
    ('{"type":"start","sessionID":"other"}', "already_started"),
]


@pytest.mark.parametrize(("raw", "code"), REFUSED)
def test_a_refused_message_changes_nothing_not_even_last_active(raw: str, code: str) -> None:
    registry, events, replication = recording_registry()
    t = tab(registry)
    start(t, 1000, sessionID="s", pageTitle="keep", metadata={"m": "1"})
    before = msgspec.json.encode(live(registry, "s"))
    events.take(), replication.take()
    answer = reply(t.receive(raw, 2000))
    assert answer["type"] == "error" and answer["code"] == code and answer["message"]
    assert msgspec.json.encode(live(registry, "s")) == before
    assert events.take() == [] and replication.take() == []
    assert t.counts.errors[code] == 1 and t.counts.sent["error"] == 1


@pytest.mark.parametrize("kind", ["heartbeat", "update", "end"])
def test_messages_before_start_are_refused(kind: str) -> None:
    registry, events, _ = recording_registry()
    answer = reply(tab(registry).receive(frame(type=kind), 1))
    assert answer["code"] == "not_started"
    assert len(registry.index) == 0 and events.take() == []


def test_end_removes_the_session_and_the_connection_may_start_again(
    hub: tuple[Registry, Events, RecordingReplication],
) -> None:
    registry, events, _ = hub
    t = tab(registry)
    start(t, 1000, sessionID="e1")
    assert t.receive(frame(type="end"), 2000) is None
    assert registry.index.get("p1", "e1") is None
    assert reply(t.receive(frame(type="heartbeat"), 2001))["code"] == "not_started"
    assert start(t, 2002, sessionID="e2")["session"]["tabs"] == 1
    t.closed(3000, timed_out=False)
    assert events.take()[:2] == [("started", "e1"), ("ended", "e1", EndReason.ENDED)]


def test_a_session_ended_by_another_tab_is_not_this_connection_s_any_more(
    hub: tuple[Registry, Events, RecordingReplication],
) -> None:
    registry, _, _ = hub
    a, b = tab(registry), tab(registry)
    start(a, 1, sessionID="s")
    start(b, 2, sessionID="s")
    assert b.receive(frame(type="end"), 3) is None
    assert reply(a.receive(frame(type="heartbeat"), 4))["code"] == "not_started"
    # Its close then leaves nothing behind (no grace for a session that ended).
    a.closed(5, timed_out=False)
    assert registry.waiting == 0 and len(registry.index) == 0


def test_tabs_repeated_starts_and_closes(hub: tuple[Registry, Events, RecordingReplication]) -> None:
    registry, _, _ = hub
    a, b = tab(registry), tab(registry)
    start(
        a, 1000, sessionID="dup", timestamp=1, pageTitle="A", metadata={"k1": "v1"}, userProperties={"x": 1}
    )
    s = start(b, 1100, sessionID="dup", timestamp=2, pageTitle="B", metadata={"k2": "v2"})["session"]
    assert (s["timestamp"], s["pageTitle"], s["tabs"]) == (1, "B", 2)
    assert s["metadata"] == {"k1": "v1", "k2": "v2"} and s["userProperties"] == {"x": 1}
    # A repeated start on the same connection merges and counts no tab; an invalid
    # sessionID in it means this connection's session.
    assert start(b, 1200, sessionID="dup", metadata={"k1": "w"})["session"]["tabs"] == 2
    assert start(b, 1300, sessionID="bad id!")["session"]["sessionID"] == "dup"
    b.closed(2000, timed_out=False)
    session = live(registry, "dup")
    assert (session.tabs, session.connected, session.lastActiveAt) == (1, True, 1300)
    a.closed(2500, timed_out=False)
    assert (session.tabs, session.connected, registry.waiting) == (0, False, 1)


@pytest.mark.parametrize(("timed_out", "reason"), [(False, "disconnected"), (True, "timeout")])
def test_a_close_without_end_waits_out_the_grace_then_ends_with_its_reason(
    timed_out: bool, reason: str, hub: tuple[Registry, Events, RecordingReplication]
) -> None:
    registry, events, _ = hub
    t = tab(registry)
    start(t, 1000, sessionID="g")
    t.closed(5000, timed_out=timed_out)
    t.closed(5001, timed_out=timed_out)  # a second call has no session left to let go
    session = live(registry, "g")
    assert (session.connected, session.tabs, session.lastActiveAt) == (False, 0, 1000)
    events.take()
    assert registry.sweep(5000 + GRACE - 1) == 0 and registry.is_live(session)
    assert registry.sweep(5000 + GRACE) == 1
    assert registry.index.get("p1", "g") is None
    assert events.take() == [("ended", "g", reason)]


@pytest.mark.parametrize("after", [0, GRACE - 1])
def test_a_reload_within_the_grace_resumes_the_same_session(
    after: int, hub: tuple[Registry, Events, RecordingReplication]
) -> None:
    registry, events, _ = hub
    page = tab(registry)
    first = start(page, 1000, sessionID="r", pageTitle="P1")["session"]
    page.closed(2000, timed_out=False)
    events.take()
    reloaded = tab(registry)
    s = start(reloaded, 2000 + after, sessionID="r", pageTitle="P2")["session"]
    assert (s["connected"], s["tabs"], s["timestamp"], s["pageTitle"]) == (True, 1, first["timestamp"], "P2")
    assert [e[0] for e in events.take()] == ["changed"], "a resume is an update: no end, no start"
    assert registry.sweep(2000 + GRACE) == 0 and registry.is_live(live(registry, "r"))


def test_fields_the_hub_owns_cannot_be_set_by_a_tracker(
    hub: tuple[Registry, Events, RecordingReplication],
) -> None:
    registry, _, _ = hub
    owned = {
        "tabs": 9,
        "live": False,
        "projectKey": "other",
        "projectId": 99,
        "lastActiveAt": 5,
        "connected": False,
    }
    t = tab(registry, project_id=3)
    s = start(t, 1000, sessionID="own", **owned)["session"]
    expected = {
        "tabs": 1,
        "live": True,
        "projectKey": "p1",
        "projectId": 3,
        "lastActiveAt": 1000,
        "connected": True,
    }
    assert {k: s[k] for k in owned} == expected
    assert t.receive(frame(type="update", pageTitle="x", **owned), 2000) is None
    assert t.receive(frame(type="heartbeat", **owned), 3000) is None
    session = live(registry, "own")
    assert {k: getattr(session, k) for k in owned} == {**expected, "lastActiveAt": 3000}
    assert registry.index.get("other", "own") is None


def test_the_record_is_active_while_any_tab_is(hub: tuple[Registry, Events, RecordingReplication]) -> None:
    registry, _, _ = hub
    a, b = tab(registry), tab(registry)
    start(a, 1000, sessionID="s")
    start(b, 1000, sessionID="s")
    b.receive(frame(type="heartbeat", active=False), 2000)
    assert live(registry, "s").active is True, "A is still active"
    a.receive(frame(type="update", active=False, pageTitle="away"), 3000)
    assert live(registry, "s").active is False
    assert live(registry, "s").activeTime == 2000
    b.receive(frame(type="heartbeat", active=False), 4000)  # B repeats itself: no change
    assert live(registry, "s").activeTime == 2000
    b.closed(5000, timed_out=False)  # B closes hidden: A still hidden
    assert (live(registry, "s").tabs, live(registry, "s").active) == (1, False)
    a.receive(frame(type="heartbeat", active=True), 6000)
    a.receive(frame(type="heartbeat"), 7000)
    assert (live(registry, "s").active, live(registry, "s").activeTime) == (True, 3000)
    # A reload: the tab closes and starts again (a new connection), active unless it says not.
    a.closed(7500, timed_out=False)
    again = tab(registry)
    start(again, 8000, sessionID="s", active=False)
    assert live(registry, "s").active is False
