"""The relay's cross-node bus: a tab on node A, the agents watching it on node B.

As ``Replication`` for the registry, a seam with a local implementation
(one process: nothing crosses) and a Redis one. The relay core (``relay``)
calls the bus with sync, non-blocking methods; ``RedisBus`` queues them in
one FIFO, which one task writes to Redis in order (consecutive publishes in
one pipeline), and hands what it reads back to the core.

Channels (the volume carries the project's hash tag, so a Redis Cluster
spreads projects over its shards; sharded pub/sub, SPUBLISH/SSUBSCRIBE, on
a ``redis+cluster://`` URL, plain pub/sub on one Redis):

- ``{p}:relay:<sid>:up`` — the session's events, from the nodes of its tabs
  to the nodes of the agents joined to it, in parts no protocol owns (tab,
  name, JSON, binary parts: ``relay.Up``), which a receiving node encodes
  once for each protocol its agents speak,
  and each tab node's list of its tabs (``Tabs``: the answer to a join, and
  again whenever they change). Subscribed by a node while one of its agents
  is joined to the session.
- ``{p}:relay:<sid>:down`` — agents' events to the tabs (``relay.Down``:
  agent, name, data, and the target tab or none: every tab). Subscribed by a node while it
  holds a tab of the session and knows of an agent of another node joined.
- ``{relay}:ctl`` — joins and leaves (``Join`` carries the agent ids and
  their ``agent`` objects), and a node's goodbye. Every node subscribes to
  it once. It is control traffic (an agent's click, not a page's stream),
  so one channel in one slot is enough, and a tab's node needs no per-session
  subscription to hear that its session became watched.

How a session's events reach Redis only while an agent is joined: a tab's
node publishes to the up channel only while it knows of a joined agent of
another node (from ``Join`` on ``{relay}:ctl``, kept only for sessions with
a tab there), and an agent's node subscribes to it only while one of its
agents is joined. An unwatched session costs no command at all: no
subscription, no key, no publish (a watched-session key read at each
tracker start would have cost one round trip per tracker start).

Order per tab: a tab lives on one node, whose events go through that node's
single FIFO and connection to the channel, and Redis delivers a channel's
messages in order. A node subscribes to the up channel and waits for
Redis's confirmation before it publishes the join, so the answer (its tabs)
and the first events are not missed.

A tab moving to another node within its grace keeps its joined agents: the
agents' node re-sends its joins of the session on ``{relay}:ctl`` whenever
the session's ``tabs`` change (``Relay.session_changed``, a registry
listener: the new node's tab reaches every index through the cluster's
replication). The new node then keeps them, and its tab is told ``agents``
(so it starts streaming) once it knows. The old node forgets them with its
last tab. After a Redis outage the node re-subscribes, re-sends its joins
(``Relay.resync``) and says hello on ``{relay}:ctl``, on which every other
node re-sends its own (whichever of two nodes reconnects first, each hears
the other's); events published meanwhile are dropped, not
queued, as are publishes past ``QUEUE_MAX_BYTES`` waiting for a slow Redis
(a player that misses events asks the page for a fresh snapshot).

With a Redis Cluster, each shard holding a subscription has its own reader
task: redis-py's ``get_sharded_message`` visits shards in turn and waits
out each quiet one's timeout before reading the next.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio
import msgspec
from anyio.abc import TaskGroup
from msgspec import Raw, Struct
from redis.exceptions import RedisError

from .cluster import Link

if TYPE_CHECKING:
    from .relay import Down, Relay, Up

log = logging.getLogger("hub.relay")

SessionKey = tuple[str, str]

CTL: Final = "{relay}:ctl"
# How long a subscription waits for Redis's confirmation before publishing anyway.
CONFIRM_S: Final = 2.0
# Publishes sent in one pipeline at most.
PIPELINE_MAX: Final = 256
# Bytes of publishes waiting for Redis at most; past it they are dropped (and counted),
# as an agent's relay buffer drops: a slow Redis must not grow the node's memory without end.
QUEUE_MAX_BYTES: Final = 64 << 20


def up_channel(key: SessionKey) -> str:
    return f"{{{key[0]}}}:relay:{key[1]}:up"


def down_channel(key: SessionKey) -> str:
    return f"{{{key[0]}}}:relay:{key[1]}:down"


class RelayBus(Protocol):
    """What the relay core needs of a bus between nodes."""

    @property
    def remote(self) -> bool:
        """Other nodes exist: a session's tabs may be elsewhere."""

    def attach(self, relay: Relay) -> None:
        """The core that receives what other nodes send."""

    def watch(self, key: SessionKey) -> None:
        """An agent here joined ``key`` (its first): receive the session's events."""

    def unwatch(self, key: SessionKey) -> None: ...

    def listen(self, key: SessionKey) -> None:
        """A tab of ``key`` is here and an agent elsewhere is joined: receive agents' events."""

    def unlisten(self, key: SessionKey) -> None: ...

    def joined(self, key: SessionKey, agents: list[tuple[str, dict[str, Any]]]) -> None:
        """Agents here joined ``key`` (or re-send their joins)."""

    def left(self, key: SessionKey, agent_id: str) -> None: ...

    def tabs(self, key: SessionKey, tabs: list[str]) -> None:
        """This node's tabs of ``key``, to the agents' nodes."""

    def up(self, key: SessionKey, ev: Up) -> None:
        """A session event to the agents' nodes."""

    def down(self, key: SessionKey, ev: Down) -> None:
        """An agent event to the tabs' nodes."""

    async def run(self) -> None:
        """Long-lived work, run in the hub's task group."""

    async def leave(self) -> None:
        """A drain: tell the others this node's agents and tabs are gone."""


