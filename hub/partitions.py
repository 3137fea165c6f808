"""Partitions of the cluster's shared state: names, owners, and what a batch means to a mirror.

The live sessions of one project are one partition; a project given buckets
(``--project-buckets``) is split by ``crc32(sessionID) % buckets`` into
partitions ``<project>#<bucket>``. Every Redis key and the channel of a
partition carry its own hash tag ``{p:<partition>}``, so a Redis
Cluster spreads partitions over its masters by slot while one partition's
keys stay in one slot (its writes are atomic there). Node-level keys stay
small, under the ``{hub}`` tag. README, "Cluster", tells the whole layout:

- ``{p:X}:s:<node>`` — the node's records of X (field ``sessionID``), the
  ``lastActiveAt`` of heartbeats since (field ``@sessionID``) and when the record's
  fields changed since the session started (field ``~sessionID``, where any did);
- ``{p:X}:seq:<node>`` — ``<epoch>:<seq>``: the node's last batch of X those reflect;
- ``{p:X}:nodes`` — the nodes whose hash of X is not empty (what a reader reads);
- ``{p:X}:where`` — sessionID → the node that last wrote its record (a start on a
  node that does not mirror X looks its session up there);
- ``{p:X}:ch`` — the channel of X's batches (sharded pub/sub on a Redis Cluster);
- ``{hub}:nodes`` (node → epoch), ``{hub}:lease:<node>``, ``{hub}:parts:<node>``
  (the partitions the node has keys in), ``{hub}:ctl``, the control channel, and
  ``{hub}:in:<node>``, the node's inbox (sessions a peer ended that it holds a part of).

No I/O here: ``cluster.py`` does the talking.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Mapping
from enum import IntEnum
from typing import Final

from .wire import BatchKind

# Between a project key and its bucket in a partition's name (not a project key character).
BUCKET: Final = "#"
NODES_KEY: Final = "{hub}:nodes"
CONTROL_CHANNEL: Final = "{hub}:ctl"
# In a partition's hash, "@sessionID" holds a heartbeat's lastActiveAt beside the
# record ("sessionID"): a heartbeat never rewrites the record.
TOUCHED: Final = "@"
# And "~sessionID" when its fields changed since the session started (``registry.Stamps``).
STAMPED: Final = "~"


class Partitioner:
    """Which partition a session is in: its project's, or one of its project's buckets."""

    __slots__ = ("buckets",)

    def __init__(self, buckets: Mapping[str, int] | None = None) -> None:
        # Project -> its bucket count (every node must agree: a setting, not a guess).
        self.buckets = {k: n for k, n in (buckets or {}).items() if n > 1}

    def of(self, key: tuple[str, str]) -> str:
        """The partition of session ``key`` = (projectKey, sessionID)."""
        count = self.buckets.get(key[0])
        if count is None:
            return key[0]
        return f"{key[0]}{BUCKET}{zlib.crc32(key[1].encode()) % count}"

    def of_project(self, project_key: str) -> list[str]:
        """Every partition of a project."""
        count = self.buckets.get(project_key)
        if count is None:
            return [project_key]
        return [f"{project_key}{BUCKET}{b}" for b in range(count)]


def project_of(partition: str) -> str:
    return partition.partition(BUCKET)[0]


def _tag(partition: str) -> str:
    return f"{{p:{partition}}}"


def records_key(partition: str, node: str) -> str:
    return f"{_tag(partition)}:s:{node}"


def seq_key(partition: str, node: str) -> str:
    return f"{_tag(partition)}:seq:{node}"


def holders_key(partition: str) -> str:
    return f"{_tag(partition)}:nodes"


def where_key(partition: str) -> str:
    return f"{_tag(partition)}:where"


def channel(partition: str) -> str:
    return f"{_tag(partition)}:ch"


def partition_of_channel(name: str) -> str | None:
    """The partition whose channel is ``name``; None for another channel."""
    if name.startswith("{p:") and name.endswith("}:ch"):
        return name[3:-4]
    return None


def inbox(node: str) -> str:
    """The channel of a node's notices: sessions a peer ended that the node holds a part of."""
    return f"{{hub}}:in:{node}"


def lease_key(node: str) -> str:
    return f"{{hub}}:lease:{node}"


def parts_key(node: str) -> str:
    return f"{{hub}}:parts:{node}"


def seq_value(epoch: str, seq: int, base: int) -> str:
    """What ``seq_key`` holds: the snapshot reflects the node's batches up to ``seq``, and
    differs from what it published up to ``base`` in nothing (``base < seq``: a rewrite
    that changed nothing, e.g. after Redis restarted empty)."""
    return f"{epoch}:{seq}:{base}"


def parse_seq(value: bytes | None) -> tuple[str, int, int] | None:
    """(epoch, seq, base) of a ``seq_key``'s value; None when absent or not written by a hub."""
    if value is None:
        return None
    parts = value.decode(errors="replace").split(":")
    if len(parts) != 3 or not (parts[0] and parts[1].isdigit() and parts[2].isdigit()):
        return None
    epoch, seq, base = parts
    return epoch, int(seq), int(base)


def snapshot_needed(held: int | None, seq: int, base: int) -> bool:
    """Whether a mirror holding the node's batches up to ``held`` must read a snapshot
    ``(seq, base)`` of the same process: it is newer and differs from what it holds."""
    return held is None or (seq > held and base > held)


def owners(partition: str, nodes: Iterable[str], count: int = 2) -> list[str]:
    """The nodes that answer for ``partition`` among ``nodes``, first the owner, then its
    backup (rendezvous hashing: a node joining or leaving moves only the partitions it wins
    or held). Both mirror the partition, so a dead owner's ends are still seen."""
    scored = sorted(
        ((hashlib.blake2b(f"{partition}\0{node}".encode(), digest_size=8).digest(), node) for node in nodes),
        reverse=True,
    )
    return [node for _, node in scored[:count]]


def owner(partition: str, nodes: Iterable[str]) -> str | None:
    found = owners(partition, nodes, 1)
    return found[0] if found else None


class Verdict(IntEnum):
    APPLY = 0  # the next batch (or a RELOAD carrying everything since what is held)
    SKIP = 1  # already in what is held (a snapshot read after it was written)
    SYNC = 2  # a gap or nothing held: read the sender's snapshot of the partition


def verdict(held: int | None, seq: int, kind: BatchKind, base: int) -> Verdict:
    """What a mirror holding ``held`` (the sender's last batch of the partition it applied,
    None for nothing) does with the sender's batch ``seq``."""
    if held is None:
        return Verdict.SYNC
    if seq == held + 1 or (kind == BatchKind.RELOAD and base <= held < seq):
        return Verdict.APPLY
    if seq <= held:
        return Verdict.SKIP
    return Verdict.SYNC
