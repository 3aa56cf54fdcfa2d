"""The worker's claims on runs that Celery let go of (no worker: the registry alone)."""

from __future__ import annotations

from typing import Any

import pytest

from celery_unique import beats


@pytest.fixture(autouse=True)
def empty() -> Any:
    saved = dict(beats.lingering)
    beats.lingering.clear()
    yield
    beats.lingering.clear()
    beats.lingering.update(saved)


def test_a_run_is_claimed_while_its_test_says_it_goes_on() -> None:
    going_on = [True]
    run = object()
    beats.linger(run, lambda: going_on[0])
    assert beats._still_lingering() == [run]
    going_on[0] = False
    assert beats._still_lingering() == []
    assert run not in beats.lingering


def test_ended_runs_are_dropped_as_others_linger_without_a_beat() -> None:
    """A worker whose beat is off (unique_reap_interval = 0) never reads them: each new
    one drops those that ended, so they do not pile up."""
    for _ in range(100):
        beats.linger(object(), lambda: False)
    beats.linger("last", lambda: True)
    assert list(beats.lingering) == ["last"]


def test_a_test_that_fails_drops_its_run_and_spares_the_others() -> None:
    def broken() -> bool:
        raise AttributeError("no ready() here")

    beats.linger("broken", broken)
    beats.linger("fine", lambda: True)
    assert beats._still_lingering() == ["fine"]
