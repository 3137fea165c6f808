"""The indexed search answers exactly as the brute-force scan (search.brute_force).

Random sessions, random changes between queries (updates, heartbeats,
removals, re-adds), random queries with every operator, alias, metadata
filter, sort field, order and page. Then one end-to-end check through a real
hub: trackers over WebSocket, searches over HTTP.
"""

from __future__ import annotations

import json
import random
from typing import Any

import msgspec
import websockets
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from hub.index import LiveIndex
from hub.record import SCALAR_FIELDS, Session, Start, decode_message
from hub.registry import Registry
from hub.search import FILTERABLE, FilterIn, Query, brute_force, parse_body, parse_filter, resolve_sort
from tests.helpers import running_hub, wait_for

PROJECTS = ("p1", "p2")
# Small pools so that values, substrings, case variants and ties collide.
IDS = ("a", "A", "b", "ab", "s-1", "S-1", "x.y", "c:d", "e", "f")
TEXTS = (None, "", "Chrome", "chrome", "CHROME", "Firefox", "fire", "a\x00b", "ab", "B", "x 1", "12")
META_KEYS = ("plan", "Plan", "tenant", "x")
FILTER_NAMES = (
    "userId", "USERID", "userUuid", "userAnonymousId", "platform", "sessionId", "userBrowser",
    "userOs", "pageTitle", "url", "timestamp", "lastActiveAt", "tabs", "active", "connected",
    "live", "projectId", "projectKey", "metadata", "plan", "Plan", "tenant", "unknownKey",
)  # fmt: skip
SORTS = (*sorted(SCALAR_FIELDS), "TIMESTAMP", "userid", "platform")
STRING_SETTABLE = ("userID", "userUUID", "userBrowser", "userOs", "userDeviceType", "pageTitle", "url")

texts = st.sampled_from(TEXTS)
small_ints = st.integers(min_value=0, max_value=12)
metadata = st.dictionaries(st.sampled_from(META_KEYS), st.sampled_from(TEXTS[1:]), max_size=3)
scalars = st.one_of(
    st.sampled_from(TEXTS),
    small_ints,
    st.booleans(),
    st.sampled_from((1.0, 2.5, -3)),
    st.sampled_from(("TRUE", "False", "chr", "ROME", "1", "0", "p1", "P2", "a\x00")),
)


@st.composite
def sessions(draw: st.DrawFn) -> Session:
    s = Session(
        sessionID=draw(st.sampled_from(IDS)),
        projectKey=draw(st.sampled_from(PROJECTS)),
        projectId=draw(st.sampled_from((0, 1, 12))),
        timestamp=draw(small_ints),
        lastActiveAt=draw(small_ints),
        metadata=draw(metadata),
        active=draw(st.booleans()),
        connected=draw(st.booleans()),
        tabs=draw(st.integers(0, 3)),
    )
    for name in STRING_SETTABLE:
        setattr(s, name, draw(texts))
    return s


@st.composite
def changes(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in draw(st.sets(st.sampled_from(STRING_SETTABLE), max_size=3)):
        out[name] = draw(texts)
    if draw(st.booleans()):
        out["metadata"] = draw(metadata)
    if draw(st.booleans()):
        out["active"] = draw(st.booleans())
    if draw(st.booleans()):
        out["tabs"] = draw(st.integers(0, 3))
    if draw(st.booleans()):
        out["timestamp"] = draw(small_ints)
    if draw(st.booleans()):
        out["lastActiveAt"] = draw(small_ints)
    if draw(st.booleans()):
        out["userProperties"] = {"k": draw(small_ints)}
    return out


@st.composite
def queries(draw: st.DrawFn) -> Query:
    criteria = []
    for i in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(FILTER_NAMES))
        raw = draw(st.none() | st.lists(scalars.filter(lambda v: v is not None), max_size=3))
        f = FilterIn(
            name=name,
            operator=draw(st.sampled_from((None, "is", "contains", "IS", "Contains"))),
            value=raw,
            source=draw(st.sampled_from(META_KEYS)) if name == "metadata" else None,
        )
        criteria.append(parse_filter(f, f"filters[{i}]"))
    return Query(
        criteria=tuple(criteria),
        sort=resolve_sort(draw(st.sampled_from(SORTS))),
        descending=draw(st.booleans()),
        page=draw(st.integers(1, 4) | st.sampled_from((2**63 - 1, 2**64 + 1, 10**30))),
        limit=draw(st.integers(1, 7)),
    )


def assert_same(index: LiveIndex, live: dict[tuple[str, str], Session], project: str, q: Query) -> None:
    expected_total, expected = brute_force([s for (p, _), s in live.items() if p == project], q)
    total, page = index.search(project, q)
    assert total == expected_total, q
    assert [s.sessionID for s in page] == [s.sessionID for s in expected], q
    assert all(a is b for a, b in zip(page, expected, strict=True))


