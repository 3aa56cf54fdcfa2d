"""Optional Prometheus counters, fed by :mod:`celery_unique.signals`.

With the ``prometheus`` extra installed they are on by default: the first
use of the locks in a process (a producer's first ``delay()``, a worker's
startup checks, a pool child's first run) registers them in the default
registry. The
``unique_prometheus`` setting turns them off (``False``) or insists on them
(``True``). :func:`enable_prometheus` registers them in a registry of your
own.
"""

from __future__ import annotations

import importlib.util
import threading
from typing import Any

from celery_unique import signals
from celery_unique.exceptions import ConfigurationError

_COUNTERS = (
    ("lock_acquired", "celery_unique_locks_acquired", "Locks taken by delay()", ("task",)),
    ("duplicate_rejected", "celery_unique_duplicates", "delay() calls found a duplicate", ("task",)),
    ("lock_conflict", "celery_unique_conflicts", "Runs that found their lock held", ("task", "policy")),
    ("lock_released", "celery_unique_locks_released", "Locks released", ("task", "why")),
    ("lock_lost", "celery_unique_locks_lost", "Locks lost while a task ran", ("task",)),
    ("lock_reaped", "celery_unique_locks_reaped", "Locks freed by the reaper", ("task", "reason")),
    ("fan_in_completed", "celery_unique_fan_ins_completed", "Fan-ins whose callback ran", ()),
    ("fan_in_failed", "celery_unique_fan_ins_failed", "Fan-ins that failed or expired", ("reason",)),
    ("seal_broken", "celery_unique_seals_broken", "Stored values that did not verify", ("purpose",)),
)


def _label(name: str, sender: Any, kwargs: dict[str, Any]) -> str:
    if name == "task":
        return getattr(sender, "name", "") or ""
    return str(kwargs.get(name, ""))


def _receiver(counter: Any, labels: tuple[str, ...]) -> Any:
    """A signal receiver that counts; the labelled children are kept, since
    looking one up in prometheus_client costs more than the signal itself."""
    if not labels:
        return lambda sender=None, **kwargs: counter.inc()
    if labels == ("task",):  # the lock signals of every delay(): the shortest way
        by_task: dict[str, Any] = {}

        def count_task(sender: Any = None, **kwargs: Any) -> None:
            name = getattr(sender, "name", "") or ""
            child = by_task.get(name)
            if child is None:
                child = by_task[name] = counter.labels(name)
            child.inc()

        return count_task
    children: dict[tuple[str, ...], Any] = {}

    def count(sender: Any = None, **kwargs: Any) -> None:
        values = tuple(_label(name, sender, kwargs) for name in labels)
        child = children.get(values)
        if child is None:
            child = children[values] = counter.labels(*values)
        child.inc()

    return count


# The counters of each registry they are in, and who may change that.
_enabled: dict[Any, dict[str, Any]] = {}
_enabling = threading.Lock()


def installed() -> bool:
    """Whether prometheus_client can be imported."""
    return importlib.util.find_spec("prometheus_client") is not None


def enable_prometheus(registry: Any = None) -> dict[str, Any]:
    """Register and connect the counters (once per registry; the default one
    unless given); returns them by signal name."""
    try:
        from prometheus_client import REGISTRY, Counter
    except ImportError as exc:
        raise ConfigurationError(
            "the Prometheus counters need prometheus_client: pip install celery-unique[prometheus]"
        ) from exc
    registry = registry or REGISTRY
    with _enabling:
        found = _enabled.get(registry)
        if found is not None:
            return found
        counters: dict[str, Any] = {}
        for signal_name, metric, documentation, labels in _COUNTERS:
            counter = Counter(metric, documentation, labels, registry=registry)
            counters[signal_name] = counter
            getattr(signals, signal_name).connect(
                _receiver(counter, labels), weak=False, dispatch_uid=_uid(registry, metric)
            )
        _enabled[registry] = counters
    return counters


def disable_prometheus(registry: Any = None) -> None:
    """Disconnect the counters of a registry (the default one unless given) and unregister them."""
    from prometheus_client import REGISTRY

    registry = registry or REGISTRY
    with _enabling:
        counters = _enabled.pop(registry, {})
        for signal_name, metric, _, _ in _COUNTERS:
            if signal_name in counters:
                getattr(signals, signal_name).disconnect(dispatch_uid=_uid(registry, metric))
                registry.unregister(counters[signal_name])


def enable_as_configured(setting: bool | None) -> None:
    """``unique_prometheus``: None (on when prometheus_client is installed), True or False.

    Counters are process-wide: an app that turns them on turns them on for
    every app of the process.
    """
    if setting is False or (setting is None and not installed()):
        return
    enable_prometheus()


def _uid(registry: Any, metric: str) -> str:
    return f"celery_unique.metrics.{id(registry)}.{metric}"
