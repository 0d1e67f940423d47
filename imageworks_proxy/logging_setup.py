"""Human log configuration for the command-line server."""

from __future__ import annotations

import logging


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aiohttp's access log would duplicate our per-request line and could log credentials in URLs.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
