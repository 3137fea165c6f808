"""Property: the live index answers every search as a plain brute-force scan would.

The reference below is written from CONTRACT §4 alone, independent of hub.search,
and the index is exercised with updates, heartbeats and ends between queries.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub.index import LiveIndex
from hub.record import Session, Start, Update, decode_message
from hub.registry import Registry
from hub.search import parse_body

WORDS = ["", "a", "ab", "Abc", "b", "AB", "b@c.d"]
TEXT_FIELDS = ["userID", "userBrowser", "userDeviceType", "pageTitle"]
META_KEYS = ["plan", "team", "Plan"]
ALIASES = {
    "userid": "userID",
    "useranonymousid": "userUUID",
    "useruuid": "userUUID",
    "platform": "userDeviceType",
    "sessionid": "sessionID",
}
# Integral floats store and compare as the integer (2.0 is "2"), others as their shortest text.
FLOATS = [0.0, 2.0, 2.5, -1.0, 1e21, 1e20]
SORTABLE = [
    "timestamp",
    "lastActiveAt",
    "userID",
    "userBrowser",
    "sessionID",
    "active",
    "tabs",
    "userCountry",
]

opt_word = st.one_of(st.none(), st.sampled_from(WORDS))
fields_st = st.fixed_dictionaries(
    {},
    optional={
        **{f: opt_word for f in TEXT_FIELDS},
        "metadata": st.dictionaries(
            st.sampled_from(META_KEYS),
            st.one_of(st.sampled_from(WORDS), st.integers(0, 3), st.booleans(), st.sampled_from(FLOATS)),
        ),
        "active": st.booleans(),
    },
)
session_st = st.tuples(st.sampled_from([f"s{i}" for i in range(12)]), st.integers(0, 5), fields_st)

filter_name_st = st.one_of(
    st.sampled_from([*TEXT_FIELDS, "active", "sessionId", "timestamp"]),
    st.sampled_from(list(ALIASES)).map(str.upper),
    st.sampled_from(META_KEYS),
    st.just("METADATA"),
)
filter_st = st.builds(
    lambda name, op, values, source: {
        "name": name,
        **({"operator": op} if op else {}),
        **({"value": values} if values is not None else {}),
        **({"source": source} if name == "METADATA" else {}),
    },
    filter_name_st,
    st.sampled_from(["is", "contains", "IS", "Contains", None]),
    st.one_of(
        st.lists(
            st.one_of(st.sampled_from(WORDS), st.booleans(), st.integers(0, 5), st.sampled_from(FLOATS)),
            min_size=1,
            max_size=3,
        ),
        st.lists(st.sampled_from(WORDS), max_size=1),
        st.none(),
    ),
    st.sampled_from(META_KEYS),
)
query_st = st.fixed_dictionaries(
    {"filters": st.lists(filter_st, min_size=1, max_size=3) | st.lists(filter_st, max_size=1)},
    optional={
        "sort": st.sampled_from([*SORTABLE, "TIMESTAMP", "userId"]),
        "order": st.sampled_from(["asc", "desc", "ASC", "Desc"]),
        "page": st.integers(1, 4),
        "limit": st.integers(1, 7),
    },
)
op_st = st.one_of(
    st.tuples(st.just("start"), session_st),
    st.tuples(st.just("update"), session_st),
    st.tuples(st.just("touch"), session_st),
    st.tuples(st.just("end"), session_st),
    st.tuples(st.just("query"), query_st),
    st.tuples(st.just("query"), query_st),
    st.tuples(st.just("query"), query_st),
)
starts_st = st.lists(st.tuples(st.just("start"), session_st), min_size=1, max_size=15)


def ref_text(record: dict[str, Any], name: str, source: str | None) -> str | None:
    low = name.lower()
    if low == "metadata":
        value: Any = record["metadata"].get(source)
    else:
        field = ALIASES.get(low) or next((f for f in record if f.lower() == low and f != "metadata"), None)
        value = record.get(field) if field else record["metadata"].get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).lower()


def ref_stored(v: Any) -> str:
    """A metadata value's text (README, Trackers): as JavaScript's String() prints it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return str(int(v)) if v == round(v) and abs(v) < 1e21 else json.dumps(v)
    return str(v)


def ref_value(v: Any) -> str:
    return ref_stored(v).lower()


def ref_search(records: list[dict[str, Any]], q: dict[str, Any]) -> tuple[int, list[str]]:
    def keep(r: dict[str, Any]) -> bool:
        for f in q["filters"]:
            text = ref_text(r, f["name"], f.get("source"))
            if not text:
                return False
            values = [ref_value(v) for v in f.get("value") or [] if v != ""]
            if not values:
                continue
            if (f.get("operator") or "contains").lower() == "is":
                if text not in values:
                    return False
            elif not any(v in text for v in values):
                return False
        return True

    sort_low = q.get("sort", "timestamp").lower()
    field = ALIASES.get(sort_low) or next(f for f in records[0] if f.lower() == sort_low) if records else ""
    desc = q.get("order", "desc").lower() == "desc"
    matched = [r for r in records if keep(r)]
    with_value = sorted(
        (r for r in matched if r[field] is not None), key=lambda r: (r[field], r["sessionID"])
    )
    without = sorted((r for r in matched if r[field] is None), key=lambda r: r["sessionID"])
    if desc:
        with_value.reverse()
        without.reverse()
    ordered = with_value + without
    limit = q.get("limit", 10)
    offset = (q.get("page", 1) - 1) * limit
    return len(matched), [r["sessionID"] for r in ordered[offset : offset + limit]]


def as_record(s: Session) -> dict[str, Any]:
    return {f: getattr(s, f) for f in s.__struct_fields__}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(starts_st, st.lists(op_st, max_size=25))
def test_index_answers_as_brute_force(starts: list[tuple[str, Any]], ops: list[tuple[str, Any]]) -> None:
    index = LiveIndex()
    registry = Registry(index, grace_ms=1000)
    now = 10
    for kind, arg in starts + ops:
        now += 1
        if kind == "query":
            query = parse_body(json.dumps(arg).encode())
            total, page = index.search("p", query)
            records = [as_record(s) for s in index.sessions("p")]
            assert (total, [s.sessionID for s in page]) == ref_search(records, arg)
            every = ref_search(records, {**arg, "page": 1, "limit": len(records) + 1})[1]
            assert sorted(s.sessionID for s in index.matching("p", query.criteria)) == sorted(every)
            continue
        sid, ts, fields = arg
        session = index.get("p", sid)
        if kind == "start":
            msg = decode_message(json.dumps({"type": "start", "sessionID": sid, "timestamp": ts, **fields}))
            assert isinstance(msg, Start)
            registry.start("p", 0, msg, now, attach=True)
            stored = index.get("p", sid)
            assert stored is not None
            for key, value in fields.get("metadata", {}).items():
                assert stored.metadata[key] == ref_stored(value)
        elif session is None:
            continue
        elif kind == "update":
            upd = decode_message(json.dumps({"type": "update", **fields}))
            assert isinstance(upd, Update)
            registry.update(session, upd, now)
        elif kind == "touch":
            registry.heartbeat(session, None, now)
        else:
            registry.end(session, "ended")
