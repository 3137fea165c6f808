"""Operations (CONTRACT §5, §6): /metrics, logs without secrets, SIGTERM drain, bind errors."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager
from pathlib import Path

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection

from hub import logs
from tests.helpers import API_KEY, HubProcess, RunningHub, StderrLog, http, running_hub, wait_for
from tests.redis_server import RedisServer, have_redis

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    reply = await http(port, "GET", "/metrics", key=None)
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def tracker(h: RunningHub | int, sid: str, project: str = "p1") -> ClientConnection:
    port = h if isinstance(h, int) else h.port
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws/tracker/{project}")
    await ws.send(json.dumps({"type": "start", "sessionID": sid, "userID": f"{sid}@x.io"}))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert reply["type"] == "started", reply
    return ws


async def test_metrics_follow_a_scenario() -> None:
    async with running_hub() as h, AsyncExitStack() as stack:
        before = await scrape(h.port)
        assert value(before, "hub_live_sessions") == 0
        assert value(before, "hub_connections", kind="tracker") == 0

        trackers = [await tracker(h, f"s{i}") for i in range(3)]
        for ws in trackers:
            stack.push_async_callback(ws.close)
        for _ in range(4):
            await trackers[0].send(json.dumps({"type": "heartbeat"}))
        await trackers[1].send(json.dumps({"type": "update", "pageTitle": "Checkout"}))
        await trackers[2].send("{not json")
        error = json.loads(await asyncio.wait_for(trackers[2].recv(), 5))
        assert error["code"] == "invalid_json"
        await trackers[2].send(json.dumps({"type": "bogus"}))
        await asyncio.wait_for(trackers[2].recv(), 5)
        await wait_for(lambda: h.hub.metrics.trackers.received["update"] == 1)

        data = await h.search()
        m = await scrape(h.port)
        assert value(m, "hub_live_sessions") == data["total"] == 3
        assert value(m, "hub_local_sessions") == 3
        assert value(m, "hub_connections", kind="tracker") == 3
        assert value(m, "hub_connections_opened_total", kind="tracker") == 3
        assert value(m, "hub_messages_received_total", kind="tracker", type="start") == 3
        assert value(m, "hub_messages_received_total", kind="tracker", type="heartbeat") == 4
        assert value(m, "hub_messages_received_total", kind="tracker", type="update") == 1
        assert value(m, "hub_messages_sent_total", kind="tracker", type="started") == 3
        assert value(m, "hub_messages_sent_total", kind="tracker", type="error") == 2
        assert value(m, "hub_errors_total", kind="tracker", code="invalid_json") == 1
        assert value(m, "hub_errors_total", kind="tracker", code="unknown_type") == 1
        assert value(m, "hub_search_duration_seconds_count") == 1
        assert value(m, "hub_http_responses_total", code="200") >= 2  # the search, the first scrape
        assert value(m, "hub_sessions_started_total") == 3
        assert value(m, "hub_ready") == 1 and value(m, "hub_draining") == 0
        assert value(m, "process_resident_memory_bytes") > 0
        assert value(m, "process_open_fds") > 0

        # An end, a clean close (1000), a dropped TCP connection (1006), a bad key.
        await trackers[0].send(json.dumps({"type": "end"}))
        await wait_for(lambda: len(h.hub.index) == 2)
        await trackers[0].close()
        await trackers[1].close()
        trackers[2].transport.abort()
        bad = await http(h.port, "GET", "/public/p1/assist/sessions", key="wrong-key")
        assert bad.status == 401
        await wait_for(lambda: h.hub.registry.waiting == 2)
        # The grace of the two closed sessions runs out: a sweep past it, not a wait.
        h.hub.registry.sweep(int(time.time() * 1000) + h.hub.registry.grace_ms)
        assert len(h.hub.index) == 0
        m = await scrape(h.port)
        assert value(m, "hub_live_sessions") == 0 and value(m, "hub_local_sessions") == 0
        assert value(m, "hub_connections", kind="tracker") == 0
        assert value(m, "hub_connections_closed_total", kind="tracker", code="1000") == 2
        assert value(m, "hub_connections_closed_total", kind="tracker", code="1006") == 1
        assert value(m, "hub_sessions_ended_total", reason="ended") == 1
        assert value(m, "hub_sessions_ended_total", reason="disconnected") == 2
        assert value(m, "hub_disconnected_sessions") == 0
        assert value(m, "hub_http_responses_total", code="401") == 1


async def test_agent_connections_and_queue_depth() -> None:
    async with running_hub() as h:
        url = f"{h.agent_url()}?token={API_KEY}"
        async with websockets.connect(url) as agent:
            await agent.send(json.dumps({"type": "subscribe"}))
            snapshot = json.loads(await asyncio.wait_for(agent.recv(), 5))
            assert snapshot["type"] == "snapshot"
            m = await scrape(h.port)
            assert value(m, "hub_connections", kind="agent") == 1
            assert value(m, "hub_agents") == 1
            assert ("hub_agent_queue_depth", frozenset()) in m
        await wait_for(lambda: h.hub.metrics.connections.open_now("agent") == 0)
        m = await scrape(h.port)
        assert value(m, "hub_connections_closed_total", kind="agent", code="1000") == 1


async def test_project_labels_only_behind_the_setting() -> None:
    async with running_hub() as h:
        ws = await tracker(h, "a1", project="shop")
        m = await scrape(h.port)
        assert not any(name == "hub_project_live_sessions" for name, _ in m)
        await ws.close()
    async with running_hub(metrics_per_project=True) as h:
        ws1, ws2 = await tracker(h, "a1", project="shop"), await tracker(h, "b1", project="blog")
        m = await scrape(h.port)
        assert value(m, "hub_project_live_sessions", project="shop") == 1
        assert value(m, "hub_project_live_sessions", project="blog") == 1
        await ws1.close()
        await ws2.close()


@pytest.mark.skipif(not have_redis(), reason="redis-server is not installed")
async def test_cluster_metrics_tell_own_from_mirrored_sessions() -> None:
    lease = 1.5
    with RedisServer() as redis, ExitStack() as stack:
        args = ("--redis-url", redis.url, "--api-key", API_KEY, "--node-lease", str(lease))
        nodes = [stack.enter_context(HubProcess(*args, "--node-id", f"m{i}")) for i in range(2)]
        for n in nodes:
            await asyncio.to_thread(n.wait_ready, 10.0, "/readyz")
        ws = await tracker(nodes[0].port, "c1")

        async def mirrored() -> Samples | None:
            # A search makes the far node mirror p1 (it serves it now), and answers once c1 is there.
            found = await http(nodes[1].port, "POST", "/public/p1/assist/sessions", {"limit": 10})
            if found.json()["data"]["total"] != 1:
                return None
            m = await scrape(nodes[1].port)
            return m if value(m, "hub_live_sessions") == 1 else None

        far = await wait_for(mirrored)
        near = await scrape(nodes[0].port)
        assert value(near, "hub_live_sessions") == value(near, "hub_local_sessions") == 1
        assert value(far, "hub_local_sessions") == 0
        assert value(near, "hub_redis_published_batches_total") >= 1
        # The session came in a batch or in a read of the partition when it was announced.
        batches = value(far, "hub_redis_received_batches_total")
        assert batches + value(far, "hub_cluster_partition_reads_total") >= 1
        for m in (near, far):
            assert value(m, "hub_redis_connected") == 1 and value(m, "hub_ready") == 1
            assert value(m, "hub_cluster_peers") == 1
            assert 0 <= value(m, "hub_cluster_peer_silence_seconds") < lease
        await ws.close()


# --- logs ----------------------------------------------------------------------------------

SECRET_KEY = "ops-secret-key-5b9e1c"
WRONG_KEY = "wrong-guess-2d7f0a"


async def test_json_logs_parse_and_never_carry_a_key() -> None:
    assist_key = "assist-path-secret-77"
    with HubProcess(
        "--api-key", SECRET_KEY, "--log-format", "json", "--log-level", "debug", "--drain-timeout", "3",
        "--assist-key", assist_key,
    ) as proc:  # fmt: skip
        await asyncio.to_thread(proc.wait_ready)
        port = proc.port
        ws = await tracker(port, "log1")
        await ws.send("{broken")
        await asyncio.wait_for(ws.recv(), 5)
        for key in (SECRET_KEY, WRONG_KEY):
            await http(port, "GET", "/public/p1/assist/sessions", key=key)
            await http(port, "GET", f"/public/p1/assist/sessions?token={key}", key=None)
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/agent/p1?token={SECRET_KEY}") as agent:
            await agent.send(json.dumps({"type": "subscribe"}))
            await asyncio.wait_for(agent.recv(), 5)
        with pytest.raises(websockets.InvalidStatus):
            await websockets.connect(f"ws://127.0.0.1:{port}/ws/agent/p1?token={WRONG_KEY}")
        headers = {"Authorization": f"Bearer {SECRET_KEY}"}
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/agent/p1", additional_headers=headers):
            pass
        # OpenReplay's assist API carries its key in the path: logged redacted, right or wrong.
        for key in (assist_key, WRONG_KEY):
            await http(port, "GET", f"/assist/{key}/sockets-live/p1", key=None)
        await ws.close()
        assert await asyncio.to_thread(proc.terminate) == 0
        err = proc.stderr.text()
    lines = err.splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in records:
        assert {"time", "level", "logger", "event"} <= record.keys(), record
    assert SECRET_KEY not in err and WRONG_KEY not in err and assist_key not in err
    assert "/assist/[redacted]/sockets-live/p1" in err
    events = {r["event"] for r in records}
    assert {"hub.listening", "connection.open", "connection.close", "http.request", "drain.done"} <= events
    errors = [r for r in records if r["event"] == "protocol.error"]
    assert errors and errors[0]["level"] == "warning" and errors[0]["code"] == "invalid_json"
    refused = [r for r in records if r["event"] == "http.request" and r["status"] == 401]
    # /public/ takes only a Bearer header: both ?token= requests, the wrong Bearer, the wrong agent.
    assert len(refused) == 4
    assert all("?" not in r["path"] for r in records if r["event"] == "http.request")


@contextmanager
def captured(fmt: str, secrets: list[str]) -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    logs.setup("debug", fmt, secrets, stream)
    try:
        yield stream
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_any_logger_is_redacted(fmt: str) -> None:
    with captured(fmt, [SECRET_KEY, "tiny"]) as stream:
        log = logging.getLogger("some.other.module")
        log.warning("auth with Bearer %s from %s", "abc.def-123", "/ws/agent/p1?x=1&token=t0k3n&y=2")
        log.error("key was %s", SECRET_KEY, extra={"fields": {"header": f"bearer {SECRET_KEY}"}})
        log.info("a tiny word stays")
    out = stream.getvalue()
    for secret in ("abc.def-123", "t0k3n", SECRET_KEY):
        assert secret not in out
    assert out.count(logs.REDACTED) == 4
    assert "x=1&token=[redacted]&y=2" in out
    assert "a tiny word stays" in out  # keys too short to redact safely are left alone
    if fmt == "json":
        assert [json.loads(line)["level"] for line in out.splitlines()] == ["warning", "error", "info"]
    else:
        assert "header=" in out


# --- drain ---------------------------------------------------------------------------------


async def test_sigterm_closes_trackers_with_1012_and_exits_0_in_time() -> None:
    drain_timeout = 3.0
    with HubProcess("--api-key", API_KEY, "--drain-timeout", str(drain_timeout)) as proc:
        await asyncio.to_thread(proc.wait_ready)
        trackers = [await tracker(proc.port, f"d{i}") for i in range(5)]
        # A client that completed the handshake and then never reads: the drain must not wait on it.
        mute = socket.create_connection(("127.0.0.1", proc.port))
        mute.sendall(
            b"GET /ws/tracker/p1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert mute.recv(1024).startswith(b"HTTP/1.1 101")
        signalled = time.monotonic()
        code = await asyncio.to_thread(proc.terminate, drain_timeout + 5)
        elapsed = time.monotonic() - signalled
        mute.close()
        assert code == 0
        assert elapsed < drain_timeout + 1.0
        for ws in trackers:
            await asyncio.wait_for(ws.wait_closed(), 5)
            assert ws.close_code == 1012


async def test_drain_stops_accepting_at_once_and_is_bounded_by_its_timeout() -> None:
    async with running_hub(drain_timeout=1.0) as h:
        ws = await tracker(h, "x1")
        stuck = asyncio.Event()

        async def hang() -> None:  # e.g. a Redis that never acknowledges the goodbye
            stuck.set()
            await asyncio.Event().wait()

        h.hub.replication.leave = hang  # type: ignore[method-assign]
        started = time.monotonic()
        h.hub.stop()
        await asyncio.wait_for(stuck.wait(), 5)
        assert not h.hub.api.ready()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", h.port)
        await asyncio.wait_for(ws.wait_closed(), 5)
        assert ws.close_code == 1012
        assert time.monotonic() - started < 2.0


# --- start-up ------------------------------------------------------------------------------


def test_a_port_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = HubProcess("--api-key", API_KEY, port=port).wait_exit(15)
    assert code == 2
    expected = f"hub: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert err.strip().splitlines() == [expected]


# --- Dockerfile ----------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuations joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n(\s*#.*\n)*", " ", text)
    steps = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            steps.append((instruction.upper(), args.strip()))
    return steps


def test_dockerfile_lints_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_dockerfile_steps_install_a_hub_that_serves(tmp_path: Path) -> None:
    """Replay the image's steps into a fresh venv: the same install, the same CMD and HEALTHCHECK."""
    steps = dockerfile()
    base = next(args for instruction, args in steps if instruction == "FROM")
    assert base.startswith(f"python:{sys.version_info.major}.{sys.version_info.minor}-slim")
    app, venv = tmp_path / "app", tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUB_", "PIP_NO_CACHE"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    env.pop("PYTHONPATH", None)
    skipped, user, exposed, healthcheck, cmd = [], "", "", "", ""
    for instruction, args in steps:
        if instruction == "WORKDIR":
            app.mkdir(parents=True, exist_ok=True)
        elif instruction == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
        elif instruction == "COPY":
            *sources, _dest = args.split()
            for src in sources:
                target = app / src
                if (ROOT / src).is_dir():
                    shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(ROOT / src, target)
        elif instruction == "RUN":
            if "useradd" in args:
                skipped.append(args)  # needs root; the USER check below covers it
                continue
            # pip's cache may be reused here; the image build keeps it out of the layer.
            command = args.replace("--no-cache-dir", "")
            subprocess.run(["bash", "-ec", command], cwd=app, env=env, check=True, timeout=300)
        elif instruction == "USER":
            user = args
        elif instruction == "EXPOSE":
            exposed = args
        elif instruction == "HEALTHCHECK":
            healthcheck = args.split(" CMD ", 1)[1]
        elif instruction == "CMD":
            cmd = args
    assert len(skipped) == 1 and user.split(":")[0] not in ("", "0", "root")
    assert exposed == env["HUB_PORT"] == "9001"
    assert json.loads(cmd) == ["hub", "serve", "--host", "0.0.0.0"]
    # The installed hub, not this checkout: run from the app dir's parent. HUB_PORT=0: it
    # reports the port it bound, which the HEALTHCHECK then reads from HUB_PORT.
    env.update(HUB_PORT="0", HUB_API_KEY=API_KEY, HUB_HOST="127.0.0.1")
    argv = [str(venv / "bin" / "hub"), *json.loads(cmd)[1:]]
    argv[argv.index("0.0.0.0")] = "127.0.0.1"  # loopback only on this machine
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        env["HUB_PORT"] = str(StderrLog(proc).wait_port(20))
        probe = json.loads(healthcheck)
        deadline = time.monotonic() + 20
        while subprocess.run(probe, env=env, cwd=tmp_path, capture_output=True).returncode != 0:
            assert proc.poll() is None, "the hub exited"
            assert time.monotonic() < deadline, "HEALTHCHECK never passed"
            time.sleep(0.1)
        located = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import hub, sys; sys.stdout.write(hub.__file__)"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )
        assert located.stdout.startswith(str(venv))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
