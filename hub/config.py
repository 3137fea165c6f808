"""Settings of a hub process: defaults, ``HUB_*`` variables and flags.

Every setting is a flag ``--name`` and a variable ``HUB_NAME`` (the flag
wins). ``parse_settings`` raises ``ConfigError`` with one clear line.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import secrets
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit, urlunsplit

import maxminddb
from redis.connection import parse_url


class ConfigError(ValueError):
    """A bad flag or value: one line, exit code 2."""


PROJECT_KEY_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
NODE_ID_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 9001
    api_key: str = ""
    # Project key -> project id; None accepts any project key (id 0).
    # From --projects, a ``Projects`` that also carries per-project API keys.
    projects: Mapping[str, int] | None = None
    # Project key -> API keys that may read only that project (--keys-file).
    keys_file: Mapping[str, tuple[str, ...]] | None = None
    redis_url: str | None = None
    workers: int = 1
    grace: float = 30.0
    heartbeat_timeout: float = 60.0
    node_lease: float = 15.0
    # This node's name in the cluster; "" = hostname-pid (README, "Cluster").
    node_id: str = ""
    # Seconds a node gathers its changes before publishing them as one batch (0 = at once).
    publish_window: float = 0.005
    # Seconds a node gathers heartbeats (lastActiveAt only) before publishing them; a
    # change to a record goes out within the publish window and takes them along.
    touch_window: float = 2.0
    # Seconds a node keeps mirroring a project after its last search there (README, "Cluster").
    mirror_idle: float = 300.0
    # Project -> partitions its sessions are split into by sessionID (README, "Cluster").
    project_buckets: Mapping[str, int] | None = None
    log_level: str = "info"
    log_format: str = "text"
    # Transport limits.
    max_frame: int = 64 * 1024
    max_http_body: int = 1024 * 1024
    max_header: int = 16 * 1024
    handshake_timeout: float = 10.0
    backlog: int = 4096
    # Agents.
    agent_interval: float = 1.0
    agent_max_pending: int = 100_000
    # Hardening (README, "Security"); 0 turns a limit off.
    rate_limit: float = 100.0
    rate_burst: int = 200
    read_batch: int = 64
    tracker_rcvbuf: int = 16 * 1024
    max_conns_per_ip: int = 0
    max_sessions_per_project: int = 250_000
    max_agents: int = 1000
    max_filters: int = 50
    agent_idle_timeout: float = 300.0
    # Origins allowed to open tracker connections; None allows any.
    tracker_origins: tuple[str, ...] | None = None
    # Origins whose pages may read the HTTP API (CORS); "*" is any; None: no CORS.
    cors_origins: tuple[str, ...] | None = None
    # How often timers (heartbeat timeout, grace) are checked.
    sweep_interval: float = 1.0
    # Operations: seconds a SIGTERM drain may take before exiting; per-project metric labels.
    drain_timeout: float = 10.0
    metrics_per_project: bool = False
    # Enrichment (hub/enrich.py): a MaxMind-format database; proxies whose X-Forwarded-For is believed.
    geoip_db: str | None = None
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # Webhooks (README, "Webhooks"): URLs for every project, (projectKey or "*", URL) pairs
    # from --webhooks-file, the signing secret, seconds an event is retried, events queued per URL.
    webhook_urls: tuple[str, ...] = ()
    webhooks_file: tuple[tuple[str, str], ...] = ()
    webhook_secret: str = ""
    webhook_budget: float = 300.0
    webhook_queue: int = 10_000
    # Live relay (README, "Live relay").
    relay_max_joins: int = 10
    relay_agent_buffer: int = 1 << 20
    relay_agent_stall: float = 10.0
    relay_rate: float = float(1 << 20)
    relay_burst: int = 4 << 20
    relay_max_event: int = 64 << 10
    # OpenReplay's ASSIST_KEY: its assist HTTP API under /assist/{key}/ ("" = not served).
    assist_key: str = ""
    # OpenReplay's Socket.IO assist protocol: path, agent JWT secret, Engine.IO ping
    # interval and timeout (s), largest packet (README, "Migrating from OpenReplay's assist server").
    openreplay_path: str = "/ws-assist/socket"
    openreplay_jwt_secret: str = ""
    openreplay_ping_interval: float = 25.0
    openreplay_ping_timeout: float = 20.0
    openreplay_max_payload: int = 4 << 20
    # True when the API key was generated at start (printed once).
    api_key_generated: bool = field(default=False, compare=False)

    def project_id(self, key: str) -> int | None:
        """The configured id of a project key, 0 when any key goes, None when unknown."""
        if self.projects is None:
            return 0 if PROJECT_KEY_RE.fullmatch(key) else None
        return self.projects.get(key)


class Projects(dict[str, int]):
    """Project key -> project id, plus the API keys given with ``key:id:apikey``."""

    def __init__(self) -> None:
        super().__init__()
        self.api_keys: dict[str, tuple[str, ...]] = {}


# Buckets a large project may be split into, at most.
MAX_BUCKETS: Final = 1024


def parse_buckets(text: str) -> dict[str, int]:
    """``key=N,...``: a project's sessions split into N partitions by sessionID."""
    buckets: dict[str, int] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, count = item.partition("=")
        if not sep or not PROJECT_KEY_RE.fullmatch(key):
            raise argparse.ArgumentTypeError(f"expected projectKey=buckets, got {item!r}")
        if not count.isdigit() or not 1 <= int(count) <= MAX_BUCKETS:
            raise argparse.ArgumentTypeError(f"buckets of {key!r} must be 1-{MAX_BUCKETS}, got {count!r}")
        buckets[key] = int(count)
    return buckets


