"""Lifecycle webhooks (CONTRACT §9, README "Webhooks"): ``session.started`` and ``session.ended``
POSTed to configured URLs, signed, at least once, in order per session, and in a cluster sent by
exactly one node.

Three parts:

- ``Webhooks`` is a registry ``Listener``: it only decides whether this node sends an event and
  enqueues it (a started one with a copy of the record: it changes later). O(1), no I/O, a few
  µs; ids, bodies and signatures are made by the sender. So a slow or dead receiver never slows
  a tracker, an agent or a search.
- ``UrlQueue`` (one per URL, I/O-free, every call takes ``now`` in Unix ms) holds what a URL
  still has to receive: bounded, one event in flight per session (a session's events go out in
  order), retried until each event's budget runs out; after a failure the whole URL backs off
  (exponential, with jitter) and sends one probe at a time until a delivery succeeds, so a dead
  receiver costs one request per backoff period, not one per queued event.
- ``Webhooks.run`` is the sender: one dispatcher per URL starting up to ``IN_FLIGHT`` requests
  over one aiohttp session (pooled keep-alive connections, timeouts), and in a cluster the
  claimer.

Who sends what (the node's view through the registry; README "Webhooks", "In a cluster"):

- ``session.started``: the node whose tracker created the session (``registry.holds`` at
  ``session_started``). A reload, a reconnect within the grace or a second tab on any node that
  already mirrors the session is a change, not a start, so it sends nothing.
- ``session.ended``: every node sees every end (its own trackers', a peer's, a grace running out
  with no node holding the session after a drain, a dead node's ``node_lost``). In a cluster each
  node that sees one claims the event in Redis (``SET NX`` on its id, which every node derives
  alike from projectKey, sessionID, timestamp and type); the node whose claim lands sends it, the
  others drop it. Started events are claimed too, so two nodes creating the same session at once
  send one start. A draining node takes on no new event: its sessions move to other nodes.
- In order across nodes: a started claim holds ``node epoch`` until its sender settled it with
  every URL (then ``+``). An ended whose started is still held by a live peer waits for it.

A node killed with events in its queues loses them (the queues are in memory); a drain delivers
what it can within ``--drain-timeout``.
"""

from __future__ import annotations

import hmac
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import anyio
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from msgspec import Struct
from redis.exceptions import RedisClusterException, RedisError

from .clock import now_ms
from .cluster import Cluster, connect
from .config import Settings
from .metrics import Metrics
from .record import Session
from .registry import Registry, SessionKey
from .replication import Replication
from .wire import EndReason, WebhookType

log = logging.getLogger("hub.webhooks")

# Concurrent requests per URL (its connection pool), and while it fails: one probe.
IN_FLIGHT: Final = 32
# Backoff of a failing URL, seconds: doubles per consecutive failure, times 0.5-1.5.
BACKOFF_MIN: Final = 0.5
BACKOFF_MAX: Final = 10.0
CONNECT_TIMEOUT: Final = 5.0
REQUEST_TIMEOUT: Final = 10.0
# Drops and failures are logged once per interval, with counts.
LOG_EVERY_S: Final = 30.0
# Cluster: events claimed per Redis round trip; how often waiting ends re-check their start.
CLAIM_BATCH: Final = 500
RECHECK_S: Final = 0.25
# A claim outlives every retry of its event, and the skew between nodes seeing the same end.
CLAIM_MARGIN_MS: Final = 60_000
DONE: Final = b"+"
# Event ids are UUIDv5 in this namespace: the same event gets the same id on every node.
NAMESPACE: Final = uuid.UUID("6f1c1e52-3f0e-4d55-9a43-2c1d8e0b7a19")


class Payload(Struct, omit_defaults=True):
    """The JSON body of one webhook (README, "Webhooks")."""

    id: str
    type: WebhookType
    time: int  # Unix ms when the event happened
    session: Session
    reason: EndReason | None = None  # session.ended only


_encode: Final = msgspec.json.Encoder().encode


