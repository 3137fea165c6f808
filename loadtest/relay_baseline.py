"""The relay baseline: a bare ``websockets`` server doing the hub's live-relay fan-out (CONTRACT §7).

What a straightforward websockets relay does, with the hub's frames: a
handler task per connection, ``json.loads`` per text message, a dict of rooms,
``websockets.broadcast`` (the library's fan-out: no back-pressure, no
copies per receiver), compression off.

- ``/ws/tracker/{projectKey}``: ``start`` (``sessionID``, optional ``tabId``)
  answered ``started``; then ``emit`` frames go to the session's joined agents
  as ``session.event``, binary frames as binary frames behind the 2-byte
  big-endian length and the ``{"sessionID","tab"}`` JSON header. The tab hears
  ``{"type":"agents","count":N}`` whenever its session's agents change.
- ``/ws/agent/{projectKey}`` (``Authorization: Bearer KEY``): ``join``
  answered ``joined``, ``leave``.

``python -m loadtest.relay_baseline --port P [--api-key KEY]`` runs it (with
uvloop, like the hub); ``GET /healthz`` answers 200.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from websockets import broadcast
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response


@dataclass
class Room:
    tabs: dict[str, ServerConnection] = field(default_factory=dict)
    agents: set[ServerConnection] = field(default_factory=set)


rooms: dict[tuple[str, str], Room] = {}
api_key = ""


def room_of(key: tuple[str, str]) -> Room:
    room = rooms.get(key)
    if room is None:
        room = rooms[key] = Room()
    return room


def agents_changed(room: Room) -> None:
    broadcast(room.tabs.values(), json.dumps({"type": "agents", "count": len(room.agents)}))


async def tracker(ws: ServerConnection, project: str) -> None:
    room: Room | None = None
    sid = tab = ""
    header = b""
    try:
        async for message in ws:
            if isinstance(message, bytes):
                if room is not None and room.agents:
                    broadcast(room.agents, header + message)
                continue
            msg = json.loads(message)
            kind = msg.get("type")
            if kind == "emit" and room is not None:
                if room.agents:
                    event = {"type": "session.event", "sessionID": sid, "tab": tab,
                             "event": msg.get("event"), "data": msg.get("data")}  # fmt: skip
                    broadcast(room.agents, json.dumps(event))
            elif kind == "start" and room is None:
                sid, tab = str(msg.get("sessionID")), str(msg.get("tabId") or id(ws))
                head = json.dumps({"sessionID": sid, "tab": tab}).encode()
                header = len(head).to_bytes(2, "big") + head
                room = room_of((project, sid))
                room.tabs[tab] = ws
                await ws.send(json.dumps({"type": "started", "sessionID": sid, "tabId": tab}))
                if room.agents:
                    await ws.send(json.dumps({"type": "agents", "count": len(room.agents)}))
    finally:
        if room is not None:
            room.tabs.pop(tab, None)


async def agent(ws: ServerConnection, project: str) -> None:
    joined: set[tuple[str, str]] = set()
    try:
        async for message in ws:
            msg: dict[str, Any] = json.loads(message)
            key = (project, str(msg.get("sessionID")))
            if msg.get("type") == "join" and key not in joined:
                joined.add(key)
                room = room_of(key)
                room.agents.add(ws)
                await ws.send(json.dumps({"type": "joined", "sessionID": key[1], "tabs": sorted(room.tabs)}))
                agents_changed(room)
            elif msg.get("type") == "leave" and key in joined:
                joined.discard(key)
                rooms[key].agents.discard(ws)
                agents_changed(rooms[key])
    finally:
        for key in joined:
            rooms[key].agents.discard(ws)
            agents_changed(rooms[key])


async def handler(ws: ServerConnection) -> None:
    assert ws.request is not None
    _, _, kind, project = ws.request.path.split("?")[0].split("/", 3)
    # A client that drops its connection without a close frame (the load generators do) is no error.
    with contextlib.suppress(ConnectionClosed):
        await (tracker if kind == "tracker" else agent)(ws, project)


def process_request(connection: ServerConnection, request: Request) -> Response | None:
    path = request.path.split("?")[0]
    if path == "/healthz":
        return connection.respond(HTTPStatus.OK, "ok\n")
    parts = path.split("/")
    if len(parts) != 4 or parts[1] != "ws" or parts[2] not in ("tracker", "agent") or not parts[3]:
        return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
    if parts[2] == "agent" and request.headers.get("Authorization") != f"Bearer {api_key}":
        return connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
    return None


async def main(port: int) -> None:
    async with serve(
        handler,
        "127.0.0.1",
        port,
        compression=None,
        max_size=1 << 20,
        backlog=4096,
        process_request=process_request,
    ) as server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=9101)
    parser.add_argument("--api-key", default="bench-key")
    args = parser.parse_args()
    api_key = args.api_key
    try:
        import uvloop

        uvloop.run(main(args.port))
    except ImportError:
        asyncio.run(main(args.port))
