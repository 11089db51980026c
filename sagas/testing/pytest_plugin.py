"""pytest plugin of :mod:`sagas.testing` (registered as the ``sagas`` plugin when sagas is installed).

Fixtures:

``saga_harness``
    A factory: ``saga_harness(app, **options)`` returns a :class:`~sagas.testing.Harness`, closed
    when the test ends.

It also registers hypothesis profiles when hypothesis is installed: ``ci`` (chosen when the ``CI``
environment variable is set), ``dev`` (the default) and ``thorough``; ``HYPOTHESIS_PROFILE`` picks one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ._harness import Harness


def pytest_configure(config: pytest.Config) -> None:
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # hypothesis is optional
        return
    slow = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("dev", max_examples=50, deadline=None, suppress_health_check=slow)
    settings.register_profile(
        "ci", max_examples=100, deadline=None, suppress_health_check=slow, derandomize=True, print_blob=True
    )
    settings.register_profile("thorough", max_examples=2000, deadline=None, suppress_health_check=slow)
    profile = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
    settings.load_profile(profile)


@pytest.fixture
def saga_harness() -> Iterator[Callable[..., Harness]]:
    """``saga_harness(app, workers=1, store=None, faults=None, seed=0, ...)``: a harness closed at the end."""
    made: list[Harness] = []

    def make(app: Any, **options: Any) -> Harness:
        harness = Harness(app, **options)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()