def event_id(kind: WebhookType, project_key: str, session_id: str, timestamp: int) -> str:
    """Deterministic: every node derives the same id for the same event, a receiver dedupes by it."""
    return str(uuid.uuid5(NAMESPACE, f"{kind}\x00{project_key}\x00{session_id}\x00{timestamp}"))


def sign(secret: bytes, body: bytes) -> str:
    """The ``X-Hub-Signature`` header: HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.digest(secret, body, "sha256").hex()


def url_label(url: str) -> str:
    """A URL as metrics and logs show it: no credentials, no query (either may hold a token)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class Event:
    """One event on its way: shared by the queues of every URL it goes to.

    The listener only records it; ``prepare`` (the sender, or the claimer) makes its id, body
    and signature, off the registry's path.
    """

    __slots__ = (
        "after", "body", "created", "id", "key", "kind", "reason", "remaining", "session", "signature"
    )  # fmt: skip

    def __init__(self, kind: WebhookType, session: Session, reason: EndReason | None, created: int) -> None:
        self.kind = kind
        self.session = session
        self.reason = reason
        self.created = created
        self.key: SessionKey = (session.projectKey, session.sessionID)
        self.id = ""
        self.body = b""
        self.signature = ""
        # URL queues that have not settled it yet (delivered, expired or refused).
        self.remaining = 0
        # Cluster, ended only: the id of the session's started, which must go first.
        self.after: str | None = None

    def prepare(self, secret: bytes, cluster: bool) -> None:
        if self.body:
            return
        s = self.session
        self.id = event_id(self.kind, s.projectKey, s.sessionID, s.timestamp)
        if self.kind is WebhookType.ENDED:
            if cluster:
                self.after = event_id(WebhookType.STARTED, s.projectKey, s.sessionID, s.timestamp)
            s = msgspec.structs.replace(s, live=False)  # the record as it left
        self.body = _encode(Payload(self.id, self.kind, self.created, s, self.reason))
        self.signature = sign(secret, self.body)


class UrlQueue:
    """What one URL still has to receive. I/O-free: every call takes ``now`` (Unix ms).

    Each session has a FIFO of its events; only its head is ready or in flight, so a session's
    events go out in order while other sessions' go out concurrently. ``settled`` is told when an
    event leaves (delivered or dropped).
    """

    def __init__(
        self,
        url: str,
        limit: int,
        budget_ms: int,
        settled: Callable[[Event], None],
        rng: random.Random | None = None,
    ) -> None:
        self.url = url
        self.label = url_label(url)
        self.limit = limit
        self.budget_ms = budget_ms
        self._settled = settled
        self._rng = rng or random.Random()
        self._sessions: dict[SessionKey, deque[Event]] = {}
        # Session heads that may be sent, oldest first (a failed one goes back to the front).
        self._ready: deque[Event] = deque()
        self.size = 0  # events held, in any state
        self.in_flight = 0
        self.failures = 0  # consecutive failed attempts
        self.paused_until = 0
        self.last_error = ""
        # Counters (metrics).
        self.delivered = 0
        self.failed = 0
        self.overflow = 0
        self.expired = 0

    def push(self, event: Event) -> bool:
        """Queue ``event``; False (counted) when the queue holds its limit."""
        if self.size >= self.limit:
            self.overflow += 1
            return False
        self.size += 1
        event.remaining += 1
        waiting = self._sessions.get(event.key)
        if waiting is None:
            self._sessions[event.key] = deque((event,))
            self._ready.append(event)
        else:
            waiting.append(event)
        return True

    def take(self, now: int) -> Event | None:
        """The next event to send now, or None: nothing ready, backing off, or at the in-flight limit."""
        self.expire(now)
        if now < self.paused_until or self.in_flight >= (1 if self.failures else IN_FLIGHT):
            return None
        if not self._ready:
            return None
        self.in_flight += 1
        return self._ready.popleft()

    def done(self, event: Event, ok: bool, now: int, error: str = "") -> None:
        """The attempt at ``event`` taken from ``take`` succeeded (a 2xx) or not."""
        self.in_flight -= 1
        if ok:
            self.delivered += 1
            self.failures = 0
            self.paused_until = 0
            self._leave(event)
            return
        self.failed += 1
        self.last_error = error
        self._ready.appendleft(event)  # retried first: it is the oldest
        if now >= self.paused_until:
            # Requests that were in flight together fail together: one step of backoff, not many.
            self.failures += 1
            backoff = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** (self.failures - 1))
            self.paused_until = now + int(backoff * 1000 * self._rng.uniform(0.5, 1.5))
        self.expire(now)

    def expire(self, now: int) -> None:
        """Drop ready events whose budget ran out (counted); their sessions' next events move up."""
        ready = self._ready
        while ready and now >= ready[0].created + self.budget_ms:
            self.expired += 1
            self._leave(ready.popleft())

    def wait_ms(self, now: int) -> int | None:
        """How long nothing can be sent (backing off), or None: until something is pushed or done."""
        return self.paused_until - now if self.paused_until > now and self._ready else None

    def _leave(self, event: Event) -> None:
        self.size -= 1
        waiting = self._sessions[event.key]
        waiting.popleft()
        if waiting:
            self._ready.append(waiting[0])
        else:
            del self._sessions[event.key]
        event.remaining -= 1
        self._settled(event)


