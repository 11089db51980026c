"""Event names, subscription patterns and RabbitMQ topic matching (``transport._names``)."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from transport import InvalidEventName, topic_matches, validate_event_name, validate_pattern
from transport._names import MAX_NAME_LENGTH

# The grammar, written out independently of the library: three or more dot-separated words, each a
# lowercase ASCII letter followed by lowercase ASCII letters, digits or '_'.
GRAMMAR = re.compile(r"\A[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*){2,}\Z", re.ASCII)

FIRST = string.ascii_lowercase
REST = string.ascii_lowercase + string.digits + "_"

words = st.builds(lambda head, tail: head + tail, st.sampled_from(FIRST), st.text(REST, max_size=30))
grammar_names = st.lists(words, min_size=3, max_size=12).map(".".join).filter(lambda n: len(n) <= MAX_NAME_LENGTH)


def reference_match(pattern: list[str], name: list[str]) -> bool:
    """RabbitMQ topic matching by definition: '*' is one word, '#' is zero or more words."""
    if not pattern:
        return not name
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return reference_match(rest, name) or (bool(name) and reference_match(pattern, name[1:]))
    if not name:
        return False
    return head in ("*", name[0]) and reference_match(rest, name[1:])


# --- event names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "ocis.sharing.share_created",
        "a.b.c",
        "a1.b_2.c__3",
        "ocis.storage.upload.finished",
        "x" * 100 + "." + "y" * 100 + "." + "z" * 53,  # exactly MAX_NAME_LENGTH
    ],
)
def test_valid_event_name_is_returned(name: str) -> None:
    """A name of three or more lowercase words is accepted and returned unchanged."""
    assert validate_event_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("ocis.sharing", id="two-segments"),
        pytest.param("ocis", id="one-segment"),
        pytest.param("", id="empty"),
        pytest.param("Ocis.sharing.share_created", id="uppercase-first"),
        pytest.param("ocis.sharing.ShareCreated", id="uppercase-inside"),
        pytest.param("ocis..share_created", id="empty-middle-segment"),
        pytest.param(".ocis.sharing.share_created", id="leading-dot"),
        pytest.param("ocis.sharing.share_created.", id="trailing-dot"),
        pytest.param("ocis.1sharing.share_created", id="leading-digit"),
        pytest.param("ocis._sharing.share_created", id="leading-underscore"),
        pytest.param("ocis.sharing.share created", id="space"),
        pytest.param(" ocis.sharing.share_created", id="leading-space"),
        pytest.param("ocis.sharing.share_created\n", id="trailing-newline"),
        pytest.param("ocis.sharing.share-created", id="hyphen"),
        pytest.param("ocis.*.share_created", id="star-wildcard"),
        pytest.param("ocis.#", id="hash-wildcard"),
        pytest.param("ocis.sharing.sharé", id="non-ascii-letter"),
    ],
)
def test_malformed_event_name_is_rejected_with_an_example(name: str) -> None:
    """A name that breaks the grammar raises InvalidEventName quoting the name and a correct example."""
    with pytest.raises(InvalidEventName, match="invalid event name") as info:
        validate_event_name(name)
    assert repr(name) in str(info.value)
    assert "ocis.sharing.share_created" in str(info.value)


@pytest.mark.parametrize("name", [None, 42, b"ocis.sharing.share_created", ["a", "b", "c"]])
def test_non_str_event_name_is_rejected(name: object) -> None:
    """A name that is not a str raises InvalidEventName naming the type it got."""
    with pytest.raises(InvalidEventName, match=f"must be a str, not {type(name).__name__}"):
        validate_event_name(name)


@pytest.mark.parametrize("length", [MAX_NAME_LENGTH + 1, 100_000])
def test_overlong_event_name_is_rejected_with_its_length(length: int) -> None:
    """A name over 255 characters raises InvalidEventName stating its length and the limit."""
    name = "a.b." + "c" * (length - 4)
    assert len(name) == length
    with pytest.raises(InvalidEventName, match=f"{length} characters long; the limit is {MAX_NAME_LENGTH}"):
        validate_event_name(name)


def test_invalid_event_name_is_a_value_error() -> None:
    """InvalidEventName is a ValueError, so generic validation code catches it."""
    with pytest.raises(ValueError, match="invalid event name"):
        validate_event_name("Bad.Name.Here")


@given(grammar_names)
def test_every_grammar_name_is_accepted(name: str) -> None:
    """Every name produced from the grammar is accepted."""
    assert validate_event_name(name) == name


@given(
    st.one_of(
        st.text(),
        st.text(alphabet="ab1_.Z -\n", max_size=12),
        grammar_names,
        st.tuples(grammar_names, st.integers(min_value=0), st.characters()).map(
            lambda t: t[0][: t[1] % (len(t[0]) + 1)] + t[2] + t[0][t[1] % (len(t[0]) + 1) :]
        ),
        grammar_names.map(lambda n: n + "."),
        st.text(max_size=MAX_NAME_LENGTH + 10, alphabet="a."),
    )
)
def test_any_text_is_accepted_only_if_it_matches_the_grammar(text: str) -> None:
    """Any str is either accepted and matches the grammar, or raises InvalidEventName, never anything else."""
    try:
        validate_event_name(text)
    except InvalidEventName:
        event("rejected")
        assert not (GRAMMAR.match(text) and len(text) <= MAX_NAME_LENGTH)
    else:
        event("accepted")
        assert GRAMMAR.match(text)
        assert len(text) <= MAX_NAME_LENGTH


# --- subscription patterns -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    [
        "ocis.sharing.share_created",
        "ocis.*.share_created",
        "ocis.#",
        "#",
        "*",
        "#.share_created",
        "*.*.*",
        "ocis.#.finished",
        "#.#",
    ],
)
def test_valid_pattern_is_returned(pattern: str) -> None:
    """A pattern of lowercase words, '*' and '#' is accepted and returned unchanged."""
    assert validate_pattern(pattern) == pattern


@pytest.mark.parametrize(
    "pattern",
    [
        pytest.param("ocis..share_created", id="empty-word"),
        pytest.param("ocis.#.", id="trailing-dot"),
        pytest.param("Ocis.*", id="uppercase"),
        pytest.param("ocis.share*", id="star-inside-word"),
        pytest.param("ocis.#x", id="hash-inside-word"),
        pytest.param("ocis.**", id="double-star"),
        pytest.param("ocis. sharing", id="space"),
        pytest.param("ocis.1sharing", id="leading-digit"),
        pytest.param("ocis.>", id="mqtt-wildcard"),
    ],
)
def test_malformed_pattern_is_rejected_with_an_explanation(pattern: str) -> None:
    """A malformed pattern raises InvalidEventName quoting the pattern and explaining '*' and '#'."""
    with pytest.raises(InvalidEventName, match="invalid subscription pattern") as info:
        validate_pattern(pattern)
    assert repr(pattern) in str(info.value)
    assert "'*' (exactly one word)" in str(info.value)


@pytest.mark.parametrize("pattern", ["", "#." * 200 + "#"])
def test_empty_or_overlong_pattern_is_rejected_with_its_length(pattern: str) -> None:
    """An empty pattern or one over 255 characters raises InvalidEventName stating the allowed length."""
    with pytest.raises(InvalidEventName, match=f"1 to {MAX_NAME_LENGTH} characters long, got {len(pattern)}"):
        validate_pattern(pattern)


@pytest.mark.parametrize("pattern", [None, 1, b"ocis.#"])
def test_non_str_pattern_is_rejected(pattern: object) -> None:
    """A pattern that is not a str raises InvalidEventName naming the type it got."""
    with pytest.raises(InvalidEventName, match=f"must be a str, not {type(pattern).__name__}"):
        validate_pattern(pattern)


# --- topic matching ------------------------------------------------------------------------------

MATCH_TABLE = [
    # pattern, name, matches
    ("ocis.sharing.share_created", "ocis.sharing.share_created", True),
    ("ocis.sharing.share_created", "ocis.sharing.share_deleted", False),
    ("ocis.*.share_created", "ocis.sharing.share_created", True),
    ("ocis.*.share_created", "ocis.share_created", False),
    ("ocis.*.share_created", "ocis.a.b.share_created", False),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a.b.x.c", False),
    ("a.*", "a", False),
    ("*", "a", True),
    ("*", "a.b", False),
    ("a.#", "a", True),
    ("a.#", "a.b", True),
    ("a.#", "a.b.c.d", True),
    ("a.#", "b.a", False),
    ("#", "a", True),
    ("#", "ocis.sharing.share_created", True),
    ("#.c", "c", True),
    ("#.c", "a.b.c", True),
    ("#.c", "a.b.c.d", False),
    ("a.#.c", "a.c", True),
    ("a.#.c", "a.b.b.c", True),
    ("a.#.c", "a.b.c.b", False),
    ("#.b.#", "a.b.c", True),
    ("#.b.#", "b", True),
    ("#.b.#", "a.c", False),
    ("a.#.b.#.c", "a.b.x.b.c", True),
    ("*.#", "a", True),
    ("#.*", "a.b.c", True),
    ("*.*.#", "a", False),
    ("#.#", "a.b", True),
    ("a.#.#.b", "a.b", True),
]


def test_match_table_contains_both_outcomes() -> None:
    """The explicit topic-matching examples include both matches and non-matches."""
    assert {expected for _, _, expected in MATCH_TABLE} == {True, False}


@pytest.mark.parametrize(("pattern", "name", "expected"), MATCH_TABLE)
def test_topic_matches_follows_rabbitmq_semantics(pattern: str, name: str, expected: bool) -> None:
    """topic_matches decides each example the way a RabbitMQ topic exchange does."""
    assert topic_matches(pattern, name) is expected


@pytest.mark.parametrize(("pattern", "name", "expected"), MATCH_TABLE)
def test_reference_matcher_agrees_with_the_table(pattern: str, name: str, expected: bool) -> None:
    """The reference matcher used by the property test decides every example correctly."""
    assert reference_match(pattern.split("."), name.split(".")) is expected


pattern_words = st.lists(st.sampled_from(["a", "b", "c", "*", "#"]), min_size=1, max_size=7)
name_words = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=7)


@given(pattern_words, name_words)
def test_topic_matches_agrees_with_reference(pattern: list[str], name: list[str]) -> None:
    """topic_matches agrees with the recursive definition of '*' and '#' on every pattern and name."""
    expected = reference_match(pattern, name)
    event(f"matches={expected}")
    assert topic_matches(".".join(pattern), ".".join(name)) is expected


@given(name_words)
def test_hash_matches_every_name(name: list[str]) -> None:
    """The pattern '#' matches every name."""
    assert topic_matches("#", ".".join(name))


@given(name_words)
def test_name_matches_itself_as_a_pattern(name: list[str]) -> None:
    """A pattern without wildcards matches exactly the name it spells."""
    assert topic_matches(".".join(name), ".".join(name))


@given(name_words)
def test_one_star_per_word_matches_a_name_of_that_length(name: list[str]) -> None:
    """A pattern of n '*' words matches every n-word name and no name of another length."""
    stars = ".".join("*" for _ in name)
    assert topic_matches(stars, ".".join(name))
    assert not topic_matches(stars, ".".join([*name, "a"]))
    assert not topic_matches(stars + ".*", ".".join(name))
