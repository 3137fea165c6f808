"""Logging set-up: ``--log-format text`` for humans, ``json`` for collectors.

A line is an *event* (the log message, e.g. ``connection.open``) plus
*fields* passed as ``extra={"fields": {...}}``. JSON lines are one object
each: ``time`` (UTC, ISO 8601, ms), ``level``, ``logger``, ``event``, then
the fields as further keys (and ``exc`` with a traceback, if any).

Secrets never reach a line: the configured API key, ``Bearer`` credentials
and ``token=`` query values are replaced by ``[redacted]`` in the finished
line, whatever module logged it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Final, TextIO

from .config import Projects, Settings

REDACTED: Final = "[redacted]"
_RESERVED: Final = frozenset({"time", "level", "logger", "event", "exc"})
# ``Bearer <credential>`` and ``token=<value>`` (query strings, form bodies), any case.
_SECRET_PATTERNS: Final = (
    re.compile(r"(?i)(bearer\s+)[^\s\"',;]+"),
    re.compile(r"(?i)(token=)[^\s&\"',;]+"),
)
# Shorter keys would redact ordinary words; keys are generated at 32 chars.
MIN_REDACTED_KEY: Final = 6


class Redactor:
    def __init__(self, secrets: list[str]) -> None:
        self.secrets = [s for s in secrets if len(s) >= MIN_REDACTED_KEY]

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        for pattern in _SECRET_PATTERNS:
            text = pattern.sub(rf"\g<1>{REDACTED}", text)
        return text


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for name, value in _fields(record).items():
            line[f"field_{name}" if name in _RESERVED else name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return self.redact(json.dumps(line, default=str, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _fields(record)
        if fields:
            first, nl, rest = text.partition("\n")
            pairs = " ".join(f"{name}={_text_value(value)}" for name, value in fields.items())
            text = f"{first} {pairs}{nl}{rest}"
        return self.redact(text)


def _text_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' "=\n')) else text


def secrets_of(settings: Settings) -> list[str]:
    """Every API key the settings hold: the organization key and per-project keys."""
    keys = [settings.api_key]
    if isinstance(settings.projects, Projects):
        for project_keys in settings.projects.api_keys.values():
            keys += project_keys
    for project_keys in (settings.keys_file or {}).values():
        keys += project_keys
    return keys


def setup(level: str, fmt: str, secrets: list[str], stream: TextIO | None = None) -> None:
    """Route every logger to one stderr handler in the chosen format."""
    redact = Redactor(secrets)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(redact) if fmt == "json" else TextFormatter(redact))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Third-party chatter (asyncio's debug notes, websockets' own loggers) stays at warning.
    for name in ("asyncio", "websockets"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
