"""Signals for observers (metrics, audit logs), sent by celery-unique.

Connect as to any Celery signal: ``lock_acquired.connect(receiver)``. A
signal nobody listens to costs a dictionary lookup. The lock signals are sent
with ``sender`` = the task, the fan-in signals with ``sender`` = the app; all
carry digests, never raw arguments.

====================== ============================================== =========================
signal                 when                                           arguments
====================== ============================================== =========================
``lock_acquired``      ``delay()`` took a lock and published          task_id, key_digest
``duplicate_rejected`` ``delay()`` found the lock held                existing_id, key_digest
``lock_conflict``      a starting run found its lock held             task_id, existing_id,
                                                                      key_digest, policy
``lock_released``      a run gave its lock back (owner-checked): at   owner, key_digest, why
                       its start (``why="started"``), its end (the
                       state), a revoke, a time limit, a lost worker
``lock_lost``          renewal found a running task's lock gone       owner, key_digest
``lock_reaped``        the reaper freed a lock whose message is gone  owner, key_digest,
                       (:mod:`celery_unique.reaper`)                  task_name, reason
``fan_in_completed``   a fan-in's callback was published              token, parts
``fan_in_failed``      a fan-in failed or expired                     token, reason
``seal_broken``        a stored value did not verify (a forgery, or   purpose
                       processes configured with different keys):
                       it was not used
====================== ============================================== =========================

A lock released by hand (``celery unique release``) or because its publish
failed, or one that simply expired, sends nothing.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = [
    "duplicate_rejected",
    "fan_in_completed",
    "fan_in_failed",
    "lock_acquired",
    "lock_conflict",
    "lock_lost",
    "lock_reaped",
    "lock_released",
    "seal_broken",
]

lock_acquired = Signal(name="lock_acquired")
duplicate_rejected = Signal(name="duplicate_rejected")
lock_conflict = Signal(name="lock_conflict")
lock_released = Signal(name="lock_released")
lock_lost = Signal(name="lock_lost")
lock_reaped = Signal(name="lock_reaped")
fan_in_completed = Signal(name="fan_in_completed")
fan_in_failed = Signal(name="fan_in_failed")
seal_broken = Signal(name="seal_broken")
