"""Split contexts: a shared context that many jobs add to, without read-modify-write.

A context is a *base* plus an append-only *log* of entries. Jobs only append
(one ``RPUSH``), so parallel jobs never overwrite each other's additions; a
reader sees the base and then the entries in order. When the log grows, one
process compacts it under a lock: it folds the entries it read into a new
base and trims exactly those entries, so entries appended meanwhile survive.
All keys of one context share one hash tag (one cluster slot). With
``unique_encryption_key`` the base and every entry are encrypted.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from celery_unique import scripts
from celery_unique.conf import get_conf
from celery_unique.keys import context_family
from celery_unique.sealing import CONTEXT

Merge = Callable[[Any, Any], Any]


def merge_dicts(base: Any, entry: Any) -> Any:
    """The default fold: dictionaries are updated, key by key."""
    return {**(base or {}), **entry}


class Context:
    """A named split context in the app's Redis."""

    def __init__(self, app: Any, name: str, ttl: float | None = None) -> None:
        conf = get_conf(app)
        family = context_family(conf.key_prefix, name)
        self.name = name
        self.client = conf.locks.client
        self._sealer = conf.sealer  # entries are encrypted when unique_encryption_key is set
        self.ttl_ms = int(ttl * 1000) if ttl else None
        self.base_key, self.log_key, self.lock_key = family + ":base", family + ":log", family + ":compact"
        self._view = self.client.register_script(scripts.CONTEXT_VIEW)
        self._compact = self.client.register_script(scripts.CONTEXT_COMPACT)

    def append(self, entry: Any) -> int:
        """Add an entry (JSON); returns how many entries the log holds now."""
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(self.log_key, self._seal(json.dumps(entry, allow_nan=False)))
        if self.ttl_ms:
            pipe.pexpire(self.log_key, self.ttl_ms)
            pipe.pexpire(self.base_key, self.ttl_ms)
        return int(pipe.execute()[0])

    def view(self) -> tuple[Any, list[Any]]:
        """(base, entries in the order they were appended)."""
        base, entries = self._view(keys=[self.base_key, self.log_key])
        return (self._open(base) if base else None), [self._open(e) for e in entries]

    def _seal(self, text: str) -> str:
        return self._sealer.maybe_seal(CONTEXT, self.name, text)

    def _open(self, stored: Any) -> Any:
        value = stored.decode() if isinstance(stored, bytes) else stored
        return json.loads(self._sealer.maybe_open(CONTEXT, self.name, value))

    def value(self, merge: Merge = merge_dicts) -> Any:
        """The context as one value: the entries folded into the base."""
        base, entries = self.view()
        for entry in entries:
            base = merge(base, entry)
        return base

    def compact(self, merge: Merge = merge_dicts, lock_timeout: float = 30.0) -> bool:
        """Fold the log into the base under a lock; False if another process is compacting."""
        owner = uuid.uuid4().hex
        if not self.client.set(self.lock_key, owner, nx=True, px=int(lock_timeout * 1000)):
            return False
        base, entries = self.view()
        for entry in entries:
            base = merge(base, entry)
        new_base = self._seal(json.dumps(base, allow_nan=False))
        keys = [self.base_key, self.log_key, self.lock_key]
        ttl = "" if self.ttl_ms is None else self.ttl_ms
        return bool(self._compact(keys=keys, args=[owner, new_base, len(entries), ttl]))

    def delete(self) -> None:
        self.client.delete(self.base_key, self.log_key, self.lock_key)
