"""pageViews and activeTime (CONTRACT §1; README, "The session record") with a fake clock.

The registry is driven directly, ``now`` a plain int in ms: page views across
reloads and tabs, active time across active/inactive flips, tabs and a
reconnect grace, both searchable like any int field, and a peer that derives
activeTime from lastActiveAt-only touches exactly as the holder computed it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from hub.record import Session, Start, Update
from hub.registry import Registry
from hub.search import parse_body
from tests.helpers import recording_registry


def start(sid: str = "s", **fields: Any) -> Start:
    return Start(sessionID=sid, **fields)


def search(registry: Registry, body: dict[str, Any]) -> list[str]:
    _, page = registry.index.search("p1", parse_body(msgspec.json.encode(body)))
    return [s.sessionID for s in page]


# -- pageViews -----------------------------------------------------------------------


def test_page_views_count_url_changes_across_updates_tabs_and_reloads() -> None:
    registry, _, _ = recording_registry()
    s, _ = registry.start("p1", 0, start(url="/a"), now=1000, attach=True)
    assert s.pageViews == 1, "the start is the first page"
    registry.update(s, Update(url="/b"), now=1100)
    registry.update(s, Update(url="/b", pageTitle="B"), now=1200)  # the same url: no new page
    assert s.pageViews == 2
    # A second tab on another page counts; one on the current page does not.
    registry.start("p1", 0, start(url="/c"), now=1300, attach=True)
    registry.start("p1", 0, start(url="/c"), now=1400, attach=True)
    assert s.pageViews == 3
    # A reload: the tab closes, the page's start resumes the session on the same url, then another.
    registry.detach(s, now=1500)
    registry.detach(s, now=1500)
    registry.detach(s, now=1500)
    assert not s.connected
    registry.start("p1", 0, start(url="/c"), now=1600, attach=True)
    assert (s.connected, s.pageViews) == (True, 3)
    registry.start("p1", 0, start(url="/d"), now=1700, attach=False)
    assert s.pageViews == 4
    # A url cleared is no page; the next url is one.
    registry.update(s, Update(url=None), now=1800)
    assert s.pageViews == 4
    registry.update(s, Update(url="/a"), now=1900)
    assert s.pageViews == 5


def test_a_start_without_url_is_one_page_and_the_first_url_another() -> None:
    registry, _, _ = recording_registry()
    s, _ = registry.start("p1", 0, start(), now=1000, attach=True)
    assert s.pageViews == 1
    registry.update(s, Update(url="/a"), now=1100)
    assert s.pageViews == 2


# -- activeTime ----------------------------------------------------------------------


def test_active_time_counts_the_time_between_messages_while_active() -> None:
    registry, _, _ = recording_registry()
    s, _ = registry.start("p1", 0, start(), now=1000, attach=True)
    assert s.activeTime == 0
    registry.heartbeat(s, None, now=1400)
    assert (s.activeTime, s.lastActiveAt) == (400, 1400)
    # The flip's own message ends an active stretch: 1400..2000 counts.
    registry.heartbeat(s, False, now=2000)
    assert s.activeTime == 1000
    registry.heartbeat(s, None, now=5000)
    registry.update(s, Update(pageTitle="x"), now=6000)
    assert s.activeTime == 1000, "inactive stretches do not count"
    registry.heartbeat(s, True, now=7000)
    assert s.activeTime == 1000, "the stretch before the flip back was inactive"
    registry.heartbeat(s, None, now=7250)
    assert (s.activeTime, s.lastActiveAt) == (1250, 7250)
    # Clocks that go back add nothing.
    registry.heartbeat(s, None, now=7000)
    assert s.activeTime == 1250


def test_active_time_counts_while_any_tab_is_active() -> None:
    """CONTRACT §1: activeTime is the time the session was active in any tab.

    Each tab's reports are its own (``was``: its previous one); the record's
    ``active`` is any tab's.
    """
    registry, _, _ = recording_registry()
    s, _ = registry.start("p1", 0, start(), now=1000, attach=True)  # tab A, active
    registry.start("p1", 0, start(active=False), now=1100, attach=True)  # tab B, hidden
    assert (s.active, s.activeTime) == (True, 100), "A is still active"
    registry.heartbeat(s, None, now=1500)  # B, saying nothing of its state
    assert (s.active, s.activeTime) == (True, 500)
    registry.heartbeat(s, False, now=1600, was=True)  # A hidden too: nobody active
    assert (s.active, s.activeTime) == (False, 600)
    registry.heartbeat(s, False, now=1900, was=False)  # B again
    assert s.activeTime == 600, "inactive in every tab: nothing counts"
    registry.heartbeat(s, True, now=2000, was=False)  # B visible
    registry.heartbeat(s, None, now=2300)  # A
    assert (s.active, s.activeTime) == (True, 900)
    # B (the active tab) closes: a close is no message; the step after A's next
    # message counts with the record's new `active`, A's (inactive).
    registry.detach(s, now=2300, active=True)
    assert (s.tabs, s.active) == (1, False)
    registry.heartbeat(s, None, now=2600)
    assert s.activeTime == 900


def test_one_tab_flipping_back_and_forth_while_another_stays_active() -> None:
    registry, _, _ = recording_registry()
    s, _ = registry.start("p1", 0, start(), now=0, attach=True)  # A
    registry.start("p1", 0, start(), now=0, attach=False, activity=None)  # A again: no new tab
    registry.start("p1", 0, start(), now=0, attach=True)  # B
    for t in range(1, 11):
        registry.heartbeat(s, t % 2 == 0, now=t * 100, was=t % 2 == 1)  # B flips
        assert s.active, "A is active all along"
    assert s.activeTime == 1000


def test_a_reconnect_grace_never_counts() -> None:
    registry, events, _ = recording_registry()
    s, _ = registry.start("p1", 0, start(), now=1000, attach=True)
    registry.heartbeat(s, None, now=2000)
    registry.detach(s, now=2500)
    events.take()
    registry.start("p1", 0, start(), now=9000, attach=True)
    assert (s.connected, s.activeTime, s.lastActiveAt) == (True, 1000, 9000)
    # Listeners' rule (activeTime moves with lastActiveAt while active) would count the
    # grace: the resume carries activeTime.
    assert events.take() == [
        ("changed", "s", {"tabs": 1, "connected": True, "activeTime": 1000, "lastActiveAt": 9000})
    ]
    registry.heartbeat(s, None, now=9100)
    assert s.activeTime == 1100


# -- search and the cluster ------------------------------------------------------------


def test_counters_are_filtered_and_sorted_like_any_int_field() -> None:
    registry, _, _ = recording_registry()
    a, _ = registry.start("p1", 0, start("a", url="/1"), now=1000, attach=True)
    b, _ = registry.start("p1", 0, start("b", url="/1"), now=1000, attach=True)
    c, _ = registry.start("p1", 0, start("c", url="/1", active=False), now=1000, attach=True)
    for n, sid in enumerate("ab"):
        for page in range(n + 2):
            registry.update(a if sid == "a" else b, Update(url=f"/{sid}{page}"), now=1100)
    registry.heartbeat(a, None, now=1500)
    registry.heartbeat(b, None, now=1300)
    registry.heartbeat(c, None, now=2000)
    assert (a.pageViews, b.pageViews, c.pageViews) == (3, 4, 1)
    assert (a.activeTime, b.activeTime, c.activeTime) == (500, 300, 0)
    assert search(registry, {"sort": "pageViews", "order": "desc"}) == ["b", "a", "c"]
    assert search(registry, {"sort": "activeTime", "order": "desc"}) == ["a", "b", "c"]
    by_views = {"filters": [{"name": "pageViews", "operator": "is", "value": ["4"]}]}
    assert search(registry, by_views) == ["b"]
    by_time = {"filters": [{"name": "activeTime", "operator": "is", "value": ["500", "0"]}]}
    assert sorted(search(registry, by_time)) == ["a", "c"]


def test_a_peer_derives_active_time_from_touches_exactly() -> None:
    """The holder publishes its record on changes and lastActiveAt alone on heartbeats;
    a peer moves activeTime by the same rule and ends up with the holder's value."""
    holder, _, _ = recording_registry()
    peer, _, _ = recording_registry()
    s, _ = holder.start("p1", 0, start(url="/a"), now=1000, attach=True)

    def publish() -> None:
        peer.remote_upsert("n1", msgspec.msgpack.decode(msgspec.msgpack.encode(s), type=Session), now=0)

    def touch() -> None:
        peer.remote_touch("p1", "s", s.lastActiveAt)

    publish()
    for now, active in [(1500, None), (2000, None), (2600, False), (3000, None), (3100, True), (3900, None)]:
        holder.heartbeat(s, active, now=now)
        if active is None:
            touch()  # a heartbeat that only moves lastActiveAt
        else:
            publish()  # the flip is a record change
        mirrored = peer.index.get("p1", "s")
        assert mirrored is not None
        assert (mirrored.lastActiveAt, mirrored.activeTime) == (s.lastActiveAt, s.activeTime)
    holder.update(s, Update(url="/b"), now=4000)
    publish()
    mirrored = peer.index.get("p1", "s")
    assert mirrored is not None
    assert (mirrored.pageViews, mirrored.activeTime) == (2, 2500) == (s.pageViews, s.activeTime)
    assert [x.sessionID for x in peer.index.sessions("p1")] == ["s"]
    _, page = peer.index.search("p1", parse_body(b'{"sort":"activeTime"}'))
    assert page == [mirrored]
