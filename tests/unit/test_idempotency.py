"""Outcome encoding: JSON only, failures replayed without importing anything."""

from __future__ import annotations

import pytest

from celery_unique.exceptions import IdempotencyConflict, ReplayedError
from celery_unique.idempotency import check_conflict, decode, encode_failure, encode_success


def test_success_round_trips_as_json() -> None:
    outcome = decode(encode_success("id-1", "ab", {"a": [1, 2], "b": None}))
    assert (outcome.task_id, outcome.args_digest, outcome.state) == ("id-1", "ab", "SUCCESS")
    assert outcome.value() == {"a": [1, 2], "b": None}
    handle = outcome.handle()
    assert handle.get() == {"a": [1, 2], "b": None} and handle.replayed and handle.duplicate


@pytest.mark.parametrize("value", [{1, 2}, object(), float("nan")])
def test_values_that_are_not_json_are_refused(value: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        encode_success("id", "ab", value)


def test_builtin_failures_replay_as_their_type() -> None:
    outcome = decode(encode_failure("id", "ab", KeyError("missing")))
    with pytest.raises(KeyError, match="missing"):
        outcome.value()


def test_other_failures_replay_as_replayed_error_without_imports() -> None:
    class CardDeclined(Exception):
        pass

    outcome = decode(encode_failure("id", "ab", CardDeclined("insufficient funds")))
    with pytest.raises(ReplayedError) as info:
        outcome.value()
    assert info.value.error_type == "CardDeclined"
    assert info.value.error_message == "insufficient funds"


def test_conflict_only_for_an_explicit_key_with_other_arguments() -> None:
    check_conflict("t", None, "aa", "bb")  # argument-derived keys cannot conflict
    check_conflict("t", "k", "", "bb")  # nothing known about the holder
    check_conflict("t", "k", "aa", "aa")
    with pytest.raises(IdempotencyConflict):
        check_conflict("t", "k", "aa", "bb")
