"""The registry's session lifecycle with a fake clock (``now`` is a plain int, in ms).

Every transition of a ``Holding`` (README, "Trackers"; CONTRACT §2, §5): what
the index holds after it, what the listeners hear, and what the registry
tells its ``Replication`` (only changes that started on this node).
"""

from __future__ import annotations

from typing import Any

import pytest

from hub.record import Session, Start, Strings, Update
from hub.registry import ProjectFull
from hub.wire import EndReason, ErrorCode
from tests.helpers import recording_registry

GRACE = 30_000
KEY = ("p1", "s")


def start(sid: str = "s", **fields: Any) -> Start:
    return Start(sessionID=sid, **fields)


def record(sid: str = "s", tabs: int = 1, last: int = 1, **fields: Any) -> Session:
    """A peer's record of a session, as it arrives from Redis."""
    fields.setdefault("timestamp", 1)
    fields.setdefault("projectKey", "p1")
    return Session(sessionID=sid, projectId=0, lastActiveAt=last, tabs=tabs, **fields)


# -- this node's trackers ----------------------------------------------------------


def test_a_start_indexes_the_session_and_publishes_it() -> None:
    registry, events, replication = recording_registry()
    session, created = registry.start("p1", 7, start(userID="ann", timestamp=500), now=1000, attach=True)
    assert created and registry.is_live(session) and registry.holds(KEY)
    assert (session.projectId, session.timestamp, session.lastActiveAt) == (7, 500, 1000)
    assert (session.tabs, session.connected, session.userID) == (1, True, "ann")
    assert events.take() == [("started", "s")]
    assert replication.take() == [("held", "s", 1, True)]


def test_tabs_count_connections_and_closing_ones_keep_last_active() -> None:
    registry, events, replication = recording_registry()
    session, _ = registry.start("p1", 0, start(timestamp=500), now=1000, attach=True)
    events.take(), replication.take()
    joined, created = registry.start("p1", 0, start(pageTitle="B", timestamp=900), now=1100, attach=True)
    assert joined is session and not created
    assert session.timestamp == 500, "the first start's timestamp stays"
    assert events.take() == [("changed", "s", {"pageTitle": "B", "tabs": 2, "lastActiveAt": 1100})]
    assert replication.take() == [("held", "s", 2, True)]
    # A repeated start on the same connection counts no tab; with nothing new it is a touch.
    registry.start("p1", 0, start(pageTitle="B"), now=1200, attach=False)
    assert session.tabs == 2
    assert events.take() == [("touched", "s", 1200)]
    assert replication.take() == [("touched", "s", 1200)]
    # A closing tab is no message from the session: lastActiveAt stays.
    registry.detach(session, now=5000)
    assert (session.tabs, session.connected, session.lastActiveAt) == (1, True, 1200)
    assert events.take() == [("changed", "s", {"tabs": 1})]
    assert replication.take() == [("held", "s", 1, True)]
    registry.detach(session, now=6000)
    assert (session.tabs, session.connected, session.lastActiveAt) == (0, False, 1200)
    assert events.take() == [("changed", "s", {"connected": False, "tabs": 0})]
    assert replication.take() == [("held", "s", 0, False)]
    assert registry.waiting == 1 and registry.holds(KEY), "its grace runs here"
    # A second close of a session already waiting changes nothing.
    registry.detach(session, now=7000)
    assert events.take() == [] and replication.take() == [] and session.tabs == 0


@pytest.mark.parametrize("reason", [EndReason.DISCONNECTED, EndReason.TIMEOUT])
def test_the_grace_ends_the_session_at_its_deadline_not_a_ms_before(reason: EndReason) -> None:
    registry, events, replication = recording_registry()
    session, _ = registry.start("p1", 0, start(), now=1000, attach=True)
    registry.detach(session, now=2000, reason=reason)
    events.take(), replication.take()
    deadline = 2000 + GRACE
    assert registry.sweep(deadline - 1) == 0
    assert registry.is_live(session) and events.take() == []
    assert registry.sweep(deadline) == 1
    assert not registry.is_live(session) and len(registry.index) == 0
    assert registry.waiting == 0 and not registry.holds(KEY)
    assert events.take() == [("ended", "s", reason)]
    assert replication.take() == [("released", "s", reason)]
    assert registry.sweep(deadline + GRACE) == 0


