"""Scenario 7: the pool child that closes a fan-in is SIGKILLed before it publishes the callback.

Each fan-in's last report closes the context and claims the publishing; the
child is then killed (a fault-injection point between the two steps). Half of
the fan-ins have ``acks_late`` parts, whose message is delivered again when
the child dies; the others' parts were acknowledged. Either way the workers'
sweep (or the redelivered part) takes the lapsed claim over: every fan-in's
callback runs exactly once, and no context is left.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import redis

from celery_unique import fan_in
from tests.chaos import chaos_app
from tests.chaos.conftest import SCALE, Report, settle
from tests.integration.conftest import Worker, read_events

pytestmark = pytest.mark.worker

FAN_INS = 4 * SCALE
PARTS = 5


def test_a_killed_closer_loses_no_callback_and_sends_none_twice(
    worker: Worker, app: Any, broker_client: redis.Redis, lock_client: redis.Redis, token: str, report: Report
) -> None:
    tokens = [f"{token}-{n}" for n in range(FAN_INS)]
    handles = []
    for n, fan_token in enumerate(tokens):
        broker_client.set(chaos_app.fan_in_fault_key(fan_token), "kill")
        part = chaos_app.fan_part_late if n % 2 else chaos_app.fan_part
        handles.append(
            fan_in(
                [part.s(fan_token, number) for number in range(PARTS)],
                chaos_app.fan_callback.s(fan_token),
                token=fan_token,
                app=app,
            )
        )

    def seen(fan_token: str) -> list[dict[str, Any]]:
        return read_events(broker_client, chaos_app.events_key(fan_token))

    # Done when every context is gone: then nothing can publish a callback any more.
    settle(lambda: all(handle.state is None for handle in handles), timeout=60)
    worker.drain()
    callbacks = Counter(t for t in tokens for e in seen(t) if e["event"] == "callback")
    killed = sum(1 for t in tokens for e in seen(t) if e["event"] == "closer-killed")
    report(
        "7 SIGKILL of the child that closes a fan-in",
        f"{FAN_INS} fan-ins of {PARTS} parts (half of them acks_late)",
        f"{killed} SIGKILL of the closing child between the close and the callback's publish",
        injected=killed,
        overlapping=0,
        completed_twice=sum(n - 1 for n in callbacks.values()),
        lost=sum(1 for t in tokens if not callbacks[t]),
        note=f"{sum(h.state is not None for h in handles)} contexts left",
    )
    assert killed == FAN_INS
    assert callbacks == Counter({t: 1 for t in tokens})
    assert [e["results"] for t in tokens for e in seen(t) if e["event"] == "callback"] == [
        {str(n): n for n in range(PARTS)}
    ] * FAN_INS
