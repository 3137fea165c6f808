"""``hub serve``: flags and ``HUB_*`` variables to a running hub."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from . import logs
from .config import ConfigError, parse_settings


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"hub: error: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level, settings.log_format, logs.secrets_of(settings))
    if settings.api_key_generated:
        # Printed once, on purpose not through logging: logs never carry keys.
        print(f"hub: no --api-key given; generated API key: {settings.api_key}", flush=True)
    from .app import BindError, run

    try:
        import uvloop  # noqa: F401
    except ImportError:
        backend: dict[str, Any] = {}
    else:
        backend = {"use_uvloop": True}
    try:
        if settings.workers > 1:
            from .workers import run_workers

            return run_workers(settings, backend)
        run(settings, **backend)
    except BindError as exc:
        # A port in use is an operator's mistake, not a crash: one line, like a bad flag.
        print(f"hub: error: {exc}", file=sys.stderr)
        return 2
    return 0
