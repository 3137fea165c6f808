"""``GET /openapi.json``: an OpenAPI 3.1 document of every HTTP route (CONTRACT §4, §5).

Built from the code it describes, so it cannot drift from it: the record's
fields and types from ``record.Session``, sort keys and bounds from
``search``, limits from the running hub's ``Settings``, static files from
``static``. ``tests/test_openapi.py`` runs schemathesis against a hub
serving it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

import msgspec
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4

from . import __version__, openreplay_api, static
from .config import PROJECT_KEY_RE, Settings
from .http_api import AUTOCOMPLETE_LIMIT, AUTOCOMPLETE_MAX, JSON, Request, Response
from .record import (
    DESCRIPTIVE_FIELDS,
    MAX_JSON_DEPTH,
    MAX_METADATA_KEY,
    MAX_METADATA_KEYS,
    MAX_STRING,
    MAX_USER_PROPERTIES_BYTES,
    SCALAR_FIELDS,
    SESSION_ID_RE,
    Session,
)
from .search import DEFAULT_LIMIT, FIELD_NAMES, MAX_LIMIT

Schema = dict[str, Any]

PATH: Final = "/openapi.json"
# Examples the document gives its path parameters; the schemathesis test
# starts live sessions under them so that answers carry real records.
EXAMPLE_PROJECT: Final = "my-project"
EXAMPLE_SESSION: Final = "s-1"

# Accepted sort keys, as the README spells them; matching is case-insensitive
# (search.FIELD_NAMES), so aliases are listed by their lower-case key.
SORT_KEYS: Final = sorted(SCALAR_FIELDS | {k for k, f in FIELD_NAMES.items() if k != f.lower()})
SORT_TEXT: Final = "A scalar record field, case-insensitive; empty or null means timestamp."
ORDERS: Final = ["asc", "desc"]
ORDER_TEXT: Final = "Case-insensitive; empty or null means desc."


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def ref_parameter(name: str) -> Schema:
    return {"$ref": f"#/components/parameters/{name}"}


def _nullable(schema: Schema) -> Schema:
    """``X | None`` as one ``type`` list: msgspec writes an ``anyOf``."""
    options = schema.pop("anyOf", None)
    if options is not None:
        types = [o["type"] for o in options]
        schema["type"] = types
    return schema


def session_schema() -> Schema:
    """``record.Session`` as the encoder writes it: every field, always present."""
    (_,), components = msgspec.json.schema_components([Session], ref_template="#/components/schemas/{name}")
    schema: Schema = components["Session"]
    props: dict[str, Schema] = schema["properties"]
    for prop in props.values():
        prop.pop("default", None)
        _nullable(prop)
    props["sessionID"]["pattern"] = f"^{SESSION_ID_RE.pattern}$"
    props["projectKey"]["pattern"] = f"^{PROJECT_KEY_RE.pattern}$"
    for name in ("timestamp", "lastActiveAt"):
        props[name].update(minimum=0, description="Unix milliseconds")
    for name in DESCRIPTIVE_FIELDS:
        props[name]["maxLength"] = MAX_STRING
    props["metadata"].update(
        maxProperties=MAX_METADATA_KEYS,
        propertyNames={"minLength": 1, "maxLength": MAX_METADATA_KEY},
        additionalProperties={"type": "string", "maxLength": MAX_STRING},
        description="Metadata by key; numbers and booleans were stored as their text.",
    )
    props["userProperties"]["description"] = (
        f"Any JSON object a tracker sent, at most {MAX_USER_PROPERTIES_BYTES} bytes encoded."
    )
    props["tabs"].update(minimum=0, description="Open tracker connections; 0 while the grace runs.")
    props["connected"]["description"] = "false while the session waits out its reconnect grace"
    props["pageViews"].update(
        minimum=1, description="Pages seen: 1 at start, +1 each time url changes to another page."
    )
    props["activeTime"].update(
        minimum=0,
        description=(
            "Ms the session was active, up to lastActiveAt: the time between two of its messages "
            "counts when it was active after the first, a reconnect grace never."
        ),
    )
    props["live"] = {"const": True}
    schema.update(required=list(props), additionalProperties=False)
    del schema["title"]
    return schema


ERROR: Final[Schema] = {
    "type": "object",
    "properties": {"error": {"type": "string", "description": "What was wrong."}},
    "required": ["error"],
    "additionalProperties": False,
}

SCALAR: Final[Schema] = {"type": ["string", "number", "boolean"]}


def search_body_schema(settings: Settings) -> Schema:
    """The POST search body (CONTRACT §4); null or absent means the default."""
    filters: Schema = {"type": ["array", "null"], "items": ref("Filter")}
    if settings.max_filters:
        filters["maxItems"] = settings.max_filters
    return {
        "type": "object",
        "properties": {
            "filters": filters,
            "sort": {"enum": [*SORT_KEYS, "", None], "description": SORT_TEXT},
            "order": {"enum": [*ORDERS, None], "description": ORDER_TEXT},
            "page": {"type": ["integer", "null"], "minimum": 0, "description": "1-based; 0 means 1."},
            "limit": {
                "type": ["integer", "null"],
                "minimum": 0,
                "maximum": MAX_LIMIT,
                "description": f"0 means {DEFAULT_LIMIT}.",
            },
        },
        "description": "Unknown fields are ignored.",
    }


FILTER: Final[Schema] = {
    "type": "object",
    "properties": {
        "name": {
            "type": "string",
            "pattern": r"\S",
            "description": (
                "A record field, case-insensitive (userId, userAnonymousId, platform and every scalar "
                "field by its name), METADATA (reads metadata[source]) or any other name, read as a "
                "metadata key. userProperties cannot be filtered (400)."
            ),
        },
        "operator": {
            "enum": ["contains", "is", None],
            "description": "Case-insensitive; contains (the default) is a substring match, is equality.",
        },
        "value": {
            "type": ["array", "null"],
            "items": SCALAR,
            "description": (
                "OR'ed; compared case-insensitively by their text. Empty or absent: the attribute is set."
            ),
        },
        "source": {"type": ["string", "null"], "description": "The metadata key of a METADATA filter."},
    },
    "required": ["name"],
    "description": "Filters are AND'ed. Unknown fields are ignored.",
}


def _error(description: str, headers: Schema | None = None) -> Schema:
    answer: Schema = {"description": description, "content": {JSON: {"schema": ref("Error")}}}
    if headers:
        answer["headers"] = headers
    return answer


def _json(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _headless(responses: dict[str, Schema]) -> dict[str, Schema]:
    """A HEAD operation's answers: the GET's statuses and headers, no body."""
    return {status: {k: v for k, v in r.items() if k != "content"} for status, r in responses.items()}


def transport_errors(settings: Settings) -> dict[str, Schema]:
    """Answers the transport gives any request, before it reaches a route."""
    errors = {
        "400": _error("A malformed HTTP request."),
        "413": _error(f"A body over --max-http-body ({settings.max_http_body} bytes)."),
        "414": _error(f"The request target is over --max-header ({settings.max_header} bytes)."),
        "431": _error(f"The request head is over --max-header ({settings.max_header} bytes)."),
    }
    if settings.max_conns_per_ip:
        errors["429"] = _error(f"Over --max-conns-per-ip ({settings.max_conns_per_ip}) open connections.")
    return errors


def _operation(
    summary: str,
    responses: dict[str, Schema],
    settings: Settings,
    *,
    tags: list[str],
    parameters: list[Schema] | None = None,
    secured: bool = False,
    body: Schema | None = None,
) -> Schema:
    op: Schema = {"summary": summary, "tags": tags}
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = body
    # A route's own description of a status (its 400) wins over the transport's.
    merged = {**transport_errors(settings), **responses}
    op["responses"] = dict(sorted(merged.items()))
    op["security"] = [{"bearer": []}] if secured else []
    return op


def _get_and_head(get: Schema, summary: str) -> Schema:
    head = {**get, "summary": summary, "responses": _headless(get["responses"])}
    return {"get": get, "head": head}


def public_paths(settings: Settings) -> dict[str, Schema]:
    unauthorized = _error(
        "Missing or invalid API key; a project's own key for another project too.",
        {"WWW-Authenticate": {"schema": {"const": "Bearer"}, "required": True}},
    )
    not_found = _error("Unknown project key (project not found) or path.")
    search = {
        "200": _json("One page of the live sessions that match.", ref("SearchAnswer")),
        "400": _error("A malformed query, saying what was wrong."),
        "401": unauthorized,
        "404": not_found,
    }
    common = [ref_parameter("projectKey")]
    query = [ref_parameter(name) for name in ("userId", "sort", "order", "page", "limit")]
    get_search = _operation(
        "Live sessions, newest first; userId filters with is.",
        search,
        settings,
        tags=["assist"],
        parameters=common + query,
        secured=True,
    )
    post_search = _operation(
        "Search live sessions by filters.",
        search,
        settings,
        tags=["assist"],
        parameters=common,
        secured=True,
        body={
            "required": True,
            "description": (
                f"Read as JSON whatever its Content-Type; nesting past {MAX_JSON_DEPTH} levels is a 400."
            ),
            "content": {JSON: {"schema": ref("SearchBody")}},
        },
    )
    get_one = _operation(
        "One live session.",
        {
            "200": _json("The session.", ref("SessionAnswer")),
            "401": unauthorized,
            "404": _error("Unknown project key or no such live session."),
        },
        settings,
        tags=["assist"],
        parameters=[*common, ref_parameter("sessionID")],
        secured=True,
    )
    get_values = _operation(
        "Autocomplete: the distinct live values of a field or metadata key, most held first.",
        {
            "200": _json(
                "Values containing q, with the number of live sessions holding each.", ref("Values")
            ),
            "400": _error("A missing or unknown key, metadata without source, or a bad limit."),
            "401": unauthorized,
            "404": not_found,
        },
        settings,
        tags=["assist"],
        parameters=common + [ref_parameter(name) for name in ("key", "source", "q", "valuesLimit")],
        secured=True,
    )
    sessions = _get_and_head(get_search, "The GET's status and headers, without a body.")
    sessions["post"] = post_search
    return {
        "/public/{projectKey}/assist/sessions": sessions,
        "/public/{projectKey}/assist/sessions/{sessionID}": _get_and_head(
            get_one, "The GET's status and headers, without a body."
        ),
        "/public/{projectKey}/assist/autocomplete": _get_and_head(
            get_values, "The GET's status and headers, without a body."
        ),
    }


def openreplay_paths(settings: Settings) -> dict[str, Schema]:
    """OpenReplay's assist routes (``openreplay_api``), served with --assist-key."""
    not_found = _error("A wrong assist key (the path is then not served), or an unknown path.")
    base = [ref_parameter(name) for name in ("assistKey", "orProject")]
    one = _operation(
        "One live session in OpenReplay's shape; data is null when it is not live "
        "(or does not match the body's filter).",
        {
            "200": _json("The session, or null.", ref("OpenReplaySession")),
            "400": _error("A malformed filter, saying what was wrong."),
            "404": not_found,
        },
        settings,
        tags=["openreplay"],
        parameters=[*base, ref_parameter("orSessionId"), ref_parameter("orUserId")],
    )
    values = _operation(
        "Autocomplete as OpenReplay answers it: live values of key (a field or metadata key; "
        "every text field and metadata key without one) containing q; nothing when neither is given.",
        {
            "200": _json("Distinct values, most held first.", ref("OpenReplayAttributes")),
            "400": _error("A query parameter given twice."),
            "404": not_found,
        },
        settings,
        tags=["openreplay"],
        parameters=[*base, ref_parameter("orQ"), ref_parameter("orKey")],
    )
    search = {
        "200": _json("The matching live sessions, one page, with per-filter counts.", ref("OpenReplayLive")),
        "400": _error("A malformed body or query, saying what was wrong."),
        "404": not_found,
    }
    body = {
        "required": False,
        "description": (
            f"Read as JSON whatever its Content-Type; empty means every session; nesting past "
            f"{MAX_JSON_DEPTH} levels is a 400."
        ),
        "content": {JSON: {"schema": ref("OpenReplaySearch")}},
    }
    params = [*base, ref_parameter("orUserId")]
    get_live = _operation(
        "Live sessions, oldest first (OpenReplay's order without a body); userId filters with is.",
        search,
        settings,
        tags=["openreplay"],
        parameters=params,
    )
    live = _get_and_head(get_live, "The GET's status and headers, without a body.")
    live["post"] = _operation(
        "Search live sessions with OpenReplay's filter, sort and pagination.",
        search,
        settings,
        tags=["openreplay"],
        parameters=params,
        body=body,
    )
    headless = "The GET's status and headers, without a body."
    return {
        openreplay_api.LIVE: live,
        openreplay_api.LIVE_AUTOCOMPLETE: _get_and_head(values, headless),
        openreplay_api.LIVE_SESSION: _get_and_head(one, headless),
        openreplay_api.LIST_AUTOCOMPLETE: _get_and_head(values, headless),
        openreplay_api.LIST_SESSION: _get_and_head(one, headless),
    }