@pytest.mark.parametrize("back_at", [2000, 2000 + GRACE - 1])
def test_a_start_within_the_grace_resumes_the_same_session(back_at: int) -> None:
    registry, events, replication = recording_registry()
    session, _ = registry.start("p1", 0, start(pageTitle="P1", timestamp=500), now=1000, attach=True)
    registry.detach(session, now=2000)
    events.take(), replication.take()
    resumed, created = registry.start("p1", 0, start(pageTitle="P2", timestamp=9), now=back_at, attach=True)
    assert resumed is session and not created
    assert (session.connected, session.tabs, session.timestamp, session.pageTitle) == (True, 1, 500, "P2")
    assert events.take() == [
        # activeTime comes with a resume: its grace does not count (README, "The session record").
        (
            "changed",
            "s",
            {"pageTitle": "P2", "tabs": 1, "connected": True, "activeTime": 0, "lastActiveAt": back_at},
        )
    ]
    assert replication.take() == [("held", "s", 1, True)]
    assert registry.waiting == 0
    assert registry.sweep(2000 + GRACE) == 0 and registry.is_live(session)
    # A later close starts a new grace, from that close.
    registry.detach(session, now=back_at + 10)
    assert registry.sweep(back_at + 10 + GRACE - 1) == 0
    assert registry.sweep(back_at + 10 + GRACE) == 1


def test_a_grace_already_running_keeps_its_deadline_and_reason() -> None:
    registry, events, _ = recording_registry()
    session, _ = registry.start("p1", 0, start(), now=1000, attach=True)
    registry.remote_upsert("b", record(tabs=1), now=1000)
    registry.detach(session, now=2000, reason=EndReason.TIMEOUT)  # here: 0 tabs, b still holds one
    assert session.connected and registry.waiting == 0
    registry.remote_upsert("b", record(tabs=0), now=9000)  # b's tab closed too: no tab anywhere
    assert not session.connected and registry.waiting == 1
    events.take()
    assert registry.sweep(9000 + GRACE - 1) == 0
    assert registry.sweep(9000 + GRACE) == 1
    assert events.take() == [("ended", "s", EndReason.DISCONNECTED)]


def test_end_removes_the_session_at_once() -> None:
    registry, events, replication = recording_registry()
    session, _ = registry.start("p1", 0, start(), now=1000, attach=True)
    registry.start("p1", 0, start(), now=1000, attach=True)
    events.take(), replication.take()
    registry.end(session, EndReason.ENDED)
    assert not registry.is_live(session) and not registry.holds(KEY)
    assert events.take() == [("ended", "s", EndReason.ENDED)]
    assert replication.take() == [("released", "s", EndReason.ENDED)]
    # Whatever still refers to it finds nothing to do.
    registry.end(session, EndReason.ENDED)
    registry.detach(session, now=2000)
    assert events.take() == [] and replication.take() == [] and registry.waiting == 0


def test_heartbeats_touch_and_an_active_flip_is_a_change() -> None:
    registry, events, replication = recording_registry()
    session, _ = registry.start("p1", 0, start(), now=1000, attach=True)
    events.take(), replication.take()
    registry.heartbeat(session, None, now=1500)
    registry.heartbeat(session, True, now=1600)  # the same flag: only lastActiveAt
    assert events.take() == [("touched", "s", 1500), ("touched", "s", 1600)]
    assert replication.take() == [("touched", "s", 1500), ("touched", "s", 1600)]
    registry.heartbeat(session, False, now=1700)
    assert events.take() == [("changed", "s", {"active": False, "lastActiveAt": 1700})]
    assert replication.take() == [("held", "s", 1, True)]


