"""Comparing a bench report with a saved one (``sagas bench ... --baseline FILE``).

A report's ``median`` section holds, per workload (``events``, ``sagas``, ``raw-classic``...), the
median of each figure over the runs. Each figure the two reports share is compared: a throughput
(``..._per_s``: higher is better), a time (``..._ms``: lower is better) or a memory figure (``..._mib``:
lower is better). One that is worse than the baseline's by more than ``tolerance`` (a fraction: 0.1 is
10 %) is a regression. Figures of other kinds, and workloads only one report has, are not compared.

Compare reports measured on the same machine, with the same ``-n`` and broker: the comparison says so
when they differ. The machine's noise is why the tolerance exists; medians of ``--repeat 3`` or more
keep it small.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: suffix -> whether a higher figure is better
_KINDS = {"_per_s": True, "_ms": False, "_mib": False}


class NotABenchReport(ValueError):
    """The baseline file is not a report that ``sagas bench ... --json`` printed."""


@dataclass(frozen=True, slots=True)
class Compared:
    """One figure of one workload in both reports."""

    workload: str
    figure: str
    baseline: float
    now: float
    higher_is_better: bool

    @property
    def ratio(self) -> float:
        """now / baseline (0 when the baseline is 0)."""
        return self.now / self.baseline if self.baseline else 0.0

    def regressed(self, tolerance: float) -> bool:
        if not self.baseline:
            return False
        if self.higher_is_better:
            return self.now < self.baseline * (1 - tolerance)
        return self.now > self.baseline * (1 + tolerance)


def load(path: str) -> dict[str, Any]:
    """The report saved in ``path``: the last line of ``sagas bench ... --json``'s output (the lines before
    it, if any, are progress)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise NotABenchReport(f"cannot read {path}: {exc.strerror or exc}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        report = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        report = None
    if not isinstance(report, dict) or not isinstance(report.get("median"), dict):
        raise NotABenchReport(f"{path} is not a report of `sagas bench ... --json` (no 'median' section)")
    return report


def _figures(report: dict[str, Any]) -> dict[tuple[str, str], float]:
    """(workload, figure) -> median, for the figures that have a direction."""
    out: dict[tuple[str, str], float] = {}
    for workload, medians in report.get("median", {}).items():
        items = medians.items() if isinstance(medians, dict) else [("per_s", medians)]
        for figure, value in items:
            if isinstance(value, int | float) and not isinstance(value, bool) and _direction(figure) is not None:
                out[(workload, figure)] = float(value)
    return out


def _direction(figure: str) -> bool | None:
    name = figure if figure.startswith("_") else f"_{figure}"
    return next((higher for suffix, higher in _KINDS.items() if name.endswith(suffix)), None)


def compare(report: dict[str, Any], baseline: dict[str, Any]) -> list[Compared]:
    """Every figure both reports have, in the report's order."""
    before = _figures(baseline)
    rows = []
    for (workload, figure), now in _figures(report).items():
        if (workload, figure) in before:
            higher = _direction(figure)
            assert higher is not None
            rows.append(Compared(workload, figure, before[(workload, figure)], now, higher))
    return rows


def _setting(report: dict[str, Any], key: str) -> set[Any]:
    return {run.get(key) for runs in report.get("runs", {}).values() if isinstance(runs, list) for run in runs}


def differences(report: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    """How the two reports' settings differ (-n, broker, machine), which makes figures less comparable."""
    notes = []
    for key in ("n", "broker"):
        now, before = _setting(report, key) - {None}, _setting(baseline, key) - {None}
        if now and before and now != before:
            notes.append(f"{key} differs: {sorted(map(str, before))} in the baseline, {sorted(map(str, now))} now")
    for key in ("cpus", "python"):
        if key in report and key in baseline and report[key] != baseline[key]:
            notes.append(f"{key} differs: {baseline[key]} in the baseline, {report[key]} now")
    return notes


def table(rows: list[Compared], tolerance: float, path: str, notes: list[str]) -> str:
    """The comparison, regressions marked, for the terminal."""
    lines = [f"against the baseline {path} (a regression: worse by more than {tolerance:.0%})"]
    lines += [f"  note: {note}" for note in notes]
    if not rows:
        lines.append("  no figure in common: compare reports of the same workload")
    for row in rows:
        mark = "  REGRESSION" if row.regressed(tolerance) else ""
        lines.append(
            f"  {row.workload + ' ' + row.figure:<40} {row.baseline:>12,.1f} -> {row.now:>12,.1f}"
            f"   x{row.ratio:.3f}{mark}"
        )
    regressions = [r for r in rows if r.regressed(tolerance)]
    lines.append(f"{len(regressions)} regression(s) in {len(rows)} figure(s)")
    return "\n".join(lines)


def as_json(rows: list[Compared], tolerance: float, path: str, notes: list[str]) -> dict[str, Any]:
    """The comparison as the JSON report's ``baseline`` section."""
    return {
        "file": path,
        "tolerance": tolerance,
        "notes": notes,
        "figures": [
            {
                "workload": r.workload,
                "figure": r.figure,
                "baseline": r.baseline,
                "now": r.now,
                "ratio": round(r.ratio, 3),
                "regression": r.regressed(tolerance),
            }
            for r in rows
        ],
        "regressions": sum(r.regressed(tolerance) for r in rows),
    }


__all__ = ["Compared", "NotABenchReport", "as_json", "compare", "differences", "load", "table"]