def openreplay_parameters() -> dict[str, Schema]:
    def path(name: str, description: str, example: str | None = None) -> Schema:
        parameter: Schema = {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        # The examples name the live sessions the schemathesis test starts; the key has none.
        if example is not None:
            parameter["example"] = example
        return parameter | {"description": description}

    def query(name: str, description: str) -> Schema:
        return {"name": name, "in": "query", "schema": {"type": "string"}, "description": description}

    return {
        "assistKey": path("assistKey", "--assist-key (OpenReplay's ASSIST_KEY)."),
        "orProject": path(
            "project", "The project key; one the hub does not know has no sessions.", EXAMPLE_PROJECT
        ),
        "orSessionId": path("sessionId", "The session's id.", EXAMPLE_SESSION),
        "orUserId": query("userId", "Only sessions of this user (case-insensitive equality)."),
        "orQ": query("q", "Only values containing it, case-insensitively."),
        "orKey": query(
            "key", "A record field (any case) or a metadata key; empty or absent: every text field."
        ),
    }


def openreplay_schemas(settings: Settings) -> dict[str, Schema]:
    scalar_or_null: Schema = {"type": ["string", "number", "boolean", "null"]}
    values: Schema = {"type": ["array", "null"], "items": scalar_or_null}
    filters: Schema = {
        "type": ["object", "null"],
        "additionalProperties": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "values": values,
                        "operator": {
                            "type": ["string", "null"],
                            "pattern": "^([iI][sS]|[cC][oO][nN][tT][aA][iI][nN][sS])$",
                            "description": "is or contains, any case; null or absent: contains.",
                        },
                    },
                },
                values,
                scalar_or_null,
            ]
        },
        "description": (
            "Filter name -> {values, operator}, OR'ed values, AND'ed filters; the v1.7 form (an array) "
            "and a bare value mean {values: [...]}. A name is a record field (any case; userId, "
            "userAnonymousId, platform, sessionId too) or else a metadata key. Null or empty values "
            "match nothing."
        ),
    }
    if settings.max_filters:
        filters["maxProperties"] = settings.max_filters
    count: Schema = {"type": "integer", "minimum": 1}
    return {
        "OpenReplaySearch": {
            "type": "object",
            "properties": {
                "filter": filters,
                "sort": {
                    "type": ["object", "null"],
                    "properties": {
                        "key": {
                            "type": ["string", "null"],
                            "description": (
                                "A record field (any case), duration (the reverse of timestamp) or a "
                                "metadata key; empty or absent: timestamp."
                            ),
                        },
                        "order": {
                            "type": ["string", "null"],
                            "pattern": "^([aA][sS][cC]|[dD][eE][sS][cC])?$",
                            "description": "asc or desc, any case; empty or absent: asc, as OpenReplay.",
                        },
                    },
                },
                "pagination": {
                    "type": ["object", "null"],
                    "properties": {
                        "page": {"type": ["integer", "null"], "minimum": 0},
                        "limit": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_LIMIT},
                    },
                    "description": (
                        f"Applied when page and limit are both non-zero; otherwise the first {MAX_LIMIT} "
                        "matches (total counts them all)."
                    ),
                },
            },
            "description": "Unknown fields are ignored.",
        },
        "OpenReplayLive": {
            "type": "object",
            "properties": {
                "data": {
                    "type": "object",
                    "properties": {
                        "total": {"type": "integer", "minimum": 0, "description": "Matches before paging."},
                        "sessions": {"type": "array", "items": ref("Session"), "maxItems": MAX_LIMIT},
                        "counter": {
                            "type": "object",
                            "additionalProperties": {"type": "object", "additionalProperties": count},
                            "description": "Filter name -> value -> the matches it matched first.",
                        },
                    },
                    "required": ["total", "sessions", "counter"],
                    "additionalProperties": False,
                }
            },
            "required": ["data"],
            "additionalProperties": False,
        },
        "OpenReplaySession": {
            "type": "object",
            "properties": {"data": {"anyOf": [ref("Session"), {"type": "null"}]}},
            "required": ["data"],
            "additionalProperties": False,
        },
        "OpenReplayAttributes": {
            "type": "object",
            "properties": {
                "data": {
                    "type": "array",
                    "maxItems": AUTOCOMPLETE_MAX,
                    "items": {
                        "type": "object",
                        "properties": {
                            "type": {
                                "type": "string",
                                "description": "The field or metadata key, upper-cased.",
                            },
                            "value": {"type": ["string", "integer", "boolean"]},
                        },
                        "required": ["type", "value"],
                        "additionalProperties": False,
                    },
                }
            },
            "required": ["data"],
            "additionalProperties": False,
        },
    }


