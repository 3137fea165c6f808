"""The partition rules of the cluster (hub/partitions.py): names, owners, what a batch means."""

from __future__ import annotations

import zlib
from collections import Counter

from hub.partitions import (
    Partitioner,
    Verdict,
    channel,
    holders_key,
    owner,
    owners,
    parse_seq,
    partition_of_channel,
    project_of,
    records_key,
    seq_key,
    seq_value,
    snapshot_needed,
    verdict,
    where_key,
)
from hub.wire import BatchKind


def _slot_tag(key: str) -> str:
    return key[key.index("{") + 1 : key.index("}")]


def test_every_key_and_the_channel_of_a_partition_share_its_hash_tag() -> None:
    keys = [records_key("shop", "n1"), seq_key("shop", "n1"), holders_key("shop"), channel("shop")]
    keys.append(where_key("shop"))
    assert {_slot_tag(k) for k in keys} == {"p:shop"}
    assert _slot_tag(records_key("blog", "n1")) != _slot_tag(records_key("shop", "n1"))
    assert partition_of_channel(channel("my.shop-1")) == "my.shop-1"
    assert partition_of_channel("{hub}:ctl") is None


def test_a_seq_value_reads_back_and_anything_else_is_none() -> None:
    assert parse_seq(seq_value("e1", 7, 5).encode()) == ("e1", 7, 5)
    for bad in (None, b"", b"7", b"e1:x:1", b":1:1", b"e:1:2:3"):
        assert parse_seq(bad) is None


def test_the_next_batch_applies_older_ones_skip_gaps_sync() -> None:
    ops = BatchKind.OPS
    assert verdict(None, 1, ops, 0) == Verdict.SYNC
    assert verdict(4, 5, ops, 0) == Verdict.APPLY
    assert verdict(4, 4, ops, 0) == Verdict.SKIP
    assert verdict(4, 3, ops, 0) == Verdict.SKIP
    assert verdict(4, 6, ops, 0) == Verdict.SYNC


def test_a_reload_applies_without_a_read_only_over_what_it_carries() -> None:
    reload = BatchKind.RELOAD
    # The sender's last batch Redis took was 4 (base): a mirror holding 4 lacks nothing else.
    assert verdict(4, 6, reload, 4) == Verdict.APPLY
    assert verdict(5, 6, reload, 4) == Verdict.APPLY
    assert verdict(3, 6, reload, 4) == Verdict.SYNC
    assert verdict(6, 6, reload, 4) == Verdict.SKIP


def test_a_snapshot_is_read_only_when_it_differs_from_what_is_held() -> None:
    assert snapshot_needed(None, 3, 3)
    assert snapshot_needed(2, 3, 3)
    assert not snapshot_needed(3, 3, 3)
    # A rewrite (after Redis restarted empty) that changed nothing since batch 2.
    assert not snapshot_needed(2, 3, 2)
    assert snapshot_needed(1, 3, 2)


def test_owners_spread_and_move_only_what_a_joining_node_wins() -> None:
    parts = [f"project-{i}" for i in range(1000)]
    four = [f"n{i}" for i in range(4)]
    before = {p: owner(p, four) for p in parts}
    counts = {n: sum(1 for o in before.values() if o == n) for n in four}
    assert all(180 <= c <= 320 for c in counts.values()), counts
    after = {p: owner(p, [*four, "n4"]) for p in parts}
    moved = [p for p in parts if before[p] != after[p]]
    assert all(after[p] == "n4" for p in moved)
    assert 120 <= len(moved) <= 280
    assert owner("x", []) is None
    # The same answer in every process (not Python's salted hash).
    assert owner("shop", ["a", "b", "c"]) == owner("shop", ["c", "b", "a"])


def test_a_partition_has_an_owner_and_a_backup_and_losing_the_owner_promotes_the_backup() -> None:
    nodes = [f"n{i}" for i in range(5)]
    for p in (f"project-{i}" for i in range(50)):
        first, backup = owners(p, nodes)
        assert first == owner(p, nodes) and backup != first
        assert owners(p, [n for n in nodes if n != first])[0] == backup
    assert owners("x", ["solo"]) == ["solo"]


def test_a_project_with_buckets_splits_its_sessions_by_session_id_the_same_everywhere() -> None:
    parts = Partitioner({"big": 4, "small": 1})
    assert parts.of(("small", "s1")) == "small" and parts.of_project("small") == ["small"]
    assert parts.of(("other", "s1")) == "other"
    assert parts.of_project("big") == ["big#0", "big#1", "big#2", "big#3"]
    spread = Counter(parts.of(("big", f"session-{i}")) for i in range(4000))
    assert set(spread) == set(parts.of_project("big")) and min(spread.values()) > 800
    # Stable across processes (not Python's salted hash), and each bucket its own hash tag.
    assert parts.of(("big", "abc")) == f"big#{zlib.crc32(b'abc') % 4}"
    assert len({_slot_tag(records_key(p, "n1")) for p in parts.of_project("big")}) == 4
    assert project_of("big#3") == "big" and project_of("small") == "small"
