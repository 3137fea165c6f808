"""OpenReplay's assist HTTP API (CONTRACT §8), answered from the live index.

OpenReplay's backend (its Python API, ``api/chalicelib/core/assist.py``, and
its Go proxy) asks its assist server for live sessions under
``/assist/{ASSIST_KEY}/…``; with ``--assist-key`` set the hub answers the
same calls, in the same ``{"data": …}`` shapes, from the same index and
filter code as ``/public/``. docs/openreplay.md §4 describes OpenReplay's
side; the README ("Migrating from OpenReplay's assist server") what differs.

- The key in the path is the only authentication, as in OpenReplay: a wrong
  one is the hub's plain 404, as for a path it does not serve.
- An unknown project is no error (OpenReplay has no list of projects): no
  sessions, or ``null``.
- A filter ``{name: {"values": […], "operator": "is"|"contains"}}`` is the
  hub's filter of that name (``search.parse_filter``: record fields by any
  case and OpenReplay's aliases, any other name a metadata key). As in
  OpenReplay, null or empty ``values`` match nothing, an empty ``is`` value
  never matches, and an empty ``contains`` value matches any session holding
  the field.
"""

from __future__ import annotations

import heapq
import hmac
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

import msgspec
from msgspec import Struct

from .config import Settings
from .http_api import AUTOCOMPLETE_MAX, Request, Response, error, search_params
from .index import BOOL_FIELDS, INT_FIELDS, LiveIndex
from .record import MAX_JSON_DEPTH, Session, scalar_text, too_deep
from .routes import HttpHandler, RouteTable
from .search import (
    FIELD_NAMES,
    MAX_LIMIT,
    STRING_FIELDS,
    Criterion,
    FilterIn,
    Query,
    QueryError,
    compare_text,
    parse_filter,
    resolve_limit,
)

# Path templates. The project is not ``{projectKey}``: the route table would
# answer an unknown one 404, and OpenReplay answers it as a project without
# sessions. A session named "autocomplete" is shadowed, as in OpenReplay.
PREFIX: Final = "/assist/{assistKey}"
LIVE: Final = PREFIX + "/sockets-live/{project}"
LIVE_AUTOCOMPLETE: Final = LIVE + "/autocomplete"
LIVE_SESSION: Final = LIVE + "/{sessionId}"
LIST_AUTOCOMPLETE: Final = PREFIX + "/sockets-list/{project}/autocomplete"
LIST_SESSION: Final = PREFIX + "/sockets-list/{project}/{sessionId}"

# OpenReplay's dashboard sorts live sessions by "duration" (now - timestamp),
# which its records lack: the reverse of the start time.
DURATION: Final = "duration"
# Fields an autocomplete without a key reads, beside every metadata key: the text
# ones (OpenReplay reads every key of its record).
TEXT_FIELDS: Final = tuple(sorted(STRING_FIELDS))

Scalar = str | int | float | bool
Handler = Callable[[Request], Response]
# Wraps a handler so that it answers once this node mirrors the request's project.
Warm = Callable[[Handler], Callable[[Request], Response | Awaitable[Response]]]


class FilterSpec(Struct, forbid_unknown_fields=False):
    values: list[Scalar | None] | None = None
    operator: str | None = None


class Sort(Struct, forbid_unknown_fields=False):
    key: str | None = None
    order: str | None = None


class Pagination(Struct, forbid_unknown_fields=False):
    page: int | None = None
    limit: int | None = None


class LiveSearch(Struct, forbid_unknown_fields=False):
    """OpenReplay's search body. A filter may also be the v1.7 form (a bare
    array of values) or a bare value (what OpenReplay's API sends for
    ``GET /{projectId}/assist/sessions?userId=``)."""

    filter: dict[str, FilterSpec | list[Scalar | None] | Scalar | None] | None = None
    sort: Sort | None = None
    pagination: Pagination | None = None


class LiveSessions(Struct):
    total: int
    sessions: list[Session]
    # Filter name -> the value that matched -> matching sessions it matched first.
    counter: dict[str, dict[str, int]]


class LiveSessionsAnswer(Struct):
    data: LiveSessions


class LiveSessionAnswer(Struct):
    data: Session | None


class Attribute(Struct):
    type: str
    value: str | int | bool