def _status(value: str) -> Schema:
    return {
        "type": "object",
        "properties": {"status": {"const": value}},
        "required": ["status"],
        "additionalProperties": False,
    }


def operations_paths(settings: Settings) -> dict[str, Schema]:
    def plain(summary: str, responses: dict[str, Schema]) -> Schema:
        get = _operation(summary, responses, settings, tags=["operations"])
        return _get_and_head(get, f"{summary} Headers only.")

    return {
        "/healthz": plain("Liveness: 200 while the process is up.", {"200": _json("Up.", _status("ok"))}),
        "/readyz": plain(
            "Readiness: bootstrapped (from Redis in a cluster) and not draining.",
            {
                "200": _json("Ready to serve.", _status("ready")),
                "503": _json("Starting or draining.", _status("starting")),
            },
        ),
        "/metrics": plain(
            "Prometheus text format; no authentication, it holds counts only.",
            {
                "200": {
                    "description": "Metrics.",
                    "content": {CONTENT_TYPE_PLAIN_0_0_4: {"schema": {"type": "string"}}},
                }
            },
        ),
        PATH: plain(
            "This document.",
            {"200": _json("An OpenAPI 3.1 document.", {"type": "object", "required": ["openapi", "paths"]})},
        ),
    }


def static_paths(settings: Settings) -> dict[str, Schema]:
    etag_header = {"ETag": {"schema": {"type": "string"}, "required": True}}
    paths = {}
    for path, name in static.ROUTES.items():
        content_type = static.CONTENT_TYPES[name[name.rfind(".") :]]
        get = _operation(
            f"The browser file {name}.",
            {
                "200": {
                    "description": name,
                    "headers": etag_header,
                    "content": {content_type: {"schema": {"type": "string"}}},
                },
                "304": {"description": "If-None-Match holds the file's ETag.", "headers": etag_header},
            },
            settings,
            tags=["browser"],
            parameters=[ref_parameter("ifNoneMatch")],
        )
        paths[path] = _get_and_head(get, f"The headers of {name}.")
    return paths


