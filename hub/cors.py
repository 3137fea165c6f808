"""CORS for the HTTP API: a browser page on another origin may read it (``--cors-origins``).

With origins configured, a route marked ``cors`` answers a preflight
(``OPTIONS``) with 204 and no key asked for, and every answer of such a
route, errors included, carries ``Access-Control-Allow-Origin`` (the
request's ``Origin``) when that origin is allowed. Other origins, or no
configuration, get no ``Access-Control-*`` header at all: the preflight is
still a 204 (with ``Allow``), and the browser refuses the call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from .http_api import Request, Response

ALLOW_METHODS: Final = "GET, POST, HEAD, OPTIONS"
ALLOW_HEADERS: Final = "Authorization, Content-Type"
# Seconds a browser may reuse a preflight answer (Chromium caps it at 7200).
MAX_AGE: Final = "7200"


class Cors:
    __slots__ = ("any", "origins")

    def __init__(self, origins: Sequence[str] | None) -> None:
        # Origins as config.py normalizes them: lowercase, no trailing "/"; "*" is any.
        self.origins = frozenset(origins or ())
        self.any = "*" in self.origins

    def allowed(self, request: Request) -> str | None:
        """The request's Origin if it may read answers, else None."""
        origin = request.headers.get("origin")
        if not origin or not self.origins:
            return None
        if self.any or origin.rstrip("/").lower() in self.origins:
            return origin
        return None

    def preflight(self, request: Request, allow: str) -> Response:
        """The answer to ``OPTIONS``: 204, with the CORS grant for an allowed origin
        (``decorate`` then adds the origin, as to every answer)."""
        response = Response(204, headers=[("Allow", allow)])
        origin = self.allowed(request)
        if origin is not None:
            response.headers += [
                ("Access-Control-Allow-Methods", ALLOW_METHODS),
                ("Access-Control-Allow-Headers", ALLOW_HEADERS),
                ("Access-Control-Max-Age", MAX_AGE),
            ]
        return response

    def decorate(self, request: Request, response: Response) -> Response:
        """Add ``Access-Control-Allow-Origin`` for an allowed origin; ``Vary: Origin`` when enabled."""
        if not self.origins:
            return response
        origin = self.allowed(request)
        if origin is not None:
            response.headers.append(("Access-Control-Allow-Origin", origin))
        # The answer depends on Origin: a shared cache must not give one origin's to another.
        response.headers.append(("Vary", "Origin"))
        return response
