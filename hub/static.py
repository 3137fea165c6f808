"""The browser files the hub serves itself: tracker.js and the dashboard.

The files ship inside the package (``hub/static/``) and are read once at
start, so a request is a dict lookup. Every answer carries a strong ETag;
a matching ``If-None-Match`` gets a 304 without a body.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Final

from .http_api import Request, Response

CONTENT_TYPES: Final = {
    ".js": "text/javascript; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}

# tracker.js is embedded in customers' pages: caches may keep it for an hour
# (a hub upgrade reaches every page within that). Everything else is the
# dashboard, which revalidates on each load so it never runs stale against
# a newer hub.
TRACKER_CACHE: Final = "public, max-age=3600"
DASHBOARD_CACHE: Final = "no-cache"

# The dashboard shows strings that trackers (anyone on the web) control:
# it only ever sets them as text, and this policy forbids inline script and
# foreign origins in case that ever slips.
DASHBOARD_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

# URL path -> file name inside hub/static.
ROUTES: Final = {
    "/static/tracker.js": "tracker.js",
    "/dashboard": "dashboard.html",
    "/static/dashboard.js": "dashboard.js",
    "/static/dashboard.css": "dashboard.css",
}


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str
    headers: tuple[tuple[str, str], ...]

    def serve(self, request: Request) -> Response:
        headers = [("ETag", self.etag), *self.headers]
        if self.etag in _etags(request.headers.get("if-none-match", "")):
            return Response(304, b"", self.content_type, headers)
        return Response(200, self.body, self.content_type, headers)


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


def load(name: str) -> StaticFile:
    body = (resources.files(__package__) / "static" / name).read_bytes()
    suffix = name[name.rfind(".") :]
    etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
    cache = TRACKER_CACHE if name == "tracker.js" else DASHBOARD_CACHE
    headers: list[tuple[str, str]] = [("Cache-Control", cache), ("X-Content-Type-Options", "nosniff")]
    if name == "tracker.js":
        # Pages on any origin load it, also as a CORS fetch (e.g. a bundler or SRI check).
        headers.append(("Access-Control-Allow-Origin", "*"))
    if suffix == ".html":
        headers += [("Content-Security-Policy", DASHBOARD_CSP), ("Referrer-Policy", "no-referrer")]
    return StaticFile(body, CONTENT_TYPES[suffix], etag, tuple(headers))


def routes() -> dict[str, Callable[[Request], Response]]:
    """Path -> GET handler, for the route table (``app.Hub._routes``)."""
    return {path: load(name).serve for path, name in ROUTES.items()}