def test_the_project_limit_refuses_new_sessions_only() -> None:
    registry, _, _ = recording_registry(max_sessions=1)
    first, _ = registry.start("p1", 0, start("a"), now=1, attach=True)
    with pytest.raises(ProjectFull) as full:
        registry.start("p1", 0, start("b"), now=2, attach=True)
    assert full.value.code is ErrorCode.PROJECT_FULL
    assert registry.start("p1", 0, start("a"), now=3, attach=True)[0] is first  # a tab joining
    assert registry.start("p2", 0, start("b"), now=4, attach=True)[1], "the limit is per project"
    registry.end(first, EndReason.ENDED)
    assert registry.start("p1", 0, start("b"), now=5, attach=True)[1]


# -- cluster: other nodes' parts ---------------------------------------------------


def test_a_peer_s_session_is_mirrored_and_never_replicated_back() -> None:
    registry, events, replication = recording_registry()
    registry.remote_upsert("b", record(userID="ann", last=100), now=1000)
    session = registry.index.get(*KEY)
    assert session is not None and not registry.holds(KEY) and registry.sessions_of("b") == {KEY}
    assert events.take() == [("started", "s")]
    # activeTime as b computes it: moved with lastActiveAt, so listeners can derive it.
    registry.remote_upsert("b", record(userID="bob", last=200, activeTime=100), now=1000)
    assert events.take() == [("changed", "s", {"userID": "bob", "lastActiveAt": 200})]
    registry.remote_upsert("b", record(userID="bob", last=300, activeTime=200), now=1000)
    assert events.take() == [("touched", "s", 300)]
    registry.remote_upsert("b", record(userID="bob", last=250, activeTime=150), now=1000)  # older: nothing
    registry.remote_touch("p1", "s", 250)
    assert events.take() == []
    registry.remote_touch("p1", "s", 400)
    assert events.take() == [("touched", "s", 400)]
    registry.remote_remove("b", "p1", "s", EndReason.ENDED, now=1000)
    assert events.take() == [("ended", "s", EndReason.ENDED)]
    assert replication.take() == [], "what peers did is theirs to publish"


def test_the_same_session_on_two_nodes_is_one_session_with_tabs_summed() -> None:
    registry, events, replication = recording_registry(grace_ms=1000)
    local, _ = registry.start("p1", 0, start(timestamp=700), now=10, attach=True)
    replication.take()
    registry.remote_upsert("b", record(tabs=2, userID="ann", timestamp=900), now=11)
    assert (local.tabs, local.userID, local.timestamp, len(registry.index)) == (3, "ann", 700, 1)
    registry.remote_upsert("b", record(tabs=2, userID="ann", timestamp=600), now=11)
    assert local.timestamp == 600, "the first start anywhere wins"
    assert replication.take() == []
    registry.detach(local, now=12)
    assert local.tabs == 2 and local.connected and not registry.holds(KEY)
    assert replication.take() == [("released", "s", None)], "its other tabs are on b"
    registry.remote_upsert("b", record(tabs=0), now=13)
    assert not local.connected and registry.waiting == 1
    events.take()
    assert registry.sweep(now=13 + 1000 - 1) == 0
    assert registry.sweep(now=13 + 1000) == 1
    assert len(registry.index) == 0 and events.take() == [("ended", "s", EndReason.DISCONNECTED)]
    assert replication.take() == [], "b's grace ran out: b says why"


def test_a_tab_resuming_on_another_node_ends_this_node_s_grace() -> None:
    registry, events, replication = recording_registry()
    session, _ = registry.start("p1", 0, start(), now=1000, attach=True)
    registry.detach(session, now=2000)
    events.take(), replication.take()
    # b mirrored the session: its record carries the same start.
    registry.remote_upsert("b", record(tabs=1, last=2500, timestamp=session.timestamp), now=2500)
    assert session.connected and session.tabs == 1 and registry.waiting == 0
    assert not registry.holds(KEY)
    # The resume carries activeTime: listeners would count the grace.
    resumed = {"tabs": 1, "connected": True, "activeTime": 0, "lastActiveAt": 2500}
    assert events.take() == [("changed", "s", resumed)]
    assert replication.take() == [("released", "s", None)]
    assert registry.sweep(2000 + GRACE) == 0 and registry.is_live(session)


