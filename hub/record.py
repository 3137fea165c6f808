"""The live session record and the tracker messages that change it.

Pure data and rules: no I/O, no clock (callers pass ``now`` in Unix ms).
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Mapping
from operator import attrgetter
from typing import Annotated, Any, Final, TypeVar

import msgspec
from msgspec import UNSET, Meta, Raw, Struct, UnsetType

from .wire import ErrorCode, InputError, validation_code

T = TypeVar("T")

# Documented limits of tracker input (README, "Limits").
MAX_SESSION_ID: Final = 64
MAX_STRING: Final = 1024
MAX_METADATA_KEYS: Final = 50
MAX_METADATA_KEY: Final = 128
MAX_USER_PROPERTIES_BYTES: Final = 16 * 1024
# userProperties is the object at level 1; a value in it nests at most 15 more.
MAX_USER_PROPERTIES_DEPTH: Final = 16
# Any JSON the hub parses (tracker and agent frames, search bodies): deeper
# frames are refused unparsed, far below the depth where the decoder (and
# any encoder of an answer) would run out of stack.
MAX_JSON_DEPTH: Final = 32
# Integers every encoder of a record can carry (JSON answers, the cluster's msgpack).
MIN_INT: Final = -(2**63)
MAX_INT: Final = 2**64 - 1
# A start timestamp a JavaScript Date can hold (ms since 1970, up to 8.64e15).
MAX_TIMESTAMP: Final = 8_640_000_000_000_000

SESSION_ID_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# What the depth scan keeps of a frame: quotes and brackets, objects' as arrays'.
_NOT_STRUCTURE: Final = bytes(b for b in range(256) if b not in b'"[]{}')
_SQUARE: Final = bytes.maketrans(b"{}", b"[]")


class Session(Struct, gc=False):
    """One live session, exactly as it goes on the wire (CONTRACT §1)."""

    sessionID: str
    projectKey: str
    projectId: int
    timestamp: int
    lastActiveAt: int
    userID: str | None = None
    userUUID: str | None = None
    metadata: dict[str, str] = {}
    userProperties: dict[str, Any] = {}
    pageTitle: str | None = None
    url: str | None = None
    referrer: str | None = None
    active: bool = True
    connected: bool = True
    tabs: int = 1
    trackerVersion: str | None = None
    userOs: str | None = None
    userBrowser: str | None = None
    userBrowserVersion: str | None = None
    userDevice: str | None = None
    userDeviceType: str | None = None
    userCountry: str | None = None
    userState: str | None = None
    userCity: str | None = None
    language: str | None = None
    environment: str | None = None
    appVersion: str | None = None
    userAgent: str | None = None
    live: bool = True
    # Pages seen: 1 at start, +1 for each change of url to another page (``changes_of``).
    pageViews: int = 1
    # Ms the session was active, up to lastActiveAt (``registry.active_time``).
    activeTime: int = 0


# Fields a search may sort by: every scalar field of the record.
SCALAR_FIELDS: Final = frozenset(
    f for f in Session.__struct_fields__ if f not in ("metadata", "userProperties")
)

Text = Annotated[str, Meta(max_length=MAX_STRING)]
OptText = Text | None | UnsetType
MetaKey = Annotated[str, Meta(min_length=1, max_length=MAX_METADATA_KEY)]
MetaValue = Text | int | float | bool | None
MetadataIn = Annotated[dict[MetaKey, MetaValue], Meta(max_length=MAX_METADATA_KEYS)]


class _Fields(Struct):
    """Fields a tracker may carry in start and update (all optional)."""

    userID: OptText = UNSET
    userUUID: OptText = UNSET
    pageTitle: OptText = UNSET
    url: OptText = UNSET
    referrer: OptText = UNSET
    trackerVersion: OptText = UNSET
    userOs: OptText = UNSET
    userBrowser: OptText = UNSET
    userBrowserVersion: OptText = UNSET
    userDevice: OptText = UNSET
    userDeviceType: OptText = UNSET
    userCountry: OptText = UNSET
    userState: OptText = UNSET
    userCity: OptText = UNSET
    language: OptText = UNSET
    environment: OptText = UNSET
    appVersion: OptText = UNSET
    userAgent: OptText = UNSET
    metadata: MetadataIn | UnsetType = UNSET
    userProperties: dict[str, Any] | UnsetType = UNSET
    active: bool | UnsetType = UNSET


# The descriptive string fields a tracker may set with start/update: read
# from _Fields, so that struct is the one list of them.
DESCRIPTIVE_FIELDS: Final = tuple(f.name for f in msgspec.structs.fields(_Fields) if f.type == OptText)


class Start(_Fields, tag_field="type", tag="start"):
    # Untyped on purpose: a bad sessionID, timestamp or tabId falls back, it is not an error.
    sessionID: Any = None
    timestamp: Any = None
    # The connection's tab (CONTRACT §7); the hub makes one when absent or invalid.
    tabId: Any = None


class Update(_Fields, tag_field="type", tag="update"):
    pass


class Heartbeat(Struct, tag_field="type", tag="heartbeat"):
    active: bool | UnsetType = UNSET


class End(Struct, tag_field="type", tag="end"):
    pass


class Emit(Struct, tag_field="type", tag="emit"):
    """A tab's event for the agents joined to its session (CONTRACT §7)."""

    event: Annotated[str, Meta(min_length=1, max_length=64)]
    # Relayed as sent: never decoded past its bounds.
    data: Raw = Raw(b"null")


