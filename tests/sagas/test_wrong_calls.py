"""A wrong call raises a typed error that says what to write, when it is made (not a raw TypeError later,
when the app runs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import pytest

from sagas import App, ConfigurationError, Event, Retry, Saga, Service, Start, State


def _handler(event: Event) -> None:
    return None


def _declare(**options: Any) -> Callable[[], Any]:
    return lambda: Service("svc").on("ocis.files.uploaded", **options)(_handler)


def _saga_with(**state: Any) -> Callable[[], Any]:
    class Wrong(Saga):
        type = "wrong"
        start = Start("ocis.files.uploaded", key="path", to="waiting")
        states: ClassVar[list[State]] = [
            State("waiting", sends="ocis.files.scan", on_reply="done", **state),
            State("done", final=True),
        ]

    return Wrong.definition


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (_declare(retry=5), "retry= takes a sagas.Retry"),
        (_declare(concurrency="2"), "concurrency= is a whole number"),
        (_declare(prefetch=1.5), "prefetch= is a whole number"),
        (_declare(idempotent="yes"), "idempotent= is True or False"),
        (lambda: Retry(attempts="3"), "Retry.attempts is a whole number"),  # type: ignore[arg-type]
        (lambda: Retry(initial="1"), "Retry.initial is a number"),  # type: ignore[arg-type]
        (lambda: Start("ocis.files.uploaded", key=5), "key= names the payload field"),  # type: ignore[arg-type]
        (_saga_with(timeout="5"), "timeout= is a number above 0"),
        (_saga_with(timeout=5, retries="3"), "retries= is a whole number"),
        (_saga_with(timeout=5, backoff=0), "backoff= is a number above 0"),
        (lambda: App([Service("svc")]), "App takes services as arguments"),  # type: ignore[arg-type]
        (lambda: App(Service("svc"), sagas=Saga), "takes a list of saga classes"),  # type: ignore[arg-type]
    ],
)
def test_a_wrong_call_raises_a_configuration_error_that_says_what_to_write(call: Callable[[], Any], says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        call()
