"""pytest plugin of :mod:`sagas.testing` (registered as the ``sagas`` plugin when sagas is installed).

Fixtures:

``saga_harness``
    A factory: ``saga_harness(app, **options)`` returns a :class:`~sagas.testing.Harness`, closed
    when the test ends.

Hypothesis profiles, when hypothesis is installed: ``sagas-dev`` (50 examples), ``sagas-ci`` (100,
derandomized) and ``sagas-thorough`` (2,000), each without a deadline and without the too-slow
health checks. The plugin only registers them; it loads one only when asked, with hypothesis's own
``--hypothesis-profile=sagas-ci`` or with ``HYPOTHESIS_PROFILE=sagas-ci`` in the environment (the
command line wins). Profiles of other names, yours included, are left alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ._harness import Harness

#: The hypothesis profiles this plugin registers, by name.
PROFILES = ("sagas-dev", "sagas-ci", "sagas-thorough")


@pytest.hookimpl(tryfirst=True)  # before hypothesis's own plugin loads the --hypothesis-profile
def pytest_configure(config: pytest.Config) -> None:
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # hypothesis is optional
        return
    slow = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("sagas-dev", max_examples=50, deadline=None, suppress_health_check=slow)
    settings.register_profile(
        "sagas-ci", max_examples=100, deadline=None, suppress_health_check=slow, derandomize=True, print_blob=True
    )
    settings.register_profile("sagas-thorough", max_examples=2000, deadline=None, suppress_health_check=slow)
    asked = os.environ.get("HYPOTHESIS_PROFILE", "")
    if asked in PROFILES:
        settings.load_profile(asked)


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
