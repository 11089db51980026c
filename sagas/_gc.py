"""The garbage collector's settings for a process that runs a worker.

A worker keeps a large, long-lived heap (its modules, the app, the broker connection, a memory store's
records) and makes many short-lived containers per message (envelopes, dicts of a saga's data, the
frames of a transition). With CPython's default thresholds (700 allocations) the young generation is
collected every few messages, and every collection of the older generations walks the whole long-lived
heap again: measured with ``sagas bench``, that is 10-20 % of a worker's time (docs/performance.md).

:func:`tune_gc` does what long-running Python services commonly do: it moves everything alive now
(the code and the app, loaded once) into the permanent generation with :func:`gc.freeze`, so that no
collection walks it again, and collects the young generation every 20,000 allocations instead of 700.
Cyclic garbage is still collected; a worker holds a few megabytes more of it between collections.

It changes process-wide settings, so the library never calls it on its own: ``sagas run`` does (unless
``--no-gc-tuning``), and so do the bench's worker processes. A program that embeds a
:class:`~sagas.Worker` may call it once its app is loaded.
"""

from __future__ import annotations

import gc

#: Allocations (net) between collections of the youngest generation (CPython's default is 700).
YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """Freeze what is alive now out of the collector's reach and collect the young generation less often.

    Call it once, after the app is imported and before the worker starts taking messages."""
    gc.collect()  # (what is garbage now is not frozen with the rest)
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
