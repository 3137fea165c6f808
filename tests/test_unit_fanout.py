"""The agent fan-out without a socket (CONTRACT §3, README "Agents"), with a fake clock.

A real Registry and LiveIndex feed a ``FanOut``; each agent's connection is a
``RecordingSink`` (frames sent, a paused flag, the close). ``flush()`` is what
the hub runs after a wake-up, ``deliver(agent)`` what it runs when a paused
connection is writable again, and ``tick()`` what it runs once per
``--agent-interval``: here the test calls them, so no timer is involved.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from hub.fanout import Agent, FanOut, parse_message
from hub.record import Session, Start, Update
from hub.wire import CloseCode, EndReason
from tests.helpers import RecordingSink, recording_registry

GRACE = 30_000


class View:
    """An agent's picture of the live sessions, rebuilt from its frames as a client would.

    Fails on a frame the contract rules out: an update before the start or
    after the end, a start of a session already live.
    """

    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}

    def apply(self, frames: list[dict[str, Any]]) -> View:
        for f in frames:
            kind = f["type"]
            if kind == "snapshot":
                self.sessions = {s["sessionID"]: s for s in f["sessions"]}
            elif kind == "session.start":
                sid = f["session"]["sessionID"]
                assert sid not in self.sessions, f"start of {sid} while it is live"
                self.sessions[sid] = f["session"]
            elif kind == "session.update":
                assert f["sessionID"] in self.sessions, f"update before start: {f}"
                _update(self.sessions[f["sessionID"]], f["changes"])
            elif kind == "sessions.update":
                for sid, changes in f["changes"].items():
                    assert sid in self.sessions, f"batched update before start: {sid}"
                    _update(self.sessions[sid], changes)
            elif kind == "session.end":
                assert self.sessions.pop(f["sessionID"], None) is not None, f"end of unknown: {f}"
            else:
                raise AssertionError(f)
        return self


def _update(session: dict[str, Any], changes: dict[str, Any]) -> None:
    """Apply an update as README tells clients: activeTime moves with lastActiveAt
    while the session was active, unless the update carries it."""
    if "lastActiveAt" in changes and "activeTime" not in changes and session["active"]:
        session["activeTime"] += max(0, changes["lastActiveAt"] - session["lastActiveAt"])
    session.update(changes)


class Rig:
    """A registry, its live index and a fan-out, driven by the test."""

    def __init__(self, max_pending: int = 1000) -> None:
        self.registry, _, _ = recording_registry(GRACE)
        self.index = self.registry.index
        self.wakes = 0
        self.fanout = FanOut(self.index, max_pending, wake=self._wake)
        self.registry.listeners.append(self.fanout)

    def _wake(self) -> None:
        self.wakes += 1

    def agent(self, sink: RecordingSink | None = None, **subscribe: Any) -> tuple[Agent, RecordingSink]:
        sink = sink if sink is not None else RecordingSink()
        agent = self.fanout.add(sink)
        self.subscribe(agent, **subscribe)
        return agent, sink

    def subscribe(self, agent: Agent, **body: Any) -> None:
        sub = parse_message(json.dumps({"type": "subscribe", **body}).encode(), "p1", 50)
        assert sub is not None
        self.fanout.subscribe(agent, sub)

    def start(self, sid: str, now: int, attach: bool = True, **fields: Any) -> Session:
        session, _ = self.registry.start("p1", 0, Start(sessionID=sid, **fields), now, attach)
        return session

    def update(self, session: Session, now: int, **fields: Any) -> None:
        self.registry.update(session, Update(**fields), now)

    def records(self) -> dict[str, dict[str, Any]]:
        """What the HTTP API answers: every live record."""
        return {s.sessionID: msgspec.to_builtins(s) for s in self.index.sessions("p1")}


def kinds(frames: list[dict[str, Any]]) -> list[str]:
    return [f["type"] for f in frames]


def test_a_snapshot_then_every_change_as_it_happens() -> None:
    rig = Rig()
    old = rig.start("old", 1000, timestamp=1000)
    rig.start("new", 1100, timestamp=2000)
    _, sink = rig.agent()
    (snapshot,) = sink.take()
    assert snapshot["type"] == "snapshot"
    assert [s["sessionID"] for s in snapshot["sessions"]] == ["new", "old"], "newest first"
    view = View().apply([snapshot])

    s = rig.start("s", 3000, pageTitle="home")
    assert rig.wakes == 1 and sink.frames == [], "frames wait for the flush after a wake-up"
    rig.fanout.flush()
    started = sink.take()
    assert kinds(started) == ["session.start"] and started[0]["session"]["pageTitle"] == "home"
    rig.update(s, 3100, pageTitle="cart")
    rig.fanout.flush()
    updated = sink.take()
    assert updated == [
        {"type": "session.update", "sessionID": "s", "changes": {"pageTitle": "cart", "lastActiveAt": 3100}}
    ]
    rig.registry.end(s, EndReason.ENDED)
    rig.registry.detach(old, 3200)
    rig.fanout.flush()
    ended = sink.take()
    assert ended == [
        {"type": "session.end", "sessionID": "s", "reason": "ended"},
        {"type": "session.update", "sessionID": "old", "changes": {"connected": False, "tabs": 0}},
    ]
    rig.registry.sweep(3200 + GRACE)
    rig.fanout.flush()
    swept = sink.take()
    assert swept == [{"type": "session.end", "sessionID": "old", "reason": "disconnected"}]
    assert view.apply(started + updated + ended + swept).sessions == rig.records()


CHROME_IS = [{"name": "userBrowser", "operator": "is", "value": ["Chrome"]}]
CHROME_CONTAINS = [{"name": "userBrowser", "operator": "contains", "value": ["chro"]}]
PLAN_IS = [{"name": "METADATA", "source": "plan", "operator": "is", "value": ["pro"]}]


@pytest.mark.parametrize(
    ("filters", "matching", "other"),
    [
        (CHROME_IS, {"userBrowser": "Chrome"}, {"userBrowser": "Firefox"}),
        (CHROME_CONTAINS, {"userBrowser": "Chrome"}, {"userBrowser": "Firefox"}),
        (PLAN_IS, {"metadata": {"plan": "pro"}}, {"metadata": {"plan": "free"}}),
    ],
)
def test_a_session_that_stops_or_starts_matching_is_an_end_or_a_start(
    filters: list[dict[str, Any]], matching: dict[str, Any], other: dict[str, Any]
) -> None:
    rig = Rig()
    _, sink = rig.agent(filters=filters)
    assert sink.take() == [{"type": "snapshot", "sessions": []}]
    s = rig.start("a", 1000, **other)
    rig.fanout.flush()
    assert sink.take() == [], "never matched: nothing"
    rig.update(s, 1100, **matching)
    rig.fanout.flush()
    assert kinds(sink.frames) == ["session.start"]
    rig.update(s, 1200, pageTitle="seen")
    rig.update(s, 1300, **other)
    rig.update(s, 1400, pageTitle="unseen")
    rig.fanout.flush()
    assert sink.frames[-1] == {"type": "session.end", "sessionID": "a", "reason": "unmatched"}
    rig.update(s, 1500, **matching)
    rig.fanout.flush()
    frames = sink.take()
    assert frames[-1]["type"] == "session.start" and frames[-1]["session"]["pageTitle"] == "unseen"
    assert View().apply(frames).sessions == rig.records()


def test_updates_of_a_paused_agent_are_coalesced_into_the_latest_state() -> None:
    rig = Rig()
    s = rig.start("s", 1000)
    agent, sink = rig.agent()
    view = View().apply(sink.take())
    sink.paused = True
    for i in range(50):
        rig.update(s, 2000 + i, pageTitle=f"p{i}", metadata={f"k{i % 3}": str(i)})
        rig.registry.heartbeat(s, None, 2000 + i)
        rig.fanout.flush()
    rig.fanout.tick()
    assert sink.frames == [] and agent.pending == 1, "one entry per session, however many changes"
    sink.paused = False
    rig.fanout.deliver(agent)
    frames = sink.take()
    assert kinds(frames) == ["session.update"]
    assert frames[0]["changes"]["pageTitle"] == "p49" and frames[0]["changes"]["lastActiveAt"] == 2049
    assert view.apply(frames).sessions == rig.records()


def test_a_start_then_end_the_agent_never_saw_is_never_sent() -> None:
    rig = Rig()
    seen = rig.start("seen", 1000)
    agent, sink = rig.agent()
    view = View().apply(sink.take())
    sink.paused = True
    brief = rig.start("brief", 1100)
    rig.update(brief, 1200, pageTitle="x")
    rig.registry.end(brief, EndReason.ENDED)
    # A session the agent saw, ended and started again while it was paused: end, then start.
    rig.registry.end(seen, EndReason.ENDED)
    rig.start("seen", 1300, pageTitle="again")
    rig.fanout.flush()
    assert agent.pending == 1
    sink.paused = False
    rig.fanout.deliver(agent)
    frames = sink.take()
    assert kinds(frames) == ["session.end", "session.start"]
    assert frames[1]["session"]["pageTitle"] == "again"
    assert view.apply(frames).sessions == rig.records()


def test_heartbeats_wait_for_the_tick_and_only_the_latest_is_sent() -> None:
    rig = Rig()
    a, b = rig.start("a", 1000), rig.start("b", 1000)
    _, sink = rig.agent()
    view = View().apply(sink.take())
    for now in (1100, 1200, 1300):
        rig.registry.heartbeat(a, None, now)
    rig.registry.heartbeat(b, None, 1250)
    rig.fanout.flush()
    assert sink.frames == [], "lastActiveAt alone waits for the interval"
    rig.fanout.tick()
    frames = sink.take()
    assert sorted((f["type"], f["sessionID"], f["changes"]) for f in frames) == [
        ("session.update", "a", {"lastActiveAt": 1300}),
        ("session.update", "b", {"lastActiveAt": 1250}),
    ], "CONTRACT §3 frames unless batch is asked"
    rig.fanout.tick()
    assert sink.frames == [], "nothing new: nothing sent"
    assert view.apply(frames).sessions == rig.records()


def test_batch_subscribers_get_one_frame_per_interval() -> None:
    rig = Rig()
    a, b = rig.start("a", 1000), rig.start("b", 1000)
    _, sink = rig.agent(batch=True)
    view = View().apply(sink.take())
    rig.registry.heartbeat(a, None, 1100)
    rig.fanout.tick()
    only = sink.take()
    assert only == [{"type": "session.update", "sessionID": "a", "changes": {"lastActiveAt": 1100}}]
    rig.registry.heartbeat(a, None, 1200)
    rig.registry.heartbeat(b, None, 1210)
    rig.fanout.tick()
    both = sink.take()
    assert both == [
        {"type": "sessions.update", "changes": {"a": {"lastActiveAt": 1200}, "b": {"lastActiveAt": 1210}}}
    ]
    # An active flag is a real change: sent at the next flush, not batched.
    rig.registry.heartbeat(b, False, 1300)
    rig.fanout.flush()
    flip = sink.take()
    assert flip == [
        {"type": "session.update", "sessionID": "b", "changes": {"active": False, "lastActiveAt": 1300}}
    ]
    assert view.apply(only + both + flip).sessions == rig.records()


def test_a_change_carries_the_heartbeat_waiting_for_the_tick() -> None:
    rig = Rig()
    s = rig.start("s", 1000)
    _, sink = rig.agent()
    sink.take()
    rig.registry.heartbeat(s, None, 1100)
    rig.update(s, 1200, pageTitle="x")
    rig.fanout.flush()
    assert sink.take() == [
        {"type": "session.update", "sessionID": "s", "changes": {"pageTitle": "x", "lastActiveAt": 1200}}
    ]
    rig.fanout.tick()
    assert sink.frames == []


@pytest.mark.parametrize("tabs", [2, 1], ids=["a-second-tab-closes", "the-only-tab-closes"])
def test_agents_converge_to_the_record_within_one_interval_after_a_tab_closes(tabs: int) -> None:
    """Issue 15, defect 6: a heartbeat's lastActiveAt waiting for the tick survives a
    change without lastActiveAt (a tab closing) that follows it."""
    rig = Rig()
    s = rig.start("s", 1000)
    for _ in range(tabs - 1):
        rig.start("s", 1000)
    _, sink = rig.agent()
    view = View().apply(sink.take())
    rig.registry.heartbeat(s, None, 2000)
    rig.registry.detach(s, 2100)
    rig.fanout.flush()
    rig.fanout.tick()
    assert view.apply(sink.take()).sessions == rig.records()
    assert view.sessions["s"]["lastActiveAt"] == 2000


def test_an_agent_paused_past_max_pending_is_closed_too_slow_and_others_keep_receiving() -> None:
    rig = Rig(max_pending=3)
    slow, slow_sink = rig.agent()
    fast, fast_sink = rig.agent()
    slow_sink.take(), fast_sink.take()
    slow_sink.paused = True
    for i in range(3):
        rig.start(f"s{i}", 1000 + i)
    assert slow_sink.closed is None and slow.pending == 3, "at the limit: kept"
    rig.start("s3", 1003)
    assert slow_sink.closed is not None
    code, reason = slow_sink.closed
    assert code == CloseCode.TOO_SLOW == 4008 and reason.startswith("too slow")
    assert slow not in rig.fanout.agents and fast in rig.fanout.agents
    rig.fanout.flush()
    assert View().apply(fast_sink.take()).sessions == rig.records()
    assert slow_sink.frames == []


def test_an_agent_that_stays_behind_on_heartbeats_is_closed_too() -> None:
    rig = Rig(max_pending=3)
    sessions = [rig.start(f"s{i}", 1000) for i in range(4)]
    slow, sink = rig.agent()
    sink.take()
    sink.paused = True
    for s in sessions:
        rig.registry.heartbeat(s, None, 2000)
    rig.fanout.tick()
    assert sink.closed is None, "one shared batch queued: not behind yet"
    for s in sessions:
        rig.registry.heartbeat(s, None, 3000)
    rig.fanout.tick()
    assert sink.closed is not None and sink.closed[0] == CloseCode.TOO_SLOW
    assert slow not in rig.fanout.agents


class PausingSink(RecordingSink):
    """A connection whose buffer fills after ``room`` frames."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def send(self, frame: bytes) -> None:
        super().send(frame)
        self.room -= 1
        if self.room <= 0:
            self.paused = True


