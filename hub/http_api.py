"""The HTTP API (CONTRACT §4, §5): handlers from a parsed request to a ``Response``.

The transport only moves bytes and ``routes.RouteTable`` picks the handler.
Every malformed request is a 400 saying what was wrong.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import parse_qsl

import msgspec
from msgspec import Struct

from .config import Settings
from .index import LiveIndex
from .record import Session
from .replication import Replication, mirrored
from .search import FIELD_NAMES, Query, QueryError, compare_text, parse_body, parse_params

JSON: Final = "application/json"


@dataclass
class Request:
    method: str
    path: str
    query: str
    # Lowercase names; a repeated header keeps its last value.
    headers: dict[str, str]
    body: bytes = b""
    # False when the client asked to close after the answer (or speaks HTTP/1.0 without keep-alive).
    keep_alive: bool = True
    # The path's parameters by name ({projectKey}, {sessionID}), set by the route table.
    params: dict[str, str] = field(default_factory=dict)


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


class Suggestion(Struct):
    value: str
    count: int


class AutocompleteAnswer(Struct):
    data: list[Suggestion]


# Autocomplete answers (README, "Autocomplete").
AUTOCOMPLETE_LIMIT: Final = 10
AUTOCOMPLETE_MAX: Final = 100


_encoder: Final = msgspec.json.Encoder()


# OpenReplay's assist API carries its key in the path (/assist/{ASSIST_KEY}/...).
_PATH_SECRET: Final = re.compile(r"^/assist/[^/]+")


def loggable_path(path: str) -> str:
    """``path`` as logs may show it: a key in the path is redacted (a query is never logged)."""
    return _PATH_SECRET.sub("/assist/[redacted]", path) if path.startswith("/assist/") else path


def error(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, _encoder.encode({"error": message}), headers=headers or [])


def query_params(query: str) -> dict[str, str]:
    return dict(parse_qsl(query, keep_blank_values=True))


def search_params(query: str) -> dict[str, str]:
    """A GET search's parameters; one given twice is ambiguous, a 400 (not the last one silently)."""
    params: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in params:
            raise QueryError(f"query parameter {name!r} given more than once")
        params[name] = value
    return params


class HttpApi:
    """Handlers of the assist API and the health routes; ``routes.RouteTable`` maps paths to them
    and has already checked the key and the project when one runs."""

    def __init__(
        self,
        settings: Settings,
        index: LiveIndex,
        ready: Callable[[], bool],
        limits: Counter[str],
        on_search: Callable[[float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.index = index
        self.ready = ready
        self.on_search = on_search
        # Times a limit was reached, by name (/metrics); shared with the transport.
        self.limits = limits

    def healthz(self, _request: Request) -> Response:
        return Response(200, b'{"status":"ok"}')

    def readyz(self, _request: Request) -> Response:
        if self.ready():
            return Response(200, b'{"status":"ready"}')
        return Response(503, b'{"status":"starting"}')

    def list_sessions(self, request: Request) -> Response:
        """``GET /public/{projectKey}/assist/sessions``: a search from the query string."""
        try:
            return self._search(request.params["projectKey"], parse_params(search_params(request.query)))
        except QueryError as exc:
            return error(400, str(exc))

    def search(self, request: Request) -> Response:
        """``POST /public/{projectKey}/assist/sessions``: a search from the JSON body."""
        try:
            return self._search(request.params["projectKey"], parse_body(request.body))
        except QueryError as exc:
            return error(400, str(exc))

    def session(self, request: Request) -> Response:
        """``GET /public/{projectKey}/assist/sessions/{sessionID}``."""
        session = self.index.get(request.params["projectKey"], request.params["sessionID"])
        if session is None:
            return error(404, "session not found")
        return Response(200, _encoder.encode(SessionAnswer(data=session)))

    def autocomplete(self, request: Request) -> Response:
        """``GET /public/{projectKey}/assist/autocomplete?key=userBrowser&q=chr``: live values.

        ``key`` names a field as a filter does (any case, the same aliases), or
        ``metadata`` with ``source`` the metadata key; ``q`` (optional) is
        matched as a `contains` filter matches; ``limit`` 1-100, default 10.
        """
        try:
            params = search_params(request.query)
            field, key = _suggested(params.get("key", ""), params.get("source", ""))
            limit = _suggestions_limit(params.get("limit", ""))
        except QueryError as exc:
            return error(400, str(exc))
        found = self.index.values(
            request.params["projectKey"], field, key, compare_text(params.get("q", "")), limit
        )
        answer = AutocompleteAnswer([Suggestion(value, count) for value, count in found])
        return Response(200, _encoder.encode(answer))

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


def _suggested(name: str, source: str) -> tuple[str, str | None]:
    """The (field, metadata key) an autocomplete's ``key`` and ``source`` name."""
    lowered = name.strip().lower()
    if not lowered:
        raise QueryError("key is required: a session field (e.g. userBrowser) or metadata with source")
    if lowered == "metadata":
        if not source:
            raise QueryError("key=metadata needs source, the metadata key")
        return "metadata", source
    field = FIELD_NAMES.get(lowered)
    if field is None:
        raise QueryError(f"unknown key {name!r}: use a session field, or metadata with source")
    return field, None


def _suggestions_limit(raw: str) -> int:
    if raw == "":
        return AUTOCOMPLETE_LIMIT
    # ASCII digits only, as the search's paging parameters.
    if not (len(raw) <= 3 and raw.isascii() and raw.isdigit() and 1 <= int(raw) <= AUTOCOMPLETE_MAX):
        raise QueryError(f"limit must be a whole number between 1 and {AUTOCOMPLETE_MAX}, got {raw[:40]!r}")
    return int(raw)


def mirrored_first(
    replication: Replication, param: str = "projectKey"
) -> Callable[[Callable[[Request], Response]], Callable[[Request], Response | Awaitable[Response]]]:
    """Wraps a handler of a project's data: it answers once this node mirrors the project
    (``request.params[param]``): at once when it does, else deferred until its bootstrap
    is done (a cold search in a cluster: README, "Cluster")."""

    def wrap(handler: Callable[[Request], Response]) -> Callable[[Request], Response | Awaitable[Response]]:
        def answer(request: Request) -> Response | Awaitable[Response]:
            project_key = request.params[param]
            if replication.mirrors(project_key) and replication.when_mirrored(project_key, _nothing):
                return handler(request)
            return _later(replication, project_key, handler, request)

        return answer

    return wrap


def _nothing() -> None:
    pass


async def _later(
    replication: Replication, project_key: str, handler: Callable[[Request], Response], request: Request
) -> Response:
    await mirrored(replication, project_key)
    return handler(request)