class IndexMachine(RuleBasedStateMachine):
    @initialize(lazy=st.booleans())
    def setup(self, lazy: bool) -> None:
        # Lazy (a cluster node's): a project is indexed at its first query, unindexed at will.
        self.index = LiveIndex(lazy=lazy)
        self.live: dict[tuple[str, str], Session] = {}

    @rule(project=st.sampled_from(PROJECTS))
    def unindex(self, project: str) -> None:
        self.index.unindex(project)
        assert self.index.indexed(project) == (not self.index.lazy and self.index.count(project) > 0)

    @rule(s=sessions())
    def add(self, s: Session) -> None:
        self.index.add(s)
        self.live[(s.projectKey, s.sessionID)] = s

    @rule(batch=st.lists(sessions(), max_size=6))
    def add_new(self, batch: list[Session]) -> None:
        # Sessions not live yet, each once (a partition's snapshot read whole).
        fresh = {(s.projectKey, s.sessionID): s for s in batch}
        fresh = {key: s for key, s in fresh.items() if key not in self.live}
        self.index.add_new(list(fresh.values()))
        self.live.update(fresh)

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        if self.live:
            key = data.draw(st.sampled_from(sorted(self.live)))
            self.index.remove(self.live.pop(key))

    @rule(data=st.data(), c=changes())
    def apply(self, data: st.DataObject, c: dict[str, Any]) -> None:
        if self.live:
            s = self.live[data.draw(st.sampled_from(sorted(self.live)))]
            self.index.apply(s, c)
            for name, value in c.items():
                assert getattr(s, name) == value

    @rule(data=st.data(), now=small_ints)
    def touch(self, data: st.DataObject, now: int) -> None:
        if self.live:
            s = self.live[data.draw(st.sampled_from(sorted(self.live)))]
            self.index.touch(s, now)
            assert s.lastActiveAt == now

    @rule(project=st.sampled_from(PROJECTS), q=queries())
    def search(self, project: str, q: Query) -> None:
        assert_same(self.index, self.live, project, q)

    @invariant()
    def counts(self) -> None:
        assert len(self.index) == len(self.live)
        for p in PROJECTS:
            assert self.index.count(p) == sum(1 for (q, _) in self.live if q == p)


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _random_session(rng: random.Random, n: int) -> Session:
    return Session(
        sessionID=f"s{n}",
        projectKey="p",
        projectId=7,
        timestamp=rng.randrange(5000),
        lastActiveAt=rng.randrange(5000),
        userID=f"user{rng.randrange(3000)}@Example.com" if rng.random() < 0.8 else None,
        userBrowser=rng.choice(("Chrome", "Firefox", "Safari", "Edge", None)),
        userCountry=rng.choice(("FR", "DE", "US", "GB", "ES", "IT")),
        metadata={"plan": rng.choice(("free", "pro", "Enterprise"))}
        | ({"tenant": f"t{rng.randrange(60)}"} if rng.random() < 0.5 else {}),
    )


def test_many_sessions_with_churn_match_brute_force() -> None:
    """Enough sessions and churn for the planner's other paths: walking the
    timestamp order part-way, sorting a sparse match, rebuilding the distinct
    values a `contains` scans after many new ones."""
    rng = random.Random(4)
    index = LiveIndex()
    live: dict[tuple[str, str], Session] = {}
    bodies = [
        [FilterIn("userBrowser", "is", ["chrome"])],
        [FilterIn("userBrowser", "is", ["chrome", "EDGE"]), FilterIn("userCountry", "is", ["fr"])],
        [FilterIn("userId", "contains", ["user12"]), FilterIn("plan", "is", ["pro"])],
        [FilterIn("userId", "contains", ["ser29", "R1@"]), FilterIn("metadata", source="tenant")],
        [FilterIn("tenant", "is", ["t7"])],
        [FilterIn("tenant", "contains", ["t1"]), FilterIn("userId", "contains", ["example"])],
        [FilterIn("timestamp", "contains", ["12"])],
        [FilterIn("userId")],
        [],
    ]
    # More sessions than the sample other-field sorts bound their first page with.
    for made in range(7000):
        s = _random_session(rng, made)
        index.add(s)
        live[("p", s.sessionID)] = s
    made = 7000
    for step in range(12):
        for _ in range(300):
            op = rng.random()
            if op < 0.5 or not live:
                s = _random_session(rng, made)
                made += 1
                index.add(s)
                live[("p", s.sessionID)] = s
            elif op < 0.7:
                index.remove(live.pop(rng.choice(list(live))))
            elif op < 0.85:
                s = live[rng.choice(list(live))]
                index.apply(s, {"userID": f"user{rng.randrange(3000)}@example.com", "tabs": 2})
            else:
                index.touch(live[rng.choice(list(live))], 5000 + step)
        for filters in bodies:
            for sort in ("timestamp", "userID", "lastActiveAt"):
                q = Query(
                    criteria=tuple(parse_filter(f, "f") for f in filters),
                    sort=sort,
                    descending=rng.random() < 0.7,
                    page=rng.choice((1, 1, 2, 5)),
                    limit=rng.choice((10, 10, 50, 1000)),
                )
                assert_same(index, live, "p", q)