def test_a_peer_s_end_ends_the_session_here_too() -> None:
    registry, events, replication = recording_registry()
    session, _ = registry.start("p1", 0, start(), now=1000, attach=True)
    registry.remote_upsert("b", record(tabs=1), now=1000)
    events.take(), replication.take()
    registry.remote_remove("b", "p1", "s", EndReason.ENDED, now=1100)
    assert not registry.is_live(session)
    assert events.take() == [("ended", "s", EndReason.ENDED)]
    assert replication.take() == [("released", "s", None)], "this node lets go of its part"


def test_a_peer_s_grace_running_out_spares_a_tab_that_resumed_here() -> None:
    registry, events, replication = recording_registry()
    registry.remote_upsert("b", record(tabs=0), now=1000)
    session = registry.index.get(*KEY)
    assert session is not None and not session.connected and registry.waiting == 1
    registry.start("p1", 0, start(), now=2000, attach=True)
    assert session.connected and session.tabs == 1 and registry.waiting == 0
    events.take(), replication.take()
    registry.remote_remove("b", "p1", "s", EndReason.DISCONNECTED, now=3000)
    assert registry.is_live(session) and session.tabs == 1 and registry.sessions_of("b") == set()
    assert events.take() == [] and replication.take() == []


def test_a_peer_s_grace_running_out_leaves_the_session_to_the_last_tab_s_grace() -> None:
    registry, events, replication = recording_registry()
    registry.remote_upsert("x", record(tabs=1), now=1000)
    # The tab moves to y; x, which does not mirror the project, keeps its part in its grace.
    registry.remote_upsert("y", record(tabs=1), now=2000)
    registry.remote_upsert("x", record(tabs=0), now=2000)
    session = registry.index.get(*KEY)
    assert session is not None and session.connected and session.tabs == 1
    # The last tab closes on y: the session's grace starts now.
    registry.remote_upsert("y", record(tabs=0), now=20_000)
    assert not session.connected and registry.waiting == 1
    events.take()
    # x's grace runs out first: y's part still waits out its own.
    registry.remote_remove("x", "p1", "s", EndReason.DISCONNECTED, now=2000 + GRACE)
    assert registry.is_live(session) and registry.sessions_of("x") == set()
    assert events.take() == []
    assert registry.sweep(20_000 + GRACE - 1) == 0 and registry.is_live(session)
    assert registry.sweep(20_000 + GRACE) == 1
    assert events.take() == [("ended", "s", EndReason.DISCONNECTED)]
    assert replication.take() == [], "each node ends its own part"


def test_a_lost_node_ends_only_the_sessions_no_other_node_holds() -> None:
    registry, events, replication = recording_registry()
    registry.remote_upsert("b", record("only-b"), now=1)
    registry.remote_upsert("b", record("both"), now=1)
    registry.remote_upsert("c", record("both"), now=1)
    mine, _ = registry.start("p1", 0, start("mine"), now=1, attach=True)
    registry.remote_upsert("b", record("mine"), now=1)
    both = registry.index.get("p1", "both")
    assert both is not None and both.tabs == 2 and mine.tabs == 2
    events.take(), replication.take()
    assert registry.drop_node("b", EndReason.NODE_LOST, now=2) == 1
    # b's sessions come from a set: compare in a fixed order.
    assert sorted(events.take()) == [
        ("changed", "both", {"tabs": 1}),
        ("changed", "mine", {"tabs": 1}),
        ("ended", "only-b", EndReason.NODE_LOST),
    ]
    assert both.tabs == 1 and mine.tabs == 1 and registry.sessions_of("b") == set()
    assert replication.take() == []


