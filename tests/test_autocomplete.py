"""Autocomplete: ``GET /public/{projectKey}/assist/autocomplete`` (README, "Autocomplete").

The index answers from its per-field distinct values; over HTTP, a live hub
with trackers on real sockets.
"""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from typing import Any

import pytest
import websockets

from hub.index import LiveIndex
from hub.record import Session
from tests.helpers import http, running_hub, wait_for


def session(sid: str, **fields: Any) -> Session:
    return Session(sessionID=sid, projectKey="p1", projectId=0, timestamp=1, lastActiveAt=1, **fields)


def test_values_containing_the_text_most_held_first_as_sessions_spell_them() -> None:
    index = LiveIndex()
    browsers = ["Chrome"] * 3 + ["Chrome Mobile"] * 2 + ["Chromium", "Firefox", None]
    for i, browser in enumerate(browsers):
        index.add(session(f"s{i}", userBrowser=browser, metadata={"plan": "Pro" if i % 2 else "free"}))
    index.add(session("t", userBrowser="CHROME"))  # the same value in the index, spelt otherwise
    found = index.values("p1", "userBrowser", None, "chr", 10)
    assert found[1:] == [("Chrome Mobile", 2), ("Chromium", 1)]
    assert found[0] in [("Chrome", 4), ("CHROME", 4)]
    assert index.values("p1", "userBrowser", None, "chr", 2)[1] == ("Chrome Mobile", 2)
    assert index.values("p1", "userBrowser", None, "", 10)[-1] == ("Firefox", 1)
    assert index.values("p1", "userBrowser", None, "safari", 10) == []
    assert index.values("p1", "metadata", "plan", "", 10) == [("free", 4), ("Pro", 4)]
    assert index.values("p1", "metadata", "plan", "r", 1) == [("free", 4)]
    assert index.values("p1", "metadata", "nope", "", 10) == []
    assert index.values("p1", "tabs", None, "1", 10) == [("1", 9)]
    assert index.values("p1", "active", None, "", 10) == [("true", 9)]
    assert index.values("other", "userBrowser", None, "", 10) == []
    # Gone and changed values leave the answer, also after the haystack was built.
    for i in range(3):
        index.apply(index.get("p1", f"s{i}"), {"userBrowser": "Edge"})  # type: ignore[arg-type]
    index.remove(index.get("p1", "s5"))  # type: ignore[arg-type]
    assert index.values("p1", "userBrowser", None, "chr", 10) == [("Chrome Mobile", 2), ("CHROME", 1)]
    assert index.values("p1", "userBrowser", None, "e", 10)[0] == ("Edge", 3)


async def get(port: int, query: str, project: str = "p1", **kw: Any) -> tuple[int, Any]:
    reply = await http(port, "GET", f"/public/{project}/assist/autocomplete{query}", **kw)
    return reply.status, reply.json()


async def test_the_route_answers_live_values_with_counts() -> None:
    async with running_hub() as h, AsyncExitStack() as stack:
        for i, (browser, plan) in enumerate([("Chrome", "pro"), ("Chrome", "Pro"), ("Firefox", "free")]):
            ws = await stack.enter_async_context(websockets.connect(h.tracker_url()))
            start = {"type": "start", "userBrowser": browser, "metadata": {"plan": plan}, "url": f"/{i}"}
            await ws.send(json.dumps(start))
            assert json.loads(await ws.recv())["type"] == "started"
        status, body = await get(h.port, "?key=userBrowser&q=CHR")
        assert (status, body) == (200, {"data": [{"value": "Chrome", "count": 2}]})
        status, body = await get(h.port, "?key=METADATA&source=plan")
        assert status == 200 and body["data"][1] == {"value": "free", "count": 1}
        assert body["data"][0]["count"] == 2 and body["data"][0]["value"] in ("pro", "Pro")
        status, body = await get(h.port, "?key=userbrowser&limit=1")
        assert (status, body) == (200, {"data": [{"value": "Chrome", "count": 2}]})
        assert await get(h.port, "?key=pageViews") == (200, {"data": [{"value": "1", "count": 3}]})
        assert await get(h.port, "?key=userBrowser&q=safari") == (200, {"data": []})
        assert (
            await http(h.port, "GET", "/public/p1/assist/autocomplete?key=userOs", key=None)
        ).status == 401

        async def after_end() -> bool:
            _, body = await get(h.port, "?key=userBrowser&q=fire")
            return not body["data"]

        await ws.send(json.dumps({"type": "end"}))
        await wait_for(after_end, what="an ended session's value gone")


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("", "key is required"),
        ("?q=chr", "key is required"),
        ("?key=nope", "unknown key"),
        ("?key=userProperties", "unknown key"),
        ("?key=metadata", "needs source"),
        ("?key=userOs&limit=0", "limit"),
        ("?key=userOs&limit=101", "limit"),
        ("?key=userOs&limit=x", "limit"),
        ("?key=userOs&key=userBrowser", "more than once"),
    ],
)
async def test_bad_parameters_are_a_400(query: str, says: str) -> None:
    async with running_hub() as h:
        status, body = await get(h.port, query)
        assert status == 400 and says in body["error"], body
