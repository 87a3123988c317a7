"""metapl.errors on its own: how an exception of a library becomes part of a one-line error."""

from __future__ import annotations

from metapl.errors import first_line


def test_first_line_keeps_the_line_that_says_what_an_announcing_line_announces():
    """load_state_dict's message starts "Error(s) in loading state_dict for X:"; its first line
    alone said nothing of what was wrong."""
    exc = RuntimeError(
        "Error(s) in loading state_dict for Net:\n\tMissing key(s): fc.weight.\n\tmore"
    )
    assert first_line(exc) == "Error(s) in loading state_dict for Net: Missing key(s): fc.weight."
    assert first_line(ValueError("bad value\nthe rest")) == "bad value"
    assert first_line(ValueError("ends with a colon:")) == "ends with a colon:"


def test_first_line_of_an_empty_message_is_the_class_and_a_limit_cuts_it():
    assert first_line(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert first_line(OSError("\n  \n")) == "OSError"
    assert first_line(ValueError("x" * 200), limit=20) == "x" * 17 + "..."
    assert first_line(ValueError("x" * 20), limit=20) == "x" * 20