def test_sessions_indexed_in_one_go_are_indexed_as_one_by_one() -> None:
    rng = random.Random(9)
    batch = [_random_session(rng, n) for n in range(3000)]
    one_by_one, in_one_go = LiveIndex(), LiveIndex()
    for s in batch[:1000]:
        one_by_one.add(s)
        in_one_go.add(s)
    for fi in in_one_go._projects["p"].fields.values():
        fi.keys_containing(["user1"])  # its haystack built: new values must reach it
    for s in batch[1000:]:
        one_by_one.add(s)
    in_one_go.add_new(batch[1000:])
    a, b = one_by_one._projects["p"], in_one_go._projects["p"]
    assert a.order == b.order and a.sessions == b.sessions
    for name, fi in a.fields.items():
        assert (fi.buckets, fi.count) == (b.fields[name].buckets, b.fields[name].count), name
        assert fi.keys_containing(["user1", "@"]) == b.fields[name].keys_containing(["user1", "@"])
    assert {k: (fi.buckets, fi.count) for k, fi in a.meta.items()} == {
        k: (fi.buckets, fi.count) for k, fi in b.meta.items()
    }


def test_a_lazy_index_builds_each_field_at_its_first_use() -> None:
    rng = random.Random(5)
    index = LiveIndex(lazy=True)
    live = {("p", s.sessionID): s for s in (_random_session(rng, n) for n in range(2000))}
    for s in live.values():
        index.add(s)
    project = index._projects["p"]
    assert not index.indexed("p") and not project.fields and not project.order
    every = Query(criteria=(), sort="timestamp", descending=True, page=1, limit=50)
    assert_same(index, live, "p", every)
    assert index.indexed("p") and not project.fields and not project.meta_built  # the order only
    by_browser = Query(criteria=(parse_filter(FilterIn("userBrowser", "is", ["chrome"]), "f"),))
    assert_same(index, live, "p", by_browser)
    assert set(project.fields) == {"userBrowser"}
    # Changes to fields not built yet are read from the records when they are built.
    for s in list(live.values())[:300]:
        index.apply(s, {"userCountry": "NZ", "metadata": {"plan": "gold"}})
        index.touch(s, 9_000)
    for name, value in (("userCountry", "nz"), ("plan", "gold"), ("lastActiveAt", "9000")):
        q = Query(criteria=(parse_filter(FilterIn(name, "is", [value]), "f"),), limit=1000)
        assert_same(index, live, "p", q)
        assert index.search("p", q)[0] == 300
    assert set(project.fields) == {"userBrowser", "userCountry", "lastActiveAt"} and project.meta_built


def test_build_next_builds_a_lazy_projects_indexes_one_at_a_time_to_an_eager_ones() -> None:
    rng = random.Random(8)
    lazy, eager = LiveIndex(lazy=True), LiveIndex()
    sessions = [_random_session(rng, n) for n in range(1500)]
    for s in sessions:
        lazy.add(msgspec.structs.replace(s))  # a record of its own: changes apply to each
        eager.add(s)
    project = lazy._projects["p"]
    steps = 0
    while lazy.build_next("p"):
        steps += 1
        built = len(project.fields) + project.meta_built
        assert built == steps - 1, "one index a step, the order first"
        # Changes between steps reach the indexes built so far and the ones still to come.
        for s in rng.sample(sessions, 20):
            plan = rng.choice(["gold", "free"])
            changes = {"userCountry": rng.choice(["NZ", "FR"]), "metadata": {"plan": plan}}
            mine = lazy.get("p", s.sessionID)
            assert mine is not None
            lazy.apply(mine, changes)
            eager.apply(s, changes)
    assert steps == 1 + len(FILTERABLE) + 1 and not lazy.build_next("p") and not lazy.build_next("nope")
    a, b = project, eager._projects["p"]
    assert a.order == b.order
    for name, fi in b.fields.items():
        assert (a.fields[name].buckets, a.fields[name].count) == (fi.buckets, fi.count), name
    assert {k: (fi.buckets, fi.count) for k, fi in a.meta.items()} == {
        k: (fi.buckets, fi.count) for k, fi in b.meta.items()
    }


