"""The live relay core without a socket (CONTRACT §7), with a fake clock.

Each connection is a ``Sink`` recording its frames; its ``queued`` bytes are
what the test says the transport holds (a stalled agent reads nothing), so
back-pressure is driven exactly. Time is the ``now`` each call takes.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from hub.record import Session
from hub.relay import Emit, Join, Leave, Limits, Relay, Send, parse_agent_message, tab_id_or_new
from hub.wire import CloseCode, EndReason, ErrorCode, InputError

P, Q = "proj-a", "proj-b"


class Sink:
    def __init__(self) -> None:
        self.text: list[dict[str, Any]] = []
        self.binary: list[bytes] = []
        self.queued = 0  # bytes the transport holds: grows with each send unless drained
        self.stalled = False
        self.closed: tuple[int, str] | None = None
        self.windows: list[bool] = []  # what ``watched`` was told, in order

    def buffered(self) -> int:
        return self.queued

    def watched(self, on: bool) -> None:
        self.windows.append(on)

    def send_text(self, frame: bytes) -> None:
        assert self.closed is None, "a frame after the close"
        self.text.append(json.loads(frame))
        if self.stalled:
            self.queued += len(frame)

    def send_binary(self, frame: bytes) -> None:
        assert self.closed is None, "a frame after the close"
        self.binary.append(frame)
        if self.stalled:
            self.queued += len(frame)

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.text if f["type"] == kind]


def make(live: set[tuple[str, str]] | None = None, **limits: Any) -> Relay:
    known = live if live is not None else {(P, "s1"), (P, "s2"), (Q, "s1")}
    return Relay(Limits(**limits), lambda p, s: (p, s) in known)


def emit(event: str, data: Any = None) -> tuple[Emit, int]:
    raw = msgspec.json.encode({"type": "emit", "event": event, "data": data})
    return msgspec.json.decode(raw, type=Emit), len(raw)


def join(sid: str, **agent: Any) -> Join:
    return Join(sid, agent)


def test_join_answers_the_tabs_and_tells_the_tracker_who_watches() -> None:
    relay = make()
    t1, t2 = Sink(), Sink()
    relay.add_tab(P, "s1", "tab-1", t1, 0.0)
    relay.add_tab(P, "s1", "tab-2", t2, 0.0)
    assert t1.text == [] and t2.text == []  # unwatched: told nothing

    a = Sink()
    agent = relay.add_agent(P, a)
    relay.join(agent, join("s1", name="Ann"), 1.0)
    assert a.text == [{"type": "joined", "sessionID": "s1", "tabs": ["tab-1", "tab-2"]}]
    notice = {"type": "agents", "count": 1, "agents": [{"id": agent.id, "agent": {"name": "Ann"}}]}
    assert t1.text == [notice] and t2.text == [notice]
    assert t1.windows == [True] == t2.windows, "a watched tab's receive window widens"

    relay.leave(agent, Leave("s1"))
    assert t1.text[-1] == {"type": "agents", "count": 0, "agents": []}
    assert t2.text[-1] == t1.text[-1]
    assert t1.windows == [True, False], "and narrows again once nobody watches"


def test_a_tab_opening_in_a_watched_session_is_told_at_once() -> None:
    relay = make()
    a = Sink()
    relay.add_tab(P, "s1", "t1", Sink(), 0.0)
    agent = relay.add_agent(P, a)
    relay.join(agent, join("s1"), 0.0)
    late = Sink()
    relay.add_tab(P, "s1", "t2", late, 1.0)
    assert late.text == [{"type": "agents", "count": 1, "agents": [{"id": agent.id, "agent": {}}]}]
    assert late.windows == [True]


def test_join_of_an_unknown_session_is_not_found() -> None:
    relay = make()
    a = Sink()
    relay.join(relay.add_agent(P, a), join("nope"), 0.0)
    assert a.text == [
        {"type": "error", "code": "not_found", "message": a.text[0]["message"], "sessionID": "nope"}
    ]


def test_an_agent_joins_only_its_own_projects_sessions() -> None:
    relay = make(live={(Q, "only-q")})
    tq = Sink()
    relay.add_tab(Q, "only-q", "t", tq, 0.0)
    a = Sink()
    agent = relay.add_agent(P, a)  # holds proj-a's key
    relay.join(agent, join("only-q"), 0.0)
    assert a.of("error")[0]["code"] == "not_found"
    assert tq.text == []  # the other project's tracker never hears of it
    relay.send(agent, Send("only-q", "hello"), 0.0)
    assert a.of("error")[-1]["code"] == "not_joined"
    assert tq.text == []


def test_a_tracker_gets_agent_events_of_its_own_session_only() -> None:
    relay = make()
    s1a, s1b, s2, other = Sink(), Sink(), Sink(), Sink()
    relay.add_tab(P, "s1", "a", s1a, 0.0)
    relay.add_tab(P, "s1", "b", s1b, 0.0)
    relay.add_tab(P, "s2", "a", s2, 0.0)
    relay.add_tab(Q, "s1", "a", other, 0.0)  # same sessionID, another project
    a = Sink()
    agent = relay.add_agent(P, a)
    relay.join(agent, join("s1"), 0.0)
    relay.send(agent, Send("s1", "message", msgspec.Raw(b'{"text":"hi"}')), 0.0)
    relay.send(agent, Send("s1", "control", msgspec.Raw(b"1"), tab="b"), 0.0)
    everyone = {"type": "agent.event", "agent": agent.id, "event": "message", "data": {"text": "hi"}}
    assert s1a.of("agent.event") == [everyone]
    assert s1b.of("agent.event") == [
        everyone,
        {"type": "agent.event", "agent": agent.id, "event": "control", "data": 1},
    ]
    assert s2.text == [] and other.text == []
    assert relay.counts.sent == 3


def test_emit_reaches_every_joined_agent_in_order_and_nobody_else() -> None:
    relay = make()
    tab = relay.add_tab(P, "s1", "t1", Sink(), 0.0)
    relay.add_tab(P, "s2", "t1", Sink(), 0.0)
    a, b, c = Sink(), Sink(), Sink()
    for sink, sid in ((a, "s1"), (b, "s1"), (c, "s2")):
        relay.join(relay.add_agent(P, sink), join(sid), 0.0)
    for i in range(50):
        relay.emit(tab, *emit("click", {"i": i}), 0.0)
    want = [
        {"type": "session.event", "sessionID": "s1", "tab": "t1", "event": "click", "data": {"i": i}}
        for i in range(50)
    ]
    assert a.of("session.event") == want and b.of("session.event") == want
    assert c.of("session.event") == []
    assert (relay.counts.emitted, relay.counts.relayed) == (50, 100)


def test_an_unwatched_emit_is_relayed_to_nobody() -> None:
    relay = make()
    tab = relay.add_tab(P, "s1", "t1", Sink(), 0.0)
    relay.emit(tab, *emit("click"), 0.0)
    relay.emit_binary(tab, b"\x00\x01", 0.0)
    assert (relay.counts.emitted, relay.counts.relayed) == (2, 0)


def test_a_binary_frame_is_relayed_byte_for_byte_behind_its_header() -> None:
    relay = make()
    tab = relay.add_tab(P, "s1", "tab:9", Sink(), 0.0)
    a, b = Sink(), Sink()
    relay.join(relay.add_agent(P, a), join("s1"), 0.0)
    relay.join(relay.add_agent(P, b), join("s1"), 0.0)
    payload = bytes(range(256)) * 10 + b"\xff\xfe not utf-8"
    relay.emit_binary(tab, payload, 0.0)
    head = b'{"sessionID":"s1","tab":"tab:9"}'
    assert a.binary == [len(head).to_bytes(2, "big") + head + payload]
    assert b.binary == a.binary
    # Both agents got the same object: built once, not per agent.
    assert a.binary[0] is b.binary[0]
    assert relay.counts.bytes_out == 2 * len(a.binary[0])


def test_past_its_buffer_an_agent_loses_events_then_gets_a_gap_when_drained() -> None:
    relay = make(agent_buffer=1000, agent_stall=10.0)
    tab = relay.add_tab(P, "s1", "t", Sink(), 0.0)
    slow, fast = Sink(), Sink()
    slow.stalled = True
    slow_agent = relay.add_agent(P, slow)
    relay.join(slow_agent, join("s1"), 0.0)
    relay.join(relay.add_agent(P, fast), join("s1"), 0.0)
    for i in range(40):
        relay.emit(tab, *emit("e", "x" * 50 + str(i)), 0.1)
    got = slow.of("session.event")
    assert 0 < len(got) < 40
    assert slow.queued <= 1000  # never past its bound
    assert len(fast.of("session.event")) == 40  # the other agent misses nothing
    lost = 40 - len(got)
    assert relay.counts.dropped == lost
    assert slow.of("session.gap") == []

    slow.queued, slow.stalled = 400, False  # drained under half the bound
    relay.writable(slow_agent, 1.0)
    assert slow.text[-1] == {"type": "session.gap", "sessionID": "s1", "dropped": lost}
    assert relay.counts.gaps == 1
    relay.emit(tab, *emit("e", "after"), 1.1)
    assert slow.text[-1]["data"] == "after"


def test_a_drop_counts_per_session_and_the_gap_comes_before_the_next_event() -> None:
    relay = make(agent_buffer=300)
    t1 = relay.add_tab(P, "s1", "t", Sink(), 0.0)
    t2 = relay.add_tab(P, "s2", "t", Sink(), 0.0)
    a = Sink()
    a.stalled = True
    agent = relay.add_agent(P, a)
    relay.join(agent, join("s1"), 0.0)
    relay.join(agent, join("s2"), 0.0)
    for _ in range(5):
        relay.emit(t1, *emit("e", "y" * 60), 0.0)
        relay.emit(t2, *emit("e", "y" * 60), 0.0)
    dropped = dict(agent.dropped)
    assert set(dropped) == {(P, "s1"), (P, "s2")}
    a.queued, a.stalled = 0, False
    # No writable call: the next emit itself finds the queue drained.
    relay.emit(t1, *emit("e", "next"), 1.0)
    kinds = [(f["type"], f["sessionID"]) for f in a.text[-3:]]
    assert sorted(kinds[:2]) == [("session.gap", "s1"), ("session.gap", "s2")]
    assert kinds[2] == ("session.event", "s1")
    gaps = {f["sessionID"]: f["dropped"] for f in a.of("session.gap")}
    assert gaps == {"s1": dropped[(P, "s1")], "s2": dropped[(P, "s2")]}


def test_an_agent_over_its_buffer_past_the_stall_time_is_closed_4008() -> None:
    relay = make(agent_buffer=200, agent_stall=5.0)
    tab = relay.add_tab(P, "s1", "t", Sink(), 0.0)
    slow, fast = Sink(), Sink()
    slow.stalled = True
    relay.join(relay.add_agent(P, slow), join("s1"), 0.0)
    relay.join(relay.add_agent(P, fast), join("s1"), 0.0)
    for _ in range(5):
        relay.emit(tab, *emit("e", "z" * 80), 1.0)  # over from t=1
    relay.tick(5.9)
    assert slow.closed is None
    relay.tick(6.0)
    assert slow.closed is not None and slow.closed[0] == CloseCode.TOO_SLOW
    assert relay.counts.slow_closes == 1
    relay.emit(tab, *emit("e"), 6.1)  # the closed agent is gone, the other still served
    assert len(fast.of("session.event")) == 6


def test_a_stalled_agent_is_closed_on_the_hot_path_too() -> None:
    relay = make(agent_buffer=200, agent_stall=5.0)
    tab = relay.add_tab(P, "s1", "t", Sink(), 0.0)
    slow = Sink()
    slow.stalled = True
    relay.join(relay.add_agent(P, slow), join("s1"), 0.0)
    for t in (0.0, 0.0, 0.0, 0.0, 4.0, 6.0):
        relay.emit(tab, *emit("e", "z" * 80), t)
    assert slow.closed is not None and slow.closed[0] == CloseCode.TOO_SLOW


def test_a_tab_past_the_event_size_limit_is_closed_1008() -> None:
    relay = make(max_event=1000)
    sink = Sink()
    tab = relay.add_tab(P, "s1", "t", sink, 0.0)
    relay.emit_binary(tab, b"x" * 1000, 0.0)
    assert sink.closed is None
    relay.emit_binary(tab, b"x" * 1001, 0.0)
    assert sink.closed is not None and sink.closed[0] == CloseCode.POLICY
    assert relay.counts.policy_closes == 1
    assert (P, "s1") not in relay.rooms


def test_a_tab_past_the_relay_rate_is_closed_1008() -> None:
    relay = make(rate=1000.0, burst=2000, max_event=1000)
    sink = Sink()
    tab = relay.add_tab(P, "s1", "t", sink, 0.0)
    relay.emit_binary(tab, b"x" * 1000, 0.0)
    relay.emit_binary(tab, b"x" * 1000, 0.0)  # the burst is spent
    relay.emit_binary(tab, b"x" * 500, 0.5)  # refilled 500 in 0.5 s
    assert sink.closed is None
    relay.emit_binary(tab, b"x" * 600, 0.9)  # refilled 400
    assert sink.closed is not None and sink.closed[0] == CloseCode.POLICY
    assert "rate" in sink.closed[1]


def test_an_agent_joins_at_most_its_limit_of_sessions() -> None:
    relay = make(live={(P, f"s{i}") for i in range(3)}, max_joins=2)
    a = Sink()
    agent = relay.add_agent(P, a)
    for i in range(3):
        relay.join(agent, join(f"s{i}"), 0.0)
    assert [f["type"] for f in a.text] == ["joined", "joined", "error"]
    assert a.text[2]["code"] == "too_many_joins"
    relay.join(agent, join("s1", name="again"), 0.0)  # a re-join is no new session
    assert a.text[-1]["type"] == "joined"
    relay.leave(agent, Leave("s0"))
    relay.join(agent, join("s2"), 0.0)
    assert a.text[-1]["type"] == "joined"


def test_a_closed_agent_leaves_everything_and_rooms_are_forgotten() -> None:
    relay = make()
    t = Sink()
    tab = relay.add_tab(P, "s1", "t", t, 0.0)
    agent = relay.add_agent(P, Sink())
    relay.join(agent, join("s1"), 0.0)
    relay.join(agent, join("s2"), 0.0)
    relay.remove_agent(agent)
    assert t.text[-1]["count"] == 0
    assert set(relay.rooms) == {(P, "s1")}
    relay.remove_tab(tab)
    relay.remove_tab(tab)  # the transport's close after the core's: a no-op
    assert relay.rooms == {}


def test_a_tab_id_open_twice_in_one_session_is_refused() -> None:
    relay = make()
    relay.add_tab(P, "s1", "t", Sink(), 0.0)
    with pytest.raises(InputError) as exc:
        relay.add_tab(P, "s1", "t", Sink(), 0.0)
    assert exc.value.code == ErrorCode.INVALID_FIELD
    relay.add_tab(P, "s2", "t", Sink(), 0.0)  # another session may use it


def test_tab_ids_are_kept_when_valid_and_made_otherwise() -> None:
    assert tab_id_or_new("tab-1.a:b_c") == "tab-1.a:b_c"
    for bad in (None, "", "x" * 65, "a b", 7):
        made = tab_id_or_new(bad)
        assert made != bad and tab_id_or_new(made) == made


def test_agent_frames_parse_and_refuse_with_stable_codes() -> None:
    msg = parse_agent_message(b'{"type":"send","sessionID":"s1","event":"msg","data":[1],"tab":"t"}')
    assert isinstance(msg, Send) and msg.tab == "t" and bytes(msg.data) == b"[1]"
    for frame, code in (
        (b'{"type":"join","sessionID":"bad id"}', ErrorCode.INVALID_FIELD),
        (b'{"type":"join"', ErrorCode.INVALID_JSON),
        (b'{"type":"dance","sessionID":"s"}', ErrorCode.UNKNOWN_TYPE),
        (b'{"type":"join","sessionID":"s","agent":[]}', ErrorCode.INVALID_FIELD),
    ):
        with pytest.raises(InputError) as exc:
            parse_agent_message(frame)
        assert exc.value.code == code, frame


def test_an_ended_session_lets_its_joins_go() -> None:
    relay = make()
    agent = relay.add_agent(P, Sink())
    relay.join(agent, join("s1"), 0.0)
    relay.session_ended(
        Session(sessionID="s1", projectKey=P, projectId=1, timestamp=0, lastActiveAt=0), EndReason.ENDED
    )
    assert agent.joins == set() and relay.rooms == {}
