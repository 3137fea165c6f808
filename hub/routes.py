"""Every path the hub answers, HTTP and WebSocket, in one table.

A route is a path template (``/public/{projectKey}/assist/sessions/{sessionID}``)
and its handlers: one per HTTP method (HEAD answers with the GET handler; the
connection drops the body), or one for a WebSocket handshake. Before a
handler runs, the table checks, once for HTTP and WebSocket alike:

1. ``auth``: the request's key may read the path's project: 401 otherwise
   (a WebSocket may carry the key as ``?token=``: browsers cannot set headers
   on one). A project's own key does not open another project.
2. a path naming a ``{projectKey}``: the project exists (404 otherwise).

While the hub drains, every WebSocket handshake is a 503. ``cors`` routes
answer preflights without a key and carry CORS headers (``cors.py``).
Handlers find the path's parameters in ``request.params``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

from .auth import Auth, bearer_token
from .config import Settings
from .cors import Cors
from .http_api import Request, Response, error, loggable_path, query_params
from .websocket import Endpoint, WebSocketConnection

log = logging.getLogger("hub.server")

HttpHandler = Callable[[Request], Response]
WsHandler = Callable[[Request, WebSocketConnection], "Endpoint | Response"]

PROJECT_KEY: Final = "projectKey"


@dataclass(frozen=True, slots=True)
class Route:
    segments: tuple[str, ...]
    # Method -> handler (HTTP); empty for a WebSocket route.
    methods: dict[str, HttpHandler]
    websocket: WsHandler | None
    auth: bool
    cors: bool

    @property
    def allow(self) -> str:
        """The ``Allow`` header: the methods this path answers."""
        return ", ".join([*self.methods, *(["OPTIONS"] if self.cors else [])])

    def match(self, parts: list[str]) -> dict[str, str] | None:
        params: dict[str, str] = {}
        for template, part in zip(self.segments, parts, strict=True):
            if template[:1] == "{":
                params[template[1:-1]] = part
            elif template != part:
                return None
        return params


def _segments(template: str) -> tuple[str, ...]:
    return tuple(template.split("/"))


class RouteTable:
    def __init__(self, settings: Settings, auth: Auth, accepting_websockets: Callable[[], bool]) -> None:
        self.settings = settings
        self.auth = auth
        self.cors = Cors(settings.cors_origins)
        self.accepting_websockets = accepting_websockets
        # By number of path segments: a request is matched against routes of its length only.
        self._http: dict[int, list[Route]] = {}
        self._ws: dict[int, list[Route]] = {}

    def http(
        self,
        template: str,
        *,
        get: HttpHandler | None = None,
        post: HttpHandler | None = None,
        auth: bool = False,
        cors: bool = False,
    ) -> None:
        methods: dict[str, HttpHandler] = {}
        if get is not None:
            methods |= {"GET": get, "HEAD": get}
        if post is not None:
            methods["POST"] = post
        self._add(self._http, Route(_segments(template), methods, None, auth, cors))

    def websocket(self, template: str, handler: WsHandler, *, auth: bool = False) -> None:
        self._add(self._ws, Route(_segments(template), {}, handler, auth, cors=False))

    @staticmethod
    def _add(table: dict[int, list[Route]], route: Route) -> None:
        if route.auth and "{" + PROJECT_KEY + "}" not in route.segments:
            raise ValueError(f"{'/'.join(route.segments)}: a key is checked against the path's project")
        table.setdefault(len(route.segments), []).append(route)

    def _match(self, table: dict[int, list[Route]], request: Request) -> Route | None:
        parts = [unquote(part) for part in request.path.split("/")]
        for route in table.get(len(parts), ()):
            params = route.match(parts)
            if params is not None:
                request.params = params
                return route
        return None

    def _admit(self, route: Route, request: Request) -> Response | None:
        """Authenticate, then check the project exists: a refusal, or None to go on."""
        project_key = request.params.get(PROJECT_KEY)
        if route.auth:
            token = bearer_token(request.headers)
            if token is None and route.websocket is not None:
                token = query_params(request.query).get("token")
            if project_key is None or not self.auth.may_read(token, project_key):
                return error(401, "missing or invalid API key", [("WWW-Authenticate", "Bearer")])
        if project_key is not None and self.settings.project_id(project_key) is None:
            return error(404, "project not found")
        return None

    def answer(self, request: Request) -> Response:
        """The response to an HTTP request."""
        route = self._match(self._http, request)
        if route is None:
            return error(404, "not found")
        response = self._answer(route, request)
        return self.cors.decorate(request, response) if route.cors else response

    def _answer(self, route: Route, request: Request) -> Response:
        if request.method == "OPTIONS" and route.cors:
            return self.cors.preflight(request, route.allow)
        handler = route.methods.get(request.method)
        if handler is None:
            return error(405, f"{request.method} is not allowed on {request.path}", [("Allow", route.allow)])
        refusal = self._admit(route, request)
        if refusal is not None:
            return refusal
        try:
            return handler(request)
        except Exception:
            log.exception("HTTP handler failed on %s %s", request.method, loggable_path(request.path))
            return error(500, "internal error")

    def accept(self, request: Request, conn: WebSocketConnection) -> Endpoint | Response:
        """The endpoint of a WebSocket handshake, or the HTTP refusal to answer it with."""
        if not self.accepting_websockets():
            return error(503, "the hub is draining; reconnect elsewhere")
        route = self._match(self._ws, request)
        if route is None or route.websocket is None:
            return error(404, "not found")
        refusal = self._admit(route, request)
        if refusal is not None:
            return refusal
        return route.websocket(request, conn)
