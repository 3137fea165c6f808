"""Promises of CONTRACT.md and the README that no other test checks (issue 15, "Also").

- an agent sees a resume (a reload, a reconnect, a second tab, a tab on
  another node) as ``session.update``, never ``session.end`` then ``session.start``;
- ``session.end`` reason ``timeout`` after a heartbeat timeout and its grace;
- fields the hub owns cannot be set by a tracker;
- the documented defaults, every flag's ``HUB_*`` variable, ``--help`` listing
  every flag of the README's configuration table;
- a 503 at the handshake and on ``/readyz`` while the hub drains;
- ``hub_info``, close-code and end-reason counters on ``/metrics``.

Their rules to the millisecond are in the unit layer (test_unit_*.py); here
they are checked over real sockets, with timers of a second or more.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import fields
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import websockets
from mmdb_writer import MMDBWriter
from netaddr import IPSet
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection

from hub.config import OPTIONS, Settings, build_parser, parse_settings
from tests.helpers import API_KEY, FrameLog, http, running_hub, wait_for
from tests.redis_server import RedisServer, have_redis

ROOT = Path(__file__).resolve().parent.parent


# -- clients ---------------------------------------------------------------------------


async def tracker(port: int, sid: str, **fields: Any) -> ClientConnection:
    # No client pings: a heartbeat timeout must see the tracker silent.
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws/tracker/p1", ping_interval=None)
    await ws.send(json.dumps({"type": "start", "sessionID": sid, **fields}))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert reply["type"] == "started", reply
    return ws


class Agent(FrameLog):
    """An agent subscribed to the whole project, its frames collected as they come."""

    def of(self, sid: str) -> list[dict[str, Any]]:
        """The frames about one session, snapshot entries as starts."""
        found = []
        for f in self.frames:
            if f["type"] == "snapshot":
                found += [
                    {"type": "session.start", "session": s} for s in f["sessions"] if s["sessionID"] == sid
                ]
            elif f.get("sessionID") == sid or f.get("session", {}).get("sessionID") == sid:
                found.append(f)
        return found

    def kinds(self, sid: str) -> list[str]:
        return [f["type"] for f in self.of(sid)]

    def view(self, sid: str) -> dict[str, Any] | None:
        """The session as the agent rebuilt it, None once ended."""
        state: dict[str, Any] | None = None
        for f in self.of(sid):
            if f["type"] == "session.start":
                state = dict(f["session"])
            elif f["type"] == "session.update":
                assert state is not None, f"update before start: {f}"
                changes = f["changes"]
                # README, "The session record": activeTime moves with lastActiveAt while active.
                if "lastActiveAt" in changes and "activeTime" not in changes and state["active"]:
                    state["activeTime"] += max(0, changes["lastActiveAt"] - state["lastActiveAt"])
                state.update(changes)
            elif f["type"] == "session.end":
                state = None
        return state


@asynccontextmanager
async def agent(port: int) -> AsyncIterator[Agent]:
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/ws/agent/p1", additional_headers={"Authorization": f"Bearer {API_KEY}"}
    ) as ws:
        await ws.send('{"type":"subscribe"}')
        a = Agent(ws)
        await wait_for(lambda: a.frames, what="the snapshot")
        try:
            yield a
        finally:
            a.task.cancel()


async def record(port: int, sid: str) -> dict[str, Any] | None:
    reply = await http(port, "GET", f"/public/p1/assist/sessions/{sid}")
    if reply.status == 404:
        return None
    assert reply.status == 200, reply.body
    data: dict[str, Any] = reply.json()["data"]
    return data


async def agent_agrees(a: Agent, port: int, sid: str) -> bool:
    """The agent's picture of ``sid`` is the HTTP record (both absent counts)."""
    return a.view(sid) == await record(port, sid)


# -- a resume is an update ---------------------------------------------------------------


