import json

import websockets

from tests.helpers import http, running_hub


async def test_start_then_search() -> None:
    async with running_hub() as h, websockets.connect(h.tracker_url()) as ws:
        await ws.send(json.dumps({"type": "start", "sessionID": "s1", "userID": "a@b.c"}))
        started = json.loads(await ws.recv())
        assert started["type"] == "started" and started["sessionID"] == "s1"
        data = await h.search()
        assert data["total"] == 1 and data["sessions"][0]["userID"] == "a@b.c"
        health = await http(h.port, "GET", "/healthz", key=None)
        assert health.status == 200