def parse_projects(text: str) -> Projects:
    # ArgumentTypeError: argparse shows its message as is (a ValueError it would hide).
    projects = Projects()
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, _, rest = item.partition(":")
        pid, _, api_key = rest.partition(":")
        if not PROJECT_KEY_RE.fullmatch(key):
            raise argparse.ArgumentTypeError(f"invalid project key {key!r} (1-64 of A-Za-z0-9._-)")
        if pid:
            try:
                projects[key] = int(pid)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"project id of {key!r} must be an integer, got {pid!r}"
                ) from None
        else:
            projects[key] = 0
        if api_key:
            projects.api_keys[key] = (*projects.api_keys.get(key, ()), api_key)
    if not projects:
        raise argparse.ArgumentTypeError("give at least one project key (key[:id[:apikey]],...)")
    return projects


def parse_keys_file(path: str) -> dict[str, tuple[str, ...]]:
    """Per-project API keys: one ``projectKey:apiKey`` a line; ``#`` comments."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path!r}: {exc.strerror}") from None
    keys: dict[str, tuple[str, ...]] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        project, sep, api_key = line.partition(":")
        project, api_key = project.strip(), api_key.strip()
        # The key itself is never echoed: only the line number says where.
        if not sep or not PROJECT_KEY_RE.fullmatch(project) or not api_key:
            raise argparse.ArgumentTypeError(f"line {number} is not projectKey:apiKey")
        keys[project] = (*keys.get(project, ()), api_key)
    return keys


def _webhook_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"webhook url must be http(s)://host/..., got {redact_url(text)!r}")
    return text


def _webhook_urls(text: str) -> tuple[str, ...]:
    urls = tuple(_webhook_url(u.strip()) for u in text.split(",") if u.strip())
    if not urls:
        raise argparse.ArgumentTypeError("give at least one webhook url")
    return urls


def parse_webhooks_file(path: str) -> tuple[tuple[str, str], ...]:
    """Webhook URLs by project: one ``projectKey URL`` (or ``* URL``: every project) a line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path!r}: {exc.strerror}") from None
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(lines, 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) != 2 or not (words[0] == "*" or PROJECT_KEY_RE.fullmatch(words[0])):
            raise argparse.ArgumentTypeError(f"{path} line {number} is not 'projectKey url' or '* url'")
        try:
            pairs.append((words[0], _webhook_url(words[1])))
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{path} line {number}: {exc}") from None
    return tuple(pairs)


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/").lower() for o in text.split(",") if o.strip())
    if not origins:
        raise argparse.ArgumentTypeError("give at least one origin, e.g. https://example.com")
    return origins


