"""The tracker protocol over real sockets (CONTRACT §2)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import AsyncExitStack
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.protocol import State

from tests.helpers import RunningHub, http, running_hub, wait_for


async def send(ws: ClientConnection, msg: dict[str, Any] | str) -> None:
    await ws.send(msg if isinstance(msg, str) else json.dumps(msg))


async def recv(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    reply: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    return reply


async def start(ws: ClientConnection, **fields: Any) -> dict[str, Any]:
    await send(ws, {"type": "start", **fields})
    reply = await recv(ws)
    assert reply["type"] == "started", reply
    return reply


async def get_session(h: RunningHub, sid: str, project: str = "p1") -> dict[str, Any] | None:
    reply = await http(h.port, "GET", f"/public/{project}/assist/sessions/{sid}")
    if reply.status == 404:
        return None
    assert reply.status == 200, reply.body
    data: dict[str, Any] = reply.json()["data"]
    return data


async def expect_error(ws: ClientConnection, msg: dict[str, Any] | str, code: str) -> dict[str, Any]:
    await send(ws, msg)
    reply = await recv(ws)
    assert reply["type"] == "error", reply
    assert reply["code"] == code, reply
    assert reply["message"]
    return reply


async def test_start_answers_started_with_the_full_record() -> None:
    async with running_hub() as h, websockets.connect(h.tracker_url()) as ws:
        before = int(time.time() * 1000)
        reply = await start(
            ws,
            sessionID="s-1",
            userID="ann@example.com",
            userBrowser="Firefox",
            pageTitle="Home",
            timestamp=1_700_000_000_000,
            metadata={"plan": "pro", "seats": 3, "trial": False, "ratio": 1.5},
            userProperties={"age": 41, "tags": ["a"]},
        )
        s = reply["session"]
        assert reply["sessionID"] == "s-1" == s["sessionID"]
        assert s["projectKey"] == "p1" and s["projectId"] == 0
        assert s["timestamp"] == 1_700_000_000_000
        assert s["lastActiveAt"] >= before
        assert s["metadata"] == {"plan": "pro", "seats": "3", "trial": "false", "ratio": "1.5"}
        assert s["userProperties"] == {"age": 41, "tags": ["a"]}
        assert s["active"] is True and s["connected"] is True and s["tabs"] == 1 and s["live"] is True
        assert s["userOs"] is None
        assert await get_session(h, "s-1") == s


@pytest.mark.parametrize("bad_id", [None, "", "has space", "x" * 65, 12345, "ünïcode", ["a"]])
async def test_missing_or_invalid_session_id_gets_a_uuid4(bad_id: Any) -> None:
    async with running_hub() as h, websockets.connect(h.tracker_url()) as ws:
        fields = {} if bad_id is None else {"sessionID": bad_id}
        reply = await start(ws, **fields)
        assert uuid.UUID(reply["sessionID"]).version == 4
        assert await get_session(h, reply["sessionID"]) is not None


@pytest.mark.parametrize("ts", ["1700000000000", None, True, [1], {"a": 1}, -5, 1e300])
async def test_non_numeric_timestamp_silently_becomes_server_now(ts: Any) -> None:
    async with running_hub() as h, websockets.connect(h.tracker_url()) as ws:
        before = int(time.time() * 1000)
        reply = await start(ws, sessionID="t1", timestamp=ts)
        after = int(time.time() * 1000)
        assert before <= reply["session"]["timestamp"] <= after
        assert (await get_session(h, "t1")) is not None


async def test_float_timestamp_is_kept_as_int() -> None:
    async with running_hub() as h, websockets.connect(h.tracker_url()) as ws:
        reply = await start(ws, sessionID="t2", timestamp=1_700_000_000_123.7)
        assert reply["session"]["timestamp"] == 1_700_000_000_123


async def test_second_start_on_sessionid_is_the_same_session_with_two_tabs() -> None:
    async with running_hub() as h, AsyncExitStack() as stack:
        a = await stack.enter_async_context(websockets.connect(h.tracker_url()))
        b = await stack.enter_async_context(websockets.connect(h.tracker_url()))
        await start(
            a, sessionID="dup", timestamp=1000, pageTitle="A", metadata={"k1": "v1"}, userProperties={"x": 1}
        )
        reply = await start(
            b, sessionID="dup", timestamp=2000, pageTitle="B", metadata={"k2": "v2"}, userProperties={"y": 2}
        )
        s = reply["session"]
        assert s["timestamp"] == 1000, "first start's timestamp wins"
        assert s["pageTitle"] == "B", "other fields carried replace stored ones"
        assert s["metadata"] == {"k1": "v1", "k2": "v2"}
        assert s["userProperties"] == {"x": 1, "y": 2}
        assert s["tabs"] == 2
        data = await h.search()
        assert data["total"] == 1
        # A repeated start on the same connection merges without counting a tab.
        reply = await start(b, sessionID="dup", metadata={"k1": "w"})
        assert reply["session"]["tabs"] == 2
        assert reply["session"]["metadata"] == {"k1": "w", "k2": "v2"}
        # One tab closing leaves the session connected with one tab.
        await b.close()
        s2 = await wait_for(lambda: _tabs_is(h, "dup", 1))
        assert s2["connected"] is True


async def _tabs_is(h: RunningHub, sid: str, tabs: int) -> dict[str, Any] | None:
    s = await get_session(h, sid)
    return s if s is not None and s["tabs"] == tabs else None


async def test_heartbeat_and_update_refresh_last_active_and_merge() -> None:
    async with running_hub() as h, websockets.connect(h.tracker_url()) as ws:
        s0 = (await start(ws, sessionID="hb", metadata={"a": "1"}, userProperties={"p": 1}))["session"]
        await asyncio.sleep(0.01)
        await send(ws, {"type": "heartbeat"})
        s1 = await wait_for(lambda: _last_active_after(h, "hb", s0["lastActiveAt"]))
        assert s1["active"] is True
        await send(ws, {"type": "heartbeat", "active": False})
        await wait_for(lambda: _field_is(h, "hb", "active", False))
        await send(
            ws,
            {
                "type": "update",
                "pageTitle": "Checkout",
                "url": "https://shop.example/checkout",
                "metadata": {"b": 2, "a": None},
                "userProperties": {"q": True},
                "active": True,
            },
        )
        s2 = await wait_for(lambda: _field_is(h, "hb", "pageTitle", "Checkout"))
        assert s2["url"] == "https://shop.example/checkout"
        assert s2["metadata"] == {"b": "2"}, "metadata merges by key; null removes a key"
        assert s2["userProperties"] == {"p": 1, "q": True}
        assert s2["active"] is True
        assert s2["timestamp"] == s0["timestamp"]


async def _last_active_after(h: RunningHub, sid: str, after: int) -> dict[str, Any] | None:
    s = await get_session(h, sid)
    return s if s is not None and s["lastActiveAt"] > after else None


async def _field_is(h: RunningHub, sid: str, name: str, value: Any) -> dict[str, Any] | None:
    s = await get_session(h, sid)
    return s if s is not None and s[name] == value else None


async def test_end_removes_the_session_at_once_and_the_connection_may_start_again() -> None:
    async with running_hub() as h, websockets.connect(h.tracker_url()) as ws:
        await start(ws, sessionID="e1")
        await send(ws, {"type": "end"})
        await wait_for(lambda: _gone(h, "e1"))
        await expect_error(ws, {"type": "heartbeat"}, "not_started")
        reply = await start(ws, sessionID="e2")
        assert reply["session"]["tabs"] == 1


async def _gone(h: RunningHub, sid: str) -> bool:
    return await get_session(h, sid) is None


async def test_disconnect_waits_out_grace_then_resume_keeps_the_session() -> None:
    async with running_hub(grace=30.0) as h:
        async with websockets.connect(h.tracker_url()) as ws:
            first = (await start(ws, sessionID="g1", pageTitle="P1"))["session"]
        s = await wait_for(lambda: _field_is(h, "g1", "connected", False))
        assert s["tabs"] == 0
        async with websockets.connect(h.tracker_url()) as ws:
            reply = await start(ws, sessionID="g1", pageTitle="P2")
            s = reply["session"]
            assert s["connected"] is True and s["tabs"] == 1
            assert s["timestamp"] == first["timestamp"] and s["pageTitle"] == "P2"
            assert (await h.search())["total"] == 1


async def test_heartbeats_keep_a_tracker_past_the_timeout() -> None:
    # The timeout closing a silent tracker, and its grace: test_contract. The grace to the
    # ms: test_unit_registry; the sweeper ending one end to end: test_contract, test_browser.
    async with running_hub(heartbeat_timeout=1.5) as h, websockets.connect(h.tracker_url()) as ws:
        await start(ws, sessionID="busy")
        for _ in range(6):  # 1.8 s in all, never 1.5 s silent
            await asyncio.sleep(0.3)
            await send(ws, {"type": "heartbeat"})
        s = await get_session(h, "busy")
        assert s is not None and s["connected"] is True


BAD_INPUT = [
    ("not json", "invalid_json"),
    ("{", "invalid_json"),
    ("[]", "invalid_message"),
    ("42", "invalid_message"),
    ('{"type":"teleport"}', "unknown_type"),
    ("{}", "unknown_type"),
    ('{"type":7}', "unknown_type"),
    ({"type": "update", "pageTitle": 5}, "invalid_field"),
    ({"type": "update", "metadata": {"a": [1]}}, "invalid_field"),
    ({"type": "update", "metadata": "x"}, "invalid_field"),
    ({"type": "update", "active": "yes"}, "invalid_field"),
    ({"type": "heartbeat", "active": 1}, "invalid_field"),
    ({"type": "update", "userProperties": []}, "invalid_field"),
    ({"type": "update", "pageTitle": "x" * 1025}, "limit_exceeded"),
    ({"type": "update", "metadata": {f"k{i}": "v" for i in range(51)}}, "limit_exceeded"),
    ({"type": "update", "metadata": {"k" * 129: "v"}}, "limit_exceeded"),
    ({"type": "update", "userProperties": {"blob": "x" * 17_000}}, "limit_exceeded"),
]


@pytest.mark.parametrize(("msg", "code"), BAD_INPUT)
async def test_bad_input_gets_an_error_and_changes_nothing(msg: dict[str, Any] | str, code: str) -> None:
    async with running_hub() as h, websockets.connect(h.tracker_url()) as ws:
        before = (await start(ws, sessionID="b1", pageTitle="keep", metadata={"m": "1"}))["session"]
        await expect_error(ws, msg, code)
        after = await get_session(h, "b1")
        assert after is not None
        assert after == before, "a refused message changes nothing, lastActiveAt included"


async def test_merge_past_the_metadata_limit_is_refused_whole() -> None:
    async with running_hub() as h, websockets.connect(h.tracker_url()) as ws:
        meta = {f"k{i}": "v" for i in range(50)}
        before = (await start(ws, sessionID="lim", metadata=meta))["session"]
        await expect_error(
            ws, {"type": "update", "pageTitle": "new", "metadata": {"one-more": "v"}}, "limit_exceeded"
        )
        assert await get_session(h, "lim") == before


@pytest.mark.parametrize("msg_type", ["heartbeat", "update", "end"])
async def test_messages_before_start_are_refused(msg_type: str) -> None:
    async with running_hub() as h, websockets.connect(h.tracker_url()) as ws:
        await expect_error(ws, {"type": msg_type}, "not_started")
        assert (await h.search())["total"] == 0


async def test_start_of_another_session_on_a_started_connection_is_refused() -> None:
    async with running_hub() as h, websockets.connect(h.tracker_url()) as ws:
        await start(ws, sessionID="one")
        await expect_error(ws, {"type": "start", "sessionID": "two"}, "already_started")
        assert (await h.search())["total"] == 1


async def test_frame_over_the_size_limit_closes_1009() -> None:
    async with running_hub(max_frame=4096) as h, websockets.connect(h.tracker_url()) as ws:
        await start(ws, sessionID="big")
        await ws.send(json.dumps({"type": "update", "pageTitle": "x" * 5000}))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1009


async def test_default_frame_limit_is_64_kib() -> None:
    async with running_hub() as h, websockets.connect(h.tracker_url()) as ws:
        await start(ws, sessionID="big2")
        await ws.send(json.dumps({"type": "heartbeat", "pad": "x" * 60_000}))
        await ws.send(json.dumps({"type": "heartbeat", "pad": "x" * 70_000}))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1009


async def test_fragmented_message_is_assembled() -> None:
    async with running_hub() as h, websockets.connect(h.tracker_url()) as ws:
        text = json.dumps({"type": "start", "sessionID": "frag", "pageTitle": "pieces"})
        await ws.send(iter([text[:10], text[10:20], text[20:]]))
        reply = await recv(ws)
        assert reply["session"]["pageTitle"] == "pieces"


async def test_unknown_project_is_refused_with_404_when_projects_are_set() -> None:
    async with running_hub(projects={"shop": 7}) as h:
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(h.tracker_url("nope")):
                pass
        assert info.value.response.status_code == 404
        async with websockets.connect(h.tracker_url("shop")) as ws:
            reply = await start(ws, sessionID="p")
            assert reply["session"]["projectId"] == 7


async def test_garbage_tracker_beside_a_good_one() -> None:
    # 212 messages at once: over the rate limit's burst, which is not what this test is about.
    async with running_hub(rate_limit=0) as h, AsyncExitStack() as stack:
        good = await stack.enter_async_context(websockets.connect(h.tracker_url()))
        # It never reads its ~180 error replies: with websockets' default queue of 16 it
        # would stop reading its socket, and its close would wait 10 s for the hub's.
        bad = await stack.enter_async_context(websockets.connect(h.tracker_url(), max_queue=None))
        await start(good, sessionID="good", pageTitle="fine", metadata={"a": "1"})
        await start(bad, sessionID="bad")
        garbage: list[Any] = [
            "}{",
            b"\xff\xfe\x00",
            '{"type":"start","sessionID":"good","pageTitle":123}',
            {"type": "update", "sessionID": "good", "pageTitle": "hijack"},
            {"type": "end", "sessionID": "good"},
            {"type": "update", "metadata": {"a": {"b": 1}}},
            '{"type":"heartbeat","active":null}',
        ]
        for round_ in range(30):
            for item in garbage:
                await bad.send(item if isinstance(item, (str, bytes)) else json.dumps(item))
            await send(good, {"type": "update", "metadata": {"round": round_}})
        await send(bad, {"type": "heartbeat"})
        s = await wait_for(lambda: _field_is(h, "good", "metadata", {"a": "1", "round": "29"}))
        assert s["pageTitle"] == "fine" and s["connected"] is True and s["tabs"] == 1
        data = await h.search()
        assert data["total"] == 1, "the bad tracker's 'end' ended its own session only"
        assert bad.state is State.OPEN, "garbage gets error frames, not a close"


async def test_binary_frames_are_not_parsed_as_json() -> None:
    # CONTRACT §2: binary frames are relay payloads (tests/test_conformance.py has the rest).
    async with running_hub() as h, websockets.connect(h.tracker_url()) as ws:
        await ws.send(json.dumps({"type": "start", "sessionID": "bin"}).encode())
        assert (await recv(ws))["code"] == "not_started", "no tab to relay from before start"
