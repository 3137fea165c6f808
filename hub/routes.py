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

A handler that cannot answer at once (a search of a project this node must
first bootstrap) defers: it returns an awaitable of its ``Response``
instead of the ``Response`` (``Deferred``), e.g. an ``async def``'s
coroutine, or a future. ``answer`` then gives the connection a task that
finishes within ``defer_timeout`` (``DEFER_TIMEOUT_S``): the handler's
response, a 500 if it raised (logged as a synchronous handler's), or a 503
with ``Retry-After`` when the bound passed; CORS headers decorate all three.
The connection (``http1.HttpConnection``) parses nothing more meanwhile
(pipelined requests wait: answers go out in order), writes the answer when
the task is done (HEAD drops its body) and goes on. If the client goes
away first, the task is cancelled: a coroutine the handler returned is
cancelled with it (it is the request's own); a future is never cancelled
(several requests may wait on one bootstrap): its result is dropped.
Answering at once stays as cheap as before: deferring costs only the
requests that do. ::

    def search(request: Request) -> Response | Deferred:
        if mirrored(project):
            return answer_now(request)
        return _after(bootstrap(project), request)   # bootstrap: a shared future

    async def _after(ready: asyncio.Future[None], request: Request) -> Response:
        await asyncio.shield(ready)
        return answer_now(request)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

from .auth import Auth, bearer_token
from .config import Settings
from .cors import Cors
from .http_api import Request, Response, error, loggable_path, query_params
from .websocket import Endpoint, WebSocketConnection

log = logging.getLogger("hub.server")

# What a handler that cannot answer at once returns instead of its response (see above).
Deferred = Awaitable[Response]
HttpHandler = Callable[[Request], "Response | Deferred"]
WsHandler = Callable[[Request, WebSocketConnection], "Endpoint | Response"]

PROJECT_KEY: Final = "projectKey"
# Seconds a deferred answer may take before it is a 503 (a cold search waits for a
# bootstrap of at most ~2 s at 100k sessions).
DEFER_TIMEOUT_S: Final = 10.0
# Seconds a client told 503 after that bound should wait before asking again.
RETRY_AFTER_S: Final = 1


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
        # Seconds a deferred answer may take (tests shorten it).
        self.defer_timeout = DEFER_TIMEOUT_S
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

    def answer(self, request: Request) -> Response | asyncio.Task[Response]:
        """The response to an HTTP request, or a task that ends with it (a deferred answer)."""
        route = self._match(self._http, request)
        if route is None:
            return error(404, "not found")
        response = self._answer(route, request)
        if not isinstance(response, Response):
            return asyncio.ensure_future(self._deferred(route, request, response))
        return self.cors.decorate(request, response) if route.cors else response

    async def _deferred(self, route: Route, request: Request, answer: Deferred) -> Response:
        """A deferred answer within ``defer_timeout``, as a synchronous one is decorated."""
        if asyncio.isfuture(answer):
            # Maybe shared with other requests: this one's going away must not cancel it.
            answer = asyncio.shield(answer)
        try:
            async with asyncio.timeout(self.defer_timeout):
                response = await answer
        except TimeoutError:
            log.warning(
                "http.deferred_timeout",
                extra={"fields": {"path": loggable_path(request.path), "timeout_s": self.defer_timeout}},
            )
            response = error(
                503,
                f"no answer within {self.defer_timeout:g} s; retry shortly",
                [("Retry-After", str(RETRY_AFTER_S))],
            )
        except Exception:
            log.exception("HTTP handler failed on %s %s", request.method, loggable_path(request.path))
            response = error(500, "internal error")
        return self.cors.decorate(request, response) if route.cors else response

    def _answer(self, route: Route, request: Request) -> Response | Deferred:
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