TrackerMessage = Start | Update | Heartbeat | End | Emit


class Started(Struct, tag_field="type", tag="started"):
    sessionID: str
    session: Session
    tabId: str


class ErrorFrame(Struct, tag_field="type", tag="error"):
    code: ErrorCode
    message: str


_decoder: Final = msgspec.json.Decoder(TrackerMessage)


def too_deep(data: bytes | str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON ``data`` nests arrays and objects deeper than ``limit``, read without parsing.

    Exact for valid JSON. For invalid JSON, True may also mean brackets that
    do not balance or more than one value; False leaves it to the decoder,
    which stops at its first error, within ``2 * limit + 1`` levels.

    Cheap for a usual frame: JSON shorter than ``2 * (limit + 1)`` bytes
    cannot nest deeper (a heartbeat is settled by its length), nor can a
    frame with at most ``limit`` brackets (two C-level counts). Only a
    frame with more is scanned, in C: escapes dropped and all but quotes
    and brackets, then matched against a pattern of strings and balanced
    brackets at most ``limit`` deep (measured on a loaded 2-core machine:
    a 600-byte start in under 1 µs, a hostile 64 KiB frame in 0.3-2 ms).
    """
    if len(data) < 2 * (limit + 1):
        return False
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    # A pair of backslashes first, then an escaped quote: quotes left delimit strings.
    structure = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(_SQUARE, _NOT_STRUCTURE)
    return _nesting(limit).fullmatch(structure) is None


@functools.cache
def _nesting(depth: int) -> re.Pattern[bytes]:
    """One JSON value as the scan leaves it (a string, or brackets around strings and
    brackets) at most ``depth`` deep; nothing for a number or a literal.

    Possessive: the grammar needs no backtracking, so a hostile frame cannot make it backtrack.
    """
    string = rb'"[^"]*+"'
    inner = rb"(?:" + string + rb")*+"
    for _ in range(depth - 1):
        inner = rb"(?:" + string + rb"|\[" + inner + rb"\])*+"
    return re.compile(rb"(?:" + string + (rb"|\[" + inner + rb"\]" if depth else b"") + rb")?")


def check_depth(frame: bytes | str) -> None:
    """Refuse a frame nested deeper than MAX_JSON_DEPTH before a decoder sees it."""
    if too_deep(frame):
        raise InputError(
            ErrorCode.INVALID_JSON, f"JSON nested deeper than {MAX_JSON_DEPTH} levels, or malformed"
        )


def decode_frame(decoder: msgspec.json.Decoder[T], frame: bytes | str) -> T:
    """Decode one client frame with ``decoder`` or raise InputError with a stable code."""
    check_depth(frame)
    try:
        return decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise InputError(validation_code(str(exc)), str(exc)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec: bad UTF-8 in a string
        raise InputError(ErrorCode.INVALID_JSON, str(exc)) from None


def decode_message(frame: bytes | str) -> TrackerMessage:
    """Decode one tracker frame or raise InputError with a stable code."""
    msg = decode_frame(_decoder, frame)
    if isinstance(msg, (Start, Update)):
        check_limits(msg)
    return msg


def check_limits(msg: _Fields) -> None:
    """Limits msgspec's schema cannot express.

    Whatever passes them encodes in every answer and every replication of
    the record: merging two userProperties that pass keeps them passing,
    but for the size, which ``changes_of`` checks again.
    """
    if msg.userProperties is UNSET:
        return
    encoded = msgspec.json.encode(msg.userProperties)
    if len(encoded) > MAX_USER_PROPERTIES_BYTES:
        raise InputError(
            ErrorCode.LIMIT_EXCEEDED,
            f"userProperties is {len(encoded)} bytes encoded, over the limit of {MAX_USER_PROPERTIES_BYTES}",
        )
    if too_deep(encoded, MAX_USER_PROPERTIES_DEPTH):
        raise InputError(
            ErrorCode.LIMIT_EXCEEDED,
            f"userProperties nests deeper than {MAX_USER_PROPERTIES_DEPTH} levels",
        )
    try:
        msgspec.msgpack.encode(msg.userProperties)
    except OverflowError:
        raise InputError(
            ErrorCode.INVALID_FIELD,
            f"userProperties holds an integer outside {MIN_INT}..{MAX_INT} - at `$.userProperties`",
        ) from None


def valid_session_id(value: object) -> bool:
    return isinstance(value, str) and SESSION_ID_RE.fullmatch(value) is not None


def session_id_or_new(value: object) -> str:
    return value if valid_session_id(value) else str(uuid.uuid4())  # type: ignore[return-value]


def timestamp_or_now(value: object, now: int) -> int:
    """A start's timestamp, or ``now`` for anything but a number a Date can hold (-5, 1e300, "x")."""
    # bool is an int subclass but not a number a tracker means.
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= MAX_TIMESTAMP:
        return int(value)
    return now


def scalar_text(value: str | int | float | bool) -> str:
    """The one text of a scalar: what metadata stores and what a filter compares.

    Booleans are ``true``/``false``; an integral float is the integer it
    holds (``5.0`` -> ``5``, as JavaScript prints it, below 1e21); other
    numbers their shortest round-trip text (``2.5``, ``1e+21``). Search
    compares the lower-cased text (``search.compare_text``).
    """
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return repr(value)


def changes_of(msg: _Fields, session: Session | None) -> dict[str, Any]:
    """What applying ``msg`` to ``session`` changes, as wire fields.

    ``metadata`` and ``userProperties`` merge by key (null removes a key);
    other fields carried replace stored ones. Fields equal to the stored
    value are left out, so an empty result means nothing changed. A ``url``
    changed to another page (not to null) counts one more ``pageViews``,
    whichever tab or reload sends it.
    """
    changes: dict[str, Any] = {}
    for name in DESCRIPTIVE_FIELDS:
        value = getattr(msg, name)
        if value is not UNSET and (session is None or getattr(session, name) != value):
            changes[name] = value
    if session is not None and changes.get("url") is not None:
        changes["pageViews"] = session.pageViews + 1
    if msg.active is not UNSET and (session is None or session.active != msg.active):
        changes["active"] = msg.active
    if msg.metadata is not UNSET:
        current = session.metadata if session is not None else {}
        merged = dict(current)
        for key, raw in msg.metadata.items():
            if raw is None:
                merged.pop(key, None)
            else:
                text = merged[key] = scalar_text(raw)
                if len(text) > MAX_STRING:  # a number of more than 1024 digits
                    raise InputError(
                        ErrorCode.LIMIT_EXCEEDED,
                        f"metadata[{key!r}] is {len(text)} characters, over the limit of {MAX_STRING}",
                    )
        if len(merged) > MAX_METADATA_KEYS:
            raise InputError(
                ErrorCode.LIMIT_EXCEEDED,
                f"metadata would hold {len(merged)} keys, over the limit of {MAX_METADATA_KEYS}",
            )
        if merged != current:
            changes["metadata"] = merged
    if msg.userProperties is not UNSET:
        current_up = session.userProperties if session is not None else {}
        merged_up = dict(current_up)
        for key, val in msg.userProperties.items():
            if val is None:
                merged_up.pop(key, None)
            else:
                merged_up[key] = val
        if merged_up != current_up:
            size = len(msgspec.json.encode(merged_up))
            if size > MAX_USER_PROPERTIES_BYTES:
                raise InputError(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"userProperties would be {size} bytes encoded, "
                    f"over the limit of {MAX_USER_PROPERTIES_BYTES}",
                )
            changes["userProperties"] = merged_up
    return changes


# The fields a connection's enrichment may fill (``enrich``): the User-Agent's, then the location.
UA_FIELDS: Final = (
    "userAgent",
    "userOs",
    "userBrowser",
    "userBrowserVersion",
    "userDevice",
    "userDeviceType",
)
GEO_FIELDS: Final = ("userCountry", "userState", "userCity")
ENRICHED_FIELDS: Final = UA_FIELDS + GEO_FIELDS


def enrich(msg: _Fields, found: Mapping[str, str], session: Session | None) -> None:
    """Fill ``msg``'s fields from the connection's enrichment (``enrich.Enricher.fields``)
    under what trackers send: only a field ``msg`` does not carry and the record does
    not hold yet, so a tracker's own value (this tab's or another's) always wins. Only
    those fields are read from ``found`` (it parses what is read)."""
    for name in ENRICHED_FIELDS:
        if getattr(msg, name) is UNSET and (session is None or getattr(session, name) is None):
            value = found.get(name)
            if value is not None:
                setattr(msg, name, value)


def active_time(session: Session, now: int) -> int:
    """``activeTime`` once ``lastActiveAt`` moves to ``now``.

    The time from the session's last message to this one counts when the
    session was ``active`` and ``connected`` after the last one: the record's
    ``active`` is true while any of its tabs' last report was (the registry
    counts each tab's), and time in a reconnect grace never counts. Exact for
    any sequence of messages: it only depends on the record at each message.
    """
    if session.active and session.connected and now > session.lastActiveAt:
        return session.activeTime + now - session.lastActiveAt
    return session.activeTime


def derived_active_time(session: Session, now: int) -> int:
    """``activeTime`` as a copy of the record derives it when ``lastActiveAt`` moves to
    ``now`` without saying more: the step counts while ``active`` (README, "The session
    record"). Where ``active_time`` differs (a resume), the hub sends activeTime itself."""
    if session.active and now > session.lastActiveAt:
        return session.activeTime + now - session.lastActiveAt
    return session.activeTime


def new_session(msg: Start, session_id: str, project_key: str, project_id: int, now: int) -> Session:
    """A fresh record from a first ``start``."""
    ts = timestamp_or_now(msg.timestamp, now)
    session = Session(
        sessionID=session_id,
        projectKey=project_key,
        projectId=project_id,
        timestamp=ts,
        lastActiveAt=now,
    )
    for name, value in changes_of(msg, None).items():
        setattr(session, name, value)
    return session


# Text fields most sessions of a project share a few values of (a browser, a country, a
# page): each distinct value is kept once (``Strings``), not once per session and copy.
SHARED_FIELDS: Final = (
    "pageTitle", "url", "referrer", "trackerVersion", "userOs", "userBrowser", "userBrowserVersion",
    "userDevice", "userDeviceType", "userCountry", "userState", "userCity", "language",
    "environment", "appVersion", "userAgent",
)  # fmt: skip


_shared_values: Final = attrgetter(*SHARED_FIELDS)


class Strings:
    """One copy of each recurring text value of the records (``SHARED_FIELDS`` and metadata
    values): tens of bytes a field a session. Bounded: full, it starts over (records keep
    the copies they point to)."""

    __slots__ = ("limit", "values")

    def __init__(self, limit: int = 65_536) -> None:
        self.limit = limit
        self.values: dict[str, str] = {}

    def get(self, value: str) -> str:
        values = self.values
        found = values.get(value)
        if found is None:
            if len(values) >= self.limit:
                values.clear()
            found = values[value] = value
        return found

    def share(self, session: Session) -> None:
        """Point ``session``'s recurring values at their shared copies."""
        for name, value in zip(SHARED_FIELDS, _shared_values(session), strict=True):
            if value:
                shared = self.get(value)
                if shared is not value:
                    setattr(session, name, shared)
        if session.metadata:
            session.metadata = self._metadata(session.metadata)

    def share_changes(self, changes: dict[str, Any]) -> None:
        for name in SHARED_FIELDS:
            value = changes.get(name)
            if value:
                changes[name] = self.get(value)
        metadata = changes.get("metadata")
        if metadata:
            changes["metadata"] = self._metadata(metadata)

    def _metadata(self, metadata: dict[str, str]) -> dict[str, str]:
        return {key: self.get(value) for key, value in metadata.items()}


def encode_error(code: ErrorCode, message: str) -> bytes:
    return msgspec.json.encode(ErrorFrame(code=code, message=message))


def encode_started(session: Session, tab_id: str) -> bytes:
    return msgspec.json.encode(Started(sessionID=session.sessionID, session=session, tabId=tab_id))
