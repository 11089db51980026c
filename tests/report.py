"""Figures for docs/reliability.md: tests add what they did; ``scripts/reliability.py`` renders them.

With ``SAGAS_RELIABILITY_REPORT=path`` set, :func:`write` appends one JSON object per scenario to that
file, and :func:`add` sums counts over many runs (the examples of a property test), written once at
the end of the session by :func:`flush` (called from conftest.py).
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from typing import Any

ENV = "SAGAS_RELIABILITY_REPORT"
_totals: defaultdict[str, Counter[str]] = defaultdict(Counter)


def write(figures: dict[str, Any]) -> None:
    """Append one scenario's figures to the report (if one is being written)."""
    path = os.environ.get(ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(figures, sort_keys=True) + "\n")


def add(scenario: str, **counts: int) -> None:
    """Add to a scenario's running totals (written by :func:`flush`)."""
    _totals[scenario].update(counts)


def flush() -> None:
    for scenario, counts in sorted(_totals.items()):
        write({"scenario": scenario, "kind": "property", **counts})
    _totals.clear()