def test_a_leaving_node_s_sessions_wait_out_their_grace_and_resume_here() -> None:
    registry, events, replication = recording_registry(grace_ms=1000)
    registry.remote_upsert("b", record("s"), now=1)
    registry.remote_upsert("b", record("t"), now=1)
    registry.move_node("b", now=2)
    session = registry.index.get(*KEY)
    assert session is not None and not session.connected and session.tabs == 0
    assert registry.waiting == 2 and registry.sessions_of("b") == set()
    resumed, created = registry.start("p1", 0, start("s"), now=3, attach=True)
    assert resumed is session and not created and session.connected and session.tabs == 1
    events.take()
    assert registry.sweep(now=2 + 1000 - 1) == 0
    assert registry.sweep(now=2 + 1000) == 1 and registry.is_live(session)
    assert events.take() == [("ended", "t", EndReason.DISCONNECTED)]
    assert replication.take() == [("held", "s", 1, True)], "only the resumed tab is this node's"


def test_reconcile_makes_a_peer_s_part_equal_its_snapshot() -> None:
    registry, events, replication = recording_registry()
    registry.remote_upsert("b", record("gone"), now=1)
    registry.remote_upsert("b", record("kept", userID="ann"), now=1)
    events.take()
    registry.reconcile("b", [record("kept", userID="bob"), record("new")], now=5)
    assert sorted(events.take()) == [
        ("changed", "kept", {"userID": "bob"}),
        ("ended", "gone", EndReason.ENDED),
        ("started", "new"),
    ]
    assert registry.sessions_of("b") == {("p1", "kept"), ("p1", "new")}
    assert registry.index.get("p1", "gone") is None
    assert replication.take() == []


def test_active_is_any_tab_s_across_nodes() -> None:
    """Each node publishes its own tabs' activity; the record's ``active`` is any node's."""
    registry, _, _ = recording_registry()
    session, _ = registry.start("p1", 0, start(), now=10, attach=True)  # a tab here, active
    registry.remote_upsert("b", record(tabs=1, active=False, last=10), now=11)  # b's tab, hidden
    assert session.active and session.tabs == 2
    assert registry.local_active(("p1", "s"), session.active) is True
    registry.heartbeat(session, False, now=20, was=True)  # this node's tab hides too
    assert session.active is False
    assert registry.local_active(("p1", "s"), session.active) is False, "what this node publishes"
    registry.remote_upsert("b", record(tabs=1, active=True, last=30), now=30)  # b's tab visible
    assert session.active is True
    registry.remote_upsert("b", record(tabs=0, active=True, last=30), now=40)  # b's tab closed
    assert (session.active, session.tabs) == (False, 1), "a node without tabs counts for nothing"
    registry.drop_node("b", EndReason.NODE_LOST, now=50)
    registry.heartbeat(session, True, now=60, was=False)
    assert session.active is True


def test_a_report_without_tab_state_speaks_for_every_tab_here() -> None:
    """A caller that keeps no tab state (a benchmark, the registry driven alone) sets the
    activity of all this node's tabs, so the counts stay whole for later tab-aware reports."""
    registry, _, _ = recording_registry()
    session, _ = registry.start("p1", 0, start(), now=10, attach=True)
    registry.start("p1", 0, start(), now=10, attach=True)
    registry.heartbeat(session, False, now=20)
    assert session.active is False and session.tabs == 2
    registry.heartbeat(session, True, now=30, was=False)  # one tab, tab-aware, comes back
    assert session.active is True
    registry.detach(session, now=40, active=True)  # and closes: the other is still hidden
    assert (session.active, session.tabs) == (False, 1)