def parameters() -> dict[str, Schema]:
    # Numbers in a query are ASCII digits only (CONTRACT §4).
    return {
        "projectKey": {
            "name": "projectKey",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": f"^{PROJECT_KEY_RE.pattern}$"},
            "example": EXAMPLE_PROJECT,
        },
        "sessionID": {
            "name": "sessionID",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": f"^{SESSION_ID_RE.pattern}$"},
            "example": EXAMPLE_SESSION,
        },
        "userId": {
            "name": "userId",
            "in": "query",
            "schema": {"type": "string"},
            "description": "Only sessions of this user (case-insensitive equality).",
        },
        "sort": {
            "name": "sort",
            "in": "query",
            "schema": {"enum": [*SORT_KEYS, ""]},
            "description": SORT_TEXT,
        },
        "order": {
            "name": "order",
            "in": "query",
            "schema": {"enum": [*ORDERS, ""]},
            "description": ORDER_TEXT,
        },
        "page": {
            "name": "page",
            "in": "query",
            # An empty value is the default, as the hub reads it.
            "schema": {"anyOf": [{"type": "integer", "minimum": 0}, {"const": ""}]},
            "description": "1-based, ASCII digits; 0 or empty means 1.",
        },
        "limit": {
            "name": "limit",
            "in": "query",
            "schema": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": MAX_LIMIT}, {"const": ""}]},
            "description": f"ASCII digits; 0 or empty means {DEFAULT_LIMIT}.",
        },
        "key": {
            "name": "key",
            "in": "query",
            "required": True,
            "schema": {"enum": [*SORT_KEYS, "metadata"]},
            "description": "A session field as a filter names it (case-insensitive), or metadata.",
        },
        "source": {
            "name": "source",
            "in": "query",
            "schema": {"type": "string"},
            "description": "With key=metadata: the metadata key.",
        },
        "q": {
            "name": "q",
            "in": "query",
            "schema": {"type": "string"},
            "description": "Only values containing it, case-insensitively; empty or absent: all.",
        },
        "valuesLimit": {
            "name": "limit",
            "in": "query",
            "schema": {
                "anyOf": [{"type": "integer", "minimum": 1, "maximum": AUTOCOMPLETE_MAX}, {"const": ""}]
            },
            "description": f"ASCII digits; empty or absent means {AUTOCOMPLETE_LIMIT}.",
        },
        "origin": {
            "name": "Origin",
            "in": "header",
            "schema": {"type": "string"},
            "description": "The page's origin; a browser sends it.",
        },
        "ifNoneMatch": {
            "name": "If-None-Match",
            "in": "header",
            "schema": {"type": "string"},
            "description": "ETags of a cached copy; a match is a 304.",
        },
    }


