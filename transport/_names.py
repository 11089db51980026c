"""Event names and subscription patterns.

An event name is ``<namespace>.<service>.<event>``: at least three lowercase, dot-separated words
(``ocis.sharing.share_created``). A pattern may use ``*`` for exactly one word and ``#`` for zero or
more words, with RabbitMQ's topic semantics. kombu's memory transport gets ``#`` wrong (``a.#`` does
not match ``a``), so the memory transport in this package routes with :func:`topic_matches`.
"""

from __future__ import annotations

import re
from functools import lru_cache

from ._errors import InvalidEventName

#: AMQP limits a routing key to 255 bytes.
MAX_NAME_LENGTH = 255
_WORD = r"[a-z][a-z0-9_]*"
_NAME_RE = re.compile(rf"{_WORD}(?:\.{_WORD}){{2,}}")
_WORD_RE = re.compile(_WORD)


def validate_event_name(name: object) -> str:
    """Return ``name`` if it is a valid event name, else raise :class:`InvalidEventName`."""
    if not isinstance(name, str):
        raise InvalidEventName(f"an event name must be a str, not {type(name).__name__}")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidEventName(f"event name is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}")
    if not _NAME_RE.fullmatch(name):
        raise InvalidEventName(
            f"invalid event name {name!r}: use '<namespace>.<service>.<event>', at least three "
            "dot-separated lowercase words of letters, digits and '_', each starting with a letter "
            "(for example 'ocis.sharing.share_created')"
        )
    return name


def validate_pattern(pattern: object) -> str:
    """Return ``pattern`` if it is a valid subscription pattern, else raise :class:`InvalidEventName`."""
    if not isinstance(pattern, str):
        raise InvalidEventName(f"a subscription pattern must be a str, not {type(pattern).__name__}")
    if not pattern or len(pattern) > MAX_NAME_LENGTH:
        raise InvalidEventName(
            f"a subscription pattern must be 1 to {MAX_NAME_LENGTH} characters long, got {len(pattern)}"
        )
    for word in pattern.split("."):
        if word not in ("*", "#") and not _WORD_RE.fullmatch(word):
            raise InvalidEventName(
                f"invalid subscription pattern {pattern!r}: each dot-separated word must be a lowercase "
                "name, '*' (exactly one word) or '#' (zero or more words), e.g. 'ocis.*.share_created'"
            )
    return pattern


@lru_cache(maxsize=8192)
def topic_matches(pattern: str, name: str) -> bool:
    """Whether ``name`` matches ``pattern`` the way a RabbitMQ topic exchange decides it."""
    return _match(tuple(pattern.split(".")), tuple(name.split(".")))


def _match(pat: tuple[str, ...], words: tuple[str, ...]) -> bool:
    # Iterative matcher with backtracking over the last '#', linear in practice.
    p = w = 0
    star_p = star_w = -1
    while w < len(words):
        if p < len(pat) and pat[p] == "#":
            star_p, star_w = p, w
            p += 1
        elif p < len(pat) and (pat[p] == "*" or pat[p] == words[w]):
            p += 1
            w += 1
        elif star_p >= 0:
            star_w += 1
            p, w = star_p + 1, star_w
        else:
            return False
    while p < len(pat) and pat[p] == "#":
        p += 1
    return p == len(pat)