class _Throttle:
    """One log line per interval for a URL's drops and failures, with the counts since the last."""

    __slots__ = ("expired", "failed", "next_at", "overflow")

    def __init__(self) -> None:
        self.next_at = 0.0
        self.failed = self.overflow = self.expired = 0


class Webhooks:
    """The registry listener that takes events on, their per-URL queues, and the sender (``run``)."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        cluster: Cluster | None = None,
        draining: Callable[[], bool] = lambda: False,
        clock: Callable[[], int] = now_ms,
        rng: random.Random | None = None,
    ) -> None:
        self.registry = registry
        self.cluster = cluster
        self._draining = draining
        self.clock = clock
        self.secret = settings.webhook_secret.encode()
        self.budget_ms = int(settings.webhook_budget * 1000)
        self.limit = settings.webhook_queue
        rng = rng or random.Random()
        queues: dict[str, UrlQueue] = {}
        for url in (*settings.webhook_urls, *(u for _, u in settings.webhooks_file)):
            if url not in queues:
                queues[url] = UrlQueue(url, self.limit, self.budget_ms, self._settled, rng)
        self.queues = list(queues.values())
        labels: set[str] = set()
        for q in self.queues:
            # URLs that differ only in their query or credentials still get one series each.
            label, n = q.label, 1
            while label in labels:
                n += 1
                label = f"{q.label}#{n}"
            q.label = label
            labels.add(label)
        every = tuple(queues[u] for u in settings.webhook_urls) + tuple(
            queues[u] for p, u in settings.webhooks_file if p == "*"
        )
        self._every = tuple(dict.fromkeys(every))
        by_project: dict[str, tuple[UrlQueue, ...]] = {}
        for project, url in settings.webhooks_file:
            if project != "*":
                by_project[project] = (*by_project.get(project, self._every), queues[url])
        self._by_project = {p: tuple(dict.fromkeys(qs)) for p, qs in by_project.items()}
        # Cluster: events waiting for their claim, and claimed ends waiting for their start.
        self.intake: deque[tuple[Event, tuple[UrlQueue, ...]]] = deque()
        self.held: list[tuple[Event, tuple[UrlQueue, ...]]] = []
        # Claimed starts settled with every URL: their claims are marked done in Redis.
        self.marks: list[str] = []
        self.claims_lost = 0
        self._wake: dict[UrlQueue | None, anyio.Event] = {q: anyio.Event() for q in (*self.queues, None)}
        self._throttles = {q: _Throttle() for q in self.queues}
        # Set whenever a request or a claim round ends (a drain waits on it).
        self._progress = anyio.Event()

    def targets(self, project_key: str) -> tuple[UrlQueue, ...]:
        return self._by_project.get(project_key, self._every)

    # -- Listener: decide, build, enqueue; nothing else ---------------------------

    def session_started(self, session: Session) -> None:
        if not self.registry.holds((session.projectKey, session.sessionID)) or self._draining():
            return
        cluster = self.cluster
        if cluster is None:
            self._take_on(WebhookType.STARTED, session, None)
            return
        # Where the node does not mirror the project, the start may resume a session held
        # elsewhere (the cluster looks it up in Redis first): a resume sends nothing.
        record = msgspec.structs.replace(session)

        def decided(resumed: bool) -> None:
            if not resumed:
                self._take_on(WebhookType.STARTED, record, None)

        cluster.after_adoption(session, decided)

    def session_changed(self, session: Session, changes: Mapping[str, object]) -> None:
        pass

    def session_touched(self, session: Session) -> None:
        pass

    def session_ended(self, session: Session, reason: EndReason) -> None:
        # In a cluster every node that sees the end claims it; one sends (module docstring). A
        # node that does not mirror the project sees only its own part: its end may be none.
        cluster = self.cluster
        if cluster is not None and not cluster.answers_for(session):
            return
        if not self._draining():
            self._take_on(WebhookType.ENDED, session, reason)

    def _take_on(self, kind: WebhookType, session: Session, reason: EndReason | None) -> None:
        targets = self.targets(session.projectKey)
        if not targets:
            return
        if kind is WebhookType.STARTED:
            session = msgspec.structs.replace(session)  # the record as it started; an ended one stays
        event = Event(kind, session, reason, self.clock())
        if self.cluster is None:
            self._enqueue(event, targets)
            return
        if len(self.intake) >= self.limit:
            for q in targets:
                q.overflow += 1
            return
        self.intake.append((event, targets))
        self._wake[None].set()

    def _enqueue(self, event: Event, targets: tuple[UrlQueue, ...]) -> None:
        for q in targets:
            if q.push(event):
                self._wake[q].set()
        if event.remaining == 0:
            self._settled(event)  # refused by every queue

    def _settled(self, event: Event) -> None:
        if event.remaining == 0 and self.cluster is not None and event.kind is WebhookType.STARTED:
            self.marks.append(event.id)
            self._wake[None].set()

    # -- cluster claims: what to do with Redis's answers (I/O-free) ---------------

    def claimed(self, event: Event, targets: tuple[UrlQueue, ...], won: bool, started: bytes | None) -> None:
        """``event``'s claim landed (``won``) or another node's did; ``started``: the value of the
        session's started claim, read with an ended's claim."""
        if not won:
            self.claims_lost += 1
            return
        if event.kind is WebhookType.ENDED and self._start_pending(started):
            self.held.append((event, targets))
            return
        self._enqueue(event, targets)

    def _start_pending(self, started: bytes | None) -> bool:
        """Whether a live peer still has to deliver the session's start (this node's own goes first
        anyway: its queues are in order per session)."""
        cluster = self.cluster
        if started is None or started == DONE or cluster is None:
            return False
        node, _, epoch = started.decode().partition(" ")
        if node == cluster.node:
            return False
        peer = cluster.peers.get(node)
        return peer is not None and peer.epoch == epoch

    def recheck(self, values: list[bytes | None], now: int) -> None:
        """The started claims of ``self.held``, read again: release those no longer pending."""
        still = []
        for (event, targets), value in zip(self.held, values, strict=True):
            if self._start_pending(value) and now < event.created + self.budget_ms:
                still.append((event, targets))
            else:
                self._enqueue(event, targets)
        self.held = still

    def expire_intake(self, now: int) -> None:
        """Events whose budget ran out while waiting for a claim (Redis unreachable)."""
        while self.intake and now >= self.intake[0][0].created + self.budget_ms:
            _, targets = self.intake.popleft()
            for q in targets:
                q.expired += 1

    def claim_value(self) -> str:
        assert self.cluster is not None
        return f"{self.cluster.node} {self.cluster.epoch}"

    # -- metrics and logs -----------------------------------------------------------

    def add_metrics(self, metrics: Metrics) -> None:
        def by_url(read: Callable[[UrlQueue], int]) -> Callable[[], dict[tuple[str, ...], float]]:
            return lambda: {(q.label,): float(read(q)) for q in self.queues}

        def dropped() -> dict[tuple[str, ...], float]:
            found: dict[tuple[str, ...], float] = {}
            for q in self.queues:
                found[(q.label, "overflow")] = q.overflow
                found[(q.label, "expired")] = q.expired
            return found

        counter, gauge = metrics.counter, metrics.gauge
        counter(
            "hub_webhook_deliveries", "Webhooks a URL accepted (2xx).", by_url(lambda q: q.delivered), ["url"]
        )
        counter(
            "hub_webhook_failed_attempts",
            "Webhook attempts that failed (no 2xx, timeout, connection error); each is retried.",
            by_url(lambda q: q.failed),
            ["url"],
        )
        gauge(
            "hub_webhook_queue_depth", "Webhook events queued for a URL.", by_url(lambda q: q.size), ["url"]
        )
        counter(
            "hub_webhook_dropped",
            "Webhook events given up: the URL's queue was full (overflow) or the retry budget ran out "
            "(expired).",
            dropped,
            ["url", "reason"],
        )
        if self.cluster is not None:
            counter(
                "hub_webhook_claims_lost",
                "Webhook events another node claimed first, so it sends them.",
                lambda: self.claims_lost,
            )
            gauge(
                "hub_webhook_claim_backlog",
                "Webhook events waiting for their claim in Redis, or for their session's start.",
                lambda: len(self.intake) + len(self.held),
            )

    def report(self, now: float) -> None:
        """Log each URL's drops and failures since its last line, at most once per ``LOG_EVERY_S``."""
        for q in self.queues:
            t = self._throttles[q]
            if now < t.next_at:
                continue
            overflow, expired, failed = q.overflow - t.overflow, q.expired - t.expired, q.failed - t.failed
            if overflow or expired:
                fields = {"url": q.label, "overflow": overflow, "expired": expired, "queued": q.size}
                log.warning("webhook.dropped", extra={"fields": fields})
            if failed:
                fields = {"url": q.label, "failed_attempts": failed, "last_error": q.last_error}
                log.warning("webhook.failing", extra={"fields": fields})
            if overflow or expired or failed:
                t.next_at = now + LOG_EVERY_S
                t.overflow, t.expired, t.failed = q.overflow, q.expired, q.failed

    # -- the sender -------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver until cancelled: up to ``IN_FLIGHT`` requests per URL over one pooled HTTP session."""
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=IN_FLIGHT, keepalive_timeout=30, ttl_dns_cache=60
        )
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT, sock_connect=CONNECT_TIMEOUT)
        async with (
            aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                headers={"User-Agent": "hub-webhooks", "Content-Type": "application/json"},
                skip_auto_headers=("Accept-Encoding",),
            ) as http,
            anyio.create_task_group() as tg,
        ):
            for q in self.queues:
                # A worker per request slot, each handed one event at a time (a task per
                # request would cost its creation; workers waiting on one event would all wake).
                send, receive = anyio.create_memory_object_stream[Event](IN_FLIGHT)
                tg.start_soon(self._dispatch, q, send)
                for _ in range(IN_FLIGHT):
                    tg.start_soon(self._worker, http, q, receive.clone())
                receive.close()
            if self.cluster is not None:
                tg.start_soon(self._claimer)
            while True:
                await anyio.sleep(1.0)
                self.report(time.monotonic())

    async def _dispatch(self, q: UrlQueue, send: MemoryObjectSendStream[Event]) -> None:
        """Hand each event ``q`` lets go to a free worker; woken by a push or a request's end."""
        while True:
            now = self.clock()
            event = q.take(now)
            if event is not None:
                event.prepare(self.secret, False)
                # take() keeps at most IN_FLIGHT out: the buffer has room.
                send.send_nowait(event)
                continue
            wait = q.wait_ms(now)
            # Nothing can change q between take() and here (no await): no wake-up is lost.
            wake = self._wake[q] = anyio.Event()
            with anyio.move_on_after(wait / 1000 if wait is not None else math.inf):
                await wake.wait()

    async def _worker(
        self, http: aiohttp.ClientSession, q: UrlQueue, receive: MemoryObjectReceiveStream[Event]
    ) -> None:
        async for event in receive:
            error = await self._post(http, q.url, event)
            q.done(event, not error, self.clock(), error)
            self._wake[q].set()  # a slot is free, or the backoff changed
            self._progress.set()

    async def _post(self, http: aiohttp.ClientSession, url: str, event: Event) -> str:
        """One attempt: "" when the receiver answered 2xx, else what went wrong."""
        headers = {"X-Hub-Event-Id": event.id, "X-Hub-Signature": event.signature}
        try:
            async with http.post(url, data=event.body, headers=headers, allow_redirects=False) as resp:
                # Read the answer to its end, so the connection goes back to the pool.
                async for _ in resp.content.iter_chunked(65536):
                    pass
                return "" if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"[:200]

    async def drain(self, timeout: float) -> None:
        """A drain: deliver what is queued, for at most ``timeout`` seconds."""
        with anyio.move_on_after(max(timeout, 0)):
            while self.intake or self.held or any(q.size for q in self.queues):
                self._progress = anyio.Event()
                await self._progress.wait()
        left = sum(q.size for q in self.queues) + len(self.intake) + len(self.held)
        if left:
            log.warning("webhook.drain_left", extra={"fields": {"events": left}})

    # -- cluster: claims in Redis ------------------------------------------------------

    async def _claimer(self) -> None:
        assert self.cluster is not None
        client, _ = connect(self.cluster.url)
        ttl = self.budget_ms + CLAIM_MARGIN_MS
        delay = BACKOFF_MIN
        failures = 0
        try:
            while True:
                if not (self.intake or self.marks):
                    wake = self._wake[None] = anyio.Event()
                    with anyio.move_on_after(RECHECK_S if self.held else None):
                        await wake.wait()
                try:
                    await self._claim_round(client, ttl)
                except (RedisError, RedisClusterException, OSError) as exc:
                    failures += 1
                    if failures == 1 or failures % 100 == 0:
                        fields = {"error": f"{type(exc).__name__}: {exc}", "failures": failures}
                        log.warning("webhook.claims_failing", extra={"fields": fields})
                    self.expire_intake(self.clock())
                    await anyio.sleep(delay * random.uniform(0.5, 1.5))
                    delay = min(delay * 2, BACKOFF_MAX)
                    continue
                failures = 0
                delay = BACKOFF_MIN
                self._progress.set()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await client.aclose()

    async def _claim_round(self, client: Any, ttl: int) -> None:
        """Re-check held ends, claim up to ``CLAIM_BATCH`` events, mark settled starts: one round trip."""
        held = self.held  # only this task changes it
        batch = [self.intake[i] for i in range(min(CLAIM_BATCH, len(self.intake)))]
        marks = self.marks[:CLAIM_BATCH]
        value = self.claim_value()
        for event, _ in batch:
            event.prepare(self.secret, True)
        pipe = client.pipeline(transaction=False)
        for event, _ in held:
            assert event.after is not None
            pipe.get(claim_key(event.after))
        for event, _ in batch:
            pipe.set(claim_key(event.id), value, nx=True, px=ttl)
            if event.after is not None:
                pipe.get(claim_key(event.after))
        for eid in marks:
            pipe.set(claim_key(eid), DONE, xx=True, px=ttl)
        answers = iter(await pipe.execute())
        # Taken off only now: a failed round trip leaves them for the next one, in order.
        for _ in batch:
            self.intake.popleft()
        del self.marks[: len(marks)]
        self.recheck([next(answers) for _ in held], self.clock())
        for event, targets in batch:
            won = bool(next(answers))
            started = next(answers) if event.after is not None else None
            self.claimed(event, targets, won, started)


def claim_key(eid: str) -> str:
    # The {hub} hash tag keeps claims in the cluster's one slot (cluster.py's keys).
    return f"{{hub}}:webhook:{eid}"


def build(
    settings: Settings, registry: Registry, replication: Replication, draining: Callable[[], bool]
) -> Webhooks | None:
    """The hub's webhooks, or None when no URL is configured."""
    if not (settings.webhook_urls or settings.webhooks_file):
        return None
    cluster = replication if isinstance(replication, Cluster) else None
    return Webhooks(settings, registry, cluster, draining)
