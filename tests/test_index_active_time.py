"""activeTime is re-indexed lazily (a heartbeat only notes it): queries reading it answer exactly."""

from __future__ import annotations

import random

from hub.index import LiveIndex
from hub.record import Session
from hub.search import Criterion, Query, brute_force


def _session(i: int) -> Session:
    return Session(sessionID=f"s{i:03d}", projectKey="p", projectId=0, timestamp=1000 + i, lastActiveAt=1000)


def _check(index: LiveIndex, sessions: dict[str, Session], query: Query) -> None:
    assert index.search("p", query) == brute_force(list(sessions.values()), query), query


def test_searches_on_active_time_see_every_touch_since_the_last_one() -> None:
    rng = random.Random(7)
    index = LiveIndex()
    sessions = {s.sessionID: s for s in map(_session, range(60))}
    for s in sessions.values():
        index.add(s)
    now = 1000
    for step in range(40):
        now += rng.randrange(1, 50)
        for s in rng.sample(list(sessions.values()), 15):
            index.touch(s, now, s.activeTime + rng.randrange(0, 3) * 100)
        action = step % 5
        if action == 1:
            # A session leaves while its activeTime index entry is stale.
            gone = rng.choice(list(sessions.values()))
            index.remove(gone)
            del sessions[gone.sessionID]
        elif action == 2:
            # An explicit change (a resume) while stale.
            s = rng.choice(list(sessions.values()))
            index.apply(s, {"activeTime": s.activeTime + 7})
        elif action == 3:
            s = _session(100 + step)
            index.add(s)
            sessions[s.sessionID] = s
        for desc in (True, False):
            _check(index, sessions, Query(sort="activeTime", descending=desc, limit=25))
            _check(index, sessions, Query(sort="activeTime", descending=desc, page=2, limit=7))
        value = str(rng.choice(list(sessions.values())).activeTime)
        criterion = Criterion(field="activeTime", key=None, op="is", values=(value,))
        _check(index, sessions, Query(criteria=(criterion,), limit=100))
        assert {s.sessionID for s in index.matching("p", (criterion,))} == {
            s.sessionID for s in sessions.values() if str(s.activeTime) == value
        }
        counts: dict[str, int] = {}
        for s in sessions.values():
            counts[str(s.activeTime)] = counts.get(str(s.activeTime), 0) + 1
        top = dict(index.values("p", "activeTime", None, "", 1000))
        assert top == {v: n for v, n in counts.items() if v != "0" or n}, step


def test_a_heartbeat_does_not_touch_the_active_time_index() -> None:
    index = LiveIndex()
    s = _session(1)
    index.add(s)
    index.touch(s, 1500, 500)
    # Not re-indexed yet: only a query reading activeTime settles it.
    project = index._projects["p"]
    assert project.stale == {"s001": 0}
    assert index.search("p", Query(sort="activeTime"))[1] == [s]
    assert project.stale == {}
    assert 500 in project.fields["activeTime"].buckets
