"""Test your sagas and handlers the way the framework tests itself.

:class:`Harness` runs an app's real workers in memory, on a virtual clock, with no threads, so that a
run is reproducible. It injects faults: any message can be dropped, duplicated, delayed or reordered
(:class:`Drop`, :class:`Duplicate`, :class:`Delay`, :class:`Reorder`), a worker can crash before or
after any of its side effects (:class:`Crash`) and restart, and the broker can restart. ``async def``
handlers run on a :class:`VirtualTimeLoop`, asyncio's loop on the harness's virtual time.

:mod:`sagas.testing.strategies` has hypothesis strategies for fault schedules (it needs the
``hypothesis`` package), and the pytest plugin (loaded automatically once ``sagas`` is installed)
gives the ``saga_harness`` fixture. See docs/testing.md.

:class:`MailSink` is a local SMTP server that keeps the mails it receives (it needs the ``aiosmtpd``
package), for handlers that send mail.
"""

from .._demo import MailSink
from ._harness import (
    STAGES,
    Crash,
    Crashed,
    Delay,
    Deliver,
    Drop,
    Duplicate,
    FaultSchedule,
    Harness,
    InlineExecutor,
    MessageFault,
    NotSettled,
    Reorder,
    Stage,
    Stats,
    VirtualClock,
)
from ._loop import NotVirtual, VirtualTimeLoop

__all__ = [
    "STAGES",
    "Crash",
    "Crashed",
    "Delay",
    "Deliver",
    "Drop",
    "Duplicate",
    "FaultSchedule",
    "Harness",
    "InlineExecutor",
    "MailSink",
    "MessageFault",
    "NotSettled",
    "NotVirtual",
    "Reorder",
    "Stage",
    "Stats",
    "VirtualClock",
    "VirtualTimeLoop",
]
