"""How the console shows values: times, ages, durations, deadlines, message bodies."""

from __future__ import annotations

import json
from datetime import UTC, datetime


def iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def age(ts: float | None, now: float) -> str:
    if ts is None:
        return ""
    s = int(now - ts)
    sign = "-" if s < 0 else ""
    s = abs(s)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{sign}{s // size}{unit}"
    return f"{sign}{s}s"


def duration(seconds: float) -> str:
    s = int(abs(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def relative(ts: float | None, now: float) -> str:
    """A deadline relative to now: "in 12s", or "overdue 3m"."""
    if ts is None:
        return ""
    return f"in {duration(ts - now)}" if ts > now else f"overdue {duration(now - ts)}"


def stamp(text: str, now: float) -> str:
    """An ISO 8601 time as the console shows times: "2026-11-30T17:13:51Z (3m ago)" (as given when it
    is not a time)."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return text
    ts = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    return f"{iso(ts)} ({age(ts, now)} ago)"


def preview(text: str, size: int = 120) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= size else flat[: size - 1] + "…"


def pretty(text: str) -> str:
    """A message body as indented JSON when it is JSON, else as it is."""
    try:
        return json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False)
    except ValueError:
        return text
