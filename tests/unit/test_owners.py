"""Task ids and owner tokens that delay() makes for a call."""

from __future__ import annotations

import uuid

from celery_unique.locks import new_task_id_and_owner, task_id_of


def test_a_new_task_id_is_a_random_uuid_as_celery_makes_them_and_its_owner_names_it() -> None:
    made = [new_task_id_and_owner() for _ in range(2000)]
    for task_id, owner in made:
        parsed = uuid.UUID(task_id)
        assert str(parsed) == task_id  # Celery's spelling: lowercase, hyphens
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert task_id_of(owner) == task_id and owner != task_id
    assert len({task_id for task_id, _ in made}) == len(made)
    assert len({owner for _, owner in made}) == len(made)
    # Every digit but the version's is random, the variant's two bits among them.
    assert {task_id[19] for task_id, _ in made} == set("89ab")