def test_a_connection_that_pauses_mid_flush_gets_the_rest_when_writable() -> None:
    rig = Rig()
    sink = PausingSink(room=3)  # the snapshot, then two frames
    agent, _ = rig.agent(sink)
    for i in range(5):
        rig.start(f"s{i}", 1000 + i)
    rig.fanout.flush()
    assert [f["session"]["sessionID"] for f in sink.frames[1:]] == ["s0", "s1"]
    assert agent.pending == 3
    rig.fanout.flush()
    assert len(sink.frames) == 3, "nothing is sent to a paused connection"
    sink.paused, sink.room = False, 100
    rig.fanout.deliver(agent)  # what the endpoint runs when the connection is writable
    assert [f["session"]["sessionID"] for f in sink.frames[1:]] == [f"s{i}" for i in range(5)]
    assert View().apply(sink.frames).sessions == rig.records()


def test_a_subscribe_while_paused_snapshots_the_state_when_writable() -> None:
    rig = Rig()
    s = rig.start("s", 1000, userBrowser="Chrome")
    rig.start("t", 1000, userBrowser="Edge")
    agent, sink = rig.agent()
    sink.take()
    sink.paused = True
    rig.subscribe(agent, filters=CHROME_IS)
    rig.update(s, 2000, pageTitle="latest")
    rig.start("u", 2100, userBrowser="Chrome")
    rig.fanout.flush()
    assert agent.pending == 0, "the snapshot, built when it can be sent, carries it all"
    sink.paused = False
    rig.fanout.deliver(agent)
    (snapshot,) = sink.take()
    assert snapshot["type"] == "snapshot"
    assert {x["sessionID"]: x["pageTitle"] for x in snapshot["sessions"]} == {"s": "latest", "u": None}


