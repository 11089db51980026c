"""The app the fault drills run in worker processes (see drills.py).

Each handler appends the event's sequence number to the file named by ``DRILL_OUT``, flushed per
line, so a kill -9 loses at most the line being written and the drill can count every effect.
"""

from __future__ import annotations

import os

from sagas import AT_MOST_ONCE, App, Event, Service

drill = Service("drill")
_out = None


def _record(tag: str, event: Event) -> None:
    global _out
    if _out is None:
        _out = open(os.environ["DRILL_OUT"], "a", buffering=1)  # noqa: SIM115 - kept open for the process
    _out.write(f"{tag} {event.payload['n']}\n")


@drill.on("drill.events.created")
def record(event: Event) -> None:
    _record("alo", event)


@drill.on("drill.presence.seen", delivery=AT_MOST_ONCE)
def seen(event: Event) -> None:
    import time

    _record("amo-start", event)
    time.sleep(float(os.environ.get("DRILL_AMO_SLEEP", "0")))
    _record("amo", event)


app = App(drill, exchange=os.environ.get("DRILL_EXCHANGE", "drill"))
