"""Run the reliability tests and print their figures; ``--update-docs`` writes them into docs/reliability.md.

    python scripts/reliability.py                 # property, hostile-input and real-process fault tests
    python scripts/reliability.py --cluster       # also the 3-node RabbitMQ cluster test
    python scripts/reliability.py --update-docs   # and replace the figures in docs/reliability.md
    python scripts/reliability.py --render FILE   # only render a report a test run already wrote

The tests are the ones CI runs (``python -m pytest`` runs them all); this script runs them with
``SAGAS_RELIABILITY_REPORT`` set, so each writes what it did (messages, faults, sagas, events) to a
JSON-lines report, and renders that report as tables. Needs RabbitMQ and PostgreSQL, as CI does; the
fault tests restart only the private node and cluster they start, never the machine's services.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
START, END = "<!-- figures:start -->", "<!-- figures:end -->"
TESTS = ["tests/properties", "tests/examples/test_share_properties.py", "tests/security", "tests/faults"]


def run_tests(report: Path, cluster: bool, extra: list[str]) -> tuple[int, float]:
    env = {**os.environ, "SAGAS_RELIABILITY_REPORT": str(report), "CI": os.environ.get("CI", "true")}
    tests = [*TESTS, *(["tests/cluster"] if cluster else [])]
    t0 = time.monotonic()
    code = subprocess.call(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *tests, *extra], cwd=ROOT, env=env
    )
    return code, time.monotonic() - t0


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def render(rows: list[dict[str, Any]], *, command: str, wall: float | None) -> str:
    props = [r for r in rows if r.get("kind") == "property"]
    procs = [r for r in rows if r.get("kind") == "process"]
    cluster = [r for r in rows if r.get("kind") == "cluster"]
    profile = os.environ.get("HYPOTHESIS_PROFILE") or ("sagas-ci" if os.environ.get("CI", "true") else "sagas-dev")
    out = [
        f"Last run: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit `{_commit()}`, "
        f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} cores, "
        f"hypothesis profile `{profile}`" + (f", {wall:.0f} s in all" if wall else "") + ".",
        "",
        f"Command: `{command}`",
        "",
    ]
    for r in props:
        out += [f"**{r['scenario']}**, {r['examples']:,} runs (one run = one fault schedule):", ""]
        keys = [k for k in r if k not in ("scenario", "kind", "examples")]
        out += ["| figure | total |", "| --- | ---: |", *(f"| {k.replace('_', ' ')} | {_n(r[k])} |" for k in keys), ""]
    if procs:
        out += [
            "**Real processes** (a private RabbitMQ node and PostgreSQL cluster, 2 worker processes each):",
            "",
            "| scenario | faults | events published / handled / lost / duplicates | sagas started / final "
            "/ stuck | requests re-sent by deadlines | passed |",
            "| --- | --- | --- | --- | ---: | --- |",
        ]
        for r in procs:
            faults = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in (r.get("faults") or {}).items() if v)
            out.append(
                f"| {r['scenario']} | {faults or '-'} | {_n(r.get('events_published'))} / "
                f"{_n(r.get('events_handled'))} / {_n(r.get('events_lost'))} / {_n(r.get('events_duplicates'))} | "
                f"{_n(r.get('sagas_started'))} / {_n(r.get('sagas_final'))} / {_n(r.get('sagas_stuck'))} | "
                f"{_n(r.get('requests_resent_by_deadline'))} | {'yes' if r.get('passed') else 'NO'} |"
            )
        out.append("")
    for r in cluster:
        out += [f"**3-node RabbitMQ cluster**: {json.dumps({k: v for k, v in r.items() if k != 'kind'})}", ""]
    return "\n".join(out)


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def update_docs(text: str) -> None:
    doc = DOC.read_text()
    if START not in doc or END not in doc:
        raise SystemExit(f"{DOC} has no {START} ... {END} section")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    DOC.write_text(pattern.sub(lambda _m: f"{START}\n{text}\n{END}", doc))
    print(f"updated {DOC.relative_to(ROOT)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster", action="store_true", help="also run the 3-node RabbitMQ cluster test")
    parser.add_argument("--update-docs", action="store_true", help="write the figures into docs/reliability.md")
    parser.add_argument("--render", metavar="FILE", help="only render this JSON-lines report")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args()
    command = "python scripts/reliability.py" + (" --cluster" if args.cluster else "")
    wall = None
    if args.render:
        report, code = Path(args.render), 0
    else:
        report = Path(tempfile.mkdtemp(prefix="sagas-reliability-")) / "report.jsonl"
        code, wall = run_tests(report, args.cluster, args.pytest_args)
    rows = [json.loads(line) for line in report.read_text().splitlines() if line.strip()] if report.exists() else []
    text = render(rows, command=command, wall=wall)
    print(text)
    if code != 0:
        print(f"the tests failed (pytest exit code {code}): the figures were not written to the docs")
        return code
    if args.update_docs:
        update_docs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
