"""Prometheus metrics (CONTRACT §5): ``GET /metrics`` in the text format.

The hot path only bumps plain ints (``counts[key] += 1`` on a small dict,
~0.03 µs, where a pre-bound prometheus_client child costs ~0.27 µs with its
lock; loadtest/bench_metrics.py); ``HubCollector`` turns them into metric families at scrape time.
Numbers owned by other modules (agent queues, Redis) come in through
``Metrics.gauge`` / ``Metrics.counter``: a function read at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .counts import AGENT, ConnectionCounts, MessageCounts, SessionCounts, tracker_counts
from .http_api import Request, Response
from .index import LiveIndex

# ``*_created`` series (a timestamp per counter) only add noise to a scrape.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Search answers take from tens of µs (a few sessions) to tens of ms (a scan of 100k).
SEARCH_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# What an external read returns: one value, or values by label values.
Reading = float | Mapping[tuple[str, ...], float]


@dataclass(frozen=True)
class _External:
    name: str
    documentation: str
    read: Callable[[], Reading]
    labels: Sequence[str]
    counter: bool


def _hub_version() -> str:
    try:
        return version("hub")
    except PackageNotFoundError:
        return "unknown"


class Metrics:
    """Everything ``/metrics`` shows for one hub (one registry per hub, so tests can run several)."""

    def __init__(self, index: LiveIndex, per_project: bool = False) -> None:
        self.index = index
        self.per_project = per_project
        self.connections = ConnectionCounts()
        self.trackers = tracker_counts()
        self.agents = MessageCounts(AGENT)
        self.sessions = SessionCounts()
        self.externals: list[_External] = []
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(HubCollector(self))
        self.search_seconds = Histogram(
            "hub_search_duration_seconds",
            "Time to answer one session search, seconds.",
            buckets=SEARCH_BUCKETS,
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)

    def gauge(
        self, name: str, documentation: str, read: Callable[[], Reading], labels: Sequence[str] = ()
    ) -> None:
        """Show a value owned elsewhere, read at each scrape."""
        self.externals.append(_External(name, documentation, read, tuple(labels), counter=False))

    def counter(
        self, name: str, documentation: str, read: Callable[[], Reading], labels: Sequence[str] = ()
    ) -> None:
        """Show a monotonic count owned elsewhere (``name`` without ``_total``)."""
        self.externals.append(_External(name, documentation, read, tuple(labels), counter=True))

    def observe_search(self, seconds: float) -> None:
        self.search_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def route(self, _request: Request) -> Response:
        return Response(200, self.render(), content_type=CONTENT_TYPE_PLAIN_0_0_4)


class HubCollector(Collector):
    """Metric families from the hub's plain counts, built at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.m
        info = GaugeMetricFamily("hub_info", "Hub version; always 1.", labels=["version"])
        info.add_metric([_hub_version()], 1)
        yield info

        conns = m.connections
        now = GaugeMetricFamily("hub_connections", "Open WebSocket connections.", labels=["kind"])
        opened = CounterMetricFamily(
            "hub_connections_opened", "WebSocket connections accepted.", labels=["kind"]
        )
        for kind in sorted(conns.opened):
            now.add_metric([kind], conns.open_now(kind))
            opened.add_metric([kind], conns.opened[kind])
        yield now
        yield opened
        closed = CounterMetricFamily(
            "hub_connections_closed",
            "WebSocket connections closed, by close code (1006: dropped without a close frame).",
            labels=["kind", "code"],
        )
        for (kind, close), n in sorted(conns.closed.items()):
            closed.add_metric([kind, str(close)], n)
        yield closed
        http = CounterMetricFamily("hub_http_responses", "HTTP responses, by status code.", labels=["code"])
        for status, n in sorted(conns.http_responses.items()):
            http.add_metric([str(status)], n)
        yield http

        received = CounterMetricFamily(
            "hub_messages_received", "Valid WebSocket messages received, by type.", labels=["kind", "type"]
        )
        sent = CounterMetricFamily(
            "hub_messages_sent", "WebSocket messages sent, by type.", labels=["kind", "type"]
        )
        errors = CounterMetricFamily(
            "hub_errors", "Messages refused with an error frame, by error code.", labels=["kind", "code"]
        )
        for counts in (m.trackers, m.agents):
            for name, n in sorted(counts.received.items()):
                received.add_metric([counts.kind, name], n)
            for name, n in sorted(counts.sent.items()):
                sent.add_metric([counts.kind, name], n)
            for code, n in sorted(counts.errors.items()):
                errors.add_metric([counts.kind, code], n)
        yield received
        yield sent
        yield errors

        yield GaugeMetricFamily(
            "hub_live_sessions",
            "Live sessions in this node's index (cluster-wide in cluster mode).",
            value=len(m.index),
        )
        yield CounterMetricFamily(
            "hub_sessions_started",
            "Sessions that entered this node's index (peers' too in cluster mode).",
            value=m.sessions.started,
        )
        ended = CounterMetricFamily(
            "hub_sessions_ended", "Sessions that left this node's index, by reason.", labels=["reason"]
        )
        for reason, n in sorted(m.sessions.ended.items()):
            ended.add_metric([reason], n)
        yield ended
        if m.per_project:
            per = GaugeMetricFamily(
                "hub_project_live_sessions", "Live sessions in the index, by project key.", labels=["project"]
            )
            for project in sorted(m.index.projects()):
                per.add_metric([project], m.index.count(project))
            yield per

        for ext in m.externals:
            yield _external(ext)


def _external(ext: _External) -> Metric:
    family = CounterMetricFamily if ext.counter else GaugeMetricFamily
    value = ext.read()
    if isinstance(value, Mapping):
        metric = family(ext.name, ext.documentation, labels=list(ext.labels))
        for labels, v in sorted(value.items()):
            metric.add_metric(list(labels), v)
        return metric
    return family(ext.name, ext.documentation, value=value)
