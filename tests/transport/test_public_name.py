"""A dead letter's error type names the class as users import it, not its private module."""

from __future__ import annotations

import json

from sagas import Reject
from transport import EventTooLarge
from transport._deadletters import public_name


class _Local(Exception):
    pass


def test_a_class_exported_by_a_public_package_gets_the_public_name() -> None:
    assert EventTooLarge.__module__ == "transport._errors"
    assert public_name(EventTooLarge) == "transport.EventTooLarge"
    assert public_name(Reject) == "sagas.Reject"


def test_other_classes_keep_their_module() -> None:
    assert public_name(ValueError) == "builtins.ValueError"
    assert public_name(json.JSONDecodeError) == "json.decoder.JSONDecodeError"
    assert public_name(_Local) == f"{__name__}._Local"
