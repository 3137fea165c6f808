"""Cluster mode: nodes share their live sessions through Redis, partitioned by project.

Each node publishes what changes in the sessions it holds and applies what
the other nodes publish (``Registry.remote_*``) for the partitions it
mirrors, so a node answers searches and agent subscriptions of those with
the whole picture (CONTRACT §5). The registry tells it only about this
node's own changes (``Replication``). Key and channel names, owners and the
batch rules are ``partitions.py``.

Writes: each ``--publish-window`` the node groups its pending changes by
partition; per partition one call of the ``hub_batch`` Redis Function writes
the records (a heartbeat only a ``@sessionID`` field: its lastActiveAt), the
sequence number and publishes the batch, atomically in the partition's slot;
all partitions' calls go in one pipeline (a Redis Cluster pipeline sends each
to its slot's master), with the node's lease every lease/4. Heartbeats alone
wait up to ``--touch-window`` (one batch then carries many of them). Channels are sharded
pub/sub on a Redis Cluster (one connection per master), plain pub/sub on
one Redis.

Bootstrap of a partition without a lost change: subscribe first, keep
reading into a bounded buffer (Redis drops a subscriber that lags), read the
holders' sequence numbers, then (seq, records) only of holders whose seq
moved past what this node holds, all pipelined; buffered batches at or below
that seq are in the snapshot, later ones apply. A batch whose seq is not the
next one (a gap) or a new epoch makes the mirror re-read that holder's part
of that partition alone. A node whose lease key is gone is dead: its
sessions end with reason ``node_lost``; one back under the same id has a new
epoch, so its old sessions are dropped, not resurrected. While Redis is
unreachable nothing is dropped: the node serves its own trackers and the
last known state, retries with backoff and jitter, then rewrites its
partitions and publishes a RELOAD per partition carrying its changes since
its last acknowledged batch there, which mirrors that missed nothing apply
without a read. After Redis restarts empty, peers' missing leases are not
believed until they have had time to come back (lease + the longest backoff).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import anyio
import msgspec
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from msgspec import Raw, Struct
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from .clock import now_ms
from .config import Settings
from .index import collector_paused
from .partitions import (
    CONTROL_CHANNEL,
    NODES_KEY,
    STAMPED,
    TOUCHED,
    Partitioner,
    Verdict,
    channel,
    holders_key,
    inbox,
    lease_key,
    owners,
    parse_seq,
    partition_of_channel,
    parts_key,
    project_of,
    records_key,
    seq_key,
    seq_value,
    snapshot_needed,
    verdict,
    where_key,
)
from .record import Session, active_time
from .registry import NO_STAMPS, Registry, SessionKey, Stamps
from .replication import AddMetric
from .wire import BatchKind, EndReason

log = logging.getLogger("hub.cluster")

# What a session waits to publish: a lastActiveAt refresh, its record, or its end (the reason).
TOUCH: Final = 0
RECORD: Final = 1

# Each batch's heartbeats wait a window drawn from [1 - TOUCH_JITTER, 1] x --touch-window:
# nodes (and --workers) started together would otherwise publish, and load every mirror,
# in step for as long as they run.
TOUCH_JITTER: Final = 0.25
BACKOFF_MIN: Final = 0.1
BACKOFF_MAX: Final = 2.0
TOUCHED_B: Final = TOUCHED.encode()
STAMPED_B: Final = STAMPED.encode()
# Messages read from the subscriptions and not applied yet (while a partition is
# read); past it they are dropped and the mirrored partitions re-read where they moved.
BUFFER_BATCHES: Final = 100_000
# While Redis stays unreachable, one log line per interval (with the count), not one per retry.
LOG_EVERY_S: Final = 30.0

# One partition's batch, atomically in its slot. KEYS: records, seq, holders, channel, where.
# ARGV: node, "epoch:seq:base", PUBLISH or SPUBLISH, the message, mode (0 changes, 1 rewrite,
# 2 goodbye: the node's keys of the partition go), n, e, n (field, value) pairs, e sessionIDs
# ended (by ``end``), fields to delete. Returns (sessionID, node) pairs, flat: the other nodes
# holding a record of an ended session, to be told (``Cluster._tell_ended``).
# ``where`` maps each sessionID to the node that last wrote its record (a start elsewhere
# finds it in one read: ``Cluster._adopt``); a node's entries go with its records.
# The library and its functions carry a version: a node of a newer release loading its own
# (FUNCTION LOAD REPLACE) never replaces what the running nodes of the older one call.
LIBRARY_VERSION: Final = 3
BATCH: Final = f"hub_batch_v{LIBRARY_VERSION}"
FORGET: Final = f"hub_forget_v{LIBRARY_VERSION}"
LIBRARY: Final = f"""#!lua name=hub_v{LIBRARY_VERSION}
-- A record's field is its sessionID; '@' (64) and '~' (126) prefix its heartbeats and stamps.
local function is_record(f)
  local b = string.byte(f, 1)
  return b ~= 64 and b ~= 126
end
local function unplace(records, where, node)
  for _, f in ipairs(redis.call('HKEYS', records)) do
    if is_record(f) and redis.call('HGET', where, f) == node then
      redis.call('HDEL', where, f)
    end
  end
