"""Webhooks (CONTRACT §9, README "Webhooks").

The unit layer drives the I/O-free parts with a fake clock (``now`` in Unix ms): which events a
node takes on, their ids, bodies and signatures, the per-URL queues (order per session, bounds,
backoff, budget) and the cluster decisions on Redis's answers. The end-to-end layer runs a hub
and a real HTTP receiver over real sockets. Three nodes over Redis: test_webhooks_cluster.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest
import websockets

from hub.cluster import Cluster, Peer
from hub.config import ConfigError, Settings, parse_settings
from hub.partitions import owners
from hub.record import Session, Start, Update
from hub.registry import Registry
from hub.webhooks import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    DONE,
    IN_FLIGHT,
    LOG_EVERY_S,
    NAMESPACE,
    Event,
    UrlQueue,
    Webhooks,
    WebhookType,
    event_id,
    sign,
    url_label,
)
from hub.wire import EndReason
from tests.helpers import HubProcess, http, recording_registry, running_hub, wait_for
from tests.webhook_receiver import Receiver

SECRET = "s3cret"
URL = "http://127.0.0.1:9/hook"
T0 = 1_700_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def hooks(
    registry: Registry | None = None, cluster: Cluster | None = None, **settings: Any
) -> tuple[Webhooks, Registry, Clock]:
    settings.setdefault("webhook_urls", (URL,))
    draining = settings.pop("draining", False)
    config = Settings(webhook_secret=SECRET, **settings)
    registry = registry or recording_registry()[0]
    clock = Clock()
    webhooks = Webhooks(config, registry, cluster, lambda: draining, clock, random.Random(7))
    registry.listeners.append(webhooks)
    return webhooks, registry, clock


def event(sid: str, kind: WebhookType = WebhookType.STARTED, created: int = T0) -> Event:
    session = Session(sessionID=sid, projectKey="p1", projectId=0, timestamp=T0, lastActiveAt=T0)
    e = Event(kind, session, None, created)
    e.id = f"{kind}-{sid}"
    return e


def queue(limit: int = 1000, budget_ms: int = 300_000) -> tuple[UrlQueue, list[str]]:
    settled: list[str] = []
    return UrlQueue(URL, limit, budget_ms, lambda e: settled.append(e.id), random.Random(7)), settled


def drain_ready(q: UrlQueue, now: int) -> list[Event]:
    taken = []
    while (e := q.take(now)) is not None:
        taken.append(e)
    return taken


# -- ids, bodies, signatures -----------------------------------------------------------


def test_event_ids_are_derived_from_the_session_and_type_alone() -> None:
    a = event_id(WebhookType.STARTED, "p1", "s", 5)
    assert a == str(uuid.uuid5(NAMESPACE, "session.started\x00p1\x00s\x005"))  # a UUIDv5
    assert a == event_id(WebhookType.STARTED, "p1", "s", 5)  # on any node, at any time
    others = {
        event_id(WebhookType.ENDED, "p1", "s", 5),
        event_id(WebhookType.STARTED, "p2", "s", 5),
        event_id(WebhookType.STARTED, "p1", "t", 5),
        event_id(WebhookType.STARTED, "p1", "s", 6),
    }
    assert a not in others and len(others) == 4


def test_a_start_and_an_end_are_signed_bodies_with_the_record() -> None:
    webhooks, registry, clock = hooks()
    session, _ = registry.start("p1", 3, Start(sessionID="s", userID="ann", timestamp=T0 - 5), T0, True)
    registry.update(session, Update(userID="bob"), T0 + 1)
    (started,) = drain_ready(webhooks.queues[0], T0)
    clock.now = T0 + 10
    registry.end(session, EndReason.ENDED)
    webhooks.queues[0].done(started, True, T0 + 10)
    (ended,) = drain_ready(webhooks.queues[0], T0 + 10)
    for e in (started, ended):  # the sender makes the body, after the registry moved on
        e.prepare(SECRET.encode(), cluster=False)

    body = json.loads(started.body)
    assert body["id"] == started.id == event_id(WebhookType.STARTED, "p1", "s", T0 - 5)
    assert (body["type"], body["time"], "reason" in body) == ("session.started", T0, False)
    assert body["session"]["userID"] == "ann" and body["session"]["live"] is True  # as it started
    body = json.loads(ended.body)
    assert (body["type"], body["time"], body["reason"]) == ("session.ended", T0 + 10, "ended")
    assert body["session"]["userID"] == "bob"  # as it ended
    assert body["session"]["live"] is False and session.live  # a copy: the record is not changed
    for e in (started, ended):
        assert e.signature == "sha256=" + hmac.new(SECRET.encode(), e.body, hashlib.sha256).hexdigest()
        assert e.signature == sign(SECRET.encode(), e.body)


def test_url_labels_hide_credentials_and_queries_and_stay_distinct() -> None:
    assert url_label("https://u:pw@example.com:8443/h?token=x") == "https://example.com:8443/h"
    urls = ("http://a.test/h?p=1", "http://a.test/h?p=2", "http://a.test/h")
    webhooks, _, _ = hooks(webhook_urls=urls)
    assert [q.label for q in webhooks.queues] == ["http://a.test/h", "http://a.test/h#2", "http://a.test/h#3"]


# -- which events a node takes on ---------------------------------------------------------


def test_only_a_real_start_is_a_start() -> None:
    webhooks, registry, _ = hooks()
    q = webhooks.queues[0]
    session, _ = registry.start("p1", 0, Start(sessionID="s"), T0, True)
    assert q.size == 1
    # A second tab, a reload (the tab closes and comes back within the grace): changes, not starts.
    registry.start("p1", 0, Start(sessionID="s"), T0 + 1, True)
    registry.detach(session, T0 + 2)
    registry.detach(session, T0 + 3)
    registry.start("p1", 0, Start(sessionID="s"), T0 + 4, True)
    # Another node's session, mirrored here: that node sends its start.
    peer = Session(sessionID="t", projectKey="p1", projectId=0, timestamp=T0, lastActiveAt=T0)
    registry.remote_upsert("n2", peer, T0)
    assert q.size == 1


def test_grace_run_out_ends_the_session_once_with_its_reason() -> None:
    webhooks, registry, clock = hooks(recording_registry(grace_ms=1000)[0])
    session, _ = registry.start("p1", 0, Start(sessionID="s"), T0, True)
    registry.detach(session, T0 + 10)
    clock.now = T0 + 2000
    registry.sweep(T0 + 2000)
    q = webhooks.queues[0]
    started = q.take(T0)
    assert started is not None and q.take(T0) is None  # the end waits for its start
    q.done(started, True, T0 + 2000)
    ended = q.take(T0 + 2000)
    assert ended is not None and ended.reason is EndReason.DISCONNECTED


def test_a_draining_node_takes_on_nothing() -> None:
    webhooks, registry, _ = hooks(draining=True)
    session, _ = registry.start("p1", 0, Start(sessionID="s"), T0, True)
    registry.end(session, EndReason.ENDED)
    assert webhooks.queues[0].size == 0


def test_urls_by_project_and_for_every_project(tmp_path: Any) -> None:
    path = tmp_path / "hooks"
    path.write_text("# comment\np1 http://a.test/p1\n* http://b.test/all\np1 http://b.test/all\n")
    settings = parse_settings(["serve", "--webhooks-file", str(path), "--webhook-secret", "x"])
    settings = replace(settings, webhook_urls=("http://c.test/",))
    webhooks = Webhooks(settings, recording_registry()[0])
    urls = {p: [q.url for q in webhooks.targets(p)] for p in ("p1", "p2")}
    assert urls == {
        "p1": ["http://c.test/", "http://b.test/all", "http://a.test/p1"],
        "p2": ["http://c.test/", "http://b.test/all"],
    }
    assert len(webhooks.queues) == 3  # one queue per URL, however many projects name it


def test_a_project_without_urls_costs_nothing(tmp_path: Any) -> None:
    path = tmp_path / "hooks"
    path.write_text("p1 http://a.test/p1\n")
    settings = parse_settings(["serve", "--webhooks-file", str(path), "--webhook-secret", "x"])
    webhooks, registry, _ = hooks(webhooks_file=settings.webhooks_file, webhook_urls=())
    registry.start("p2", 0, Start(sessionID="s"), T0, True)
    assert webhooks.queues[0].size == 0


# -- one URL's queue ----------------------------------------------------------------------


def test_a_session_s_events_go_one_at_a_time_in_order_others_concurrently() -> None:
    q, settled = queue()
    for e in (event("a"), event("a", WebhookType.ENDED), event("b"), event("b", WebhookType.ENDED)):
        assert q.push(e)
    first = drain_ready(q, T0)
    assert [e.id for e in first] == ["session.started-a", "session.started-b"]
    q.done(first[1], True, T0)
    (b_end,) = drain_ready(q, T0)
    assert b_end.id == "session.ended-b"
    q.done(first[0], True, T0)
    q.done(b_end, True, T0)
    (a_end,) = drain_ready(q, T0)
    q.done(a_end, True, T0)
    assert settled == ["session.started-b", "session.started-a", "session.ended-b", "session.ended-a"]
    assert (q.size, q.delivered) == (0, 4)


def test_in_flight_is_bounded_per_url() -> None:
    q, _ = queue()
    for i in range(IN_FLIGHT + 5):
        q.push(event(f"s{i}"))
    assert len(drain_ready(q, T0)) == IN_FLIGHT


def test_a_full_queue_refuses_and_counts() -> None:
    q, _ = queue(limit=2)
    assert q.push(event("a")) and q.push(event("b"))
    assert not q.push(event("c"))
    assert (q.size, q.overflow) == (2, 1)


def test_a_failing_url_backs_off_exponentially_with_jitter_and_probes_one_at_a_time() -> None:
    q, _ = queue()
    for sid in "abc":
        q.push(event(sid))
    now = T0
    ratios = []
    for n in range(1, 9):
        taken = drain_ready(q, now)
        assert len(taken) == (3 if n == 1 else 1)  # once failing: one probe at a time
        for e in taken:  # failing together: one step of backoff
            q.done(e, False, now, "HTTP 503")
        base = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** (n - 1)) * 1000
        assert base * 0.5 <= q.paused_until - now <= base * 1.5
        ratios.append((q.paused_until - now) / base)
        assert q.take(q.paused_until - 1) is None
        now = q.paused_until
    assert len(set(ratios)) == len(ratios)  # jitter: failing hubs do not retry in step
    (probe,) = drain_ready(q, now)
    q.done(probe, True, now)
    assert len(drain_ready(q, now)) == 2 and q.failures == 0  # healthy again: full speed
    assert q.last_error == "HTTP 503" and q.failed == 3 + 7


def test_events_past_their_budget_are_dropped_and_counted() -> None:
    q, settled = queue(budget_ms=5000)
    q.push(event("a"))
    q.push(event("a", WebhookType.ENDED, created=T0 + 4000))
    (e,) = drain_ready(q, T0)
    q.done(e, False, T0 + 5000)  # failed after its budget
    (nxt,) = drain_ready(q, T0 + 6000)
    assert nxt.id == "session.ended-a" and q.expired == 1
    q.done(nxt, False, T0 + 6000)
    assert q.take(T0 + 9000) is None and q.size == 0 and q.expired == 2
    assert settled == ["session.started-a", "session.ended-a"]


def test_receiver_down_for_30_s_then_back_loses_nothing() -> None:
    """Fake clock: 40 sessions start and end while the receiver is down for 30 s."""
    q, _ = queue(budget_ms=120_000)
    for i in range(40):
        q.push(event(f"s{i}", created=T0 + i * 100))
        q.push(event(f"s{i}", WebhookType.ENDED, created=T0 + i * 100 + 50))
    back = T0 + 30_000
    now, attempts, received = T0, 0, []
    in_flight: list[Event] = []
    while q.size:
        in_flight += drain_ready(q, now)
        for e in in_flight:
            attempts += 1
            if now >= back:
                received.append((now, e.id))
            q.done(e, now >= back, now)
        in_flight = []
        now += 10
    ids = [eid for _, eid in received]
    assert Counter(ids) == Counter({f"{k}-s{i}": 1 for i in range(40) for k in WebhookType})
    for i in range(40):
        assert ids.index(f"session.started-s{i}") < ids.index(f"session.ended-s{i}")
    assert received[0][0] - back <= BACKOFF_MAX * 1500  # the next probe after it returns
    # While down: the first requests, then one probe per backoff period, not a flood.
    assert attempts - 80 <= IN_FLIGHT + 10
    assert q.expired == q.overflow == 0


# -- cluster: what a node does with Redis's answers ----------------------------------------


def cluster_hooks() -> tuple[Webhooks, Cluster, Clock]:
    settings = Settings(redis_url="redis://127.0.0.1:1", node_id="n1", webhook_urls=(URL,))
    registry = recording_registry()[0]
    cluster = Cluster(settings, registry)  # no I/O until run()
    cluster.ready = True
    cluster.mirrored.add("p1")  # as p1's owner: it sees every start and end of p1
    webhooks, _, clock = hooks(registry, cluster, redis_url=settings.redis_url)
    return webhooks, cluster, clock


def test_a_node_that_does_not_mirror_the_project_sends_no_end_and_a_start_only_if_not_a_resume() -> None:
    webhooks, cluster, _ = cluster_hooks()
    cluster.mirrored.clear()
    # p1's owners are n2 and n3 (partitions.owners): this node only holds some of its sessions.
    cluster.peers["n2"] = Peer("e2", 0.0)
    cluster.peers["n3"] = Peer("e3", 0.0)
    assert owners("p1", ["n1", "n2", "n3"]) == ["n3", "n2"]
    registry = webhooks.registry
    session, _ = registry.start("p1", 0, Start(sessionID="s", timestamp=5), T0, True)
    registry.start("p1", 0, Start(sessionID="r", timestamp=5), T0, True)
    # Its own view of an end may be none (a tab resumed on another node): the owners decide.
    registry.end(session, EndReason.ENDED)
    assert not webhooks.intake and set(cluster._unknown) == {("p1", "s"), ("p1", "r")}
    # The lookup in Redis found "r" held elsewhere: a resume; "s" was new.
    for key, waiters in cluster._unknown.items():
        for then in waiters:
            then(key[1] == "r")
    assert [(e.kind, e.key[1]) for e, _ in webhooks.intake] == [(WebhookType.STARTED, "s")]


def test_in_a_cluster_events_wait_for_their_claim() -> None:
    webhooks, cluster, _ = cluster_hooks()
    registry = webhooks.registry
    session, _ = registry.start("p1", 0, Start(sessionID="s", timestamp=5), T0, True)
    registry.end(session, EndReason.ENDED)
    # A peer's end too: every node that sees an end claims it.
    peer = Session(sessionID="t", projectKey="p1", projectId=0, timestamp=5, lastActiveAt=T0)
    registry.remote_upsert("n2", peer, T0)
    registry.drop_node("n2", EndReason.NODE_LOST, T0)
    assert webhooks.queues[0].size == 0
    for e, _ in webhooks.intake:
        e.prepare(SECRET.encode(), cluster=True)
    kinds = [(e.kind, e.key[1], e.after) for e, _ in webhooks.intake]
    assert kinds == [
        (WebhookType.STARTED, "s", None),
        (WebhookType.ENDED, "s", event_id(WebhookType.STARTED, "p1", "s", 5)),
        (WebhookType.ENDED, "t", event_id(WebhookType.STARTED, "p1", "t", 5)),
    ]
    assert webhooks.claim_value() == f"n1 {cluster.epoch}"


def test_a_lost_claim_is_dropped_a_won_one_is_queued() -> None:
    webhooks, _, _ = cluster_hooks()
    targets = tuple(webhooks.queues)
    webhooks.claimed(event("a"), targets, won=False, started=None)
    webhooks.claimed(event("b"), targets, won=True, started=None)
    assert (webhooks.claims_lost, webhooks.queues[0].size) == (1, 1)


def test_an_end_waits_while_a_live_peer_still_has_to_send_the_start() -> None:
    webhooks, cluster, clock = cluster_hooks()
    targets = tuple(webhooks.queues)
    cluster.peers["n2"] = Peer("e2", 0.0)
    q = webhooks.queues[0]
    for sid, started in [
        ("done", DONE),  # delivered: go
        ("none", None),  # no claim (expired, or no start was ever sent): go
        ("mine", f"n1 {cluster.epoch}".encode()),  # this node's own start is ahead in its queue
        ("dead", b"n3 e3"),  # its sender is gone: go
        ("restarted", b"n2 old"),  # n2 restarted since: that start is lost
        ("peer", b"n2 e2"),  # n2 lives and will send it: wait
    ]:
        webhooks.claimed(event(sid, WebhookType.ENDED), targets, won=True, started=started)
    assert q.size == 5 and [e.key[1] for e, _ in webhooks.held] == ["peer"]
    webhooks.recheck([b"n2 e2"], clock.now + 1000)
    assert q.size == 5
    webhooks.recheck([DONE], clock.now + 2000)
    assert q.size == 6 and not webhooks.held


def test_a_held_end_goes_when_its_budget_is_spent_waiting() -> None:
    webhooks, cluster, clock = cluster_hooks()
    cluster.peers["n2"] = Peer("e2", 0.0)
    webhooks.claimed(event("s", WebhookType.ENDED), tuple(webhooks.queues), won=True, started=b"n2 e2")
    webhooks.recheck([b"n2 e2"], clock.now + webhooks.budget_ms)
    assert webhooks.queues[0].size == 1  # and then expires there, counted


def test_settled_starts_are_marked_done_for_the_other_nodes() -> None:
    webhooks, _, _ = cluster_hooks()
    q = webhooks.queues[0]
    webhooks.claimed(event("s"), (q,), won=True, started=None)
    e = q.take(T0)
    assert e is not None and not webhooks.marks
    q.done(e, True, T0)
    assert webhooks.marks == ["session.started-s"]


def test_the_claim_backlog_is_bounded_and_expires() -> None:
    webhooks, _, clock = cluster_hooks()
    webhooks.limit = 2
    registry = webhooks.registry
    for sid in "abc":
        registry.start("p1", 0, Start(sessionID=sid), T0, True)
    assert len(webhooks.intake) == 2 and webhooks.queues[0].overflow == 1
    webhooks.expire_intake(clock.now + webhooks.budget_ms)
    assert not webhooks.intake and webhooks.queues[0].expired == 2


# -- logs ----------------------------------------------------------------------------------


def test_drops_and_failures_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "hub.webhooks")
    webhooks, _, _ = hooks(webhook_queue=1)
    q = webhooks.queues[0]
    q.push(event("a"))
    for sid in "bcd":
        q.push(event(sid))
    e = q.take(T0)
    assert e is not None
    q.done(e, False, T0, "ClientConnectorError: refused")
    webhooks.report(100.0)
    webhooks.report(101.0)
    q.push(event("e"))
    webhooks.report(100.0 + LOG_EVERY_S - 1)
    lines = [(r.getMessage(), r.__dict__["fields"]) for r in caplog.records]
    assert lines == [
        ("webhook.dropped", {"url": URL, "overflow": 3, "expired": 0, "queued": 1}),
        (
            "webhook.failing",
            {"url": URL, "failed_attempts": 1, "last_error": "ClientConnectorError: refused"},
        ),
    ]
    webhooks.report(100.0 + LOG_EVERY_S)
    assert caplog.records[-1].__dict__["fields"]["overflow"] == 1  # the count since the last line


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--webhook-urls", "ftp://x/h"], {}, "webhook url must be http\\(s\\)"),
        (["--webhook-urls", "http://x/h"], {}, "need --webhook-secret"),
        ([], {"HUB_WEBHOOK_BUDGET": "0"}, "HUB_WEBHOOK_BUDGET: webhook-budget must be > 0"),
        (["--webhook-queue", "x"], {}, "webhook-queue must be a number"),
        (["--webhooks-file", "/nonexistent"], {}, "cannot read"),
    ],
)
def test_bad_webhook_settings_are_one_line(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_settings(["serve", *argv], env)


def test_a_bad_webhooks_file_line_and_unknown_projects(tmp_path: Any) -> None:
    path = tmp_path / "hooks"
    path.write_text("p1 http://a/\np1\n")
    with pytest.raises(ConfigError, match="line 2 is not 'projectKey url'"):
        parse_settings(["serve", "--webhooks-file", str(path), "--webhook-secret", "x"])
    path.write_text("p9 http://a/\n")
    argv = ["serve", "--webhooks-file", str(path), "--webhook-secret", "x", "--projects", "p1"]
    with pytest.raises(ConfigError, match="names projects not in --projects: p9"):
        parse_settings(argv)


def test_the_process_exits_2_on_a_bad_webhook_url() -> None:
    with HubProcess("--webhook-urls", "not a url", port=1) as hub:
        code, err = hub.wait_exit()
    assert code == 2 and err.strip().splitlines() == [
        "hub: error: argument --webhook-urls: webhook url must be http(s)://host/..., got 'not a url'"
    ]


# -- end to end: a hub and a real receiver --------------------------------------------------


async def tracker(port: int, sid: str) -> Any:
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws/tracker/p1")
    await ws.send(json.dumps({"type": "start", "sessionID": sid}))
    assert json.loads(await ws.recv())["type"] == "started"
    return ws


def order_ok(receiver: Receiver) -> dict[str, list[str]]:
    """Each session's event types as delivered; asserts none ended before it started."""
    seen: dict[str, list[str]] = {}
    for e in receiver.events():
        seen.setdefault(e["session"]["sessionID"], []).append(e["type"])
    for sid, kinds in seen.items():
        assert kinds[0] == "session.started", (sid, kinds)
    return seen


