"""Reading celery-unique's message headers (no Redis: what a request carries)."""

from __future__ import annotations

from types import SimpleNamespace

from celery_unique.headers import RUN_OWNER_HEADER, run_owner


def test_a_run_owner_of_the_message_s_own_task_id_is_its_running_lock_owner() -> None:
    owner = "abc#0123456789ab"
    assert run_owner({RUN_OWNER_HEADER: owner}, "abc") == owner  # a worker's request_dict
    assert run_owner(SimpleNamespace(**{RUN_OWNER_HEADER: owner}), "abc") == owner  # task.request
    assert run_owner(SimpleNamespace(headers={RUN_OWNER_HEADER: owner}), "abc") == owner  # an eager apply()


def test_without_one_or_with_another_task_s_the_task_id_owns_it() -> None:
    assert run_owner({}, "abc") == "abc"
    assert run_owner(None, "abc") == "abc"
    assert run_owner(SimpleNamespace(headers=None), "abc") == "abc"
    assert run_owner({RUN_OWNER_HEADER: "other#0123456789ab"}, "abc") == "abc"
    assert run_owner({RUN_OWNER_HEADER: "abcd#0123456789ab"}, "abc") == "abc"
    assert run_owner({RUN_OWNER_HEADER: 42}, "abc") == "abc"
