"""The producer's hints of held keys: least recently held out first, each with its own expiry."""

from __future__ import annotations

import pytest

from celery_unique import publish
from celery_unique.publish import DuplicateHints


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(publish, "monotonic", fake)
    return fake


def test_more_keys_than_room_keep_the_most_recent_not_none(clock: Clock) -> None:
    """Before: the whole cache was wiped at 10,000 entries, so a caller cycling over
    more keys than that found no hint for any of the keys it had just met."""
    hints = DuplicateHints()
    for n in range(15_000):
        hints.held(f"k{n}", None)
    assert len(hints) == DuplicateHints.MAX_ENTRIES
    assert all(hints.expects_duplicate(f"k{n}") for n in range(5_000, 15_000))
    assert not any(hints.expects_duplicate(f"k{n}") for n in range(5_000))


def test_a_key_held_again_is_the_most_recent(clock: Clock) -> None:
    hints = DuplicateHints()
    for n in range(DuplicateHints.MAX_ENTRIES):
        hints.held(f"k{n}", None)
    hints.held("k0", None)  # k0 again: k1 is now the least recent
    hints.held("new", None)
    assert hints.expects_duplicate("k0") and hints.expects_duplicate("new")
    assert not hints.expects_duplicate("k1")


def test_each_entry_expires_on_its_own(clock: Clock) -> None:
    hints = DuplicateHints()
    hints.held("short", 0.5)
    hints.held("long", None)  # capped at MAX_SECONDS
    clock.now += 0.6
    assert not hints.expects_duplicate("short") and hints.expects_duplicate("long")
    clock.now += DuplicateHints.MAX_SECONDS
    assert not hints.expects_duplicate("long")
    hints.held("freed", None)
    hints.free("freed")
    assert not hints.expects_duplicate("freed")
