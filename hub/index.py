"""The live index: every live session, by project, searchable.

The index owns the mutation of indexed records: callers change a session
only through ``apply`` and ``touch`` so the index can keep itself in step.
No I/O, no clock.

Per project it keeps, for every filterable field and every metadata key, an
inverted index from the text a filter compares (``search.text_of``) to the
sessions holding it, plus the sessions ordered by (timestamp, sessionID) for
the default sort. ``search`` plans each query from those: exact filters from
their buckets, smallest first; ``contains`` by scanning the field's distinct
values, not its sessions; candidates that are already few are checked one by
one with ``Criterion.matches``. ``search.brute_force`` is the reference the
answers must equal (tests/test_index.py checks it on random data).
"""

from __future__ import annotations

import contextlib
import gc
import heapq
from bisect import bisect_left, bisect_right, insort
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from itertools import accumulate, islice
from operator import attrgetter, itemgetter
from typing import Any, Final

import msgspec

from .record import Session, scalar_text
from .search import FILTERABLE, Criterion, Query, compare_text

_KINDS: Final = {f.name: f.type for f in msgspec.structs.fields(Session)}
# Fields whose values are ints: indexed by the int itself (its text,
# scalar_text(int), is str(int)); bool fields by their text.
INT_FIELDS: Final = frozenset(f for f in FILTERABLE if _KINDS[f] is int)
# Re-indexed lazily: it moves with every heartbeat of an active session (``_Project.stale``).
ACTIVE_TIME: Final = "activeTime"
BOOL_FIELDS: Final = frozenset(f for f in FILTERABLE if _KINDS[f] is bool)

# Relative costs for the planner, in the time of one hash probe (~30 ns here):
# checking one candidate with Criterion.matches, and scanning one distinct
# value during a `contains`. Measured by loadtest.bench_search, rounded.
CHECK_COST: Final = 10
SCAN_COST: Final = 0.5
# One step of the walk along the timestamp order vs one matched session
# sorted: the walk is a C-level filter, sorting builds a key per session.
WALK_PER_SORT: Final = 16

# A bucket: the one session holding a value, or the set of them. Most values
# of high-cardinality fields (sessionID, userID, timestamps) are held by one
# session, and a lone str costs nothing beyond the dict entry.
Bucket = str | dict[str, None]
# Session ids a query matched: a bucket itself (read only), or a set made for the query.
Ids = set[str] | frozenset[str] | dict[str, None]
# What a field index is keyed by: an int field's int, any other field's text.
FieldValue = str | int
_EMPTY: Final[frozenset[str]] = frozenset()
_SEP: Final = "\x00"


def _text_key(value: str | None) -> str | None:
    if not value:
        return None
    low = compare_text(value)
    # Reuse the record's own string when lowering changes nothing.
    return value if low == value else low


def _keys_of(values: list[Any], key_of: Callable[[Any], FieldValue | None]) -> list[FieldValue | None]:
    """``key_of`` each of ``values``, computed once per distinct value (most fields hold few)."""
    distinct = {v: key_of(v) for v in set(values)}
    return [distinct[v] for v in values]


def field_key(session: Session, field: str) -> FieldValue | None:
    """What ``field`` of ``session`` is indexed under; None when a filter cannot match it."""
    value = getattr(session, field)
    if field in INT_FIELDS:
        return value  # type: ignore[no-any-return]
    if field in BOOL_FIELDS:
        return scalar_text(value)
    return _text_key(value)


def _int_of(text: str) -> int | None:
    """The int whose str() is exactly ``text``, if any."""
    try:
        number = int(text)
    except ValueError:
        return None
    return number if str(number) == text else None


class _Haystack:
    """The distinct values of a field joined into one string, for C-speed substring search."""

    __slots__ = ("keys", "starts", "text")

    def __init__(self, keys: list[FieldValue]) -> None:
        self.keys = keys
        texts = [k if isinstance(k, str) else str(k) for k in keys]
        self.text = _SEP.join(texts)
        self.starts = [0, *accumulate(len(t) + 1 for t in texts)]

    def containing(self, value: str) -> Iterator[FieldValue]:
        # A value without the separator never matches across two keys, so
        # each hit lies inside one key; skip to the next key after a hit.
        text, starts, keys = self.text, self.starts, self.keys
        pos = text.find(value)
        while pos != -1:
            i = bisect_right(starts, pos) - 1
            yield keys[i]
            pos = text.find(value, starts[i + 1])