async def test_signed_events_arrive_in_order_over_reused_connections() -> None:
    async with (
        Receiver() as receiver,
        running_hub(webhook_urls=(receiver.url,), webhook_secret=SECRET, grace=1.0) as h,
    ):
        trackers = [await tracker(h.port, f"s{i}") for i in range(30)]
        for ws in trackers[:20]:
            await ws.send(json.dumps({"type": "end"}))
        for ws in trackers[20:]:
            await ws.close()  # ended by the grace: disconnected
        await wait_for(lambda: len(receiver.deliveries) == 60, timeout=10)
        for ws in trackers:
            await ws.close()
    for d in receiver.deliveries:
        assert d.verified(SECRET)
        assert d.headers["x-hub-event-id"] == d.event["id"]
        assert d.headers["content-type"] == "application/json"
    seen = order_ok(receiver)
    assert all(kinds == ["session.started", "session.ended"] for kinds in seen.values()) and len(seen) == 30
    reasons = Counter(e.get("reason") for e in receiver.events())
    assert reasons == {None: 30, "ended": 20, "disconnected": 10}
    assert receiver.connections <= IN_FLIGHT  # keep-alive: not one connection per event


@pytest.mark.parametrize("down_s", [3.0, pytest.param(30.0, marks=pytest.mark.slow)])
async def test_receiver_down_then_back_gets_every_event(down_s: float) -> None:
    async with (
        Receiver() as receiver,
        running_hub(
            webhook_urls=(receiver.url,), webhook_secret=SECRET, webhook_budget=down_s + 30, grace=300
        ) as h,
    ):
        await receiver.stop()
        stopped = time.monotonic()
        for i in range(20):
            ws = await tracker(h.port, f"s{i}")
            if i % 2:
                await ws.send(json.dumps({"type": "end"}))
            await ws.close()
        queued = (await http(h.port, "GET", "/metrics")).body.decode()
        assert f'hub_webhook_queue_depth{{url="{receiver.url}"}} 30.0' in queued
        await asyncio.sleep(down_s - (time.monotonic() - stopped))
        await receiver.start()
        back = time.monotonic()
        await wait_for(lambda: len({d.event["id"] for d in receiver.deliveries}) >= 30, timeout=20)
        latency = time.monotonic() - back
        metrics = (await http(h.port, "GET", "/metrics")).body.decode()
    assert latency <= BACKOFF_MAX * 1.5 + 1
    ids = Counter(d.event["id"] for d in receiver.deliveries)
    assert len(ids) == 30 and all(d.verified(SECRET) for d in receiver.deliveries)
    assert sum(ids.values()) == 30  # nothing was in flight as it went down: no duplicate either
    order_ok(receiver)
    assert f'hub_webhook_deliveries_total{{url="{receiver.url}"}} 30.0' in metrics
    assert "hub_webhook_failed_attempts_total" in metrics
    assert f'hub_webhook_dropped_total{{reason="expired",url="{receiver.url}"}} 0.0' in metrics


async def test_a_stalled_receiver_never_slows_trackers_and_overflow_is_counted() -> None:
    async with (
        Receiver() as receiver,
        running_hub(
            webhook_urls=(receiver.url,), webhook_secret=SECRET, webhook_queue=50, drain_timeout=1
        ) as h,
    ):
        receiver.mode = "stall"
        ws = await tracker(h.port, "first")
        await wait_for(lambda: receiver.attempts == 1)  # its request hangs
        worst = 0.0
        for i in range(100):
            t = time.perf_counter()
            (await tracker(h.port, f"s{i}")).transport.abort()
            worst = max(worst, time.perf_counter() - t)
        await ws.close()
        metrics = (await http(h.port, "GET", "/metrics")).body.decode()
    assert worst < 2.0  # a start's round trip never waits for the receiver (its timeout is 10 s)
    assert f'hub_webhook_dropped_total{{reason="overflow",url="{receiver.url}"}} 51.0' in metrics
    assert f'hub_webhook_queue_depth{{url="{receiver.url}"}} 50.0' in metrics