def _origin(text: str) -> str:
    """``scheme://host[:port]`` as a browser sends it in ``Origin`` (lowercase, no path)."""
    parts = urlsplit(text)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # not a number, or out of range
        port_ok = False
    path_ok = parts.path in ("", "/") and not parts.query and not parts.fragment
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        port_ok = False
    if not (port_ok and path_ok):
        raise argparse.ArgumentTypeError(f"{text!r} is not an origin (scheme://host[:port]) nor *")
    return f"{parts.scheme}://{parts.netloc}".lower()


def _cors_origins(text: str) -> tuple[str, ...]:
    origins = tuple(o if o == "*" else _origin(o) for o in (o.strip() for o in text.split(",")) if o)
    if not origins:
        raise argparse.ArgumentTypeError("give at least one origin, e.g. https://dashboard.example.com, or *")
    return origins


def _number(name: str, kind: type, zero: str | None) -> Any:
    """A flag converter: a number > 0, or >= 0 where 0 means ``zero`` (e.g. "off")."""

    def conv(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if value < 0 or (value == 0 and zero is None):
            bound = f">= 0 (0 = {zero})" if zero is not None else "> 0"
            raise argparse.ArgumentTypeError(f"{name} must be {bound}, got {text!r}")
        return value

    conv.__name__ = kind.__name__
    return conv


def _positive(name: str, kind: type) -> Any:
    return _number(name, kind, None)


def _non_negative(name: str, kind: type, zero: str = "off") -> Any:
    return _number(name, kind, zero)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be an integer, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {port}")
    return port


def redact_url(text: str) -> str:
    """``text`` with any password replaced, for messages and logs."""
    parts = urlsplit(text)
    if parts.password is None:
        return text
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:[redacted]@{host}"))


def _redis_url(text: str) -> str:
    # Checked here, in full, as redis-py will read it: a URL it cannot use must
    # be one line and exit 2 at start, not an error logged on every retry.
    shown = redact_url(text)
    scheme = urlsplit(text).scheme
    if scheme not in ("redis", "rediss", "redis+cluster", "rediss+cluster", "unix"):
        raise argparse.ArgumentTypeError(
            f"redis url must start with redis://, rediss://, redis+cluster:// or unix://, got {shown!r}"
        )
    try:
        parsed = parse_url(text.replace("+cluster://", "://", 1))  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid redis url {shown!r}: {exc}") from None
    if scheme != "unix" and not parsed.get("host"):
        raise argparse.ArgumentTypeError(f"invalid redis url {shown!r}: it names no host")
    return text


def _geoip_db(path: str) -> str:
    # Opened once here so a wrong path is one line at start, not a traceback later.
    try:
        maxminddb.open_database(path).close()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read geoip database {path!r}: {exc.strerror}") from None
    except maxminddb.InvalidDatabaseError:
        raise argparse.ArgumentTypeError(f"{path!r} is not a MaxMind-format geoip database") from None
    return path


def _trusted_proxies(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in text.split(","):
        if item.strip():
            try:
                networks.append(ipaddress.ip_network(item.strip()))
            except ValueError as exc:
                raise argparse.ArgumentTypeError(f"bad CIDR: {exc}") from None
    if not networks:
        raise argparse.ArgumentTypeError("give at least one CIDR, e.g. 10.0.0.0/8")
    return tuple(networks)


def _node_id(text: str) -> str:
    if not NODE_ID_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"node id must be 1-64 of A-Za-z0-9._:-, got {text!r}")
    return text


def _assist_key(text: str) -> str:
    # One path segment, as OpenReplay's backend puts it in ASSIST_URL.
    if not re.fullmatch(r"[A-Za-z0-9_.~-]{1,256}", text):
        raise argparse.ArgumentTypeError("assist key must be 1-256 of A-Za-z0-9_.~- (one URL path segment)")
    return text


def _openreplay_path(text: str) -> str:
    path = text.rstrip("/")
    if not re.fullmatch(r"(/[A-Za-z0-9_.~-]+)+", path):
        raise argparse.ArgumentTypeError(f"openreplay path must be /segment[/segment...], got {text!r}")
    return path


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help, but a line never breaks inside a hyphenated word: a flag named in a
    help text (``--relay-burst``) stays whole, for the reader and for grep."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


# name, type, help. Each also read from HUB_<NAME>.
OPTIONS: Final[list[tuple[str, Any, str]]] = [
    ("host", str, "address to listen on (default 127.0.0.1)"),
    ("port", _port, "port for WebSocket and HTTP (default 9001)"),
    ("api-key", str, "organization API key for agents and /public/ (default: random, printed once)"),
    (
        "projects",
        parse_projects,
        "accepted project keys, key[:id[:apikey]],...; an apikey reads only its project (default: any)",
    ),
    ("keys-file", parse_keys_file, "file of per-project API keys, one projectKey:apiKey a line"),
    ("redis-url", _redis_url, "Redis URL; makes this process a cluster node (default: single node)"),
    (
        "workers",
        _positive("workers", int),
        "processes on one port, each a cluster node; needs Redis (default 1)",
    ),
    ("grace", _positive("grace", float), "seconds a disconnected session waits for its tracker (default 30)"),
    (
        "heartbeat-timeout",
        _positive("heartbeat-timeout", float),
        "seconds of tracker silence before closing (default 60)",
    ),
    (
        "node-lease",
        _positive("node-lease", float),
        "seconds before a silent node's sessions are dropped (default 15)",
    ),
    ("node-id", _node_id, "this node's name in a cluster (default: hostname-pid)"),
    (
        "publish-window",
        _non_negative("publish-window", float, "at once"),
        "seconds a cluster node gathers changes into one Redis batch (default 0.005, 0 = at once)",
    ),
    (
        "touch-window",
        _non_negative("touch-window", float, "within the publish window"),
        "seconds a cluster node gathers heartbeats (lastActiveAt only) into one batch; other "
        "changes go out within the publish window and take them along (default 2)",
    ),
    (
        "project-buckets",
        parse_buckets,
        "key=N,...: split a large project's sessions into N cluster partitions by sessionID; "
        "the same on every node (default: one partition a project)",
    ),
    (
        "mirror-idle",
        _non_negative("mirror-idle", float, "only while agents follow it"),
        "seconds a cluster node keeps mirroring a project after its last search there; agents "
        "keep it mirrored while connected (default 300)",
    ),
    ("log-level", str.lower, "debug, info, warning or error (default info)"),
    ("log-format", str.lower, "text or json (default text)"),
    (
        "max-frame",
        _positive("max-frame", int),
        "largest WebSocket message in bytes; larger closes with 1009 (default 65536)",
    ),
    (
        "max-http-body",
        _positive("max-http-body", int),
        "largest HTTP body in bytes; larger is a 413 (default 1048576)",
    ),
    (
        "max-header",
        _positive("max-header", int),
        "largest HTTP request head in bytes; larger is a 431 (default 16384)",
    ),
    (
        "handshake-timeout",
        _positive("handshake-timeout", float),
        "seconds to send a full request head (default 10)",
    ),
    ("backlog", _positive("backlog", int), "listen backlog (default 4096)"),
    (
        "agent-interval",
        _positive("agent-interval", float),
        "seconds between lastActiveAt batches to agents (default 1)",
    ),
    (
        "agent-max-pending",
        _positive("agent-max-pending", int),
        "sessions with unsent changes before a slow agent is dropped (default 100000)",
    ),
    ("sweep-interval", _positive("sweep-interval", float), "seconds between timer sweeps (default 1)"),
    (
        "drain-timeout",
        _positive("drain-timeout", float),
        "seconds a SIGTERM drain may take before the process exits (default 10)",
    ),
    (
        "metrics-per-project",
        _bool,
        "true: label live-session metrics by project key (one series per project) (default false)",
    ),
    (
        "rate-limit",
        _non_negative("rate-limit", float),
        "WebSocket messages/s a connection may sustain; past it closes with 1008 (default 100, 0 = off)",
    ),
    ("rate-burst", _positive("rate-burst", int), "messages a connection may send at once (default 200)"),
    (
        "read-batch",
        _non_negative("read-batch", int),
        "messages handled per read before yielding to other connections (default 64, 0 = off)",
    ),
    (
        "tracker-rcvbuf",
        _non_negative("tracker-rcvbuf", int, "system default"),
        "socket receive buffer of tracker connections in bytes (default 16384, 0 = system default)",
    ),
    (
        "max-conns-per-ip",
        _non_negative("max-conns-per-ip", int),
        "open connections per client IP; more get a 429 (default 0 = off; leave off behind a proxy)",
    ),
    (
        "max-sessions-per-project",
        _non_negative("max-sessions-per-project", int),
        "live sessions per project; more get error project_full (default 250000, 0 = off)",
    ),
    (
        "max-agents",
        _non_negative("max-agents", int),
        "agent connections per process; more get a 503 (default 1000, 0 = off)",
    ),
    (
        "max-filters",
        _non_negative("max-filters", int),
        "filters in one search or subscription; more is a 400 / limit_exceeded (default 50, 0 = off)",
    ),
    (
        "agent-idle-timeout",
        _non_negative("agent-idle-timeout", float),
        "seconds before an agent that answers nothing, not even the hub's ping, "
        "is closed with 4000 (default 300, 0 = off)",
    ),
    (
        "tracker-origins",
        _origins,
        "Origins allowed to open tracker connections, comma-separated; others get 403 (default: any)",
    ),
    (
        "cors-origins",
        _cors_origins,
        "Origins whose pages may call the HTTP API (CORS), comma-separated, or * (default: none)",
    ),
    (
        "geoip-db",
        _geoip_db,
        "MaxMind-format database: userCountry, userState, userCity from the client address (default: none)",
    ),
    (
        "trusted-proxies",
        _trusted_proxies,
        "CIDRs of proxies whose X-Forwarded-For names the client, comma-separated (default: none)",
    ),
    ("webhook-urls", _webhook_urls, "URLs that receive every project's session webhooks, comma-separated"),
    ("webhooks-file", parse_webhooks_file, "file of webhook URLs, one 'projectKey url' or '* url' a line"),
    ("webhook-secret", str, "secret that signs webhook bodies (X-Hub-Signature); needed with webhook URLs"),
    (
        "webhook-budget",
        _positive("webhook-budget", float),
        "seconds a webhook event is retried before it is dropped (default 300)",
    ),
    ("webhook-queue", _positive("webhook-queue", int), "webhook events queued per URL (default 10000)"),
    (
        "relay-max-joins",
        _positive("relay-max-joins", int),
        "sessions one agent connection may be joined to at once (default 10)",
    ),
    (
        "relay-agent-buffer",
        _positive("relay-agent-buffer", int),
        "relay bytes queued to an agent before its events are dropped and it is told session.gap "
        "(default 1048576)",
    ),
    (
        "relay-agent-stall",
        _positive("relay-agent-stall", float),
        "seconds an agent may stay over its relay buffer before it is closed with 4008 (default 10)",
    ),
    (
        "relay-rate",
        _positive("relay-rate", float),
        "relay bytes/s a tab may emit; past it (and its burst) it is closed with 1008 (default 1048576)",
    ),
    ("relay-burst", _positive("relay-burst", int), "relay bytes a tab may emit at once (default 4194304)"),
    (
        "relay-max-event",
        _positive("relay-max-event", int),
        "bytes of one relayed event or binary frame; more closes the tab with 1008 (default 65536; "
        "--max-frame bounds every frame too)",
    ),
    (
        "assist-key",
        _assist_key,
        "OpenReplay's ASSIST_KEY: serve its assist HTTP API under /assist/KEY/ (default: not served)",
    ),
    (
        "openreplay-path",
        _openreplay_path,
        "path of OpenReplay's Socket.IO assist protocol (trackers and agents), also served with a "
        "trailing slash and as /socket/ (default /ws-assist/socket)",
    ),
    (
        "openreplay-jwt-secret",
        str,
        "OpenReplay's ASSIST_JWT_SECRET: Socket.IO agents may show its HS256/384/512 agent tokens "
        "(default: hub API keys only)",
    ),
    (
        "openreplay-ping-interval",
        _positive("openreplay-ping-interval", float),
        "seconds between Engine.IO pings to Socket.IO clients; each pong keeps lastActiveAt (default 25)",
    ),
    (
        "openreplay-ping-timeout",
        _positive("openreplay-ping-timeout", float),
        "seconds a Socket.IO client has to answer a ping before it is closed (default 20)",
    ),
    (
        "openreplay-max-payload",
        _positive("openreplay-max-payload", int),
        "bytes of one Socket.IO packet, e.g. a page's first snapshot; a tab's event is also bounded "
        "by --relay-burst (default 4194304)",
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hub", description="Live-session WebSocket hub")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    serve = sub.add_parser(
        "serve", help="run the hub", description="Run the hub.", formatter_class=_HelpFormatter
    )
    serve.error = parser.error  # type: ignore[method-assign]
    for name, kind, help_text in OPTIONS:
        serve.add_argument(f"--{name}", type=kind, default=None, help=f"{help_text} [HUB_{_env(name)}]")
    return parser


def _env(name: str) -> str:
    return name.upper().replace("-", "_")


def parse_settings(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``hub serve`` flags over ``HUB_*`` variables over defaults."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(list(argv))
    values: dict[str, Any] = {}
    for name, kind, _ in OPTIONS:
        attr = name.replace("-", "_")
        value = getattr(args, attr)
        if value is None and environ.get(f"HUB_{_env(name)}", "") != "":
            raw = environ[f"HUB_{_env(name)}"]
            try:
                value = kind(raw)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise ConfigError(f"HUB_{_env(name)}: {exc}") from None
        if value is not None:
            values[attr] = value
    return validate(Settings(**values))


def validate(settings: Settings) -> Settings:
    if settings.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"--log-level must be debug, info, warning or error, got {settings.log_level!r}")
    if settings.log_format not in ("text", "json"):
        raise ConfigError(f"--log-format must be text or json, got {settings.log_format!r}")
    if settings.keys_file and settings.projects is not None:
        unknown = sorted(set(settings.keys_file) - set(settings.projects))
        if unknown:
            raise ConfigError(f"--keys-file names projects not in --projects: {', '.join(unknown)}")
    if (settings.webhook_urls or settings.webhooks_file) and not settings.webhook_secret:
        raise ConfigError("webhook URLs need --webhook-secret: every webhook is signed")
    if settings.webhooks_file and settings.projects is not None:
        unknown = sorted({p for p, _ in settings.webhooks_file if p != "*"} - set(settings.projects))
        if unknown:
            raise ConfigError(f"--webhooks-file names projects not in --projects: {', '.join(unknown)}")
    if settings.workers > 1 and not settings.redis_url:
        raise ConfigError("--workers above 1 needs --redis-url: each worker is a node of a Redis cluster")
    if settings.api_key == "":
        return replace(settings, api_key=secrets.token_urlsafe(24), api_key_generated=True)
    return settings
