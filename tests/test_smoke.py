import asyncio
import json

import websockets

from tests.helpers import http, running_hub, wait_for


async def test_start_then_search() -> None:
    async with running_hub() as h, websockets.connect(h.tracker_url()) as ws:
        await ws.send(json.dumps({"type": "start", "sessionID": "s1", "userID": "a@b.c"}))
        started = json.loads(await ws.recv())
        assert started["type"] == "started" and started["sessionID"] == "s1"
        data = await h.search()
        assert data["total"] == 1 and data["sessions"][0]["userID"] == "a@b.c"
        health = await http(h.port, "GET", "/healthz", key=None)
        assert health.status == 200


async def test_a_connection_is_taken_with_its_first_bytes_and_a_silent_one_still_served() -> None:
    # TCP_DEFER_ACCEPT (hub/server.py): one wake-up for the accept and the request.
    async with running_hub() as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        await asyncio.sleep(0.3)
        assert not h.hub.server.connections  # connected, silent: not accepted yet
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\n")
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
        writer.close()
        # A client that waits before it speaks is accepted after the defer time, and served.
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        await wait_for(lambda: h.hub.server.connections, timeout=5)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\n")
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
        writer.close()