class LocalBus:
    """One process: nothing crosses."""

    remote = False

    def attach(self, relay: Relay) -> None:
        pass

    def watch(self, key: SessionKey) -> None:
        pass

    def unwatch(self, key: SessionKey) -> None:
        pass

    def listen(self, key: SessionKey) -> None:
        pass

    def unlisten(self, key: SessionKey) -> None:
        pass

    def joined(self, key: SessionKey, agents: list[tuple[str, dict[str, Any]]]) -> None:
        pass

    def left(self, key: SessionKey, agent_id: str) -> None:
        pass

    def tabs(self, key: SessionKey, tabs: list[str]) -> None:
        pass

    def up(self, key: SessionKey, ev: Up) -> None:
        pass

    def down(self, key: SessionKey, ev: Down) -> None:
        pass

    async def run(self) -> None:
        pass

    async def leave(self) -> None:
        pass


# -- messages (msgpack: frames cross as bytes, not base64) ----------------------------


class _Join(Struct, array_like=True, tag=1):
    node: str
    project: str
    sid: str
    agents: list[tuple[str, dict[str, Any]]]


class _Leave(Struct, array_like=True, tag=2):
    node: str
    project: str
    sid: str
    agent: str


class _Bye(Struct, array_like=True, tag=3):
    node: str


class _Hello(Struct, array_like=True, tag=7):
    """A node (re)connected: the others re-send their joins, which it may have missed."""

    node: str


class _Tabs(Struct, array_like=True, tag=4):
    node: str
    tabs: list[str]


class _Up(Struct, array_like=True, tag=5):
    node: str
    tab: str
    name: str | None
    # The event's JSON: its tab's envelope when ``wrapped``, else its data.
    json: bytes
    wrapped: bool
    blobs: tuple[bytes, ...]


class _Down(Struct, array_like=True, tag=6):
    node: str
    tab: str | None
    agent: str
    name: str
    data: bytes


_Message = _Join | _Leave | _Bye | _Hello | _Tabs | _Up | _Down
_decode: Final = msgspec.msgpack.Decoder(_Message).decode
_encode: Final = msgspec.msgpack.Encoder().encode

# Queued operations.
_PUB: Final = 0
_SUB: Final = 1
_UNSUB: Final = 2


