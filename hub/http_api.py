"""The HTTP API (CONTRACT §4, §5), as a pure function of a parsed request.

``HttpApi.handle`` maps a request to a ``Response``; the server layer only
moves bytes. Every malformed request is a 400 saying what was wrong.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import parse_qsl, unquote

import msgspec
from msgspec import Struct

from .auth import Auth, bearer_token
from .config import Settings
from .index import LiveIndex
from .record import Session
from .search import Query, QueryError, parse_body, parse_params

JSON: Final = "application/json"


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = JSON
    headers: list[tuple[str, str]] = field(default_factory=list)


class SearchData(Struct):
    total: int
    sessions: list[Session]
    live: bool = True


class SearchAnswer(Struct):
    data: SearchData


class SessionAnswer(Struct):
    data: Session


_encoder: Final = msgspec.json.Encoder()


def error(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, _encoder.encode({"error": message}), headers=headers or [])


def query_params(query: str) -> dict[str, str]:
    return dict(parse_qsl(query, keep_blank_values=True))


class HttpApi:
    def __init__(
        self,
        settings: Settings,
        index: LiveIndex,
        ready: Callable[[], bool],
        on_search: Callable[[float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.index = index
        self.ready = ready
        self.on_search = on_search
        self.auth = Auth.from_settings(settings)
        # Times a limit was reached here, by name; the server counts into the same one.
        self.limits: Counter[str] = Counter()
        self.routes: dict[str, Callable[[Request], Response]] = {
            "/healthz": lambda _r: Response(200, b'{"status":"ok"}'),
            "/readyz": self._readyz,
        }

    def _readyz(self, _request: Request) -> Response:
        if self.ready():
            return Response(200, b'{"status":"ready"}')
        return Response(503, b'{"status":"starting"}')

    def handle(self, request: Request) -> Response:
        try:
            return self._handle(request)
        except QueryError as exc:
            return error(400, str(exc))

    def _handle(self, request: Request) -> Response:
        path = request.path
        route = self.routes.get(path)
        if route is not None:
            if request.method not in ("GET", "HEAD"):
                return error(405, f"{request.method} is not allowed on {path}", [("Allow", "GET")])
            return route(request)
        if path.startswith("/public/"):
            return self._public(request)
        return error(404, "not found")

    def _public(self, request: Request) -> Response:
        parts = [unquote(p) for p in request.path.split("/")]
        # ["", "public", pk, "assist", "sessions", (sid)]
        if len(parts) not in (5, 6) or parts[3] != "assist" or parts[4] != "sessions":
            return error(404, "not found")
        project_key = parts[2]
        # A project's own key does not open another project: 401, as a wrong key.
        if not self.auth.may_read(bearer_token(request.headers), project_key):
            return error(401, "missing or invalid API key", [("WWW-Authenticate", "Bearer")])
        if self.settings.project_id(project_key) is None:
            return error(404, "project not found")
        if len(parts) == 6:
            if request.method != "GET":
                return error(405, f"{request.method} is not allowed here", [("Allow", "GET")])
            session = self.index.get(project_key, parts[5])
            if session is None:
                return error(404, "session not found")
            return Response(200, _encoder.encode(SessionAnswer(data=session)))
        if request.method == "GET":
            query = parse_params(query_params(request.query))
        elif request.method == "POST":
            query = parse_body(request.body)
        else:
            return error(405, f"{request.method} is not allowed here", [("Allow", "GET, POST")])
        return self._search(project_key, query)

    def _search(self, project_key: str, query: Query) -> Response:
        limit = self.settings.max_filters
        if limit and len(query.criteria) > limit:
            self.limits["max_filters"] += 1
            return error(400, f"{len(query.criteria)} filters, over the limit of {limit}")
        started = time.perf_counter()
        total, page = self.index.search(project_key, query)
        if self.on_search is not None:
            self.on_search(time.perf_counter() - started)
        return Response(200, _encoder.encode(SearchAnswer(SearchData(total=total, sessions=page))))
