"""Looking at the locks and stored outcomes in Redis: list them, release them by hand.

Uses SCAN only (never KEYS), so it is safe on a busy production Redis.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from celery_unique import idempotency
from celery_unique.conf import get_conf
from celery_unique.keys import KEY_VERSION, digest_of_key, tag_name, task_name_of_tag


@dataclass(frozen=True)
class LockInfo:
    """One lock found in Redis."""

    key: str
    task_name: str
    digest: str
    kind: str  # "lock" (queued), "run" (running) or "result" (an idempotent outcome)
    holder: str | None  # the holding task id (for "result": the task that stored it)
    ttl: float | None

    def line(self) -> str:
        """One line for a listing."""
        ttl = "-" if self.ttl is None else f"{self.ttl:.1f}s"
        return f"{self.key}  {self.kind}  holder={self.holder}  ttl={ttl}"


def _task_of(key: str) -> str:
    tag = key[key.index("{") + 1 : key.rindex("}")]
    return task_name_of_tag(tag.rpartition(":")[0])


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a SCAN pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def iter_locks(app: Any, task_name: str | None = None, count: int = 500) -> Iterator[LockInfo]:
    """Every lock and stored outcome of ``app``'s key prefix (optionally of one task), via SCAN."""
    conf = get_conf(app)
    store = conf.locks
    tag = f"{{{_glob_escape(tag_name(task_name))}:*}}" if task_name else "{*}"
    for kind in ("lock", "run", "result"):
        pattern = f"{conf.key_prefix}:{KEY_VERSION}:{tag}:{kind}"
        for raw in store.client.scan_iter(match=pattern, count=count):
            key = raw.decode() if isinstance(raw, bytes) else raw
            value, ttl = store.holder(key)
            if value is None:
                continue  # gone between SCAN and GET
            holder = idempotency.decode(value).task_id if kind == "result" else value
            yield LockInfo(key, _task_of(key), digest_of_key(key), kind, holder, ttl)


def force_release(app: Any, key: str) -> bool:
    """Delete a lock (or a stored outcome) whoever holds it (an operator's decision); True if it existed."""
    conf = get_conf(app)
    if not key.startswith(f"{conf.key_prefix}:{KEY_VERSION}:{{") or not key.endswith(
        (":lock", ":run", ":result")
    ):
        raise ValueError(f"not a celery-unique lock key of this app: {key!r}")
    return bool(conf.locks.client.delete(key))
