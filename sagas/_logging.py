"""Opt-in logging set-up. The library itself never configures logging; the CLI calls this."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from transport import redact_url

from . import _tracing

_URL_KEYS = ("broker", "url", "store")


def redact_credentials(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: hide passwords in any URL-valued field."""
    for key in _URL_KEYS:
        value = event_dict.get(key)
        if isinstance(value, str) and "@" in value:
            event_dict[key] = redact_url(value)
    return event_dict


def configure_logging(*, json: bool = False, level: str | int = "info") -> None:
    """Configure structlog for a worker process: JSON lines (``json=True``) or readable console output,
    with contextvars merged in (event id, type, service, handler, attempt), ISO timestamps, and
    credentials redacted. Call once, at process start."""
    lvl = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(lvl, int):
        raise ValueError(f"unknown log level {level!r}")
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_credentials,
    ]
    if _tracing.ENABLED:
        processors.append(_tracing.add_trace_ids)
    if json:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        # Not cached: a process (or a test run) may configure more than once, and cached loggers would
        # keep the old configuration.
        cache_logger_on_first_use=False,
    )