class AttributesAnswer(Struct):
    data: list[Attribute]


class Filter(Struct, frozen=True):
    """One filter of a request: its name as given, its values in order (what
    the counter reports), and the criterion, None when it can match nothing."""

    name: str
    op: str
    values: tuple[Scalar, ...]
    criterion: Criterion | None

    def matches(self, session: Session) -> bool:
        return self.criterion is not None and self.criterion.matches(session)

    def first_match(self, session: Session) -> Scalar | None:
        """The first of ``values`` that ``session`` matches (OpenReplay counts that one)."""
        text = self.criterion.text_of(session) if self.criterion is not None else None
        if text is None:
            return None
        for value in self.values:
            wanted = compare_text(value)
            if (wanted in text) if self.op == "contains" else (wanted == text):
                return value
        return None


_decoder: Final = msgspec.json.Decoder(LiveSearch)
_encoder: Final = msgspec.json.Encoder()


def parse_search(body: bytes) -> LiveSearch:
    """A search body; an empty one asks for every session, as in OpenReplay."""
    if not body.strip():
        return LiveSearch()
    if too_deep(body):
        raise QueryError(f"invalid JSON: nested deeper than {MAX_JSON_DEPTH} levels, or malformed")
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise QueryError(f"invalid search body: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise QueryError(f"invalid JSON: {exc}") from None


def to_filter(
    name: str, spec: FilterSpec | list[Scalar | None] | Scalar | None, key: str | None = None
) -> Filter:
    """``name``'s filter (``key``: the field or metadata key it reads, when not ``name`` itself)."""
    if isinstance(spec, FilterSpec):
        raw, operator = spec.values, spec.operator
    elif isinstance(spec, list) or spec is None:
        raw, operator = spec, None
    else:
        raw, operator = [spec], None
    op = (operator or "contains").lower()
    if op not in ("is", "contains"):
        raise QueryError(f"filter {name!r}: unknown operator {operator!r} (use 'is' or 'contains')")
    values = tuple(v for v in raw or () if v is not None and not (op == "is" and v == ""))
    if not values:
        return Filter(name, op, values, None)
    # An empty `contains` value is in every text: the hub's "set" filter (no values).
    value = None if op == "contains" and "" in values else list(values)
    criterion = parse_filter(FilterIn(name=key or name, operator=op, value=value), f"filter {name!r}")
    return Filter(name, op, values, criterion)


def _sort(sort: Sort | None, meta: dict[str, str]) -> tuple[str, bool, str | None]:
    """(record field, descending, metadata key): a name that is no field sorts by that metadata key."""
    key, order = (sort.key, sort.order) if sort is not None else (None, None)
    lowered = (order or "").lower()
    if lowered not in ("", "asc", "desc"):
        raise QueryError(f"unknown sort order {order!r}: use 'asc' or 'desc'")
    # OpenReplay sorts ascending unless told "desc".
    descending = lowered == "desc"
    if not key:
        return "timestamp", descending, None
    if key.lower() == DURATION:
        return "timestamp", not descending, None
    field = FIELD_NAMES.get(key.lower())
    return (
        (field, descending, None)
        if field is not None
        else ("timestamp", descending, meta.get(key.lower(), key))
    )


def _paging(pagination: Pagination | None) -> tuple[int, int]:
    """(page, limit). OpenReplay pages only when both are set (non-zero), else answers
    every match; the hub then answers the first MAX_LIMIT, ``total`` counting them all."""
    page, limit = (pagination.page, pagination.limit) if pagination is not None else (None, None)
    for name, value in (("page", page), ("limit", limit)):
        if value is not None and value < 0:
            raise QueryError(f"pagination.{name} must be >= 0, got {value}")
    if limit is not None:
        resolve_limit(limit)  # over MAX_LIMIT is a 400 even when not paging
    if not (page and limit):
        return 1, MAX_LIMIT
    return page, limit


def _number(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return None if number != number else number  # NaN orders nothing


def _metadata_key(key: str, descending: bool) -> Callable[[Session], tuple[bool, bool, float, str, str]]:
    """Sessions by metadata ``key``: numbers by value before other text (OpenReplay compares
    numeric text as numbers), then by sessionID; unset last in either direction (the first
    item: ``nlargest`` serves a descending order)."""

    def order(s: Session) -> tuple[bool, bool, float, str, str]:
        value = s.metadata.get(key)
        if value is None:
            return (not descending, False, 0.0, "", s.sessionID)
        number = _number(value)
        if number is None:
            return (descending, True, 0.0, value, s.sessionID)
        return (descending, False, number, "", s.sessionID)

    return order


def metadata_page(
    matched: list[Session], key: str, descending: bool, offset: int, limit: int
) -> list[Session]:
    """One page of ``matched`` ordered by metadata ``key``."""
    pick = heapq.nlargest if descending else heapq.nsmallest
    return pick(offset + limit, matched, key=_metadata_key(key, descending))[offset:]


class OpenReplayApi:
    """Handlers of OpenReplay's assist routes; ``register`` adds them to a route table."""

    def __init__(
        self,
        settings: Settings,
        index: LiveIndex,
        limits: Counter[str],
        on_search: Callable[[float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.key = settings.assist_key.encode()
        self.max_filters = settings.max_filters
        self.index = index
        self.limits = limits
        self.on_search = on_search

    def register(self, routes: RouteTable, warm: Warm | None = None) -> None:
        """``warm``: in a cluster, answers a known project's request once this node mirrors it
        (``http_api.mirrored_first``); a wrong key or an unknown project is answered at once."""

        def guarded(handler: Handler) -> HttpHandler:
            if warm is None:
                return handler
            warmed = warm(handler)

            def answer(request: Request) -> Response | Awaitable[Response]:
                known = self.settings.project_id(request.params["project"]) is not None
                return warmed(request) if known and self._key_ok(request) else handler(request)

            return answer

        # The literal autocomplete paths first: the table tries routes in order.
        routes.http(LIVE_AUTOCOMPLETE, get=guarded(self.autocomplete))
        routes.http(LIST_AUTOCOMPLETE, get=guarded(self.autocomplete))
        routes.http(LIVE, get=guarded(self.sessions), post=guarded(self.sessions))
        routes.http(LIVE_SESSION, get=guarded(self.session))
        routes.http(LIST_SESSION, get=guarded(self.session))

    def _key_ok(self, request: Request) -> bool:
        return hmac.compare_digest(request.params["assistKey"].encode(), self.key)

    def sessions(self, request: Request) -> Response:
        """``GET|POST …/sockets-live/{project}``: ``{"data": {"total", "sessions", "counter"}}``."""
        if not self._key_ok(request):
            return error(404, "not found")
        try:
            search = parse_search(request.body)
            project = request.params["project"]
            filters = self._filters(search, request.query, project)
            field, descending, meta_key = _sort(search.sort, self._metadata_names(project))
            page, limit = _paging(search.pagination)
        except QueryError as exc:
            return error(400, str(exc))
        started = time.perf_counter()
        answer = self._search(request.params["project"], filters, field, descending, meta_key, page, limit)
        if self.on_search is not None:
            self.on_search(time.perf_counter() - started)
        return Response(200, _encoder.encode(LiveSessionsAnswer(answer)))

    def _filters(self, search: LiveSearch, query: str, project: str) -> list[Filter]:
        specs: dict[str, FilterSpec | list[Scalar | None] | Scalar | None] = {}
        user_id = search_params(query).get("userId")
        if user_id is not None:
            # OpenReplay's GET form (it throws on it today); `is`, as the hub's own GET reads userId.
            specs["userID"] = FilterSpec(values=[user_id], operator="is")
        specs.update(search.filter or {})
        if self.max_filters and len(specs) > self.max_filters:
            self.limits["max_filters"] += 1
            raise QueryError(f"{len(specs)} filters, over the limit of {self.max_filters}")
        meta = self._metadata_names(project)
        return [to_filter(name, spec, _metadata_key_of(name, meta)) for name, spec in specs.items()]

    def _metadata_names(self, project: str) -> dict[str, str]:
        """The project's metadata keys by their lower-cased name: OpenReplay matches names
        case-insensitively."""
        return {key.lower(): key for key in self.index.metadata_keys(project)}

    def _search(
        self,
        project: str,
        filters: list[Filter],
        field: str,
        descending: bool,
        meta_key: str | None,
        page: int,
        limit: int,
    ) -> LiveSessions:
        criteria = tuple(f.criterion for f in filters if f.criterion is not None)
        if len(criteria) < len(filters):
            return LiveSessions(total=0, sessions=[], counter={})
        query = Query(criteria=criteria, sort=field, descending=descending, page=page, limit=limit)
        matched: list[Session] | None = None
        if meta_key is None:
            total, sessions = self.index.search(project, query)
        else:
            # The index orders by record fields only: the matches are ordered here.
            matched = self.index.matching(project, criteria)
            total = len(matched)
            sessions = metadata_page(matched, meta_key, descending, query.offset, limit)
        counter: dict[str, dict[str, int]] = {}
        if total:
            several = [f for f in filters if len(f.values) > 1]
            for f in filters:
                if len(f.values) == 1:
                    counter[f.name] = {scalar_text(f.values[0]): total}
            if several:
                if matched is None:
                    matched = self.index.matching(project, criteria)
                counter.update(_counts(matched, several))
        return LiveSessions(total=total, sessions=sessions, counter=counter)

    def session(self, request: Request) -> Response:
        """``GET …/sockets-live|sockets-list/{project}/{sessionId}``: the record, or null when not
        live (or, given a body's filter, not matching it)."""
        if not self._key_ok(request):
            return error(404, "not found")
        try:
            filters = self._filters(parse_search(request.body), request.query, request.params["project"])
        except QueryError as exc:
            return error(400, str(exc))
        found = self.index.get(request.params["project"], request.params["sessionId"])
        if found is not None and not all(f.matches(found) for f in filters):
            found = None
        return Response(200, _encoder.encode(LiveSessionAnswer(found)))

    def autocomplete(self, request: Request) -> Response:
        """``GET …/autocomplete?q=&key=``: ``{"data": [{"type": KEY, "value"}]}``, the live values of
        field or metadata ``key`` (of every text field without one) containing ``q``."""
        if not self._key_ok(request):
            return error(404, "not found")
        try:
            params = search_params(request.query)
        except QueryError as exc:
            return error(400, str(exc))
        q, key = params.get("q"), params.get("key")
        if q is None and key is None:
            # As OpenReplay: nothing asked, nothing answered.
            return Response(200, _encoder.encode(AttributesAnswer([])))
        text = compare_text(q or "")
        project = request.params["project"]
        found: list[tuple[int, str, str, Attribute]] = []
        for field, meta in _autocompleted(key, self._metadata_names(project)):
            kind = (meta or field).upper()
            for value, count in self.index.values(project, field, meta, text, AUTOCOMPLETE_MAX):
                found.append((-count, value, kind, Attribute(kind, _typed(field, value))))
        found.sort(key=lambda item: item[:3])
        top = [attribute for *_, attribute in found[:AUTOCOMPLETE_MAX]]
        return Response(200, _encoder.encode(AttributesAnswer(top)))


def _metadata_key_of(name: str, meta: dict[str, str]) -> str | None:
    """The metadata key a filter or sort ``name`` that is no record field reads, if it differs."""
    if FIELD_NAMES.get(name.lower()) is not None:
        return None
    return meta.get(name.lower())


def _autocompleted(key: str | None, meta: dict[str, str]) -> Iterable[tuple[str, str | None]]:
    """The (field, metadata key) pairs an autocomplete ``key`` names: without one, every text
    field and every metadata key the project's sessions hold."""
    if not key:
        return [*((field, None) for field in TEXT_FIELDS), *(("metadata", k) for k in meta.values())]
    field = FIELD_NAMES.get(key.lower())
    return [(field, None)] if field is not None else [("metadata", meta.get(key.lower(), key))]


def _typed(field: str, value: str) -> str | int | bool:
    """A value as OpenReplay's record holds it: numbers and booleans as such."""
    if field in INT_FIELDS:
        return int(value)
    if field in BOOL_FIELDS:
        return value == "true"
    return value


def _counts(matched: list[Session], filters: list[Filter]) -> dict[str, dict[str, int]]:
    """Per filter, how many of ``matched`` each value matched first."""
    counts: dict[str, Counter[str]] = {f.name: Counter() for f in filters}
    for session in matched:
        for f in filters:
            value = f.first_match(session)
            if value is not None:
                counts[f.name][scalar_text(value)] += 1
    return {name: dict(c) for name, c in counts.items()}
