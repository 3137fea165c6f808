"""``hub serve``: flags and ``HUB_*`` variables to a running hub."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from .config import ConfigError, parse_settings


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"hub: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if settings.api_key_generated:
        # Printed once, on purpose not through logging: logs never carry keys.
        print(f"hub: no --api-key given; generated API key: {settings.api_key}", flush=True)
    from .app import run

    try:
        import uvloop  # noqa: F401

        run(settings, use_uvloop=True)
    except ImportError:
        run(settings)
    return 0