def test_reconcile_and_move_of_one_project_leave_the_peer_s_other_projects() -> None:
    registry, events, _ = recording_registry()
    registry.remote_upsert("b", record("one"), now=1)
    registry.remote_upsert("b", record("two", projectKey="p2"), now=1)
    events.take()
    registry.reconcile("b", [], now=5, part="p1")
    assert events.take() == [("ended", "one", EndReason.ENDED)]
    assert registry.sessions_of("b") == {("p2", "two")}
    registry.move_node("b", now=6, part="p2")
    assert registry.sessions_of("b") == set() and registry.waiting == 1


def test_forgetting_a_project_drops_peers_parts_silently_and_keeps_this_node_s() -> None:
    registry, events, replication = recording_registry()
    mine, _ = registry.start("p1", 1, Start(sessionID="both"), now=1, attach=True)
    registry.remote_upsert("b", record("both", tabs=2), now=2)
    registry.remote_upsert("b", record("theirs"), now=2)
    registry.remote_upsert("b", record("other", projectKey="p2"), now=2)
    assert mine.tabs == 3
    events.take()
    replication.take()
    assert registry.forget_part("p1", now=3) == 1
    # Not ended: no listener hears of the session that left, the one held here keeps its tab.
    assert events.take() == [("changed", "both", {"tabs": 1})]
    assert registry.index.get("p1", "theirs") is None and registry.is_live(mine) and mine.tabs == 1
    assert registry.sessions_of("b") == {("p2", "other")}
    assert replication.take() == []
    # A later snapshot of the project brings the peer's part back.
    registry.reconcile("b", [record("both", tabs=2), record("theirs")], now=4, part="p1")
    assert mine.tabs == 3 and registry.index.get("p1", "theirs") is not None


# -- memory: recurring values kept once ----------------------------------------------


def test_recurring_text_values_are_kept_once_across_local_and_mirrored_records() -> None:
    registry, _, _ = recording_registry()
    # Decoded apart, as two trackers' frames and a peer's record are: equal, not the same object.
    browser, page = "".join(["Fire", "fox"]), "".join(["https://shop.test/", "a"])
    a, _ = registry.start(
        "p1", 0, start("a", userBrowser=browser, url=page, metadata={"plan": "pro"}), 1, True
    )
    b, _ = registry.start("p1", 0, start("b", userBrowser="Fire" + "fox"[:3], url=page[:]), 1, True)
    registry.remote_upsert(
        "n2", record("c", userBrowser="".join(["Fir", "efox"]), metadata={"plan": "".join("pro")}), 1
    )
    c = registry.index.get("p1", "c")
    assert c is not None
    assert a.userBrowser is b.userBrowser is c.userBrowser
    assert a.metadata["plan"] is c.metadata["plan"]
    # An update brings its values to the shared copies too.
    registry.update(b, Update(userBrowser="".join(["Sa", "fari"])), 2)
    registry.update(a, Update(userBrowser="".join(["Saf", "ari"])), 2)
    assert a.userBrowser == "Safari" and a.userBrowser is b.userBrowser


def test_the_shared_values_are_bounded() -> None:
    strings = Strings(limit=3)
    for n in range(10):
        strings.get(f"value-{n}")
        assert len(strings.values) <= 3
    kept = strings.get("".join(["x", "y"]))
    assert strings.get("".join(["x", "y"])) is kept


# -- one session's parts on several nodes: field by field, the newest change wins ----------


def test_one_process_stamps_nothing() -> None:
    registry, _, _ = recording_registry()
    session, _ = registry.start("p1", 0, start(userID="first"), now=1000, attach=True)
    registry.update(session, Update(userID="second"), now=2000)
    assert registry.stamps(KEY) == {}, "only a cluster merges parts"


