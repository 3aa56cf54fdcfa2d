"""Signals for observers (metrics, audit logs), sent by celery-unique.

Connect as to any Celery signal: ``lock_acquired.connect(receiver)``. A
signal nobody listens to costs a dictionary lookup. Every one is sent with
``sender`` = the task (or the app, for fan-ins) and carries digests, never
raw arguments.

====================== ========================================= ==================
signal                 when                                      arguments
====================== ========================================= ==================
``lock_acquired``      ``delay()`` took a lock and published     task_id, key_digest
``duplicate_rejected`` ``delay()`` found the lock held           existing_id, key_digest
``lock_conflict``      a starting run found its lock held        task_id, existing_id,
                                                                 key_digest, policy
``lock_released``      a lock was released (owner-checked)       owner, key_digest, why
``lock_lost``          renewal found a running task's lock gone  owner, key_digest
``fan_in_completed``   a fan-in's callback was published         token, parts
``fan_in_failed``      a fan-in failed or expired                token, reason
====================== ========================================= ==================
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

lock_acquired = Signal(name="lock_acquired")
duplicate_rejected = Signal(name="duplicate_rejected")
lock_conflict = Signal(name="lock_conflict")
lock_released = Signal(name="lock_released")
lock_lost = Signal(name="lock_lost")
fan_in_completed = Signal(name="fan_in_completed")
fan_in_failed = Signal(name="fan_in_failed")