class RedisBus:
    """The bus through Redis pub/sub (``hub.cluster.connect``'s URL forms)."""

    remote = True

    def __init__(self, url: str, node: str) -> None:
        self.url = url
        self.node = node
        self.connected = False
        # The Redis connection, kept up as the cluster mirror keeps its own.
        self._link = Link(url, "relay")
        self.published = 0  # messages
        self.received = 0
        self.dropped = 0  # publishes dropped: Redis down, or over QUEUE_MAX_BYTES behind
        self._relay: Relay | None = None
        self._queue: deque[tuple[int, str, bytes]] = deque()
        self._queued = 0  # bytes of the queued publishes
        self._wake = anyio.Event()
        # Channels subscribed besides CTL, each with its session.
        self._channels: dict[str, SessionKey] = {}
        self._confirmed: dict[str, anyio.Event] = {}
        self._sharded = False
        self._client: Any = None
        # While connected: the shards (or "" for one Redis) with a reader.
        self._readers: set[str] = set()

    def attach(self, relay: Relay) -> None:
        self._relay = relay

    # -- what the core asks (queued, in order) ----------------------------------

    def _put(self, op: int, channel: str, payload: bytes = b"") -> None:
        if op == _PUB:
            # While disconnected nothing is kept: the reconnection re-sends the joins.
            if not self.connected or self._queued > QUEUE_MAX_BYTES:
                self.dropped += 1
                return
            self._queued += len(payload)
        self._queue.append((op, channel, payload))
        self._wake.set()

    def _subscribe(self, channel: str, key: SessionKey) -> None:
        self._channels[channel] = key
        self._put(_SUB, channel)

    def _unsubscribe(self, channel: str) -> None:
        if self._channels.pop(channel, None) is not None:
            self._put(_UNSUB, channel)

    def watch(self, key: SessionKey) -> None:
        self._subscribe(up_channel(key), key)

    def unwatch(self, key: SessionKey) -> None:
        self._unsubscribe(up_channel(key))

    def listen(self, key: SessionKey) -> None:
        self._subscribe(down_channel(key), key)

    def unlisten(self, key: SessionKey) -> None:
        self._unsubscribe(down_channel(key))

    def joined(self, key: SessionKey, agents: list[tuple[str, dict[str, Any]]]) -> None:
        self._put(_PUB, CTL, _encode(_Join(self.node, key[0], key[1], agents)))

    def left(self, key: SessionKey, agent_id: str) -> None:
        self._put(_PUB, CTL, _encode(_Leave(self.node, key[0], key[1], agent_id)))

    def tabs(self, key: SessionKey, tabs: list[str]) -> None:
        self._put(_PUB, up_channel(key), _encode(_Tabs(self.node, tabs)))

    def up(self, key: SessionKey, ev: Up) -> None:
        # The JSON as the event holds it: a Socket.IO tab's envelope is not unwrapped here.
        envelope = ev.envelope
        if ev.data is None and envelope is not None:
            json, wrapped = envelope, True
        else:
            json, wrapped = ev.payload(), False
        up = _Up(self.node, ev.tab, ev.name, bytes(json), wrapped, ev.blobs)
        self._put(_PUB, up_channel(key), _encode(up))

    def down(self, key: SessionKey, ev: Down) -> None:
        down = _Down(self.node, ev.tab, ev.agent, ev.name, bytes(ev.data))
        self._put(_PUB, down_channel(key), _encode(down))

    # -- running ------------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected; after a failure retry with backoff, re-subscribe and re-send joins."""
        await self._link.run(self._session, self._down)

    async def _session(self, client: Any, sharded: bool, pubsub: Any) -> None:
        self._client, self._sharded = client, sharded
        # What was queued is replaced by a fresh subscription of every channel.
        self._queue.clear()
        self._queued = 0
        self._confirmed.clear()
        for channel in (CTL, *self._channels):
            self._queue.append((_SUB, channel, b""))
        async with anyio.create_task_group() as tg:
            self._readers = set()
            await self._command(tg, pubsub, _SUB, CTL)
            self._queue.popleft()
            self.connected = True
            self._link.up()
            self._put(_PUB, CTL, _encode(_Hello(self.node)))
            if self._relay is not None:
                self._relay.resync()
            await self._writer(tg, client, pubsub)

    def _down(self) -> None:
        self.connected = False
        self._client = None

    async def leave(self) -> None:
        client = self._client
        if client is None:
            return
        with anyio.move_on_after(1):
            with contextlib.suppress(RedisError, OSError):
                await self._publish_one(client, CTL, _encode(_Bye(self.node)))

    async def _publish_one(self, client: Any, channel: str, payload: bytes) -> None:
        if self._sharded:
            await client.spublish(channel, payload)
        else:
            await client.publish(channel, payload)
        self.published += 1

    async def _command(self, tg: TaskGroup, pubsub: Any, op: int, channel: str) -> None:
        if op == _SUB:
            confirmed = self._confirmed[channel] = anyio.Event()
            if self._sharded:
                await pubsub.ssubscribe(channel)
                # One reader per shard: redis-py's round robin over shards would
                # wait out a quiet shard's timeout before reading a busy one.
                node = self._client.get_node_from_key(channel)
                if node.name not in self._readers:
                    self._readers.add(node.name)
                    tg.start_soon(self._shard_reader, pubsub, node)
            else:
                await pubsub.subscribe(channel)
                if not self._readers:
                    self._readers.add("")
                    tg.start_soon(self._reader, pubsub)
            # The subscription must be live before this node publishes a join or tabs.
            if channel == CTL:
                with anyio.fail_after(CONFIRM_S):
                    await confirmed.wait()
            else:
                with anyio.move_on_after(CONFIRM_S):
                    await confirmed.wait()
        else:
            await (pubsub.sunsubscribe if self._sharded else pubsub.unsubscribe)(channel)

    async def _writer(self, tg: TaskGroup, client: Any, pubsub: Any) -> None:
        queue = self._queue
        while True:
            if not queue:
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            op, channel, payload = queue[0]
            if op != _PUB:
                await self._command(tg, pubsub, op, channel)
                queue.popleft()
                continue
            pipe = client.pipeline(transaction=False)
            publish = pipe.spublish if self._sharded else pipe.publish
            n = 0
            while queue and queue[0][0] == _PUB and n < PIPELINE_MAX:
                _, channel, payload = queue.popleft()
                self._queued -= len(payload)
                publish(channel, payload)
                n += 1
            await pipe.execute()
            self.published += n

    async def _reader(self, pubsub: Any) -> None:
        while True:
            self._handle(await pubsub.get_message(ignore_subscribe_messages=False, timeout=1.0))

    async def _shard_reader(self, pubsub: Any, node: Any) -> None:
        """Read one shard's subscriptions while it has some (redis-py drops a shard's without)."""
        try:
            while node.name in pubsub.node_pubsub_mapping:
                get = pubsub.get_sharded_message
                self._handle(await get(ignore_subscribe_messages=False, timeout=1.0, target_node=node))
        finally:
            self._readers.discard(node.name)

    def _handle(self, msg: Any) -> None:
        if msg is None:
            return
        kind = msg["type"]
        channel = msg["channel"]
        if isinstance(channel, bytes):
            channel = channel.decode()
        if kind in ("subscribe", "ssubscribe"):
            event = self._confirmed.get(channel)
            if event is not None:
                event.set()
            return
        if kind not in ("message", "smessage") or self._relay is None:
            return
        try:
            message = _decode(msg["data"])
        except msgspec.DecodeError:
            log.warning("relay.bad_message", extra={"fields": {"bytes": len(msg["data"])}})
            return
        if message.node == self.node:
            return  # this node's own: already delivered here
        self.received += 1
        relay = self._relay
        if isinstance(message, _Up):
            key = self._channels.get(channel)
            if key is not None:
                relay.remote_up(
                    key,
                    message.tab,
                    message.name,
                    Raw(message.json),
                    message.wrapped,
                    message.blobs,
                    time.monotonic(),
                )
        elif isinstance(message, _Down):
            key = self._channels.get(channel)
            if key is not None:
                relay.remote_down(key, message.agent, message.name, Raw(message.data), message.tab)
        elif isinstance(message, _Tabs):
            key = self._channels.get(channel)
            if key is not None:
                relay.remote_tabs(message.node, key, message.tabs)
        elif isinstance(message, _Join):
            relay.remote_joined(message.node, (message.project, message.sid), message.agents)
        elif isinstance(message, _Leave):
            relay.remote_left(message.node, (message.project, message.sid), message.agent)
        elif isinstance(message, _Hello):
            relay.resync()
        else:
            relay.node_gone(message.node)
