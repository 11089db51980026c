"""The apps the fault drills (drills.py) and the fault tests (tests/faults) run in worker processes.

Each handler appends the event's sequence number to the file named by ``DRILL_OUT``, flushed per
line, so a kill -9 loses at most the line being written and the drill can count every effect.

``app`` has the drill service only; ``with_sagas`` adds the post-processing saga and its simulated
participants (examples/postprocessing.py, which reads FAIL_RATE and DROP_RATE), so one worker process
carries both plain at-least-once events and sagas through the same faults.
"""

from __future__ import annotations

import os

from examples.postprocessing import Postprocessing, antivirus, policies, storage
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
with_sagas = App(
    drill, antivirus, policies, storage, sagas=[Postprocessing], exchange=os.environ.get("DRILL_EXCHANGE", "drill")
)