def test_other_field_sorts_when_sessions_arrive_in_that_order() -> None:
    """Sessions indexed in the order of the sort field: the first sessions are the answer."""
    index = LiveIndex()
    live: dict[tuple[str, str], Session] = {}
    for n in range(6000):
        s = Session(
            sessionID=f"s{n % 97}-{n}",
            projectKey="p",
            projectId=1,
            timestamp=n // 2,
            lastActiveAt=n,
            userID=f"u{n:05d}" if n % 50 else None,
            pageTitle=f"t{n // 3:05d}",
            metadata={"era": "old" if n < 300 else "new"},
        )
        index.add(s)
        live[("p", s.sessionID)] = s
    era = {era: parse_filter(FilterIn("era", "is", [era]), "f") for era in ("old", "new")}
    for sort in ("userID", "pageTitle", "lastActiveAt", "sessionID", "timestamp"):
        for descending in (False, True):
            for page, limit in ((1, 10), (3, 7), (1, 64), (2, 1000)):
                q = Query(sort=sort, descending=descending, page=page, limit=limit)
                assert_same(index, live, "p", q)
                # The oldest few: walking the newest end finds none of them.
                for c in era.values():
                    assert_same(index, live, "p", msgspec.structs.replace(q, criteria=(c,)))


async def test_tracker_updates_are_searchable_over_http() -> None:
    async with running_hub() as h:
        conns = []
        for i in range(30):
            ws = await websockets.connect(h.tracker_url())
            conns.append(ws)
            start = {
                "type": "start",
                "sessionID": f"s{i:02d}",
                "timestamp": 1000 + i % 7,
                "userID": f"User{i}@x.io",
                "userBrowser": "Chrome" if i % 3 else "Firefox",
                "metadata": {"plan": "pro" if i % 2 else "free"},
            }
            await ws.send(json.dumps(start))
            assert json.loads(await ws.recv())["type"] == "started"
        # Changes after the start move sessions between index buckets.
        update = {"type": "update", "userBrowser": "Edge", "metadata": {"plan": "pro"}}
        await conns[3].send(json.dumps(update))
        await conns[4].send(json.dumps({"type": "end"}))
        await conns[5].send(json.dumps({"type": "heartbeat", "active": False}))

        def only(name: str, value: Any) -> dict[str, Any]:
            return {"filters": [{"name": name, "operator": "is", "value": [value]}]}

        async def settled() -> bool:
            every = await h.search(body={"limit": 100})
            edge = await h.search(body=only("userBrowser", "edge"))
            inactive = await h.search(body=only("active", False))
            return (
                every["total"] == 29
                and [s["sessionID"] for s in edge["sessions"]] == ["s03"]
                and [s["sessionID"] for s in inactive["sessions"]] == ["s05"]
            )

        await wait_for(settled)
        body = {
            "filters": [
                {"name": "userBrowser", "operator": "is", "value": ["chrome", "edge"]},
                {"name": "plan", "operator": "is", "value": ["PRO"]},
            ],
            "limit": 5,
        }
        data = await h.search(body=body)
        expected = [i for i in range(30) if i != 4 and (i % 3 or i == 3) and (i % 2 or i == 3)]
        assert data["total"] == len(expected)
        order = sorted(expected, key=lambda i: (1000 + i % 7, f"s{i:02d}"), reverse=True)
        assert [s["sessionID"] for s in data["sessions"]] == [f"s{i:02d}" for i in order[:5]]
        for ws in conns:
            await ws.close()


def test_a_number_in_metadata_matches_the_same_number_in_a_filter() -> None:
    """Metadata numbers are stored as the text a filter value of that number compares:
    one conversion (record.scalar_text) on both sides, 5.0 and 5 alike."""
    index = LiveIndex()
    registry = Registry(index, grace_ms=1000)
    meta = {"n": 5.0, "r": 2.5, "big": 1e21, "i": 7, "b": True, "neg": -0.0}
    msg = decode_message(json.dumps({"type": "start", "sessionID": "s", "metadata": meta}))
    assert isinstance(msg, Start)
    session, _ = registry.start("p", 0, msg, 10, attach=True)
    assert session.metadata == {"n": "5", "r": "2.5", "big": "1e+21", "i": "7", "b": "true", "neg": "0"}
    matching = [(5.0, "n"), (5, "n"), ("5", "n"), (2.5, "r"), (1e21, "big"), (7.0, "i"), (True, "b")]
    for value, name in [*matching, (0, "neg")]:
        body = {"filters": [{"name": name, "operator": "is", "value": [value]}]}
        q = parse_body(json.dumps(body).encode())
        assert index.search("p", q)[0] == 1, body
        assert brute_force([session], q)[0] == 1, body
    for value, name in [("5.0", "n"), (2.50001, "r"), (False, "b")]:
        q = parse_body(json.dumps({"filters": [{"name": name, "operator": "is", "value": [value]}]}).encode())
        assert index.search("p", q)[0] == 0 == brute_force([session], q)[0], (name, value)
