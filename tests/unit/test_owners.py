"""Task ids and owner tokens that delay() makes for a call."""

from __future__ import annotations

import uuid

import redis

from celery_unique.locks import _set_acquisition, new_task_id_and_owner, task_id_of


def test_a_new_task_id_is_a_random_uuid_as_celery_makes_them_and_its_owner_names_it() -> None:
    made = [new_task_id_and_owner() for _ in range(2000)]
    for task_id, owner in made:
        parsed = uuid.UUID(task_id)
        assert str(parsed) == task_id  # Celery's spelling: lowercase, hyphens
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert task_id_of(owner) == task_id and owner != task_id
    assert len({task_id for task_id, _ in made}) == len(made)
    assert len({owner for _, owner in made}) == len(made)
    # Every digit but the version's is random, the variant's two bits among them, and
    # they are bits of their own: not read from the digit after the variant's.
    assert {task_id[19] for task_id, _ in made} == set("89ab")
    assert len({task_id[19:21] for task_id, _ in made}) > 16


def test_a_set_answer_is_read_as_the_acquire_script_answers() -> None:
    """SET ... NX GET and the PTTL after it, which are not one atomic step."""
    taken = _set_acquisition("me", 5_000, None, 5_000)
    assert taken.acquired and taken.holder == "me" and taken.ttl_ms == 5_000
    held = _set_acquisition("me", 5_000, b"other", 1_234)
    assert not held.acquired and held.holder == "other" and held.ttl == 1.234
    assert _set_acquisition("me", 5_000, b"me", 900).acquired  # our own earlier attempt took it
    assert _set_acquisition("me", 5_000, b"other", -1).ttl is None  # no expiry, as the script says
    # Released between the SET and the PTTL, or the PTTL refused: at its end, not for ever.
    assert _set_acquisition("me", 5_000, b"other", -2).ttl == 0
    assert _set_acquisition("me", 5_000, b"other", redis.ResponseError("MOVED 1 h:1")).ttl == 0
    # The SET ran and took it: the PTTL's error changes nothing.
    assert _set_acquisition("me", 5_000, None, redis.ResponseError("MOVED 1 h:1")).acquired
