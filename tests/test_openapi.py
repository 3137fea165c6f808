"""``GET /openapi.json`` (CONTRACT §4) checked against the hub serving it.

schemathesis reads the document from a real hub process holding live
sessions (some at every record limit, one waiting out its grace), then
sends what the document allows and what it forbids, and checks each answer
against the document. A route registered in the hub but not documented (or
documented but not served) fails ``test_every_route_is_documented``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import websockets

from hub import openapi
from hub.config import Settings
from hub.record import (
    DESCRIPTIVE_FIELDS,
    MAX_METADATA_KEY,
    MAX_METADATA_KEYS,
    MAX_STRING,
    MAX_USER_PROPERTIES_BYTES,
)
from tests.helpers import API_KEY, HubProcess, http, running_hub, wait_for

PROJECT = openapi.EXAMPLE_PROJECT

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "ignored_auth",
    # The document lists exactly the methods each path answers, and the headers it promises.
    "unsupported_method",
    "allow_header_conformance",
    "response_headers_conformance",
)


# OpenReplay's routes carry their key in the path: schemathesis is told it (the document never is).
ASSIST_KEY = "schemathesis-assist-key"
CONFIG = f"""[parameters]
"path.assistKey" = "{ASSIST_KEY}"
"""


def schemathesis_command(port: int, report: Path, config: Path) -> list[str]:
    """The run BENCHMARKS.md ("HTTP API conformance") shows: under a minute on 2 cores.

    The number of examples bounds its time: ``--max-time`` would also cut the
    coverage phase short (fewer cases; it then misses e.g. a POST without a body).
    """
    return [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"http://127.0.0.1:{port}{openapi.PATH}",
        "--header",
        f"Authorization: Bearer {API_KEY}",
        "--phases",
        "coverage,fuzzing",
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        "40",
        # One worker: schemathesis generates in threads, and CPython 3.11.7's ast.parse is not
        # thread-safe (gh-106905: "AST constructor recursion depth mismatch" from hypothesis).
        "--workers",
        "1",
        "--request-timeout",
        "5",
        "--continue-on-failure",
        "--generation-database",
        "none",
        "--no-color",
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]


def starts() -> list[dict[str, Any]]:
    """Start frames for records of every shape: full, at every limit, sparse."""
    full: dict[str, Any] = {name: f"{name} value" for name in DESCRIPTIVE_FIELDS}
    full.update(
        sessionID=openapi.EXAMPLE_SESSION,
        timestamp=1_700_000_000_000,
        metadata={"plan": "pro", "seats": 5, "ratio": 2.5, "beta": True},
        userProperties={"plan": {"tier": [1, None, "x"]}, "n": 1.5},
        active=False,
    )
    at_limits: dict[str, Any] = {name: "é" * MAX_STRING for name in DESCRIPTIVE_FIELDS}
    at_limits.update(
        sessionID="L" * 64,
        metadata={f"{i:0{MAX_METADATA_KEY}d}": "v" * MAX_STRING for i in range(MAX_METADATA_KEYS)},
        # Just under the encoded size limit: the property's name and quotes take the rest.
        userProperties={"k": "u" * (MAX_USER_PROPERTIES_BYTES - 16)},
    )
    sparse = {"sessionID": "s-2"}
    numbers = {"sessionID": "s-3", "userID": "Ann@Example.com", "timestamp": 0, "metadata": {"n": 1e21}}
    return [full, at_limits, sparse, numbers]


async def fill(stack: AsyncExitStack, port: int) -> None:
    """Live sessions in PROJECT (one with two tabs, one in its grace) and one elsewhere."""
    base = f"ws://127.0.0.1:{port}/ws/tracker"
    frames = [(PROJECT, start) for start in starts()]
    frames += [(PROJECT, {"sessionID": "s-2"}), ("other-project", {"sessionID": "o-1"})]
    for project, start in frames:
        ws = await stack.enter_async_context(websockets.connect(f"{base}/{project}", max_size=None))
        await ws.send(json.dumps({"type": "start", **start}))
        reply = json.loads(await ws.recv())
        assert reply["type"] == "started", reply
    async with websockets.connect(f"{base}/{PROJECT}") as ws:
        await ws.send(json.dumps({"type": "start", "sessionID": "gone"}))
        assert json.loads(await ws.recv())["type"] == "started"

    async def settled() -> dict[str, Any] | None:
        reply = await http(port, "GET", f"/public/{PROJECT}/assist/sessions?limit=1000")
        sessions = {s["sessionID"]: s for s in reply.json()["data"]["sessions"]}
        return sessions if not sessions["gone"]["connected"] else None

    sessions = await wait_for(settled)
    assert len(sessions) == 5, sessions.keys()
    assert sessions["s-2"]["tabs"] == 2
    assert sessions["gone"]["tabs"] == 0
    assert len(sessions["L" * 64]["metadata"]) == MAX_METADATA_KEYS


async def test_schemathesis_finds_nothing(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    # A frame large enough for a record at every limit in one start; a grace that outlasts the run;
    # CORS for any origin, so that preflights carry the grant the document describes.
    args = ("--api-key", API_KEY, "--grace", "300", "--max-frame", "1048576", "--cors-origins", "*",
            "--assist-key", ASSIST_KEY)  # fmt: skip
    with HubProcess(*args) as hub:
        hub.wait_ready()
        async with AsyncExitStack() as trackers:
            await fill(trackers, hub.port)
            run = await asyncio.create_subprocess_exec(
                *schemathesis_command(hub.port, report, config),
                cwd=tmp_path,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            try:
                out, _ = await asyncio.wait_for(run.communicate(), 110)
            finally:
                if run.returncode is None:
                    run.kill()
                    await run.wait()
        hub.kill()
        logged = hub.stderr.text()
    output = out.decode()
    assert run.returncode == 0, output
    result = json.loads(report.read_text())
    assert (result["failures"], result["errors"]) == ([], []), output
    ops = result["operations"]
    # Every documented operation but GET /openapi.json, which schemathesis leaves out as the schema itself.
    paths = openapi.document(Settings(cors_origins=("*",), assist_key=ASSIST_KEY))["paths"]
    documented = sum(len(methods) for methods in paths.values())
    assert ops["tested"] == ops["selected"] == documented - 1, ops
    assert result["test_cases"]["generated"] > 500, result["test_cases"]
    assert "Traceback" not in logged, logged


async def test_every_route_is_documented() -> None:
    async with running_hub() as h:
        registered = {
            # Allow: the methods the path answers, OPTIONS (a CORS preflight) included.
            "/".join(route.segments): set(route.allow.split(", "))
            # The route table has no public listing; its HTTP routes by segment count.
            for routes in h.hub.routes._http.values()
            for route in routes
        }
        reply = await http(h.port, "GET", openapi.PATH, key=None)
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    document = reply.json()
    assert document["openapi"] == "3.1.0"
    documented = {path: {m.upper() for m in ops} for path, ops in document["paths"].items()}
    assert documented == registered


async def test_the_document_follows_the_settings() -> None:
    document = openapi.document(Settings(max_filters=7, max_http_body=1234, max_conns_per_ip=3))
    body = document["components"]["schemas"]["SearchBody"]
    assert body["properties"]["filters"]["maxItems"] == 7
    post = document["paths"]["/public/{projectKey}/assist/sessions"]["post"]
    assert "1234 bytes" in post["responses"]["413"]["description"]
    assert "429" in post["responses"]
    preflight = document["paths"]["/public/{projectKey}/assist/sessions"]["options"]["responses"]["204"]
    assert preflight["headers"]["Allow"]["schema"] == {"const": "GET, HEAD, POST, OPTIONS"}
    assert "Access-Control-Allow-Origin" not in preflight["headers"]
    with_cors = openapi.document(Settings(cors_origins=("https://dash.example.com",)))
    preflight = with_cors["paths"][openapi.PATH]["options"]["responses"]["204"]
    assert preflight["headers"]["Allow"]["schema"] == {"const": "GET, HEAD, OPTIONS"}
    assert "Access-Control-Allow-Origin" in preflight["headers"]
    unbounded = openapi.document(Settings(max_filters=0))
    assert "maxItems" not in unbounded["components"]["schemas"]["SearchBody"]["properties"]["filters"]
    assert "429" not in unbounded["paths"]["/healthz"]["get"]["responses"]


async def test_a_parameter_given_twice_is_a_400() -> None:
    """The document's query parameters take one value each (schemathesis sends several)."""
    async with running_hub() as h:
        for query in ("page=abc&page=1", "userId=a&userId=b", "limit=5&limit=5"):
            reply = await http(h.port, "GET", f"/public/p1/assist/sessions?{query}")
            assert reply.status == 400, query
            assert "given more than once" in reply.json()["error"]
        reply = await http(h.port, "GET", "/public/p1/assist/sessions?page=1&limit=5&other=1")
        assert reply.status == 200