class FieldIndex:
    """Sessions of one project by the text one field (or metadata key) holds."""

    __slots__ = ("_added", "_hay", "_stale", "buckets", "count", "numeric")

    def __init__(self, numeric: bool) -> None:
        self.numeric = numeric
        self.buckets: dict[FieldValue, Bucket] = {}
        self.count = 0  # sessions indexed (holding a non-empty value)
        self._hay: _Haystack | None = None
        # Keys created or dropped since the haystack was built.
        self._added: set[FieldValue] = set()
        self._stale = 0

    def add(self, key: FieldValue, sid: str) -> None:
        bucket = self.buckets.get(key)
        if bucket is None:
            self.buckets[key] = sid
            if self._hay is not None:
                self._added.add(key)
                self._check_hay()
        elif type(bucket) is str:
            self.buckets[key] = {bucket: None, sid: None}
        else:
            bucket[sid] = None  # type: ignore[index]
        self.count += 1

    def add_many(self, keys: list[FieldValue | None], sids: list[str]) -> None:
        """``add(key, sid)`` for each pair whose key is not None: grouped by key first, so a
        value many sessions hold grows its bucket once."""
        if None in keys:
            pairs = [(k, sid) for k, sid in zip(keys, sids, strict=True) if k is not None]
            keys, sids = [k for k, _ in pairs], [sid for _, sid in pairs]
        buckets = self.buckets
        distinct = set(keys)
        if len(distinct) == len(keys) and buckets.keys().isdisjoint(distinct):
            # Every value held by one session and new here (ids, timestamps): one bucket each.
            buckets.update(zip(keys, sids, strict=True))  # type: ignore[arg-type]
            self.count += len(keys)
            if self._hay is not None:
                self._added |= distinct  # type: ignore[arg-type]
                self._check_hay()
            return
        grouped: defaultdict[FieldValue, list[str]] = defaultdict(list)
        for key, sid in zip(keys, sids, strict=True):
            grouped[key].append(sid)  # type: ignore[index]
        for key, group in grouped.items():
            bucket = buckets.get(key)
            if bucket is None and len(group) == 1:
                self.add(key, group[0])
                continue
            if bucket is None:
                buckets[key] = dict.fromkeys(group)
                if self._hay is not None:
                    self._added.add(key)
                    self._check_hay()
            elif type(bucket) is str:
                buckets[key] = dict.fromkeys((bucket, *group))
            else:
                bucket.update(dict.fromkeys(group))  # type: ignore[union-attr]
            self.count += len(group)

    def discard(self, key: FieldValue, sid: str) -> None:
        bucket = self.buckets[key]
        if type(bucket) is str:
            del self.buckets[key]
            if self._hay is not None:
                self._stale += 1
                self._check_hay()
        else:
            del bucket[sid]  # type: ignore[union-attr]
            if len(bucket) == 1:
                self.buckets[key] = next(iter(bucket))
        self.count -= 1

    def _check_hay(self) -> None:
        # Too many changes since the build: drop it, the next `contains` rebuilds.
        if len(self._added) + self._stale > max(256, len(self._hay.keys) // 4):  # type: ignore[union-attr]
            self._hay = None
            self._added = set()
            self._stale = 0

    def lookup(self, text: str) -> Bucket | None:
        """The sessions whose text equals ``text`` (an `is` value)."""
        if self.numeric:
            number = _int_of(text)
            return None if number is None else self.buckets.get(number)
        return self.buckets.get(text)

    def scan_cost(self) -> float:
        return len(self.buckets) * SCAN_COST

    def containing(self, values: Iterable[str]) -> list[Bucket]:
        """Buckets of every distinct value containing one of ``values`` (a `contains`)."""
        buckets = self.buckets
        return [buckets[k] for k in self.keys_containing(values)]

    def keys_containing(self, values: Iterable[str]) -> set[FieldValue]:
        """Every distinct value (key) containing one of ``values``."""
        if self._hay is None:
            self._hay = _Haystack(list(self.buckets))
        found: set[FieldValue] = set()
        for value in values:
            if _SEP in value:
                found.update(k for k in self.buckets if value in _key_text(k))
                continue
            found.update(self._hay.containing(value))
            found.update(k for k in self._added if value in _key_text(k))
        # The haystack may still hold keys dropped since it was built.
        return {k for k in found if k in self.buckets}


def _key_text(key: FieldValue) -> str:
    return key if isinstance(key, str) else str(key)


def _size(buckets: Iterable[Bucket]) -> int:
    return sum(1 if type(b) is str else len(b) for b in buckets)


def _common(ids: Ids, bucket: dict[str, None]) -> AbstractSet[str]:
    """``ids`` ∩ ``bucket``, probing the larger from the smaller (dict views and sets
    intersect that way in C)."""
    return (ids.keys() if isinstance(ids, dict) else ids) & bucket.keys()


def _union(buckets: list[Bucket]) -> Ids:
    """The sessions of ``buckets``; may be a bucket itself, so read it only."""
    if len(buckets) == 1 and isinstance(first := buckets[0], dict):
        return first
    out: set[str] = set()
    for b in buckets:
        if type(b) is str:
            out.add(b)
        else:
            out.update(b)
    return out


def _restrict(cands: Ids, buckets: list[Bucket]) -> Ids:
    """``cands`` ∩ the union of ``buckets``, without building that union."""
    out: set[str] = set()
    for b in buckets:
        if type(b) is str:
            if b in cands:
                out.add(b)
        else:
            out |= _common(cands, b)  # type: ignore[arg-type]
    return out


class _Project:
    __slots__ = ("fields", "indexed", "meta", "meta_built", "order", "sessions", "stale")

    def __init__(self, indexed: bool = True) -> None:
        self.sessions: dict[str, Session] = {}
        # Unindexed (a lazy index's project): only ``sessions`` is kept until a query needs
        # more (``index_all`` builds the order); then each field's index, and the metadata
        # indexes, are built at their first use. An eager project has them all from the start.
        self.indexed = indexed
        self.fields = {f: FieldIndex(f in INT_FIELDS) for f in FILTERABLE} if indexed else {}
        self.meta: dict[str, FieldIndex] = {}
        self.meta_built = indexed
        # activeTime moves with every heartbeat of an active session but is
        # rarely searched: a touch notes the value its index still holds here
        # (sessionID -> indexed activeTime), and a query that reads activeTime
        # re-indexes those first (``settle``). A heartbeat costs a dict store.
        self.stale: dict[str, int] = {}
        # (timestamp, sessionID) ascending: the default sort without sorting.
        # A plain list: new sessions land near its end; a random insert at
        # 100k costs ~8 µs here vs ~1 µs in sortedcontainers (measured), too
        # little to add a dependency for.
        self.order: list[tuple[int, str]] = []

    def index_all(self) -> None:
        """Index the sessions held by timestamp (an unindexed project's first query); the
        fields' indexes follow at their first use (``field``, ``meta_indexes``)."""
        self.indexed = True
        with collector_paused():
            self.order = sorted((s.timestamp, sid) for sid, s in self.sessions.items())

    def unindex(self) -> None:
        """Keep the sessions only (their indexes are most of their memory)."""
        self.indexed = self.meta_built = False
        self.fields, self.meta, self.order, self.stale = {}, {}, [], {}

    def field(self, name: str) -> FieldIndex:
        """The index of field ``name``, built now from the sessions if it was not."""
        fi = self.fields.get(name)
        if fi is None:
            fi = self.fields[name] = FieldIndex(name in INT_FIELDS)
            batch = list(self.sessions.values())
            with collector_paused():
                self._index_field(name, fi, batch, [s.sessionID for s in batch])
        return fi

    def meta_indexes(self) -> dict[str, FieldIndex]:
        """Each metadata key's index, built now if they were not."""
        if not self.meta_built:
            self.meta_built = True
            batch = list(self.sessions.values())
            with collector_paused():
                self._index_meta(batch, [s.sessionID for s in batch])
        return self.meta

    def build_next(self) -> bool:
        """Build one index this project does not have yet; False when it has them all."""
        if not self.indexed:
            self.index_all()
            return True
        for name in FILTERABLE:
            if name not in self.fields:
                self.field(name)
                return True
        if not self.meta_built:
            self.meta_indexes()
            return True
        return False

    def add(self, s: Session) -> None:
        sid = s.sessionID
        self.sessions[sid] = s
        if not self.indexed:
            return
        for name, fi in self.fields.items():
            key = field_key(s, name)
            if key is not None:
                fi.add(key, sid)
        if self.meta_built:
            for mkey, value in s.metadata.items():
                self._meta_add(mkey, value, sid)
        insort(self.order, (s.timestamp, sid))

    def add_new(self, batch: list[Session]) -> None:
        """Index sessions none of which is indexed yet (a partition read whole): field by
        field over the batch, and the order sorted once instead of an insert each."""
        sids = [s.sessionID for s in batch]
        self.sessions.update(zip(sids, batch, strict=True))
        if not self.indexed:
            return
        for name, fi in self.fields.items():
            self._index_field(name, fi, batch, sids)
        if self.meta_built:
            self._index_meta(batch, sids)
        self.order += [(s.timestamp, sid) for s, sid in zip(batch, sids, strict=True)]
        self.order.sort()  # two sorted runs: timsort merges them in linear time

    @staticmethod
    def _index_field(name: str, fi: FieldIndex, batch: list[Session], sids: list[str]) -> None:
        values = [getattr(s, name) for s in batch]
        if name in INT_FIELDS:
            fi.add_many(values, sids)
        else:
            fi.add_many(_keys_of(values, scalar_text if name in BOOL_FIELDS else _text_key), sids)

    def _index_meta(self, batch: list[Session], sids: list[str]) -> None:
        by_key: defaultdict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        for s, sid in zip(batch, sids, strict=True):
            for mkey, value in s.metadata.items():
                values_of, sids_of = by_key[mkey]
                values_of.append(value)
                sids_of.append(sid)
        for mkey, (meta_values, meta_sids) in by_key.items():
            meta_keys = _keys_of(meta_values, _text_key)
            if any(k is not None for k in meta_keys):
                self._meta_of(mkey).add_many(meta_keys, meta_sids)

    def remove(self, s: Session) -> None:
        sid = s.sessionID
        del self.sessions[sid]
        if not self.indexed:
            return
        indexed = self.stale.pop(sid, None)
        for name, fi in self.fields.items():
            key = indexed if name == ACTIVE_TIME and indexed is not None else field_key(s, name)
            if key is not None:
                fi.discard(key, sid)
        if self.meta_built:
            for mkey, value in s.metadata.items():
                self._meta_discard(mkey, value, sid)
        self._order_discard(s.timestamp, sid)

    def _order_discard(self, timestamp: int, sid: str) -> None:
        item = (timestamp, sid)
        del self.order[bisect_left(self.order, item)]

    def _meta_of(self, mkey: str) -> FieldIndex:
        fi = self.meta.get(mkey)
        if fi is None:
            fi = self.meta[mkey] = FieldIndex(False)
        return fi

    def _meta_add(self, mkey: str, value: str, sid: str) -> None:
        key = _text_key(value)
        if key is not None:
            self._meta_of(mkey).add(key, sid)

    def _meta_discard(self, mkey: str, value: str, sid: str) -> None:
        key = _text_key(value)
        if key is not None:
            fi = self.meta[mkey]
            fi.discard(key, sid)
            if not fi.count:
                del self.meta[mkey]

    def set_field(self, s: Session, name: str, value: Any) -> None:
        if name == "metadata":
            if self.meta_built:
                self._set_metadata(s, value)
            else:
                s.metadata = value
            return
        if name == "timestamp" and self.indexed:
            self._order_discard(s.timestamp, s.sessionID)
            insort(self.order, (value, s.sessionID))
        fi = self.fields.get(name)
        if fi is None:
            setattr(s, name, value)
            return
        old = field_key(s, name)
        if name == ACTIVE_TIME:
            old = self.stale.pop(s.sessionID, old)
        setattr(s, name, value)
        new = field_key(s, name)
        if old != new:
            if old is not None:
                fi.discard(old, s.sessionID)
            if new is not None:
                fi.add(new, s.sessionID)

    def _set_metadata(self, s: Session, new: dict[str, str]) -> None:
        old = s.metadata
        s.metadata = new
        sid = s.sessionID
        for mkey, value in old.items():
            if new.get(mkey) != value:
                self._meta_discard(mkey, value, sid)
        for mkey, value in new.items():
            if old.get(mkey) != value:
                self._meta_add(mkey, value, sid)

    # -- search --------------------------------------------------------------

    def touch_active_time(self, s: Session, value: int) -> None:
        if ACTIVE_TIME in self.fields and s.sessionID not in self.stale:
            self.stale[s.sessionID] = s.activeTime
        s.activeTime = value

    def settle(self) -> None:
        """Bring the activeTime index up to date with the records (before a query reads it)."""
        stale, self.stale = self.stale, {}
        fi, sessions = self.fields.get(ACTIVE_TIME), self.sessions
        if fi is None:
            return  # not built yet: it will be from the records as they are
        for sid, indexed in stale.items():
            value = sessions[sid].activeTime
            if value != indexed:
                fi.discard(indexed, sid)
                fi.add(value, sid)

    def reads_active_time(self, criteria: tuple[Criterion, ...], sort: str | None = None) -> None:
        if self.stale and (sort == ACTIVE_TIME or any(c.field == ACTIVE_TIME for c in criteria)):
            self.settle()

    def index_of(self, field: str, key: str | None) -> FieldIndex | None:
        """The index of ``field``, or of metadata ``key`` (None when no session holds it)."""
        return self.meta_indexes().get(key) if key is not None else self.field(field)

    def match(self, criteria: tuple[Criterion, ...]) -> Ids | None:
        """The matching session ids; None means every session of the project."""
        n = len(self.sessions)
        exact: list[tuple[int, Criterion, list[Bucket] | None, FieldIndex]] = []
        contains: list[tuple[Criterion, FieldIndex]] = []
        for c in criteria:
            fi = self.index_of(c.field, c.key)
            if fi is None or not fi.count:
                return _EMPTY
            if not c.values:
                # "set to a non-empty value": free when every session has it.
                if fi.count < n:
                    exact.append((fi.count, c, None, fi))
            elif c.op == "is":
                buckets = [b for v in c.values if (b := fi.lookup(v)) is not None]
                if not buckets:
                    return _EMPTY
                exact.append((_size(buckets), c, buckets, fi))
            else:
                contains.append((c, fi))
        exact.sort(key=itemgetter(0))
        cands: Ids | None = None
        for size, c, exact_buckets, fi in exact:
            buckets = exact_buckets if exact_buckets is not None else list(fi.buckets.values())
            if cands is None:
                cands = _union(buckets)
            else:
                # Intersecting costs a probe per bucket and per smaller side.
                cost = len(buckets) + min(len(cands) * len(buckets), size)
                check = len(cands) * CHECK_COST < cost
                cands = self._check(cands, c) if check else _restrict(cands, buckets)
            if not cands:
                return _EMPTY
        for c, fi in contains:
            if cands is not None and len(cands) * CHECK_COST < fi.scan_cost():
                cands = self._check(cands, c)
            else:
                found = fi.containing(c.values)
                cands = _union(found) if cands is None else _restrict(cands, found)
            if not cands:
                return _EMPTY
        return cands

    def _check(self, cands: Iterable[str], c: Criterion) -> set[str]:
        sessions = self.sessions
        return {sid for sid in cands if c.matches(sessions[sid])}

    def page(self, matched: Ids | None, q: Query) -> list[Session]:
        ids = self._timestamp_page(matched, q) if q.sort == "timestamp" else self._sorted_page(matched, q)
        sessions = self.sessions
        return [sessions[sid] for sid in ids]

    def _timestamp_page(self, matched: Ids | None, q: Query) -> list[str]:
        order, n = self.order, len(self.order)
        start, stop = q.offset, q.offset + q.limit
        if matched is None:
            if q.descending:
                chunk = order[max(0, n - stop) : max(0, n - start)]
                chunk.reverse()
            else:
                chunk = order[start:stop]
            return [sid for _, sid in chunk]
        m = len(matched)
        if start >= m:
            return []
        # Walk the order when the matches are dense enough to reach `stop`
        # of them within the steps sorting them would cost; else sort them.
        budget = WALK_PER_SORT * m
        if stop * n <= budget * m:
            region = order if budget >= n else order[n - budget :] if q.descending else order[:budget]
            ids = map(itemgetter(1), reversed(region) if q.descending else region)
            found = list(islice(filter(matched.__contains__, ids), start, stop))
            if len(found) == min(stop, m) - start or region is order:
                return found
        sessions = self.sessions
        keys = [(sessions[sid].timestamp, sid) for sid in matched]
        return [sid for _, sid in _top(keys, stop, q.descending)[start:stop]]

    def _sorted_page(self, matched: Ids | None, q: Query) -> list[str]:
        field, desc, stop = q.sort, q.descending, q.offset + q.limit
        if field in INT_FIELDS:
            if matched is None:
                return self._int_order_page(field, q)
            found = self._int_matched_page(field, matched, q)
            if found is not None:
                return found
        sessions = self.sessions
        chosen = sessions.values() if matched is None else map(sessions.__getitem__, matched)
        # Same order as search.sort_key: (value, sessionID), unset values last
        # either way. The (value, sessionID) pairs are built at C speed.
        keys: list[tuple[Any, str]] = list(map(attrgetter(field, "sessionID"), chosen))
        unset: list[str] = []
        if None in map(itemgetter(0), keys):
            unset = [sid for value, sid in keys if value is None]
            keys = [k for k in keys if k[0] is not None]
        ids = [k[1] for k in _top(keys, stop, desc)[:stop]]
        if len(ids) < stop:
            ids += _top(unset, stop - len(ids), desc)
        return ids[q.offset : stop]

    def _int_order_page(self, field: str, q: Query) -> list[str]:
        # Every session holds an int here, so the field's index has a key per
        # session. Any `stop` keys bound the answer: at least `stop` sessions
        # lie at or beyond the weakest of them. The keys inserted last (first)
        # make a tight bound for clock-driven fields like lastActiveAt, and one
        # pass then leaves few keys to order.
        buckets, desc, stop = self.field(field).buckets, q.descending, q.offset + q.limit
        seed: list[Any] = list(islice(reversed(buckets) if desc else iter(buckets), stop))
        bound: Any = min(seed) if desc else max(seed)
        keys = _at_or_beyond(buckets, bound, desc)
        ids: list[str] = []
        for value in _top(keys, stop, desc):
            bucket = buckets[value]
            ids += [bucket] if type(bucket) is str else sorted(bucket, reverse=desc)
            if len(ids) >= stop:
                break
        return ids[q.offset : stop]

    def _int_matched_page(self, field: str, matched: Ids, q: Query) -> list[str] | None:
        """A page of ``matched`` by an int field, from the field's index; None when
        the matches are too sparse for it (sorting them is then cheaper).

        Walking the keys from the last (first) inserted finds ``stop`` matches
        soon when they are dense, and their weakest value bounds the answer:
        at least ``stop`` matches lie at or beyond it. One pass keeps
        the keys within the bound; only those are ordered and read.
        """
        buckets, desc, stop = self.field(field).buckets, q.descending, q.offset + q.limit
        seen, weakest = 0, None
        value: Any
        for value in islice(reversed(buckets) if desc else iter(buckets), len(matched)):
            bucket = buckets[value]
            hits = (bucket in matched) if type(bucket) is str else len(_common(matched, bucket))  # type: ignore[arg-type]
            if hits:
                seen += hits
                if weakest is None or (value < weakest if desc else value > weakest):
                    weakest = value
                if seen >= stop:
                    break
        if seen < stop or weakest is None:
            return None
        bound: Any = weakest
        keys = _at_or_beyond(buckets, bound, desc)
        ids: list[str] = []
        for value in _top(keys, len(keys), desc):
            bucket = buckets[value]
            if type(bucket) is str:
                if bucket in matched:
                    ids.append(bucket)
            else:
                ids += sorted(_common(matched, bucket), reverse=desc)  # type: ignore[arg-type]
            if len(ids) >= stop:
                break
        return ids[q.offset : stop]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """For work that creates a few objects per session at once, none of them garbage (a
    partition read whole, a project's indexes built): the cyclic collector would walk the
    whole heap several times meanwhile (a third of the time at 100k sessions, measured)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _top(keys: list[Any], count: int, descending: bool) -> list[Any]:
    """``keys`` in order, or at least their first ``count``; keys are unique."""
    size = max(32 * count, 2048)
    if 2 * size < len(keys):
        # The count-th best of a sample bounds the answer: at least `count`
        # keys are that good. One pass then leaves few keys to sort.
        sample = sorted(keys[:size], reverse=descending)
        keys = _at_or_beyond(keys, sample[count - 1], descending)
    keys.sort(reverse=descending)
    return keys


def _at_or_beyond(keys: Iterable[Any], bound: Any, descending: bool) -> list[Any]:
    """The keys at or beyond ``bound`` in the sort's direction, in their order.

    A comprehension's inline comparison: 1.5-1.8x faster than ``filter(bound.__le__, …)``,
    which calls a method wrapper per key (40,000 ints: 0.83 against 1.5 ms)."""
    if descending:
        return [k for k in keys if k >= bound]
    return [k for k in keys if k <= bound]


class LiveIndex:
    """Live sessions of every project, with inverted indexes per project.

    ``lazy`` (a cluster node): a project's indexes are built at its first query, and
    dropped by ``unindex`` when the node stops serving it; until then only its sessions
    are kept (a node holds its own trackers' sessions of projects other nodes serve)."""

    def __init__(self, lazy: bool = False) -> None:
        self.lazy = lazy
        self._projects: dict[str, _Project] = {}

    def __len__(self) -> int:
        return sum(len(p.sessions) for p in self._projects.values())

    def count(self, project_key: str) -> int:
        project = self._projects.get(project_key)
        return len(project.sessions) if project is not None else 0

    def get(self, project_key: str, session_id: str) -> Session | None:
        project = self._projects.get(project_key)
        return project.sessions.get(session_id) if project is not None else None

    def sessions(self, project_key: str) -> Iterator[Session]:
        project = self._projects.get(project_key)
        return iter(list(project.sessions.values()) if project is not None else [])

    def projects(self) -> list[str]:
        return list(self._projects)

    def _ready(self, project_key: str) -> _Project | None:
        """The project, indexed (built now if it was not)."""
        project = self._projects.get(project_key)
        if project is not None and not project.indexed:
            project.index_all()
        return project

    def _project(self, project_key: str) -> _Project:
        project = self._projects.get(project_key)
        if project is None:
            project = self._projects[project_key] = _Project(indexed=not self.lazy)
        return project

    def unindex(self, project_key: str) -> None:
        """Drop a project's indexes, keeping its sessions (a lazy index only: the next
        query builds them again)."""
        project = self._projects.get(project_key)
        if self.lazy and project is not None:
            project.unindex()

    def build_next(self, project_key: str) -> bool:
        """Build one more of a lazy project's indexes (its order, a field's, or the metadata
        ones), so that a project served for long has them before a query waits for one;
        False once it has them all."""
        project = self._projects.get(project_key)
        return project is not None and project.build_next()

    def indexed(self, project_key: str) -> bool:
        project = self._projects.get(project_key)
        return project is not None and project.indexed

    def _indexed(self, session: Session) -> _Project | None:
        project = self._projects.get(session.projectKey)
        if project is not None and project.sessions.get(session.sessionID) is session:
            return project
        return None

    def add_new(self, sessions: list[Session]) -> None:
        """Index many sessions, none of them indexed yet: as ``add`` each, faster."""
        by_project: dict[str, list[Session]] = {}
        for session in sessions:
            by_project.setdefault(session.projectKey, []).append(session)
        for project_key, batch in by_project.items():
            self._project(project_key).add_new(batch)

    def add(self, session: Session) -> None:
        """Index ``session``; one already live under its sessionID is replaced."""
        project = self._project(session.projectKey)
        old = project.sessions.get(session.sessionID)
        if old is not None:
            project.remove(old)
        project.add(session)

    def remove(self, session: Session) -> None:
        project = self._indexed(session)
        if project is not None:
            project.remove(session)
            if not project.sessions:
                del self._projects[session.projectKey]

    def apply(self, session: Session, changes: dict[str, Any]) -> None:
        """Set changed fields of a session, re-indexing only those fields."""
        project = self._indexed(session)
        if project is None:
            for name, value in changes.items():
                setattr(session, name, value)
            return
        if "sessionID" in changes or "projectKey" in changes:
            raise ValueError("sessionID and projectKey identify an indexed session: remove and add it")
        for name, value in changes.items():
            project.set_field(session, name, value)

    def touch(self, session: Session, now: int, active_time: int | None = None) -> None:
        """Refresh lastActiveAt, and activeTime when given: no other field is re-indexed."""
        project = self._indexed(session)
        if project is None:
            session.lastActiveAt = now
            if active_time is not None:
                session.activeTime = active_time
            return
        fi = project.fields.get("lastActiveAt")
        if fi is None:
            session.lastActiveAt = now
        else:
            sid = session.sessionID
            fi.discard(session.lastActiveAt, sid)
            session.lastActiveAt = now
            fi.add(now, sid)
        if active_time is not None and active_time != session.activeTime:
            project.touch_active_time(session, active_time)

    def metadata_keys(self, project_key: str) -> list[str]:
        """The metadata keys some live session of the project holds."""
        project = self._ready(project_key)
        if project is None:
            return []
        return list(project.meta_indexes())

    def values(
        self, project_key: str, field: str, key: str | None, text: str, limit: int
    ) -> list[tuple[str, int]]:
        """Autocomplete: ``(value, sessions holding it)`` of the distinct values of ``field``
        (of metadata ``key`` when given) whose text contains ``text`` (lower-cased, as
        ``search.compare_text`` gives it), most held first, then by text; at most ``limit``.

        A lookup over the field's index: its distinct values are scanned (the
        haystack a `contains` filter uses), never its sessions. The index keeps
        values lower-cased; each is answered as one of the sessions holding it
        spells it (an int as its digits).
        """
        project = self._ready(project_key)
        if project is None:
            return []
        fi = project.index_of(field, key)
        if field == ACTIVE_TIME and key is None:
            project.settle()
        if fi is None:
            return []
        buckets = fi.buckets
        keys: Iterable[FieldValue] = fi.keys_containing((text,)) if text else buckets
        sizes = ((1 if type(b := buckets[k]) is str else len(b), k) for k in keys)
        top = heapq.nsmallest(limit, sizes, key=lambda item: (-item[0], _key_text(item[1])))
        sessions = project.sessions
        answer: list[tuple[str, int]] = []
        for size, k in top:
            if isinstance(k, int) or field in BOOL_FIELDS:
                answer.append((_key_text(k), size))
                continue
            bucket = buckets[k]
            holder = sessions[bucket if type(bucket) is str else next(iter(bucket))]
            shown = holder.metadata[key] if key is not None else getattr(holder, field)
            answer.append((shown, size))
        return answer

    def search(self, project_key: str, query: Query) -> tuple[int, list[Session]]:
        """``(total before paging, the page)`` of a project's matching sessions."""
        project = self._ready(project_key)
        if project is None:
            return 0, []
        project.reads_active_time(query.criteria, query.sort)
        matched = project.match(query.criteria)
        total = len(project.sessions) if matched is None else len(matched)
        if query.offset >= total:
            # Past the last page, whatever its number (2^64 too): the pagers
            # below then only see offsets within the project's size.
            return total, []
        return total, project.page(matched, query)

    def matching(self, project_key: str, criteria: tuple[Criterion, ...]) -> list[Session]:
        """Every session of a project matching all ``criteria``, in no order."""
        project = self._ready(project_key)
        if project is None:
            return []
        project.reads_active_time(criteria)
        matched = project.match(criteria)
        if matched is None:
            return list(project.sessions.values())
        return [project.sessions[sid] for sid in matched]