# Paths whose routes are registered with ``cors=True`` (app.Hub._routes): they answer preflights.
CORS_PATHS: Final = (
    "/public/{projectKey}/assist/sessions",
    "/public/{projectKey}/assist/sessions/{sessionID}",
    "/public/{projectKey}/assist/autocomplete",
    PATH,
)
CORS_GRANT: Final = (
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers",
    "Access-Control-Max-Age",
)


def add_preflights(paths: dict[str, Schema], settings: Settings) -> None:
    """``OPTIONS`` on the CORS paths: a 204 without a key, ``Allow`` listing the path's methods."""
    for path in CORS_PATHS:
        operations = paths[path]
        allow = ", ".join(method.upper() for method in [*operations, "options"])
        headers: Schema = {"Allow": {"schema": {"const": allow}, "required": True}}
        if settings.cors_origins:
            grant = {"schema": {"type": "string"}, "description": "When the request's Origin is allowed."}
            headers.update(dict.fromkeys(CORS_GRANT, grant))
        # A preflight is answered whatever the path's parameters hold (no project is looked up).
        path_parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", path)
        ]
        operations["options"] = _operation(
            "CORS preflight: no key asked; the grant only for an origin in --cors-origins.",
            {"204": {"description": "The methods this path answers.", "headers": headers}},
            settings,
            tags=[str(operations["get"]["tags"][0])],
            parameters=[*path_parameters, ref_parameter("origin")],
        )