async def test_an_agent_sees_a_reload_a_reconnect_and_a_second_tab_as_updates() -> None:
    async with running_hub() as h, agent(h.port) as watch:  # the default 30 s grace
        first = await tracker(h.port, "s", pageTitle="P1")
        await wait_for(lambda: watch.kinds("s") == ["session.start"])
        # A reload: the page's connection closes, the new page starts the same session.
        await first.close()
        await wait_for(lambda: watch.view("s") and not watch.view("s")["connected"])  # type: ignore[index]
        reloaded = await tracker(h.port, "s", pageTitle="P2")
        await wait_for(lambda: watch.view("s")["pageTitle"] == "P2")  # type: ignore[index]
        # A reconnect: the TCP connection drops without a close frame.
        reloaded.transport.abort()
        await wait_for(lambda: not watch.view("s")["connected"])  # type: ignore[index]
        again = await tracker(h.port, "s")
        # A second tab, which then closes.
        second = await tracker(h.port, "s")
        await wait_for(lambda: watch.view("s")["tabs"] == 2)  # type: ignore[index]
        await second.close()
        await wait_for(lambda: watch.view("s")["tabs"] == 1)  # type: ignore[index]
        await wait_for(lambda: agent_agrees(watch, h.port, "s"))
        kinds = watch.kinds("s")
        assert kinds[0] == "session.start" and set(kinds[1:]) == {"session.update"}, kinds
        session = watch.view("s")
        assert session is not None and session["tabs"] == 1 and session["connected"]
        assert session["timestamp"] == watch.of("s")[0]["session"]["timestamp"]
        await again.close()


@pytest.mark.skipif(not have_redis(), reason="redis-server is not installed")
async def test_a_tab_resuming_on_another_node_is_an_update_on_every_node() -> None:
    with RedisServer() as redis:
        cluster = {"redis_url": redis.url, "node_lease": 15.0}
        async with (
            running_hub(node_id="a", **cluster) as a,
            running_hub(node_id="b", **cluster) as b,
        ):
            for h in (a, b):
                await wait_for(lambda h=h: h.hub.api.ready(), what="bootstrapped from redis")
            async with agent(a.port) as on_a, agent(b.port) as on_b:
                ws = await tracker(a.port, "moving", userID="m")
                await wait_for(lambda: on_b.kinds("moving") == ["session.start"], what="mirrored on b")
                await ws.close()
                await wait_for(lambda: not on_b.view("moving")["connected"])  # type: ignore[index]
                back = await tracker(b.port, "moving")
                for watch, h in ((on_a, a), (on_b, b)):
                    await wait_for(lambda w=watch: w.view("moving")["connected"], what="resumed")
                    await wait_for(lambda w=watch, h=h: agent_agrees(w, h.port, "moving"))
                    session = watch.view("moving")
                    assert session is not None and session["tabs"] == 1 and session["userID"] == "m"
                    kinds = watch.kinds("moving")
                    assert kinds[0] == "session.start" and set(kinds[1:]) == {"session.update"}, kinds
                await back.send('{"type":"end"}')
                for watch in (on_a, on_b):
                    await wait_for(lambda w=watch: w.kinds("moving")[-1] == "session.end")
                    assert watch.of("moving")[-1]["reason"] == "ended"
                await back.close()


# -- timeout --------------------------------------------------------------------------


async def test_a_silent_tracker_is_closed_4000_and_its_session_ends_with_reason_timeout() -> None:
    async with running_hub(heartbeat_timeout=1.0, grace=1.0) as h, agent(h.port) as watch:
        ws = await tracker(h.port, "quiet")
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        assert (ws.close_code, ws.close_reason) == (4000, "heartbeat timeout")
        await wait_for(lambda: watch.kinds("quiet")[-1:] == ["session.end"], timeout=10)
        updates = [f["changes"] for f in watch.of("quiet") if f["type"] == "session.update"]
        assert updates == [{"connected": False, "tabs": 0}], "closed, then its grace"
        assert watch.of("quiet")[-1]["reason"] == "timeout"
        m = await scrape(h.port)
        assert m[("hub_sessions_ended_total", frozenset({("reason", "timeout")}))] == 1
        assert m[("hub_connections_closed_total", frozenset({("kind", "tracker"), ("code", "4000")}))] == 1


# -- fields the hub owns ------------------------------------------------------------------

