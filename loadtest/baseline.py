"""The baseline: a bare ``websockets`` receiver, the floor the hub is compared with.

What a straightforward websockets server for trackers does: a handler task
per connection, ``json.loads`` per message, the record kept as a dict,
compression off. ``GET /stats`` answers its counts; ``python -m
loadtest.baseline --port P`` runs it (with uvloop, like the hub).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

sessions: dict[str, dict[str, Any]] = {}
counts = {"messages": 0, "connections": 0}


async def handler(ws: ServerConnection) -> None:
    counts["connections"] += 1
    record: dict[str, Any] | None = None
    try:
        async for message in ws:
            counts["messages"] += 1
            msg = json.loads(message)
            kind = msg.get("type")
            now = int(time.time() * 1000)
            if kind == "start":
                sid = str(msg.get("sessionID"))
                record = sessions.setdefault(sid, {"timestamp": now})
                record.update(msg)
                record["lastActiveAt"] = now
                await ws.send(json.dumps({"type": "started", "sessionID": sid, "session": record}))
            elif kind == "heartbeat" and record is not None:
                record["lastActiveAt"] = now
            elif kind == "end" and record is not None:
                sessions.pop(str(record.get("sessionID")), None)
                record = None
    finally:
        counts["connections"] -= 1


def process_request(connection: ServerConnection, request: Request) -> Response | None:
    if request.path == "/healthz":
        return connection.respond(HTTPStatus.OK, "ok\n")
    if request.path == "/stats":
        return connection.respond(HTTPStatus.OK, json.dumps({"sessions": len(sessions), **counts}) + "\n")
    return None


async def main(port: int) -> None:
    async with serve(
        handler,
        "127.0.0.1",
        port,
        compression=None,
        max_size=64 * 1024,
        backlog=4096,
        process_request=process_request,
    ) as server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=9100)
    port = parser.parse_args().port
    try:
        import uvloop

        uvloop.run(main(port))
    except ImportError:
        asyncio.run(main(port))
