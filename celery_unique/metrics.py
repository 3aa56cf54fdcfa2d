"""Optional Prometheus counters, fed by :mod:`celery_unique.signals`.

Off unless asked for: ``celery_unique.metrics.enable_prometheus()`` (with the
``prometheus`` extra installed) registers the counters and connects them;
call it once per process, e.g. where the Celery app is created.
"""

from __future__ import annotations

from typing import Any

from celery_unique import signals
from celery_unique.exceptions import ConfigurationError

_COUNTERS = (
    ("lock_acquired", "celery_unique_locks_acquired", "Locks taken by delay()", ("task",)),
    ("duplicate_rejected", "celery_unique_duplicates", "delay() calls found a duplicate", ("task",)),
    ("lock_conflict", "celery_unique_conflicts", "Runs that found their lock held", ("task", "policy")),
    ("lock_released", "celery_unique_locks_released", "Locks released", ("task", "why")),
    ("lock_lost", "celery_unique_locks_lost", "Locks lost while a task ran", ("task",)),
    ("fan_in_completed", "celery_unique_fan_ins_completed", "Fan-ins whose callback ran", ()),
    ("fan_in_failed", "celery_unique_fan_ins_failed", "Fan-ins that failed or expired", ("reason",)),
)


def _labels(names: tuple[str, ...], sender: Any, kwargs: dict[str, Any]) -> dict[str, str]:
    values = {"task": getattr(sender, "name", "") or "", **{k: str(v) for k, v in kwargs.items()}}
    return {name: values.get(name, "") for name in names}


def enable_prometheus(registry: Any = None) -> dict[str, Any]:
    """Register and connect the counters; returns them by signal name."""
    try:
        from prometheus_client import REGISTRY, Counter
    except ImportError as exc:
        raise ConfigurationError(
            "enable_prometheus() needs prometheus_client: pip install celery-unique[prometheus]"
        ) from exc
    counters: dict[str, Any] = {}
    for signal_name, metric, documentation, labels in _COUNTERS:
        counter = Counter(metric, documentation, labels, registry=registry or REGISTRY)
        counters[signal_name] = counter

        def count(
            sender: Any = None, _counter: Any = counter, _labels_of: Any = labels, **kwargs: Any
        ) -> None:
            target = _counter.labels(**_labels(_labels_of, sender, kwargs)) if _labels_of else _counter
            target.inc()

        getattr(signals, signal_name).connect(
            count, weak=False, dispatch_uid=f"celery_unique.metrics.{metric}"
        )
    return counters