OWNED = {
    "tabs": 9,
    "live": False,
    "projectKey": "other",
    "projectId": 99,
    "lastActiveAt": 5,
    "connected": False,
}


async def test_fields_the_hub_owns_cannot_be_set_by_a_tracker() -> None:
    async with running_hub(projects={"p1": 3}) as h, agent(h.port) as watch:
        before = int(time.time() * 1000)
        ws = await tracker(h.port, "own", **OWNED)
        expected = {"tabs": 1, "live": True, "projectKey": "p1", "projectId": 3, "connected": True}
        await ws.send(json.dumps({"type": "update", "pageTitle": "x", **OWNED}))
        await ws.send(json.dumps({"type": "heartbeat", **OWNED}))
        await wait_for(lambda: watch.view("own") and watch.view("own")["pageTitle"] == "x")  # type: ignore[index]
        await wait_for(lambda: agent_agrees(watch, h.port, "own"))
        stored = await record(h.port, "own")
        assert stored is not None and {k: stored[k] for k in expected} == expected
        assert stored["lastActiveAt"] >= before
        for f in watch.of("own")[1:]:
            assert set(f.get("changes", {})) <= {"pageTitle", "lastActiveAt"}, f
        assert (await http(h.port, "GET", "/public/other/assist/sessions/own")).status == 404
        await ws.close()


# -- defaults, flags and variables --------------------------------------------------------