def test_a_new_subscribe_drops_what_the_old_one_queued() -> None:
    rig = Rig()
    s = rig.start("s", 1000)
    t = rig.start("t", 1000)
    agent, sink = rig.agent()
    sink.take()
    sink.paused = True
    rig.update(s, 2000, pageTitle="old subscription")
    rig.subscribe(agent, sessionID="t")
    rig.update(s, 2100, pageTitle="not watched")
    rig.update(t, 2200, pageTitle="watched")
    sink.paused = False
    rig.fanout.deliver(agent)
    frames = sink.take()
    assert kinds(frames) == ["snapshot"] and [x["sessionID"] for x in frames[0]["sessions"]] == ["t"]
    assert frames[0]["sessions"][0]["pageTitle"] == "watched"
    rig.update(s, 2300, pageTitle="still not")
    rig.fanout.flush()
    assert sink.frames == []


def test_a_removed_agent_gets_nothing_and_its_group_goes() -> None:
    rig = Rig()
    s = rig.start("s", 1000)
    agent, sink = rig.agent(filters=CHROME_IS)
    other, other_sink = rig.agent()
    sink.take()
    rig.fanout.remove(agent)
    rig.update(s, 2000, userBrowser="Chrome")
    rig.registry.heartbeat(s, None, 2100)
    rig.fanout.flush()
    rig.fanout.tick()
    assert sink.frames == [] and rig.fanout.agents == {other}
    assert len(rig.fanout._groups) == 1
    assert View().apply(other_sink.frames).sessions == rig.records()


