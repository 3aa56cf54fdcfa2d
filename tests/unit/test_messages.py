"""Finding owner tokens and task ids in raw kombu messages (the reaper's evidence)."""

from __future__ import annotations

import json

from celery_unique.messages import identities


def message(task_id: str, owner: str | None, **headers: object) -> str:
    found = {"lang": "py", "task": "t", "id": task_id, **headers}
    if owner is not None:
        found["celery_unique"] = {"key": "k", "owner": owner, "timeout": 60.0}
    return json.dumps({"body": "W10=", "headers": found, "properties": {"correlation_id": task_id}})


def test_the_owner_and_the_task_id_are_found() -> None:
    assert set(identities(message("abc", "abc#0123456789ab"))) == {"abc", "abc#0123456789ab"}


def test_ids_that_json_escapes_are_found_as_they_are() -> None:
    for task_id in ['q"uote', "back\\slash", "é\u2028", "{brace}:*[x]"]:
        assert set(identities(message(task_id, task_id + "#0123456789ab"))) == {
            task_id,
            task_id + "#0123456789ab",
        }


def test_a_lookalike_inside_a_string_is_not_taken_for_a_key() -> None:
    fake = 'x", "celery_unique": {"owner": "stolen"}, "id": "forged'
    found = set(identities(message("real", None, kwargsrepr=fake)))
    assert found == {"real"}


def test_a_message_without_a_lock_header_gives_its_task_id() -> None:
    assert set(identities(message("by-name", None))) == {"by-name"}


def test_a_cut_message_gives_what_it_can_and_does_not_raise() -> None:
    whole = message("abc", "abc#0123456789ab")
    assert set(identities(whole[: whole.index('"celery_unique"') + 20])) == {"abc"}


def test_the_running_lock_owner_of_a_message_without_a_lock_header_is_found() -> None:
    """A while_executing message names the owner of its running lock (its own header)."""
    found = set(identities(message("abc", None, celery_unique_run_owner="abc#0123456789ab")))
    assert found == {"abc", "abc#0123456789ab"}