def readme_configuration() -> dict[str, tuple[str, str]]:
    """The README's configuration table: flag -> (variable, default column)."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| flag | variable | default | meaning |") :]
    rows: dict[str, tuple[str, str]] = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = (cells[1].strip("`"), cells[2])
    return rows


def documented_default(cell: str) -> str | None:
    """The literal default of a README cell (the first `code` in it), None when it is a phrase."""
    found = re.match(r"`([^`]*)`", cell)
    return found.group(1) if found else None


# Defaults the README states in words, and what the parsed settings hold for them.
WORDED_DEFAULTS = {
    "api-key": "random, printed once",
    "projects": "any key accepted",
    "keys-file": "none",
    "project-buckets": "none",
    "redis-url": "unset: single node",
    "tracker-origins": "any",
    "cors-origins": "none",
    "webhook-urls": "none",
    "webhooks-file": "none",
    "webhook-secret": "none",
    "geoip-db": "none",
    "trusted-proxies": "none",
    "assist-key": "none",
    "openreplay-jwt-secret": "none",
}


def test_the_help_names_only_whole_flags() -> None:
    # A help text that names another flag must not have it broken at a hyphen by the wrapping.
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    named = set(re.findall(r"--[a-z][a-z0-9-]*", serve.format_help()))
    assert named == {f"--{name}" for name, _, _ in OPTIONS} | {"--help"}


@pytest.mark.parametrize("name", [name for name, _, _ in OPTIONS])
def test_every_flag_is_in_the_readme_table_with_its_variable(name: str) -> None:
    table = readme_configuration()
    assert f"--{name}" in table, f"--{name} is missing from README's configuration table"
    assert table[f"--{name}"][0] == "HUB_" + name.upper().replace("-", "_")


def test_every_flag_of_the_readme_table_exists() -> None:
    assert set(readme_configuration()) <= {f"--{name}" for name, _, _ in OPTIONS}


def test_the_documented_defaults_are_the_parsed_settings() -> None:
    settings = parse_settings(["serve"], environ={})
    table = readme_configuration()
    for flag, (_, cell) in table.items():
        name = flag[2:].replace("-", "_")
        value = getattr(settings, name)
        literal = documented_default(cell)
        if flag == "--node-id":
            assert literal == "hostname-pid" and value == "", "cluster.default_node_id() is used then"
        elif literal is None:
            assert flag[2:] in WORDED_DEFAULTS, f"the README gives no literal default of {flag}: add it here"
            assert WORDED_DEFAULTS[flag[2:]] in cell, (flag, cell)
            if flag == "--api-key":
                assert settings.api_key_generated and len(value) >= 24
            else:
                assert not value, (flag, value)  # None, or an empty tuple or string
        elif isinstance(value, bool):
            assert literal == str(value).lower(), (flag, literal, value)
        elif isinstance(value, (int, float)):
            assert float(literal) == value, (flag, literal, value)
        else:
            assert literal == value, (flag, literal, value)
    # The ones CONTRACT §2 and §5 name.
    assert (settings.grace, settings.heartbeat_timeout, settings.node_lease) == (30, 60, 15)
    assert (settings.host, settings.port) == ("127.0.0.1", 9001)


def test_help_shows_every_readme_flag_with_its_variable_and_default() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hub", "serve", "--help"], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 0, result.stderr
    # argparse wraps lines: one entry per flag, whitespace joined.
    text = " ".join(result.stdout.split())
    entries = dict(re.findall(r"(--[a-z-]+) [A-Z_]+ (.*?)(?= --[a-z-]+ [A-Z_]+ |$)", text))
    for flag, (variable, cell) in readme_configuration().items():
        assert flag in entries, f"{flag} missing from hub serve --help"
        entry = entries[flag].replace("default:", "default")
        assert f"[{variable}]" in entry, (flag, entry)
        literal = documented_default(cell)
        if literal is not None:
            assert f"default {literal}" in entry, (flag, literal, entry)


# A value other than the default for every flag, as typed on a command line.
SAMPLES = {
    "host": "127.0.0.2",
    "port": "9101",
    "api-key": "sample-key-123456",
    "projects": "shop:5,blog,news",
    "redis-url": "redis://127.0.0.1:6391/1",
    "workers": "3",
    "grace": "12.5",
    "heartbeat-timeout": "45",
    "node-lease": "7",
    "node-id": "node-7",
    "publish-window": "0.05",
    "touch-window": "0.75",
    "mirror-idle": "120",
    "project-buckets": "shop=8",
    "log-level": "debug",
    "log-format": "json",
    "max-frame": "4096",
    "max-http-body": "2048",
    "max-header": "8192",
    "handshake-timeout": "3",
    "backlog": "128",
    "agent-interval": "2",
    "agent-max-pending": "500",
    "sweep-interval": "0.5",
    "drain-timeout": "4",
    "metrics-per-project": "true",
    "rate-limit": "0",
    "rate-burst": "10",
    "read-batch": "0",
    "tracker-rcvbuf": "0",
    "max-conns-per-ip": "20",
    "max-sessions-per-project": "0",
    "max-agents": "0",
    "max-filters": "5",
    "agent-idle-timeout": "0",
    "tracker-origins": "https://shop.example",
    "cors-origins": "https://dashboard.example",
    "trusted-proxies": "10.0.0.0/8",
    "webhook-urls": "http://127.0.0.1:9/hook",
    "webhook-secret": "sample-secret-1",
    "webhook-budget": "60",
    "webhook-queue": "100",
    "relay-max-joins": "3",
    "relay-agent-buffer": "65536",
    "relay-agent-stall": "2.5",
    "relay-rate": "5000",
    "relay-burst": "9000",
    "relay-max-event": "4096",
    "assist-key": "sample-assist-key",
    "openreplay-path": "/assist-io/socket",
    "openreplay-jwt-secret": "sample-jwt-secret",
    "openreplay-ping-interval": "10",
    "openreplay-ping-timeout": "5",
    "openreplay-max-payload": "1048576",
}


def test_every_flag_has_a_hub_variable_that_sets_it_and_the_flag_wins(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("shop:shop-key-1234\n")
    hooks = tmp_path / "hooks"
    hooks.write_text("* http://127.0.0.1:9/all\n")
    geo = tmp_path / "geo.mmdb"
    writer = MMDBWriter(ip_version=4, database_type="GeoIP2-City")
    writer.insert_network(IPSet(["81.2.69.0/24"]), {"country": {"iso_code": "GB"}})
    writer.to_db_file(str(geo))
    samples = {**SAMPLES, "keys-file": str(keys), "webhooks-file": str(hooks), "geoip-db": str(geo)}
    # Settings that others need: --workers above 1 a Redis, --keys-file projects it names,
    # webhooks a secret.
    base = {
        "redis-url": "redis://127.0.0.1:6390/0",
        "projects": "shop:4,blog",
        "webhook-secret": "base-secret",
    }
    base_args = [arg for name, value in base.items() for arg in (f"--{name}", value)]
    base_env = {variable_of(name): value for name, value in base.items()}
    default = parse_settings(["serve", *base_args], environ={})
    for name, _, _ in OPTIONS:
        assert name in samples, f"add a sample value for --{name}"
        variable, attr = variable_of(name), name.replace("-", "_")
        by_flag = parse_settings(["serve", *base_args, f"--{name}", samples[name]], environ={})
        by_env = parse_settings(["serve"], environ={**base_env, variable: samples[name]})
        assert getattr(by_env, attr) == getattr(by_flag, attr), name
        assert getattr(by_env, attr) != getattr(default, attr), f"{variable} changed nothing"
        both = parse_settings(["serve", *base_args, f"--{name}", samples[name]], environ={variable: "bogus"})
        assert getattr(both, attr) == getattr(by_flag, attr), f"--{name} must win over {variable}"
    assert {f.name for f in fields(Settings)} >= {name.replace("-", "_") for name, _, _ in OPTIONS}


def variable_of(name: str) -> str:
    return "HUB_" + name.upper().replace("-", "_")


# -- draining -------------------------------------------------------------------------------


async def raw_status(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: str) -> int:
    """Send ``request`` on an already open connection; the answer's status."""
    writer.write(request.encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return int(head.split(b" ", 2)[1])


UPGRADE = (
    "GET /ws/tracker/p1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def test_while_draining_handshakes_and_readyz_are_503() -> None:
    async with running_hub() as h:
        # Connections open before the drain: new ones are not even accepted during it.
        conns = [await asyncio.open_connection("127.0.0.1", h.port) for _ in range(3)]
        ready = await http(h.port, "GET", "/readyz", key=None)
        assert ready.status == 200
        release = asyncio.Event()
        leaving = asyncio.Event()

        async def leave() -> None:  # the drain waits here until the test has looked
            leaving.set()
            await release.wait()

        h.hub.replication.leave = leave  # type: ignore[method-assign]
        h.hub.stop()
        await asyncio.wait_for(leaving.wait(), 5)
        (r1, w1), (r2, w2), (r3, w3) = conns
        assert await raw_status(r1, w1, UPGRADE) == 503
        assert await raw_status(r2, w2, "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n") == 503
        assert await raw_status(r3, w3, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") == 200
        release.set()
        for _, w in conns:
            w.close()


# -- metrics ---------------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    reply = await http(port, "GET", "/metrics", key=None)
    assert reply.status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


async def test_metrics_carry_hub_info_close_codes_and_end_reasons() -> None:
    async with running_hub(max_frame=1024) as h:
        ended = await tracker(h.port, "ended")
        await ended.send('{"type":"end"}')
        left = await tracker(h.port, "left")
        await left.close()
        big = await tracker(h.port, "big")
        await big.send(json.dumps({"type": "update", "pageTitle": "x" * 2000}))
        await asyncio.wait_for(big.wait_closed(), 5)
        assert big.close_code == 1009
        await ended.close()
        await wait_for(lambda: h.hub.registry.waiting == 2, what="two sessions in their grace")
        h.hub.registry.sweep(int(time.time() * 1000) + h.hub.registry.grace_ms)
        m = await scrape(h.port)
        assert m[("hub_info", frozenset({("version", version("hub"))}))] == 1
        assert counted(m, "hub_connections_closed_total", "kind", "code") == {
            ("tracker", "1000"): 2,
            ("tracker", "1009"): 1,
        }
        assert counted(m, "hub_sessions_ended_total", "reason") == {("ended",): 1, ("disconnected",): 2}


def counted(m: Samples, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """The non-zero series of a counter, by the values of ``labels``."""
    found = {}
    for (sample, values), count in m.items():
        if sample == name and count:
            found[tuple(dict(values)[label] for label in labels)] = count
    return found
