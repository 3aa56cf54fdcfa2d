"""Unique and idempotent Celery tasks on Redis."""

from celery_unique.aggregate import Aggregator, FanIn, fan_in
from celery_unique.context import Context
from celery_unique.exceptions import (
    AlreadyQueued,
    ConfigurationError,
    DuplicateTaskError,
    IdempotencyConflict,
    LockBackendError,
    LockConflictError,
    ReplayedError,
    SealBroken,
    UniqueError,
    UniqueKeyError,
)
from celery_unique.task import UniqueTask

__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "AlreadyQueued",
    "ConfigurationError",
    "Context",
    "DuplicateTaskError",
    "FanIn",
    "IdempotencyConflict",
    "LockBackendError",
    "LockConflictError",
    "ReplayedError",
    "SealBroken",
    "UniqueError",
    "UniqueKeyError",
    "UniqueTask",
    "__version__",
    "fan_in",
]