def test_agents_with_the_same_subscription_get_the_same_frames() -> None:
    rig = Rig()
    sinks = [rig.agent(filters=CHROME_IS)[1] for _ in range(3)]
    s = rig.start("s", 1000, userBrowser="Chrome")
    rig.update(s, 1100, pageTitle="x")
    rig.registry.heartbeat(s, None, 1200)
    rig.fanout.flush()
    rig.fanout.tick()
    assert len(rig.fanout._groups) == 1
    assert sinks[0].frames == sinks[1].frames == sinks[2].frames and len(sinks[0].frames) == 3


def test_a_resume_reaches_agents_as_updates_never_an_end_and_a_start() -> None:
    rig = Rig()
    s = rig.start("s", 1000)
    _, sink = rig.agent()
    for step in (
        lambda: rig.registry.detach(s, 2000),  # the page reloads...
        lambda: rig.start("s", 2500),  # ...and starts again within the grace
        lambda: rig.start("s", 2600),  # a second tab
        lambda: rig.registry.detach(s, 2700),
        lambda: rig.registry.sweep(2000 + GRACE),
    ):
        step()
        rig.fanout.flush()
    frames = sink.take()
    assert kinds(frames) == ["snapshot", *["session.update"] * 4]
    assert [f["changes"].get("tabs") for f in frames[1:]] == [0, 1, 2, 1]
    assert [f["changes"].get("connected") for f in frames[1:]] == [False, True, None, None]
    assert View().apply(frames).sessions == rig.records()