end
local function batch(keys, args)
  local records, seq, holders, channel, where = keys[1], keys[2], keys[3], keys[4], keys[5]
  local node, mode = args[1], args[5]
  if mode ~= '0' then
    unplace(records, where, node)
    redis.call('UNLINK', records)
  end
  local i, n, e = 8, tonumber(args[6]), tonumber(args[7])
  local stop = i + 2 * n
  while n > 0 do
    local m = math.min(n, 256)
    redis.call('HSET', records, unpack(args, i, i + 2 * m - 1))
    i, n = i + 2 * m, n - m
  end
  for k = 8, stop - 1, 2 do
    if is_record(args[k]) then redis.call('HSET', where, args[k], node) end
  end
  -- Peers' records of the partition share its hash tag (and slot) with this node's.
  local told = {{}}
  if e > 0 then
    local prefix = string.sub(records, 1, #records - #node)
    local others = redis.call('SMEMBERS', holders)
    for k = stop, stop + e - 1 do
      for _, other in ipairs(others) do
        if other ~= node and redis.call('HEXISTS', prefix .. other, args[k]) == 1 then
          told[#told + 1] = args[k]
          told[#told + 1] = other
        end
      end
    end
  end
  i = stop + e
  while i <= #args do
    local j = math.min(i + 511, #args)
    redis.call('HDEL', records, unpack(args, i, j))
    i = j + 1
  end
  for k = stop + e, #args do
    if is_record(args[k]) and redis.call('HGET', where, args[k]) == node then
      redis.call('HDEL', where, args[k])
    end
  end
  if mode == '2' then
    redis.call('UNLINK', seq)
  else
    redis.call('SET', seq, args[2])
  end
  if redis.call('EXISTS', records) == 1 then
    redis.call('SADD', holders, node)
  else
    redis.call('SREM', holders, node)
  end
  redis.call(args[3], channel, args[4])
  return told
end
local function forget(keys, args)
  unplace(keys[1], keys[4], args[1])
  redis.call('UNLINK', keys[1], keys[2])
  redis.call('SREM', keys[3], args[1])
  return 1
end
redis.register_function('{BATCH}', batch)
redis.register_function('{FORGET}', forget)
"""
MODE_CHANGES: Final = "0"
MODE_REWRITE: Final = "1"
MODE_GOODBYE: Final = "2"


class LeaseLost(RedisError):
    """This node's lease ran out while it ran: it must write its records again."""


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


# (sessionID, lastActiveAt) refreshes; (sessionID, reason) removals, reason None:
# the sender let the session go to other nodes.
Touches = list[tuple[str, int]]
Gone = list[tuple[str, EndReason | None]]


class _BatchOut(Struct, array_like=True):
    node: str
    epoch: str
    partition: str
    seq: int
    kind: BatchKind
    up: list[Raw]
    touch: Touches
    gone: Gone
    # RELOAD: the sender's last batch of the partition known to have reached Redis. A
    # mirror holding at least that one lacks nothing the RELOAD does not carry.
    base: int = 0
    # sessionID -> when fields of its record in ``up`` changed (where any did).
    stamps: dict[str, Stamps] = {}


class Batch(Struct, array_like=True):
    node: str
    epoch: str
    partition: str
    seq: int
    kind: BatchKind
    up: list[Session]
    touch: Touches
    gone: Gone
    base: int = 0
    stamps: dict[str, dict[str, int]] = {}


class Ended(Struct, array_like=True):
    """On a node's inbox ``{hub}:in:<node>``: sessions (partition, sessionID) the sender
    ended (by ``end``) that the node holds a part of."""

    node: str
    epoch: str
    sessions: list[tuple[str, str]]


class Control(Struct, array_like=True):
    """On ``{hub}:ctl``: HOLDS (the sender now has keys in ``partitions``) or BYE (it drains)."""

    node: str
    epoch: str
    kind: BatchKind
    partitions: list[str]


_encode: Final = msgspec.msgpack.Encoder().encode
_decode_batch: Final = msgspec.msgpack.Decoder(Batch).decode
_decode_control: Final = msgspec.msgpack.Decoder(Control).decode
_decode_ended: Final = msgspec.msgpack.Decoder(Ended).decode
_decode_session: Final = msgspec.msgpack.Decoder(Session).decode
_decode_stamps: Final = msgspec.msgpack.Decoder(dict[str, int]).decode


@dataclass
class Peer:
    epoch: str
    heard: float  # monotonic time of its last message
    # Partition -> its last batch of it this node applied.
    seqs: dict[str, int] = field(default_factory=dict)


def _options() -> dict[str, Any]:
    # No retries inside redis-py: a failure must reach ``Cluster.run``, which
    # resubscribes and resyncs; a silent reconnect would lose messages.
    return {"retry": Retry(NoBackoff(), 0), "socket_connect_timeout": 2.0, "socket_timeout": 5.0}


def connect(url: str) -> tuple[Any, bool]:
    """A client for ``url`` and whether it is a Redis Cluster (``redis+cluster://``)."""
    parts = urlsplit(url)
    if parts.scheme.endswith("+cluster"):
        plain = urlunsplit((parts.scheme.removesuffix("+cluster"), *parts[1:]))
        return RedisCluster.from_url(plain, **_options()), True
    return Redis.from_url(url, **_options()), False


class Subscriber:
    """Channels subscribed while a Redis session lasts, read as they come into one stream.

    On one Redis, one pub/sub connection. On a Redis Cluster a sharded channel
    lives on its slot's master: one connection per master, each read by its
    own task (redis-py's cluster pub/sub polls its shards in turn, so a message
    would wait for the others' timeouts). ``subscribe`` returns once Redis
    confirmed every channel: what is published after that is read.
    """

    def __init__(
        self, client: Any, sharded: bool, pubsub: Any, tg: TaskGroup, out: MemoryObjectSendStream[Any]
    ) -> None:
        self._client = client
        self._sharded = sharded
        self._tg = tg
        self._out = out
        # Master ("host:port", or "" on one Redis) -> its pub/sub connection.
        self._shards: dict[str, Any] = {} if sharded else {"": pubsub}
        self._reading: set[str] = set()
        self.channels: set[str] = set()
        self._confirm: dict[bytes, anyio.Event] = {}
        self.overflowed = False  # a message was dropped: the reader must resync

    def _shard(self, name: str) -> str:
        if not self._sharded:
            return ""
        node = self._client.get_node_from_key(name)
        return f"{node.host}:{node.port}"

    def _by_slot(self, names: list[str]) -> list[list[str]]:
        slots: dict[int, list[str]] = {}
        for name in names:
            slots.setdefault(self._client.keyslot(name), []).append(name)
        return list(slots.values())

    async def subscribe(self, names: list[str]) -> None:
        new = [n for n in names if n not in self.channels]
        if not new:
            return
        by_shard: dict[str, list[str]] = {}
        for name in new:
            by_shard.setdefault(self._shard(name), []).append(name)
        events = [self._confirm.setdefault(n.encode(), anyio.Event()) for n in new]
        for shard, group in by_shard.items():
            pubsub = self._shards.get(shard)
            if pubsub is None:
                host, _, port = shard.rpartition(":")
                pubsub = self._shards[shard] = Redis(host=host, port=int(port), **_options()).pubsub()
            if self._sharded:
                # One SSUBSCRIBE per slot: Redis takes several channels only of one slot.
                for same_slot in self._by_slot(group):
                    await pubsub.ssubscribe(*same_slot)
            else:
                await pubsub.subscribe(*group)
            self.channels.update(group)
            if shard not in self._reading:
                self._reading.add(shard)
                self._tg.start_soon(self._read, pubsub)
        with anyio.fail_after(5):
            for event in events:
                await event.wait()
        for name in new:
            self._confirm.pop(name.encode(), None)

    async def unsubscribe(self, names: list[str]) -> None:
        gone = [n for n in names if n in self.channels]
        by_shard: dict[str, list[str]] = {}
        for name in gone:
            by_shard.setdefault(self._shard(name), []).append(name)
            self.channels.discard(name)
        for shard, group in by_shard.items():
            pubsub = self._shards[shard]
            if self._sharded:
                for same_slot in self._by_slot(group):
                    await pubsub.sunsubscribe(*same_slot)
            else:
                await pubsub.unsubscribe(*group)

    async def _read(self, pubsub: Any) -> None:
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=False, timeout=1.0)
            if msg is None:
                continue
            kind = msg["type"]
            if kind in ("message", "smessage"):
                try:
                    self._out.send_nowait((msg["channel"], msg["data"]))
                except anyio.WouldBlock:
                    self.overflowed = True
            elif kind in ("subscribe", "ssubscribe"):
                event = self._confirm.get(msg["channel"])
                if event is not None:
                    event.set()
            elif kind == "sunsubscribe" and msg["channel"].decode() in self.channels:
                # Redis moved the channel's slot to another master: start over.
                raise RedisError(f"channel {msg['channel'].decode()} moved to another shard")

    async def aclose(self) -> None:
        for shard, pubsub in self._shards.items():
            try:
                await pubsub.aclose()
                if shard:
                    await pubsub.connection_pool.disconnect()
            except (RedisError, OSError):
                pass


class Cluster:
    """The Redis ``Replication``: publishes this node's changes; ``run`` applies the others'."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        assert settings.redis_url
        self.url = settings.redis_url
        self.registry = registry
        self.index = registry.index
        # Which partition each session is in (its project, or a bucket of it).
        self.parts = Partitioner(settings.project_buckets)
        registry.part_of = self.parts.of
        registry.stamping = True
        self.node = settings.node_id or default_node_id()
        # Told of each peer found dead or lost (e.g. the relay, which forgets its agents and tabs).
        self.node_gone: list[Callable[[str], None]] = []
        self.epoch = secrets.token_hex(6)
        self._inbox = inbox(self.node).encode()
        self.lease = settings.node_lease
        self.lease_ms = max(1, int(settings.node_lease * 1000))
        self.ready = False  # bootstrapped once: /readyz
        self.connected = False
        self.leaving = False
        self.peers: dict[str, Peer] = {}
        # Partitions this node mirrors (subscribed and read), and the nodes known to hold each.
        self.mirrored: set[str] = set()
        self.holders: dict[str, set[str]] = {}
        self.published = 0  # batches
        self.received = 0
        self.reads = 0  # partition snapshots read
        self.told = 0  # sessions ended here that peers were told of (they held a part)
        self._untold: dict[str, list[tuple[str, str]]] = {}  # node -> (partition, sessionID)
        self._client: Any = None
        self._sharded = False
        self._subscriber: Subscriber | None = None
        self._pending: dict[str, dict[SessionKey, int | EndReason]] = {}
        # Per partition: this node's sessions in its hash in Redis, its last batch, the last
        # one Redis answered (a failed one may or may not have landed).
        self._in_redis: dict[str, set[SessionKey]] = {}
        self._seq: dict[str, int] = {}
        self._acked: dict[str, int] = {}
        # Partitions listed in this node's ``{hub}:parts`` key.
        self._announced: set[str] = set()
        # (node, epoch) of peers that said goodbye: their late batches are not news.
        self._departed: set[tuple[str, str]] = set()
        self._wake = anyio.Event()  # a change to publish within the publish window
        # Set with ``_wake``, and by the first heartbeat after a batch: the publisher then
        # sleeps to the touch window's end instead of to the next lease refresh.
        self._stir = anyio.Event()
        self._lock = anyio.Lock()
        self.window = settings.publish_window
        # Heartbeats wait up to ``touch_window`` (from the first pending one) unless a
        # change goes out sooner: one batch carries many, and lastActiveAt lags that much.
        self.touch_window = settings.touch_window
        self._touches_due: float | None = None
        # When the lease was last refreshed, and how often (every lease/4, not every batch:
        # it lives on the ``{hub}`` tag's master).
        self._lease_at = 0.0
        self._refresh_every = max(self.lease / 4, 0.01)
        # Peers' missing leases are not believed until then (after a bootstrap).
        self._lenient_until = 0.0
        self._link = Link(self.url, "cluster")
        # Interest (README, "Cluster"): what keeps a partition mirrored here besides being its
        # owner: agents following it, a search within ``mirror_idle`` seconds.
        self.idle = settings.mirror_idle
        self._followers: Counter[str] = Counter()
        self._served: dict[str, float] = {}
        # Partitions asked for and not mirrored yet, and what waits for them.
        self._requested: set[str] = set()
        self._waiting: dict[str, list[Callable[[], None]]] = {}
        self._commands: MemoryObjectSendStream[tuple[bytes, bytes]] | None = None
        # Sessions this node started in partitions it does not mirror, to look up in Redis
        # before their record goes out (a resume?), and what waits for the answer.
        self._unknown: dict[SessionKey, list[Callable[[bool], None]]] = {}
        # Those looked up and not published since: a change meanwhile (the adoption's own)
        # must not look them up again (the record's page views and active time would count twice).
        self._looked_up: set[SessionKey] = set()
        self.adopted = 0  # starts found to be resumes of sessions held elsewhere
        # Owners mirror a partition whatever they serve, so a dead node's sessions are
        # reported ended by a survivor: only webhooks need that (README, "Webhooks").
        self.owner_count = 2 if settings.webhook_urls or settings.webhooks_file else 0
        # Whether this node owns each partition, for the membership in ``_members``.
        self._members: frozenset[str] = frozenset()
        self._owned: dict[str, bool] = {}

    # -- Replication: mark what to publish (only this node's own changes) --------

    def _mark(self, key: SessionKey, mark: int | EndReason) -> None:
        if self.leaving:
            return
        pending = self._pending.setdefault(self.parts.of(key), {})
        if mark == TOUCH:
            if key in pending:
                return
            pending[key] = mark
            if self._touches_due is None:
                self._touches_due = self._touch_deadline()
                if not self.touch_window:
                    self._wake.set()
                self._stir.set()
            return
        pending[key] = mark
        self._wake.set()
        self._stir.set()

    def _touch_deadline(self) -> float:
        return time.monotonic() + self.touch_window * (1 - TOUCH_JITTER * random.random())

    def _touches_due_at(self, now: float) -> bool:
        return self._touches_due is not None and now >= self._touches_due

    def held(self, session: Session) -> None:
        key = _key_of(session)
        if self._new_here(key):
            self._unknown.setdefault(key, [])
        self._mark(key, RECORD)

    def _new_here(self, key: SessionKey) -> bool:
        """A session this node holds and has not published, in a partition it does not mirror:
        it may live on elsewhere (a tab that reconnected here)."""
        p = self.parts.of(key)
        return (
            p not in self.mirrored
            and key not in self._in_redis.get(p, ())
            and key not in self._looked_up
            and self.ready
        )

    def after_adoption(self, session: Session, then: Callable[[bool], None]) -> None:
        """``then(resumed)`` once this node knows whether ``session``, which it just started,
        lives on elsewhere (at once where it mirrors the project: the start was a start)."""
        key = _key_of(session)
        if not self._new_here(key):
            then(False)
            return
        self._unknown.setdefault(key, []).append(then)

    def touched(self, session: Session) -> None:
        self._mark(_key_of(session), TOUCH)

    def released(self, session: Session, reason: EndReason | None) -> None:
        key = _key_of(session)
        if reason is not None:
            self._mark(key, reason)
        elif key in self._in_redis.get(self.parts.of(key), ()):
            # Resumed or ended elsewhere: the flush finds it no longer held and takes it back.
            self._mark(key, RECORD)

    def add_metrics(self, gauge: AddMetric, counter: AddMetric) -> None:
        counter("hub_redis_published_batches", "Batches this node published.", lambda: self.published)
        counter("hub_redis_received_batches", "Batches received from peers.", lambda: self.received)
        counter(
            "hub_cluster_adopted_sessions",
            "Starts on this node found to resume a session held elsewhere (in a project it does "
            "not mirror): the session went on from its earlier record.",
            lambda: self.adopted,
        )
        counter(
            "hub_cluster_told_ended_sessions",
            "Sessions ended on this node by their tracker that another node held a part of, "
            "sent to that node's inbox.",
            lambda: self.told,
        )
        counter(
            "hub_cluster_partition_reads",
            "Snapshots of a peer's part of a partition read from Redis (bootstrap, gaps, resync).",
            lambda: self.reads,
        )
        gauge("hub_redis_connected", "1 while the Redis connection is up.", lambda: self.connected)
        gauge("hub_cluster_peers", "Peer nodes this node hears from.", lambda: len(self.peers))
        gauge("hub_cluster_mirrored_partitions", "Partitions this node mirrors.", lambda: len(self.mirrored))
        gauge(
            "hub_cluster_indexed_projects",
            "Projects whose sessions this node indexes for search (those it serves); of the "
            "others it keeps its own sessions only.",
            lambda: sum(1 for p in self.index.projects() if self.index.indexed(p)),
        )
        gauge(
            "hub_cluster_peer_silence_seconds",
            "Seconds since the last message of the quietest peer: the replication lag bound "
            "(peers refresh their lease at least every node-lease/4).",
            lambda: max((time.monotonic() - p.heard for p in self.peers.values()), default=0.0),
        )

    # -- interest: which partitions this node mirrors ----------------------------------

    def mirrors(self, project_key: str) -> bool:
        return all(p in self.mirrored for p in self.parts.of_project(project_key))

    def answers_for(self, session: Session) -> bool:
        """Whether this node decides the session's end: it mirrors its partition, or owns it
        (and is about to mirror it: a partition it just started holding)."""
        p = self.parts.of(_key_of(session))
        return p in self.mirrored or self._owns(p)

    def when_mirrored(self, project_key: str, then: Callable[[], None]) -> bool:
        now = time.monotonic()
        cold = []
        for p in self.parts.of_project(project_key):
            self._served[p] = now
            if p not in self.mirrored:
                cold.append(p)
        if not cold or not self.connected:
            return True  # warm, or Redis unreachable: what this node holds is the answer
        left = len(cold)

        def one_done() -> None:
            nonlocal left
            left -= 1
            if left == 0:
                then()

        for p in cold:
            self._waiting.setdefault(p, []).append(one_done)
            self._request(p)
        return False

    def follow(self, project_key: str) -> None:
        for p in self.parts.of_project(project_key):
            self._followers[p] += 1
            if p not in self.mirrored:
                self._request(p)

    def unfollow(self, project_key: str) -> None:
        now = time.monotonic()
        for p in self.parts.of_project(project_key):
            self._followers[p] -= 1
            if self._followers[p] <= 0:
                del self._followers[p]
                self._served[p] = now  # its idle time starts now

    def _request(self, partition: str) -> None:
        """Ask the applier to mirror ``partition`` (it reads partitions one at a time, in order
        with the batches it applies)."""
        if partition in self._requested or self._commands is None:
            return
        try:
            self._commands.send_nowait((b"", partition.encode()))
        except anyio.WouldBlock:
            return  # the buffer is full: the next review of interest asks again
        self._requested.add(partition)

    def _release(self, partitions: Iterable[str]) -> None:
        for p in partitions:
            self._requested.discard(p)
            for then in self._waiting.pop(p, ()):
                then()

    def _wants(self, partition: str) -> bool:
        """Whether this node mirrors ``partition``: followed, searched lately, or one of its owners."""
        if partition in self._followers:
            return True
        served = self._served.get(partition)
        if served is not None and time.monotonic() - served < self.idle:
            return True
        return (partition in self.holders or self._held_here(partition)) and self._owns(partition)

    def _held_here(self, partition: str) -> bool:
        return bool(self._in_redis.get(partition)) or partition in self._pending

    def _owns(self, partition: str) -> bool:
        """Whether this node is one of ``partition``'s owners among the nodes it knows (cached
        until the membership changes: a review asks for every known partition)."""
        if not self.owner_count:
            return False
        members = frozenset(self.peers)
        if members != self._members:
            self._members = members
            self._owned.clear()
        owned = self._owned.get(partition)
        if owned is None:
            owned = self._owned[partition] = self.node in owners(
                partition, [self.node, *members], self.owner_count
            )
        return owned

    async def _review(self, client: Any, subscriber: Subscriber) -> None:
        """Stop mirroring what no longer interests this node; mirror what it came to own."""
        for p in [p for p, nodes in self.holders.items() if not nodes and not self._held_here(p)]:
            # No node holds it any more (they left or died): nothing to mirror or own.
            del self.holders[p]
            self._owned.pop(p, None)
        for p in [p for p in self.mirrored if not self._wants(p)]:
            await self._unmirror(subscriber, p)
        known = [*self.holders, *(p for p in self._in_redis if p not in self.holders)]
        cold = [p for p in known if p not in self.mirrored and self._wants(p)]
        cold += [p for p in self._requested if p not in self.mirrored and p not in cold]
        if cold:
            await self._mirror(client, subscriber, cold)
        # A project its agents follow is served for long: its indexes are built ahead of the
        # searches, one a review, so that no search waits while a field's index is built
        # (tens of ms at 40k sessions). A project only searched builds what its queries use.
        for project in {project_of(p) for p in self._followers}:
            self.index.build_next(project)

    async def _unmirror(self, subscriber: Subscriber, partition: str) -> None:
        self.mirrored.discard(partition)
        self._served.pop(partition, None)
        await subscriber.unsubscribe([channel(partition)])
        forgotten = self._forget(partition)
        project = project_of(partition)
        if not any(p in self.mirrored for p in self.parts.of_project(project)):
            # Served no more: its own sessions here need no indexes (the next query builds them).
            self.index.unindex(project)
        log.info("cluster.unmirrored", extra={"fields": {"partition": partition, "sessions": forgotten}})

    def _forget(self, partition: str) -> int:
        """Forget the others' sessions of a partition no longer mirrored, and where their
        batches had got to; how many sessions left the index."""
        for peer in self.peers.values():
            peer.seqs.pop(partition, None)
        return self.registry.forget_part(partition, now_ms())

    async def _tick(self) -> None:
        """Ask the applier to review interest now and then."""
        interval = max(0.05, min(1.0, self.idle / 4))
        while True:
            await anyio.sleep(interval)
            if self._commands is not None:
                with contextlib.suppress(anyio.WouldBlock):  # a review is already queued
                    self._commands.send_nowait((b"", b""))

    # -- running ----------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected: bootstrap, mirror, and after any failure retry with backoff and jitter."""
        await self._link.run(self._session, self._down)

    async def _session(self, client: Any, sharded: bool, pubsub: Any) -> None:
        self._client, self._sharded = client, sharded
        await client.function_load(LIBRARY, replace=True)
        # Read the subscriptions from the start, buffered while snapshots are
        # read: Redis drops a subscriber that lags.
        send, receive = anyio.create_memory_object_stream[tuple[bytes, bytes]](BUFFER_BATCHES)
        async with send, receive, anyio.create_task_group() as tg:
            subscriber = self._subscriber = Subscriber(client, sharded, pubsub, tg, send)
            self._commands = send
            try:
                await subscriber.subscribe([CONTROL_CHANNEL, inbox(self.node)])
                await self._bootstrap(client, subscriber)
                self._link.up()
                tg.start_soon(self._publisher, client)
                tg.start_soon(self._apply_messages, client, subscriber, receive)
                tg.start_soon(self._watch_leases, client)
                tg.start_soon(self._tick)
                await anyio.sleep_forever()
            finally:
                self._subscriber = None
                self._commands = None
                with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                    await subscriber.aclose()

    def _down(self) -> None:
        self.connected = False
        self._client = None
        # What waits for a partition is answered with what this node holds.
        self._release(list(self._waiting))
        self._requested.clear()
        # Starts not looked up are taken as starts.
        unknown, self._unknown = self._unknown, {}
        for waiters in unknown.values():
            for then in waiters:
                then(False)

    async def _bootstrap(self, client: Any, subscriber: Subscriber) -> None:
        # Redis lost this node's registration: it restarted empty, and every
        # peer's lease is gone until that peer, maybe still in its reconnect
        # backoff, writes it again. Its sessions stay meanwhile.
        lost = self.ready and await client.hget(NODES_KEY, self.node) is None
        await self._republish(client)
        # What this node mirrored before is read again where it moved (after an outage).
        before = set(self.mirrored)
        self.mirrored.clear()
        await self._sync_cluster(client, subscriber)
        for p in before - self.mirrored:
            self._forget(p)
        self._lenient_until = time.monotonic() + self.lease + BACKOFF_MAX * 1.5 if lost else 0.0
        heard = time.monotonic()
        for peer in self.peers.values():
            peer.heard = heard
        self.connected = True
        self.ready = True
        log.info(
            "cluster.bootstrapped",
            extra={
                "fields": {
                    "node": self.node,
                    "peers": len(self.peers),
                    "partitions": len(self.mirrored),
                    "sessions": len(self.index),
                }
            },
        )

    async def _sync_cluster(self, client: Any, subscriber: Subscriber) -> None:
        """Learn the live nodes and their partitions; mirror those wanted, read where they moved."""
        nodes = {k.decode(): v.decode() for k, v in (await client.hgetall(NODES_KEY)).items()}
        others = [n for n in nodes if n != self.node]
        pipe = client.pipeline(transaction=False)
        for n in others:
            pipe.get(lease_key(n))
            pipe.smembers(parts_key(n))
        found = await pipe.execute() if others else []
        holders: dict[str, set[str]] = {}
        for i, node in enumerate(others):
            lease, parts = found[2 * i], found[2 * i + 1]
            if lease is None:
                await self._forget_dead(client, node)
                continue
            self._peer(node, nodes[node])
            for raw in parts:
                holders.setdefault(raw.decode(), set()).add(node)
        # Peers this node knew of that Redis no longer lists are gone (e.g. Redis lost them
        # and they have not come back yet: their leases decide, in ``_watch_leases``).
        self.holders = holders
        wanted = {p for p in holders if self._wants(p)}
        wanted.update(p for p in [*self._followers, *self._served, *self._requested] if self._wants(p))
        await self._mirror(client, subscriber, sorted(wanted))

    async def _mirror(self, client: Any, subscriber: Subscriber, partitions: list[str]) -> None:
        """Subscribe to ``partitions`` (if not yet), then read each holder's part that moved."""
        if not partitions:
            return
        await subscriber.subscribe([channel(p) for p in partitions])
        pipe = client.pipeline(transaction=False)
        for p in partitions:
            pipe.smembers(holders_key(p))
        listed = await pipe.execute()
        pairs: list[tuple[str, str]] = []
        for p, members in zip(partitions, listed, strict=True):
            names = {m.decode() for m in members} - {self.node}
            self.holders.setdefault(p, set()).update(names)
            # Its holders, and peers whose part this node holds (which may be empty now:
            # their seq says so; one not written yet, e.g. after Redis restarted, stays).
            names.update(node for node, peer in self.peers.items() if p in peer.seqs)
            pairs += [(p, node) for node in sorted(names) if node in self.peers]
        await self._read_moved(client, pairs)
        self.mirrored.update(partitions)
        now = time.monotonic()
        for p in partitions:
            if p in self._served:
                # A search's idle time counts from its answer, not from its arrival: a
                # bootstrap longer than --mirror-idle is not forgotten as it completes.
                self._served[p] = now
        self._release(partitions)

    async def _read_moved(self, client: Any, pairs: list[tuple[str, str]]) -> None:
        """Read the (partition, node) snapshots newer than what this node holds, pipelined."""
        if not pairs:
            return
        pipe = client.pipeline(transaction=False)
        for p, node in pairs:
            pipe.get(seq_key(p, node))
        seqs = await pipe.execute()
        moved = []
        for (p, node), raw in zip(pairs, seqs, strict=True):
            found = parse_seq(raw)
            peer = self.peers.get(node)
            if found is None or peer is None:
                continue  # not written yet: its first batch will say so
            epoch, seq, base = found
            held = peer.seqs.get(p)
            if epoch != peer.epoch or snapshot_needed(held, seq, base):
                moved.append((p, node))
            elif held is not None and seq > held:
                peer.seqs[p] = seq  # a rewrite of what this node holds
        await self._read(client, moved)

    async def _read(self, client: Any, pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """Make each (partition, node) here equal its snapshot in Redis; the pairs read."""
        if not pairs:
            return set()
        pipe = client.pipeline(transaction=False)
        for p, node in pairs:
            # seq before records: the records are at least as new as the seq says.
            pipe.get(seq_key(p, node))
            pipe.hgetall(records_key(p, node))
        found = await pipe.execute()
        now = now_ms()
        done = set()
        for i, (p, node) in enumerate(pairs):
            seq = parse_seq(found[2 * i])
            if seq is None:
                continue
            epoch, number, _ = seq
            peer = self._peer(node, epoch)
            self.reads += 1
            records, stamps = self._records(node, found[2 * i + 1])
            with collector_paused():
                self.registry.reconcile(node, records, now, p, stamps)
            peer.seqs[p] = number
            done.add((p, node))
        return done

    @staticmethod
    def _records(node: str, fields: dict[bytes, bytes]) -> tuple[list[Session], dict[str, Stamps]]:
        """A node's records (with its heartbeats since) from its hash's ``fields``, and the
        stamps of those that have any."""
        records = []
        stamps: dict[str, Stamps] = {}
        for name, value in fields.items():
            if name.startswith(TOUCHED_B):
                continue
            try:
                if name.startswith(STAMPED_B):
                    stamps[name[1:].decode()] = _decode_stamps(value)
                    continue
                record = _decode_session(value)
            except (msgspec.DecodeError, RecursionError):
                # Not a record any node writes: whoever else writes to Redis cannot stop the mirror.
                log.warning("cluster.bad_record", extra={"fields": {"node": node, "bytes": len(value)}})
                continue
            touched = fields.get(TOUCHED_B + name)
            if touched is not None:
                # activeTime moved with the heartbeats, by the rule peers apply to a touch.
                record.activeTime = active_time(record, int(touched))
                record.lastActiveAt = max(record.lastActiveAt, int(touched))
            records.append(record)
        return records, stamps

    # -- publishing ----------------------------------------------------------------

    def _publish_command(self) -> str:
        return "SPUBLISH" if self._sharded else "PUBLISH"

    def _call(
        self,
        pipe: Any,
        partition: str,
        seq: int,
        message: bytes,
        mode: str,
        sets: list[Any],
        deletes: list[str],
        base: int | None = None,
        ended: Sequence[str] = (),
    ) -> None:
        keys = (
            records_key(partition, self.node),
            seq_key(partition, self.node),
            holders_key(partition),
            channel(partition),
            where_key(partition),
        )
        value = seq_value(self.epoch, seq, seq if base is None else base)
        args = [self.node, value, self._publish_command(), message, mode, len(sets) // 2, len(ended)]
        command = ("FCALL", BATCH, len(keys), *keys, *args, *sets, *ended, *deletes)
        if self._sharded:
            # Routed by its first key; left to itself, redis-py's cluster pipeline asks the
            # default node for the keys of an FCALL (COMMAND GETKEYS with the whole call).
            pipe.execute_command(*command, target_nodes=self._client.get_node_from_key(keys[0]))
        else:
            pipe.execute_command(*command)

    def _announce(self, pipe: Any, partitions: list[str], hello: bool = False) -> None:
        """List partitions this node now has keys in, and tell mirrors (``{hub}:ctl``); a
        ``hello`` goes out even with none new: peers learn this process's epoch from it."""
        new = [p for p in partitions if p not in self._announced]
        if not new and not hello:
            return
        if new:
            pipe.sadd(parts_key(self.node), *new)
        self._tell(pipe, BatchKind.HOLDS, new)

    def _tell(self, pipe: Any, kind: BatchKind, partitions: list[str]) -> None:
        """Publish a control message of this node on ``{hub}:ctl``."""
        self._publish(pipe, CONTROL_CHANNEL, _encode(Control(self.node, self.epoch, kind, partitions)))

    def _publish(self, pipe: Any, name: str, message: bytes) -> None:
        """``message`` on channel ``name``: sharded pub/sub on a Redis Cluster."""
        (pipe.spublish if self._sharded else pipe.publish)(name, message)

    async def _republish(self, client: Any) -> None:
        """Rewrite this node's partitions in Redis (Redis may have lost them).

        Each partition's batch carries what changed since the last one, as a
        changes batch would: a mirror that missed nothing applies it and reads
        nothing; one that did (its sequence is behind) re-reads that partition.
        """
        async with self._lock:
            pending, self._pending = self._pending, {}
            self._touches_due = None
            started = time.monotonic()
            held: dict[str, list[Session]] = {}
            for session in self.registry.held():
                held.setdefault(self.parts.of(_key_of(session)), []).append(session)
            try:
                # A previous process under this id may have left keys: they are rewritten
                # (emptied) too, so no mirror takes them for this process's.
                listed = {raw.decode() for raw in await client.smembers(parts_key(self.node))}
                pipe = client.pipeline(transaction=False)
                pipe.hset(NODES_KEY, self.node, self.epoch)
                pipe.set(lease_key(self.node), self.epoch, px=self.lease_ms)
                self._announced.clear()
                partitions = sorted(set(held) | {p for p, keys in self._in_redis.items() if keys} | listed)
                self._announce(pipe, partitions, hello=True)
                seqs = {}
                for p in partitions:
                    up, touch, gone = self._changes(p, pending.get(p, {}))
                    seq = seqs[p] = self._seq.get(p, 0) + 1
                    self._seq[p] = seq
                    message = _encode(
                        _BatchOut(
                            self.node, self.epoch, p, seq, BatchKind.RELOAD, [r for _, r in up], touch, gone,
                            self._acked.get(p, 0), self._stamps(up),
                        )
                    )  # fmt: skip
                    sets: list[Any] = []
                    for s in held.get(p, ()):
                        key = _key_of(s)
                        sets += self._fields(key, self._record(s), self.registry.stamps(key))
                    # Nothing changed since the last batch Redis took: a mirror holding that
                    # one need not read this rewrite.
                    same = not (up or touch or gone)
                    base = self._acked.get(p, 0) if same else seq
                    self._call(pipe, p, seq, message, MODE_REWRITE, sets, [], base)
                await pipe.execute()
            except BaseException:
                self._restore(pending)
                raise
            self._announced = set(partitions)
            self._in_redis = {p: {_key_of(s) for s in held.get(p, ())} for p in partitions}
            self._looked_up.clear()
            self._acked.update(seqs)
            self._lease_at = started
            self.published += len(partitions)

    def _changes(
        self, partition: str, pending: dict[SessionKey, int | EndReason]
    ) -> tuple[list[tuple[SessionKey, Raw]], Touches, Gone]:
        """A partition's batch: records, lastActiveAt refreshes and removals from pending marks."""
        up: list[tuple[SessionKey, Raw]] = []
        touch: Touches = []
        gone: Gone = []
        in_redis = self._in_redis.get(partition, set())
        for key, mark in pending.items():
            session = self.index.get(*key)
            if isinstance(mark, str) or session is None or not self.registry.holds(key):
                # An end goes out even if this node's record did not (yet): another node
                # may hold the session (e.g. the tab that resumed here left it waiting there).
                if key in in_redis or mark is EndReason.ENDED:
                    gone.append((key[1], mark if isinstance(mark, str) else None))
            elif mark == TOUCH and key in in_redis:
                touch.append((key[1], session.lastActiveAt))
            else:
                up.append((key, Raw(self._record(session))))
        return up, touch, gone

    def _restore(self, pending: dict[str, dict[SessionKey, int | EndReason]]) -> None:
        # Newer marks win; what failed to go out goes with the next batch.
        for p, marks in pending.items():
            mine = self._pending.setdefault(p, {})
            for key, mark in marks.items():
                mine.setdefault(key, mark)
        if self._pending and self._touches_due is None:
            self._touches_due = self._touch_deadline()  # restored heartbeats go out with the next batch

    def _stamps(self, up: list[tuple[SessionKey, Raw]]) -> dict[str, Stamps]:
        """The stamps of the records in ``up`` that have any, by sessionID."""
        stamps_of = self.registry.stamps
        return {key[1]: stamps for key, _ in up if (stamps := stamps_of(key))}

    def _fields(self, key: SessionKey, record: bytes, stamps: Stamps) -> list[Any]:
        """A record's fields in this node's hash: the record, and its stamps where it has any."""
        if not stamps:
            return [key[1], record]
        return [key[1], record, STAMPED + key[1], _encode(stamps)]

    def _record(self, session: Session) -> bytes:
        """The session as this node holds it: its own tabs and their activity, not the cluster's."""
        key = _key_of(session)
        tabs = self.registry.local_tabs(key)
        active = self.registry.local_active(key, session.active)
        return _encode(msgspec.structs.replace(session, tabs=tabs, connected=tabs > 0, active=active))

    async def _publisher(self, client: Any) -> None:
        while not self.leaving:
            self._stir = anyio.Event()
            if not self._wake.is_set():
                due = self._lease_at + self._refresh_every
                if self._touches_due is not None:
                    due = min(due, self._touches_due)
                with anyio.move_on_after(max(0.0, due - time.monotonic())):
                    await self._stir.wait()
            if self._wake.is_set() and self.window:
                # Gather what else changes within the window into the same batches.
                await anyio.sleep(self.window)
            if self._unknown:
                await self._adopt(client)
            now = time.monotonic()
            refresh = now - self._lease_at >= self._refresh_every
            if self._wake.is_set() or self._touches_due_at(now) or refresh:
                await self.flush(client)

    async def flush(self, client: Any, final: bool = False) -> None:
        """Publish the pending changes, one batch per partition, and refresh the lease when due.

        A lease refresh with only heartbeats pending, their window still open, refreshes the
        lease alone: publishing them then would add a batch per partition every lease/4, in
        step on every node that started with this one.
        """
        async with self._lock:
            if self.leaving and not final:
                return  # nothing may follow the goodbye
            started = time.monotonic()
            refresh = final or started - self._lease_at >= self._refresh_every
            if final or self._wake.is_set() or self._touches_due_at(started):
                self._wake = anyio.Event()
                pending, self._pending = self._pending, {}
                self._touches_due = None
            else:
                pending = {}
            sent: list[tuple[str, int, list[tuple[SessionKey, Raw]], Gone]] = []
            try:
                pipe = client.pipeline(transaction=False)
                for p, marks in pending.items():
                    up, touch, gone = self._changes(p, marks)
                    if not (up or touch or gone):
                        continue
                    seq = self._seq.get(p, 0) + 1
                    self._seq[p] = seq
                    records = [raw for _, raw in up]
                    stamps = self._stamps(up)
                    batch = _BatchOut(
                        self.node, self.epoch, p, seq, BatchKind.OPS, records, touch, gone, 0, stamps
                    )
                    message = _encode(batch)
                    sets: list[Any] = []
                    for key, raw in up:
                        sets += self._fields(key, bytes(raw), stamps.get(key[1], NO_STAMPS))
                    for sid, at in touch:
                        # A heartbeat stores its lastActiveAt alone, never the whole record.
                        sets += (TOUCHED + sid, at)
                    deletes = [f"{prefix}{sid}" for sid, _ in gone for prefix in ("", TOUCHED, STAMPED)]
                    ended = [sid for sid, reason in gone if reason is EndReason.ENDED]
                    self._call(pipe, p, seq, message, MODE_CHANGES, sets, deletes, ended=ended)
                    sent.append((p, seq, up, gone))
                self._announce(pipe, [p for p, _, up, _ in sent if up])
                if refresh:
                    # GET: the lease's value before, None once it ran out (peers may have
                    # reaped this node's keys meanwhile: see below).
                    pipe.set(lease_key(self.node), self.epoch, px=self.lease_ms, get=True)
                results = await pipe.execute() if len(pipe) else []
            except BaseException:
                self._restore(pending)
                raise
            told, self._untold = self._untold, {}
            for (p, seq, up, gone), others in zip(sent, results, strict=False):
                for sid, node in zip(others[::2], others[1::2], strict=True):
                    told.setdefault(node.decode(), []).append((p, sid.decode()))
                keys = self._in_redis.setdefault(p, set())
                for sid, _ in gone:
                    keys.discard((project_of(p), sid))
                keys.update(key for key, _ in up)
                self._acked[p] = seq
                if up and p not in self._announced:
                    self._announced.add(p)
                    if p not in self.mirrored and self._owns(p):
                        self._request(p)  # a partition this node owns: mirror it now
            self.published += len(sent)
            for marks in pending.values():
                self._looked_up.difference_update(marks)
            if told:
                try:
                    await self._tell_ended(client, told)
                except BaseException:
                    # Told with the next flush (in a lease/4 at most): a part left on a peer
                    # would come back with that peer's next report.
                    for node, sessions in told.items():
                        self._untold.setdefault(node, []).extend(sessions)
                    raise
            if not refresh:
                return
            self._lease_at = started
            if results[-1] is None and not final:
                # This node could not refresh its lease for a whole lease (a stall, Redis
                # answering late): peers took it for dead and may have removed its keys.
                # Start over: the next session rewrites every partition it holds.
                log.warning("cluster.lease_lost", extra={"fields": {"node": self.node}})
                raise LeaseLost(f"the lease of {self.node} ran out before it was refreshed")

    async def _tell_ended(self, client: Any, told: dict[str, list[tuple[str, str]]]) -> None:
        """Tell each node holding a part of sessions this node ended (by ``end``): one that
        does not mirror their partition would keep its part, and publish it again."""
        pipe = client.pipeline(transaction=False)
        for node, sessions in told.items():
            self._publish(pipe, inbox(node), _encode(Ended(self.node, self.epoch, sessions)))
        await pipe.execute()
        self.told += sum(len(sessions) for sessions in told.values())

    def _ended_elsewhere(self, notice: Ended) -> None:
        """A peer ended sessions this node holds a part of: end them here too (as the batch
        on their channel does where it is mirrored)."""
        if notice.node == self.node or (notice.node, notice.epoch) in self._departed:
            return
        now = now_ms()
        for p, sid in notice.sessions:
            self.registry.remote_remove(notice.node, project_of(p), sid, EndReason.ENDED, now)

    async def _adopt(self, client: Any) -> None:
        """Look up the sessions this node started in partitions it does not mirror: one found
        in another node's part (the partition's directory says whose) continues from that
        record (``Registry.adopt``). Two pipelined round trips for all of them."""
        unknown, self._unknown = self._unknown, {}
        try:
            by_part: dict[str, list[SessionKey]] = {}
            for key in unknown:
                by_part.setdefault(self.parts.of(key), []).append(key)
            parts = list(by_part)
            pipe = client.pipeline(transaction=False)
            for p in parts:
                pipe.hmget(where_key(p), [key[1] for key in by_part[p]])
            placed = await pipe.execute()
            asked: list[tuple[str, SessionKey]] = []
            pipe = client.pipeline(transaction=False)
            for p, nodes in zip(parts, placed, strict=True):
                for key, raw in zip(by_part[p], nodes, strict=True):
                    node = raw.decode() if raw is not None else None
                    if node is None or node == self.node or node not in self.peers:
                        continue
                    pipe.hmget(records_key(p, node), [key[1], TOUCHED + key[1], STAMPED + key[1]])
                    asked.append((node, key))
            found = await pipe.execute() if asked else []
        except BaseException:
            for key, waiters in unknown.items():
                self._unknown.setdefault(key, []).extend(waiters)
            raise
        latest: dict[SessionKey, tuple[Session, Stamps]] = {}
        # Only what is held and not in Redis yet: its mark is pending, and the flush that
        # publishes (or ends) it lets it go. One published since it was queued stays out.
        self._looked_up.update(k for k in unknown if self._new_here(k) and self.registry.holds(k))
        for (node, key), values in zip(asked, found, strict=True):
            names = (key[1], TOUCHED + key[1], STAMPED + key[1])
            fields = {n.encode(): v for n, v in zip(names, values, strict=True) if v is not None}
            records, stamped = self._records(node, fields)
            for record in records:
                if key not in latest or record.lastActiveAt > latest[key][0].lastActiveAt:
                    latest[key] = (record, stamped.get(key[1], NO_STAMPS))
        now = now_ms()
        for record, stamps in latest.values():
            self.registry.adopt(record, now, stamps)
        self.adopted += len(latest)
        for key, waiters in unknown.items():
            for then in waiters:
                then(key in latest)

    # -- mirroring -------------------------------------------------------------------

    async def _apply_messages(
        self, client: Any, subscriber: Subscriber, receive: MemoryObjectReceiveStream[tuple[bytes, bytes]]
    ) -> None:
        async for name, data in receive:
            if not name:
                # A command: mirror a partition (its name), or review interest.
                if data:
                    wanted = data.decode()
                    if wanted not in self.mirrored:
                        await self._mirror(client, subscriber, [wanted])
                    self._release([wanted])
                else:
                    await self._review(client, subscriber)
                continue
            if subscriber.overflowed:
                # Messages were dropped: re-read every mirrored partition where it moved.
                subscriber.overflowed = False
                await self._sync_cluster(client, subscriber)
            partition = partition_of_channel(name.decode())
            try:
                if partition is None:
                    if name == self._inbox:
                        self._ended_elsewhere(_decode_ended(data))
                    else:
                        await self._control(client, subscriber, _decode_control(data))
                    continue
                batch = _decode_batch(data)
            except (msgspec.DecodeError, RecursionError):  # msgpack nested past the interpreter's limit
                log.warning("cluster.bad_message", extra={"fields": {"bytes": len(data)}})
                continue
            if batch.node == self.node:
                if batch.epoch != self.epoch:
                    log.error("cluster.duplicate_node_id", extra={"fields": {"node": self.node}})
                continue
            self.received += 1
            if batch.partition == partition and partition in self.mirrored:
                await self._receive(client, batch)

    async def _control(self, client: Any, subscriber: Subscriber, control: Control) -> None:
        node = control.node
        if node == self.node or (node, control.epoch) in self._departed:
            return
        if control.kind == BatchKind.BYE:
            self._departed.add((node, control.epoch))
            self.peers.pop(node, None)
            for holders in self.holders.values():
                holders.discard(node)
            self.registry.move_node(node, now_ms())
            log.info("cluster.node_left", extra={"fields": {"node": node}})
            return
        peer = self._peer(node, control.epoch)
        peer.heard = time.monotonic()
        for p in control.partitions:
            self.holders.setdefault(p, set()).add(node)
        # A partition mirrored already learns of the holder from its channel (a batch it
        # cannot place makes it read that holder's part there).
        new = [p for p in control.partitions if p not in self.mirrored and self._wants(p)]
        await self._mirror(client, subscriber, new)

    def _peer(self, node: str, epoch: str) -> Peer:
        peer = self.peers.get(node)
        if peer is not None and peer.epoch != epoch:
            # Restarted under the same id: what the old process held is gone.
            self._drop(node, EndReason.NODE_LOST)
            peer = None
        if peer is None:
            peer = self.peers[node] = Peer(epoch, time.monotonic())
        return peer

    async def _receive(self, client: Any, batch: Batch) -> None:
        node, p = batch.node, batch.partition
        if (node, batch.epoch) in self._departed:
            return
        now = now_ms()
        peer = self._peer(node, batch.epoch)
        peer.heard = time.monotonic()
        self.holders.setdefault(p, set()).add(node)
        if batch.kind == BatchKind.BYE:
            # Its part of this partition waits out its grace (the node's BYE on the control
            # channel may come later: it is draining).
            self.registry.move_node(node, now, p)
            peer.seqs.pop(p, None)
            return
        seen = verdict(peer.seqs.get(p), batch.seq, batch.kind, batch.base)
        if seen == Verdict.APPLY:
            self._apply(node, batch, now)
            peer.seqs[p] = batch.seq
            return
        if seen == Verdict.SKIP:
            return
        # A gap, a new holder, or a rewrite after batches this node missed: read its part.
        if batch.gone:
            # Ends first, so they keep their reasons (a missing record reads as "let go").
            self._apply(node, Batch(node, batch.epoch, p, batch.seq, BatchKind.OPS, [], [], batch.gone), now)
        if not await self._read(client, [(p, node)]):
            # Its records are not in Redis (yet): take the batch as it is.
            self._apply(node, batch, now)
            peer.seqs[p] = batch.seq

    def _apply(self, node: str, batch: Batch, now: int) -> None:
        registry = self.registry
        project = project_of(batch.partition)
        for session_id, reason in batch.gone:
            registry.remote_remove(node, project, session_id, reason, now)
        stamps = batch.stamps
        for record in batch.up:
            registry.remote_upsert(node, record, now, stamps.get(record.sessionID, NO_STAMPS))
        for session_id, last_active in batch.touch:
            registry.remote_touch(project, session_id, last_active)

    def _drop(self, node: str, reason: EndReason) -> None:
        self.peers.pop(node, None)
        for holders in self.holders.values():
            holders.discard(node)
        for gone in self.node_gone:
            gone(node)
        dropped = self.registry.drop_node(node, reason, now_ms())
        log.warning("cluster.node_lost", extra={"fields": {"node": node, "sessions": dropped}})

    async def _forget_dead(self, client: Any, node: str) -> None:
        """``node``'s lease ran out: drop its sessions here and its keys in Redis."""
        if node in self.peers or self.registry.sessions_of(node):
            self._drop(node, EndReason.NODE_LOST)
        if await client.exists(lease_key(node)):
            return  # back already
        # One node cleans up (the others would only repeat it).
        if not await client.set(f"{{hub}}:reap:{node}", self.node, nx=True, px=self.lease_ms):
            return
        parts = [raw.decode() for raw in await client.smembers(parts_key(node))]
        pipe = client.pipeline(transaction=False)
        for p in parts:
            # Its entries in the partition's directory, then its keys (UNLINK: a big hash is
            # freed in the background, not in Redis's one thread).
            keys = (records_key(p, node), seq_key(p, node), holders_key(p), where_key(p))
            pipe.fcall(FORGET, len(keys), *keys, node)
        pipe.hdel(NODES_KEY, node)
        _unlink(pipe, parts_key(node))
        await pipe.execute()

    async def _watch_leases(self, client: Any) -> None:
        """A peer is dead when its lease key in Redis is gone, whatever this node's reader does."""
        interval = min(self.lease / 10, 0.5)
        while True:
            await anyio.sleep(interval)
            nodes = list(self.peers)
            if not nodes or time.monotonic() < self._lenient_until:
                continue
            leases = await client.mget([lease_key(n) for n in nodes])
            for node, lease in zip(nodes, leases, strict=True):
                if lease is None and node in self.peers:
                    await self._forget_dead(client, node)

    async def leave(self) -> None:
        """Drain: publish what is pending, then tell peers this node's sessions are moving."""
        self.leaving = True
        client = self._client
        if client is None or not self.connected:
            return
        try:
            await self._goodbye(client)
        except (RedisError, OSError) as exc:
            # Peers will drop this node's sessions when its lease runs out instead.
            log.warning("cluster.leave_failed", extra={"fields": {"error": f"{type(exc).__name__}: {exc}"}})
            return
        held = sum(len(keys) for keys in self._in_redis.values())
        log.info("cluster.left", extra={"fields": {"node": self.node, "sessions": held}})

    async def _goodbye(self, client: Any) -> None:
        await self.flush(client, final=True)
        async with self._lock:
            pipe = client.pipeline(transaction=False)
            for p in sorted(self._announced):
                # Per partition, in order after its last batch: its mirrors move its sessions.
                seq = self._seq.get(p, 0) + 1
                self._seq[p] = seq
                message = _encode(_BatchOut(self.node, self.epoch, p, seq, BatchKind.BYE, [], [], []))
                self._call(pipe, p, seq, message, MODE_GOODBYE, [], [])
            self._tell(pipe, BatchKind.BYE, [])
            pipe.hdel(NODES_KEY, self.node)
            # The lease is left to run out: a peer whose lease check runs before it reads the
            # BYE would take a missing lease for a death (node_lost for sessions that move).
            _unlink(pipe, parts_key(self.node))
            await pipe.execute()


class Link:
    """A Redis connection kept up: each session runs until it fails, then the next one
    starts after a backoff (``BACKOFF_MIN`` doubling to ``BACKOFF_MAX``, ±50 % jitter).
    Failures are logged once per ``LOG_EVERY_S`` with a count (``<name>.redis_down``, or
    ``<name>.failed`` with the traceback for anything else: a bug must not take the node
    down, the next session starts afresh). A session calls ``up`` once it is working:
    the backoff and the count start over."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self.log = logging.getLogger(f"hub.{name}")
        self.delay = BACKOFF_MIN
        self.failures = Throttle(LOG_EVERY_S)

    def up(self) -> None:
        self.delay = BACKOFF_MIN
        self.failures = Throttle(LOG_EVERY_S)

    async def run(
        self, session: Callable[[Any, bool, Any], Awaitable[None]], down: Callable[[], None]
    ) -> None:
        """Run ``session(client, sharded, pubsub)`` again and again; ``down`` after each."""
        while True:
            try:
                client, sharded = connect(self.url)
                pubsub = client.pubsub()
                try:
                    if sharded:
                        await client.initialize()  # the slot map, before routing by channel
                    await session(client, sharded, pubsub)
                finally:
                    down()
                    with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                        await close_quietly(client, pubsub)
            except* (RedisError, RedisClusterException, OSError) as group:
                if self.failures.due(time.monotonic()):
                    fields = {"error": first_error(group), "retry_in_s": round(self.delay, 2)}
                    fields["failures"] = self.failures.take()
                    self.log.warning(f"{self.name}.redis_down", extra={"fields": fields})
            except* Exception as group:
                if self.failures.due(time.monotonic()):
                    fields = {"failures": self.failures.take()}
                    self.log.error(f"{self.name}.failed", exc_info=group, extra={"fields": fields})
            await anyio.sleep(self.delay * random.uniform(0.5, 1.5))
            self.delay = min(self.delay * 2, BACKOFF_MAX)


class Throttle:
    """Counts events; ``due`` says when one may be logged (the first, then every ``interval``)."""

    __slots__ = ("count", "interval", "next_at")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.next_at = 0.0
        self.count = 0

    def due(self, now: float) -> bool:
        self.count += 1
        if now < self.next_at:
            return False
        self.next_at = now + self.interval
        return True

    def take(self) -> int:
        """Events since the last logged one, that one included."""
        count, self.count = self.count, 0
        return count


def _key_of(session: Session) -> SessionKey:
    return (session.projectKey, session.sessionID)


def _unlink(pipe: Any, *keys: str) -> None:
    """UNLINK each key in a pipeline (a big hash is freed in the background, not in Redis's
    one thread); one command per key: a Redis Cluster pipeline does not queue a multi-key one."""
    for key in keys:
        pipe.execute_command("UNLINK", key)


def first_error(group: BaseExceptionGroup[Any]) -> str:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


async def close_quietly(client: Any, pubsub: Any) -> None:
    """Close a client and its pub/sub after a failure: errors closing them do not matter."""
    try:
        await pubsub.aclose()
        await client.aclose()
    except (RedisError, OSError):
        pass