def document(settings: Settings) -> Schema:
    """The OpenAPI 3.1 document of a hub running with ``settings``."""
    paths = {**public_paths(settings), **operations_paths(settings), **static_paths(settings)}
    add_preflights(paths, settings)
    tags = [
        {"name": "assist", "description": "Search live sessions (Authorization: Bearer KEY)."},
        {"name": "operations", "description": "Health, readiness, metrics, this document."},
        {"name": "browser", "description": "tracker.js and the live dashboard."},
    ]
    params = parameters()
    schemas: Schema = {}
    if settings.assist_key:
        paths.update(openreplay_paths(settings))
        tags.append(
            {"name": "openreplay", "description": "OpenReplay's assist API (--assist-key in the path)."}
        )
        params.update(openreplay_parameters())
        schemas = openreplay_schemas(settings)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hub",
            "version": __version__,
            "description": (
                "A live-session hub: the OpenReplay-compatible assist API, health and metrics, and the "
                "browser files it serves. Trackers and agents use WebSocket (/ws/tracker/{projectKey}, "
                "/ws/agent/{projectKey}), described in the README. A method a route does not list is "
                "a 405 with an Allow header; an unknown path is a 404."
            ),
        },
        "tags": tags,
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The organization key (--api-key) or a project's own key.",
                }
            },
            "parameters": params,
            "schemas": {
                "Session": session_schema(),
                "SearchAnswer": {
                    "type": "object",
                    "properties": {"data": ref("SearchData")},
                    "required": ["data"],
                    "additionalProperties": False,
                },
                "SearchData": {
                    "type": "object",
                    "properties": {
                        "total": {"type": "integer", "minimum": 0, "description": "Matches before paging."},
                        "sessions": {"type": "array", "items": ref("Session"), "maxItems": MAX_LIMIT},
                        "live": {"const": True},
                    },
                    "required": ["total", "sessions", "live"],
                    "additionalProperties": False,
                },
                "SessionAnswer": {
                    "type": "object",
                    "properties": {"data": ref("Session")},
                    "required": ["data"],
                    "additionalProperties": False,
                },
                "Values": {
                    "type": "object",
                    "properties": {
                        "data": {
                            "type": "array",
                            "maxItems": AUTOCOMPLETE_MAX,
                            "items": {
                                "type": "object",
                                "properties": {
                                    "value": {
                                        "type": "string",
                                        "description": "As a session holding it spells it; an int as digits.",
                                    },
                                    "count": {"type": "integer", "minimum": 1},
                                },
                                "required": ["value", "count"],
                                "additionalProperties": False,
                            },
                        }
                    },
                    "required": ["data"],
                    "additionalProperties": False,
                },
                "SearchBody": search_body_schema(settings),
                "Filter": FILTER,
                "Error": ERROR,
                **schemas,
            },
        },
    }


def route(settings: Settings) -> Callable[[Request], Response]:
    """The ``GET /openapi.json`` route; the document is encoded once."""
    body = msgspec.json.encode(document(settings))
    return lambda _request: Response(200, body)