def test_a_peer_s_part_keeps_fields_changed_here_since_and_takes_its_newer_ones() -> None:
    registry, events, replication = recording_registry()
    registry.stamping = True  # as the cluster sets it
    session, _ = registry.start("p1", 0, start(userID="first"), now=1000, attach=True)
    registry.remote_upsert("b", record(userID="first"), now=1100)  # a second tab, on b
    assert registry.stamps(KEY) == {}, "a field as it started has no stamp"
    registry.update(session, Update(userID="second"), now=2000)
    assert registry.stamps(KEY) == {"userID": 2000}
    events.take(), replication.take()
    # b did not see the change (it does not mirror the project): its part still says "first".
    registry.remote_upsert("b", record(userID="first", url="/b", last=3000), now=3000, stamps={"url": 3000})
    assert (session.userID, session.url) == ("second", "/b")
    ((kind, _, changes),) = events.take()
    assert kind == "changed" and changes["url"] == "/b" and "userID" not in changes
    assert registry.stamps(KEY) == {"userID": 2000, "url": 3000}
    # A later change on b wins.
    registry.remote_upsert(
        "b", record(userID="third", url="/b", last=4000), now=4000, stamps={"userID": 4000}
    )
    assert session.userID == "third" and registry.stamps(KEY) == {"userID": 4000, "url": 3000}
    assert replication.take() == [], "what peers did is theirs to publish"


@pytest.mark.parametrize("order", [("b", "c"), ("c", "b")])
def test_parts_read_from_snapshots_merge_alike_in_any_order(order: tuple[str, str]) -> None:
    registry, _, _ = recording_registry()
    parts = {
        "b": (record(userID="second", url="/a", pageTitle="A"), {"userID": 2000}),
        "c": (record(userID="first", url="/c", pageTitle="C"), {"url": 3000}),
    }
    for node in order:
        rec, stamps = parts[node]
        registry.reconcile(node, [rec], now=5000, stamps={"s": stamps})
    session = registry.index.get(*KEY)
    assert session is not None and (session.userID, session.url, session.tabs) == ("second", "/c", 2)
    # Unstamped on both (as each started): the last read keeps its value, as before stamps.
    assert session.pageTitle == parts[order[1]][0].pageTitle


def test_an_adopted_record_keeps_its_stamps_and_the_start_here_is_newer() -> None:
    registry, _, _ = recording_registry()
    registry.start("p1", 0, start(userID="mine"), now=5000, attach=True)
    earlier = record(userID="theirs", pageTitle="P", url="/p", timestamp=100)
    assert registry.adopt(earlier, now=5010, stamps={"pageTitle": 3000, "userID": 2000})
    session = registry.index.get(*KEY)
    assert session is not None and (session.userID, session.pageTitle) == ("mine", "P")
    # pageViews: the record's page and this start's other page.
    assert registry.stamps(KEY) == {"pageTitle": 3000, "userID": 5010, "pageViews": 5010}


def test_metadata_merges_key_by_key_newest_first_and_a_removal_is_a_change() -> None:
    registry, _, _ = recording_registry()
    registry.stamping = True
    session, _ = registry.start("p1", 0, start(metadata={"os": "mac"}), now=1000, attach=True)
    registry.remote_upsert("b", record(metadata={"os": "mac", "ab": "x"}), now=1100)
    assert session.metadata == {"os": "mac", "ab": "x"}, "keys as each part started: both kept"
    registry.update(session, Update(metadata={"plan": "pro"}), now=2000)
    assert registry.stamps(KEY) == {"metadata.plan": 2000}
    # b did not see plan (it does not mirror the project) and set lang since.
    b_map = {"os": "mac", "ab": "x", "lang": "en"}
    registry.remote_upsert("b", record(metadata=b_map), now=3000, stamps={"metadata.lang": 3000})
    assert session.metadata == {"os": "mac", "ab": "x", "plan": "pro", "lang": "en"}
    # A key b removed later goes; one b's map lacks without a stamp stays.
    registry.remote_upsert(
        "b", record(metadata={"os": "mac", "lang": "en"}), now=4000,
        stamps={"metadata.lang": 3000, "metadata.ab": 4000},
    )  # fmt: skip
    assert session.metadata == {"os": "mac", "plan": "pro", "lang": "en"}
    assert registry.stamps(KEY) == {"metadata.plan": 2000, "metadata.lang": 3000, "metadata.ab": 4000}
