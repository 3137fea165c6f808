"""Cluster mode: every node keeps a full copy of the live index, mirrored through Redis.

Each node publishes what changes in the sessions it holds and applies what
the other nodes publish (``Registry.remote_*``), so any node answers any
search or agent subscription with the whole picture (CONTRACT §5). The
registry tells it only about this node's own changes (``Replication``).

In Redis (every key carries the ``{hub}`` hash tag, so a Redis Cluster keeps
them, and the channel, in one slot and transactions stay possible):

- ``{hub}:changes`` — the pub/sub channel (sharded pub/sub on a Redis
  Cluster). A message is one ``Batch`` from one node, gathered over
  ``--publish-window``: its records that changed, lastActiveAt refreshes,
  and sessions it ended or let go.
- ``{hub}:sessions:<node>`` — a hash of the node's records
  (``project/session``) and of heartbeats since (``@project/session``: only
  lastActiveAt, so a heartbeat never rewrites a record), and
  ``{hub}:seq:<node>`` the sequence number of the batch they reflect; both
  written in the same MULTI/EXEC as the batch's PUBLISH.
- ``{hub}:lease:<node>`` — refreshed with every batch (a batch goes out at
  least every lease/4), expiring after the lease; ``{hub}:nodes`` maps each
  node to its epoch (a random id per process start).

Bootstrap without a lost change: subscribe first and keep reading into a
bounded buffer (Redis drops a subscriber that lags), then read each peer's
(seq, records) atomically, only for peers whose seq moved past what this
node holds; buffered batches at or below that seq are already in the
snapshot and skipped, later ones apply. A batch whose seq is not the next
one (a gap) or a new epoch makes the reader resync that node from its
snapshot. A peer whose lease key is gone is dead: its sessions end with
reason ``node_lost``; a node that comes back under the same id has a new
epoch, so its old sessions are dropped, not resurrected. While Redis is
unreachable nothing is dropped: the node serves its own trackers and the
last known state, retries with backoff and jitter, then rewrites its
records and publishes a RELOAD carrying its changes since its last
acknowledged batch, which peers that missed nothing apply without a read.
After Redis restarts empty, peers' missing leases are not believed until
they have had time to come back (lease + the longest backoff).
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from msgspec import Raw, Struct
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from .clock import now_ms
from .config import Settings
from .record import Session, active_time
from .registry import Registry, SessionKey
from .replication import AddMetric
from .wire import BatchKind, EndReason

log = logging.getLogger("hub.cluster")

CHANNEL: Final = "{hub}:changes"
NODES_KEY: Final = "{hub}:nodes"

# What a session waits to publish: a lastActiveAt refresh, its record, or its end (the reason).
TOUCH: Final = 0
RECORD: Final = 1

BACKOFF_MIN: Final = 0.1
BACKOFF_MAX: Final = 2.0
HSET_CHUNK: Final = 1000
# In a node's hash, "@project/session" holds a heartbeat's lastActiveAt beside
# the record ("project/session"): a heartbeat never rewrites the record.
TOUCHED: Final = "@"
TOUCHED_B: Final = TOUCHED.encode()
# Batches read from the subscription and not applied yet (while bootstrapping);
# past it they are dropped and the peers re-read from their snapshots.
BUFFER_BATCHES: Final = 100_000
# While Redis stays unreachable, one log line per interval (with the count), not one per retry.
LOG_EVERY_S: Final = 30.0


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _key(kind: str, node: str) -> str:
    return f"{{hub}}:{kind}:{node}"


def _field(key: SessionKey) -> str:
    return f"{key[0]}/{key[1]}"


# (projectKey, sessionID, lastActiveAt) refreshes; (projectKey, sessionID, reason) removals,
# reason None: the sender let the session go to other nodes.
Touches = list[tuple[str, str, int]]
Records = list[tuple[SessionKey, Raw]]
Gone = list[tuple[str, str, EndReason | None]]


class _BatchOut(Struct, array_like=True):
    node: str
    epoch: str
    seq: int
    kind: BatchKind
    up: list[Raw]
    touch: Touches
    gone: Gone
    # RELOAD: the sender's last batch known to have reached Redis. A peer holding
    # at least that one lacks nothing the RELOAD does not carry.
    base: int = 0


class Batch(Struct, array_like=True):
    node: str
    epoch: str
    seq: int
    kind: BatchKind
    up: list[Session]
    touch: Touches
    gone: Gone
    base: int = 0


_encode: Final = msgspec.msgpack.Encoder().encode
_decode_batch: Final = msgspec.msgpack.Decoder(Batch).decode
_decode_session: Final = msgspec.msgpack.Decoder(Session).decode


@dataclass
class Peer:
    epoch: str
    seq: int
    heard: float  # monotonic time of its last batch


def connect(url: str) -> tuple[Any, bool]:
    """A client for ``url`` and whether it is a Redis Cluster (``redis+cluster://``)."""
    parts = urlsplit(url)
    # No retries inside redis-py: a failure must reach ``Cluster.run``, which
    # resubscribes and resyncs; a silent reconnect would lose messages.
    options: dict[str, Any] = {
        "retry": Retry(NoBackoff(), 0),
        "socket_connect_timeout": 2.0,
        "socket_timeout": 5.0,
    }
    if parts.scheme.endswith("+cluster"):
        plain = urlunsplit((parts.scheme.removesuffix("+cluster"), *parts[1:]))
        return RedisCluster.from_url(plain, **options), True
    return Redis.from_url(url, **options), False


class Cluster:
    """The Redis ``Replication``: publishes this node's changes; ``run`` applies the others'."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        assert settings.redis_url
        self.url = settings.redis_url
        self.registry = registry
        self.index = registry.index
        self.node = settings.node_id or default_node_id()
        # Told of each peer found dead or lost (e.g. the relay, which forgets its agents and tabs).
        self.node_gone: list[Callable[[str], None]] = []
        self.epoch = secrets.token_hex(6)
        self.lease = settings.node_lease
        self.lease_ms = max(1, int(settings.node_lease * 1000))
        self.ready = False  # bootstrapped once: /readyz
        self.connected = False
        self.leaving = False
        self.peers: dict[str, Peer] = {}
        self.published = 0  # batches
        self.received = 0
        self._client: Any = None
        self._sharded = False
        self._pending: dict[SessionKey, int | EndReason] = {}
        # Sessions in this node's hash in Redis.
        self._in_redis: set[SessionKey] = set()
        self._seq = 0
        # The last batch whose MULTI/EXEC Redis answered (a failed one may or may not have landed).
        self._acked = 0
        self._wake = anyio.Event()
        self._lock = anyio.Lock()
        self._last_publish = 0.0
        self.window = settings.publish_window
        # Peers' missing leases are not believed until then (after a bootstrap).
        self._lenient_until = 0.0
        # The subscription buffer overflowed: re-read the peers that moved on.
        self._resync = False
        self._link = Link(self.url, "cluster")

    # -- Replication: mark what to publish (only this node's own changes) --------

    def _mark(self, key: SessionKey, mark: int | EndReason) -> None:
        if self.leaving:
            return
        if mark == TOUCH and key in self._pending:
            return
        self._pending[key] = mark
        self._wake.set()

    def held(self, session: Session) -> None:
        self._mark(_key_of(session), RECORD)

    def touched(self, session: Session) -> None:
        self._mark(_key_of(session), TOUCH)

    def released(self, session: Session, reason: EndReason | None) -> None:
        key = _key_of(session)
        if reason is not None:
            self._mark(key, reason)
        elif key in self._in_redis:
            # Resumed or ended elsewhere: the flush finds it no longer held and takes it back.
            self._mark(key, RECORD)

    def add_metrics(self, gauge: AddMetric, counter: AddMetric) -> None:
        counter("hub_redis_published_batches", "Batches this node published.", lambda: self.published)
        counter("hub_redis_received_batches", "Batches received from peers.", lambda: self.received)
        gauge("hub_redis_connected", "1 while the Redis connection is up.", lambda: self.connected)
        gauge("hub_cluster_peers", "Peer nodes this node hears from.", lambda: len(self.peers))
        gauge(
            "hub_cluster_peer_silence_seconds",
            "Seconds since the last batch of the quietest peer: the replication lag bound "
            "(peers publish at least every node-lease/4).",
            lambda: max((time.monotonic() - p.heard for p in self.peers.values()), default=0.0),
        )

    # -- running ----------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected: bootstrap, mirror, and after any failure retry with backoff and jitter."""
        await self._link.run(self._session, self._down)

    async def _session(self, client: Any, sharded: bool, pubsub: Any) -> None:
        self._client, self._sharded = client, sharded
        await self._subscribe(pubsub)
        # Read the subscription from the start, buffered while the
        # snapshots are read: Redis drops a subscriber that lags.
        send, receive = anyio.create_memory_object_stream[Batch](BUFFER_BATCHES)
        async with send, receive, anyio.create_task_group() as tg:
            tg.start_soon(self._reader, pubsub, send)
            await self._bootstrap(client)
            self._link.up()
            tg.start_soon(self._publisher, client)
            tg.start_soon(self._apply_batches, client, receive)
            tg.start_soon(self._watch_leases, client)

    def _down(self) -> None:
        self.connected = False
        self._client = None

    async def _subscribe(self, pubsub: Any) -> None:
        if self._sharded:
            await pubsub.ssubscribe(CHANNEL)
        else:
            await pubsub.subscribe(CHANNEL)
        # The subscription must be live before the snapshots are read.
        with anyio.fail_after(5):
            while True:
                msg = await self._next(pubsub, 1.0, ignore_subscribe=False)
                if msg is not None and msg["type"] in ("subscribe", "ssubscribe"):
                    return

    async def _next(self, pubsub: Any, timeout: float, ignore_subscribe: bool = True) -> Any:
        get = pubsub.get_sharded_message if self._sharded else pubsub.get_message
        return await get(ignore_subscribe_messages=ignore_subscribe, timeout=timeout)

    async def _bootstrap(self, client: Any) -> None:
        # Redis lost this node's registration: it restarted empty, and every
        # peer's lease is gone until that peer, maybe still in its reconnect
        # backoff, writes it again. Its sessions stay meanwhile.
        lost = self.ready and await client.hget(NODES_KEY, self.node) is None
        await self._republish(client)
        await self._sync_peers(client)
        self._lenient_until = time.monotonic() + self.lease + BACKOFF_MAX * 1.5 if lost else 0.0
        heard = time.monotonic()
        for peer in self.peers.values():
            peer.heard = heard
        self.connected = True
        self.ready = True
        log.info(
            "cluster.bootstrapped",
            extra={"fields": {"node": self.node, "peers": len(self.peers), "sessions": len(self.index)}},
        )

    async def _sync_peers(self, client: Any) -> None:
        """Read each live peer's snapshot that is newer than what this node holds of it."""
        nodes = {k.decode(): v.decode() for k, v in (await client.hgetall(NODES_KEY)).items()}
        others = [n for n in nodes if n != self.node]
        pipe = client.pipeline(transaction=False)
        for n in others:
            pipe.get(_key("lease", n))
            pipe.get(_key("seq", n))
        found = await pipe.execute() if others else []
        for i, node in enumerate(others):
            lease, seq = found[2 * i], found[2 * i + 1]
            peer = self.peers.get(node)
            if lease is None:
                await self._forget_dead(client, node)
            elif peer is None or peer.epoch != nodes[node] or seq is None or int(seq) > peer.seq:
                # Re-read a peer only when its snapshot is newer than what this node holds.
                await self._sync(client, node)

    async def _republish(self, client: Any) -> None:
        """Rewrite this node's records in Redis (Redis may have lost them).

        The batch carries what changed since the last one, as an OPS batch
        would: a peer that missed nothing applies it and reads nothing; one
        that did (its sequence is behind) re-reads this node's snapshot.
        """
        async with self._lock:
            pending, self._pending = self._pending, {}
            try:
                held = self.registry.held()
                up, touch, gone = self._changes(pending)
                self._seq += 1
                records = [raw for _, raw in up]
                batch = _BatchOut(
                    self.node, self.epoch, self._seq, BatchKind.RELOAD, records, touch, gone, self._acked
                )
                pipe = client.pipeline(transaction=True)
                pipe.unlink(_key("sessions", self.node))
                for i in range(0, len(held), HSET_CHUNK):
                    pipe.hset(
                        _key("sessions", self.node),
                        mapping={_field(_key_of(s)): self._record(s) for s in held[i : i + HSET_CHUNK]},
                    )
                self._write_tail(pipe, batch)
                pipe.hset(NODES_KEY, self.node, self.epoch)
                await pipe.execute()
            except BaseException:
                self._restore(pending)
                raise
            self._in_redis = {_key_of(s) for s in held}
            self._acked = self._seq
            self._last_publish = time.monotonic()
            self.published += 1

    def _changes(self, pending: dict[SessionKey, int | EndReason]) -> tuple[Records, Touches, Gone]:
        """A batch's records, lastActiveAt refreshes and removals from pending marks."""
        up: Records = []
        touch: Touches = []
        gone: Gone = []
        for key, mark in pending.items():
            session = self.index.get(*key)
            if isinstance(mark, str) or session is None or not self.registry.holds(key):
                if key in self._in_redis:
                    gone.append((key[0], key[1], mark if isinstance(mark, str) else None))
            elif mark == TOUCH and key in self._in_redis:
                touch.append((key[0], key[1], session.lastActiveAt))
            else:
                up.append((key, Raw(self._record(session))))
        return up, touch, gone

    def _write_tail(self, pipe: Any, batch: _BatchOut) -> None:
        pipe.set(_key("seq", self.node), batch.seq)
        pipe.set(_key("lease", self.node), self.epoch, px=self.lease_ms)
        if self._sharded:
            pipe.spublish(CHANNEL, _encode(batch))
        else:
            pipe.publish(CHANNEL, _encode(batch))

    def _restore(self, pending: dict[SessionKey, int | EndReason]) -> None:
        # Newer marks win; what failed to go out goes with the next batch.
        for key, mark in pending.items():
            self._pending.setdefault(key, mark)

    def _record(self, session: Session) -> bytes:
        """The session as this node holds it: its own tabs and their activity, not the cluster's."""
        key = _key_of(session)
        tabs = self.registry.local_tabs(key)
        active = self.registry.local_active(key, session.active)
        return _encode(msgspec.structs.replace(session, tabs=tabs, connected=tabs > 0, active=active))

    async def _publisher(self, client: Any) -> None:
        ping = max(self.lease / 4, 0.01)
        while not self.leaving:
            with anyio.move_on_after(ping):
                await self._wake.wait()
            if self._pending and self.window:
                # Gather what else changes within the window into the same batch.
                await anyio.sleep(self.window)
            if self._pending or time.monotonic() - self._last_publish >= ping:
                await self.flush(client)

    async def flush(self, client: Any, final: bool = False) -> None:
        """Publish the pending changes as one batch (an empty one refreshes the lease)."""
        async with self._lock:
            if self.leaving and not final:
                return  # nothing may follow the goodbye
            self._wake = anyio.Event()
            pending, self._pending = self._pending, {}
            try:
                up, touch, gone = self._changes(pending)
                self._seq += 1
                records = [raw for _, raw in up]
                batch = _BatchOut(self.node, self.epoch, self._seq, BatchKind.OPS, records, touch, gone)
                pipe = client.pipeline(transaction=True)
                if up:
                    mapping = {_field(key): bytes(raw) for key, raw in up}
                    pipe.hset(_key("sessions", self.node), mapping=mapping)
                if touch:
                    # A heartbeat stores its lastActiveAt alone, never the whole record.
                    pipe.hset(
                        _key("sessions", self.node),
                        mapping={f"{TOUCHED}{p}/{sid}": t for p, sid, t in touch},
                    )
                if gone:
                    removed = [f"{prefix}{p}/{sid}" for p, sid, _ in gone for prefix in ("", TOUCHED)]
                    pipe.hdel(_key("sessions", self.node), *removed)
                self._write_tail(pipe, batch)
                await pipe.execute()
            except BaseException:
                self._restore(pending)
                raise
            for p, sid, _ in gone:
                self._in_redis.discard((p, sid))
            self._in_redis.update(key for key, _ in up)
            self._acked = self._seq
            self._last_publish = time.monotonic()
            self.published += 1

    async def _reader(self, pubsub: Any, send: MemoryObjectSendStream[Batch]) -> None:
        """Read the subscription as fast as it comes; ``_apply_batches`` applies it."""
        while True:
            msg = await self._next(pubsub, 1.0)
            if msg is None:
                continue
            try:
                batch = _decode_batch(msg["data"])
            except (msgspec.DecodeError, RecursionError):  # msgpack nested past the interpreter's limit
                log.warning("cluster.bad_message", extra={"fields": {"bytes": len(msg["data"])}})
                continue
            if batch.node == self.node:
                if batch.epoch != self.epoch:
                    log.error("cluster.duplicate_node_id", extra={"fields": {"node": self.node}})
                continue
            self.received += 1
            try:
                send.send_nowait(batch)
            except anyio.WouldBlock:
                # Over the buffer: drop, and re-read the peers whose sequence moved on.
                self._resync = True

    async def _apply_batches(self, client: Any, receive: MemoryObjectReceiveStream[Batch]) -> None:
        async for batch in receive:
            if self._resync:
                self._resync = False
                await self._sync_peers(client)
            await self._receive(client, batch)

    async def _receive(self, client: Any, batch: Batch) -> None:
        node = batch.node
        now = now_ms()
        peer = self.peers.get(node)
        if peer is not None and peer.epoch != batch.epoch:
            # Restarted under the same id: what the old process held is gone.
            self._drop(node, EndReason.NODE_LOST)
            peer = None
        if batch.kind == BatchKind.BYE:
            self.peers.pop(node, None)
            self.registry.move_node(node, now)
            log.info("cluster.node_left", extra={"fields": {"node": node}})
            return
        if peer is not None and (
            batch.seq == peer.seq + 1
            or (batch.kind == BatchKind.RELOAD and batch.base <= peer.seq < batch.seq)
        ):
            # The next batch, or a RELOAD carrying everything since what this node holds.
            self._apply(node, batch, now)
            peer.seq = batch.seq
            peer.heard = time.monotonic()
            return
        if peer is not None and batch.seq <= peer.seq:
            peer.heard = time.monotonic()
            return  # already in the snapshot read
        # A gap, a new peer, or a rewrite after batches this node missed: read its snapshot.
        if batch.gone:
            # Ends first, so they keep their reasons (a missing record reads as "let go").
            self._apply(node, Batch(node, batch.epoch, batch.seq, BatchKind.OPS, [], [], batch.gone), now)
        if not await self._sync(client, node):
            # Its records are not in Redis (yet): take the batch as it is.
            self._apply(node, batch, now)
            self.peers[node] = Peer(batch.epoch, batch.seq, time.monotonic())

    def _apply(self, node: str, batch: Batch, now: int) -> None:
        registry = self.registry
        for project_key, session_id, reason in batch.gone:
            registry.remote_remove(node, project_key, session_id, reason, now)
        for record in batch.up:
            registry.remote_upsert(node, record, now)
        for project_key, session_id, last_active in batch.touch:
            registry.remote_touch(project_key, session_id, last_active)

    async def _sync(self, client: Any, node: str) -> bool:
        """Make ``node``'s sessions here equal its snapshot in Redis; False when it has none."""
        pipe = client.pipeline(transaction=True)
        pipe.hget(NODES_KEY, node)
        pipe.get(_key("seq", node))
        pipe.hgetall(_key("sessions", node))
        raw_epoch, raw_seq, fields = await pipe.execute()
        if raw_epoch is None or raw_seq is None:
            return False
        epoch = raw_epoch.decode()
        peer = self.peers.get(node)
        if peer is not None and peer.epoch != epoch:
            self._drop(node, EndReason.NODE_LOST)
        records = []
        for field, value in fields.items():
            if field.startswith(TOUCHED_B):
                continue
            try:
                record = _decode_session(value)
            except (msgspec.DecodeError, RecursionError):
                # Not a record any node writes: whoever else writes to Redis cannot stop the mirror.
                log.warning("cluster.bad_record", extra={"fields": {"node": node, "bytes": len(value)}})
                continue
            touched = fields.get(TOUCHED_B + field)
            if touched is not None:
                # activeTime moved with the heartbeats, by the rule peers apply to a touch.
                record.activeTime = active_time(record, int(touched))
                record.lastActiveAt = max(record.lastActiveAt, int(touched))
            records.append(record)
        self.registry.reconcile(node, records, now_ms())
        self.peers[node] = Peer(epoch, int(raw_seq), time.monotonic())
        return True

    def _drop(self, node: str, reason: EndReason) -> None:
        self.peers.pop(node, None)
        for gone in self.node_gone:
            gone(node)
        dropped = self.registry.drop_node(node, reason, now_ms())
        log.warning("cluster.node_lost", extra={"fields": {"node": node, "sessions": dropped}})

    async def _forget_dead(self, client: Any, node: str) -> None:
        """``node``'s lease ran out: drop its sessions here and its keys in Redis."""
        if node in self.peers or self.registry.sessions_of(node):
            self._drop(node, EndReason.NODE_LOST)
        if not await client.exists(_key("lease", node)):
            pipe = client.pipeline(transaction=True)
            pipe.hdel(NODES_KEY, node)
            # UNLINK: a big hash is freed in the background, not in Redis's one thread.
            pipe.unlink(_key("sessions", node), _key("seq", node))
            await pipe.execute()

    async def _watch_leases(self, client: Any) -> None:
        """A peer is dead when its lease key in Redis is gone, whatever this node's reader does."""
        interval = min(self.lease / 10, 0.5)
        while True:
            await anyio.sleep(interval)
            nodes = list(self.peers)
            if not nodes or time.monotonic() < self._lenient_until:
                continue
            leases = await client.mget([_key("lease", n) for n in nodes])
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
        log.info("cluster.left", extra={"fields": {"node": self.node, "sessions": len(self._in_redis)}})

    async def _goodbye(self, client: Any) -> None:
        await self.flush(client, final=True)
        async with self._lock:
            self._seq += 1
            pipe = client.pipeline(transaction=True)
            pipe.hdel(NODES_KEY, self.node)
            pipe.unlink(_key("sessions", self.node), _key("seq", self.node), _key("lease", self.node))
            batch = _encode(_BatchOut(self.node, self.epoch, self._seq, BatchKind.BYE, [], [], []))
            if self._sharded:
                pipe.spublish(CHANNEL, batch)
            else:
                pipe.publish(CHANNEL, batch)
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
