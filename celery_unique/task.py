"""``UniqueTask``: a Celery task class whose ``apply_async`` never publishes a duplicate.

``delay()``, ``apply_async()``, ``signature(...).apply_async()`` and
``self.retry()`` all pass through :meth:`UniqueTask.apply_async`. It resolves
the options (per call, task, settings), builds the key and the owner token,
and puts both in the message headers; :func:`celery_unique.publish.publish`
then takes the lock and publishes along the path the call needs, releasing
the lock again if publishing fails. The worker releases it when the task ends
(:mod:`celery_unique.hooks`).
"""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from celery import Task

from celery_unique import headers, hooks, idempotency, orphans, publish, runs
from celery_unique.conf import (
    LIFETIMES,
    ON_CONFLICT,
    ON_DUPLICATE,
    UNTIL_EXECUTING,
    UNTIL_EXPIRED,
    WHILE_EXECUTING,
    UniqueConf,
    check_choice,
    check_lock_timeout,
    get_conf,
)
from celery_unique.exceptions import ConfigurationError
from celery_unique.keys import (
    ArgumentKey,
    UniqueOn,
    digest,
    family_head,
    family_of,
    lock_key,
    result_key,
)
from celery_unique.lease import Lease
from celery_unique.locks import LockStore, new_owner, new_task_id_and_owner

logger = logging.getLogger(__name__)

#: Options that may be given per call in ``apply_async(unique_options={...})``.
CALL_OPTIONS = frozenset({"unique_on", "lock_timeout", "on_duplicate"})
# The properties that resolve a task's options (a class that defines its own is never cached).
_RESOLVERS = ("unique_lifetime", "unique_lock_timeout")

# Options set only by Celery's canvas machinery (groups, chords, chains, and
# callbacks dispatched by the worker). Deduplicating such a message would hang
# a chord or cut a chain, so these are published as they are unless configured
# otherwise. A caller's own link= does not make a canvas member.
_CANVAS_OPTIONS = ("chord", "group_id")


def _running_request(task: Any) -> Any:
    """The request of a run of ``task`` on this thread, or None (a plain call).

    Read from the task's request stack, not ``task.request``: while another
    thread binds a lazily created task, Celery has marked it bound before it
    makes the stack, and ``task.request`` fails. No run of it is on this
    thread then.
    """
    stack = task.request_stack
    if stack is None or _nothing_pushed(stack):
        return None
    top = stack.top
    return top if top is not None and not top.called_directly else None


def _nothing_pushed(stack: Any) -> bool:
    """Whether nothing was ever pushed on ``stack`` on this thread (every producer's
    case), seen without the two exceptions that ``stack.top`` raises and catches
    then (4 us a call); False when that cannot be seen (another kind of stack)."""
    local = getattr(stack, "_local", None)
    storage = getattr(local, "__storage__", None)
    ident = getattr(local, "__ident_func__", None)  # a thread's, or a greenlet's under gevent
    if type(storage) is not dict or ident is None:
        return False
    return not storage.get(ident(), {}).get("stack")


def _delay_seconds(app: Any, options: Mapping[str, Any]) -> float:
    """How long the message waits in the queue before it may run (countdown/eta)."""
    countdown = options.get("countdown")
    if countdown:
        return max(float(countdown), 0.0)
    eta = options.get("eta")
    if not eta:
        return 0.0
    if isinstance(eta, str):
        eta = datetime.fromisoformat(eta)
    if eta.tzinfo is None:
        eta = eta.replace(tzinfo=app.timezone)
    return max(float((eta - app.now()).total_seconds()), 0.0)


class UniqueTask(Task):  # type: ignore[misc]
    """Base class for tasks that must not be queued or run twice at once.

    Use it as ``@app.task(base=UniqueTask, unique_on=("loan_id",))``.
    """

    #: Argument names that form the key (default: all arguments), or a
    #: callable ``(args, kwargs) -> key material``.
    unique_on: UniqueOn = None
    #: Seconds the lock may live (default: ``unique_lock_timeout``).
    lock_timeout: float | None = None
    #: ``return_existing``, ``raise`` or ``ignore`` (default: ``unique_default_on_duplicate``).
    on_duplicate: str | None = None
    #: When the lock lives: ``until_executed`` (default), ``until_executing``,
    #: ``while_executing``, ``until_and_while_executing`` or ``until_expired``.
    lock: str | None = None
    #: What a run does when its lock is held by another task (worker side):
    #: ``discard`` (ends IGNORED), ``retry`` or ``raise`` (default: ``unique_default_on_conflict``).
    on_conflict: str | None = None
    #: Seconds before a run retried by ``on_conflict="retry"`` tries again.
    conflict_retry_countdown: float = 5.0
    #: Extend a lock held while the task runs every third of its timeout.
    renew_lock: bool = True
    #: Store the outcome under the key and replay it for duplicates and redeliveries.
    idempotent: bool = False
    #: Seconds an outcome is kept (default: ``unique_result_ttl``).
    result_ttl: float | None = None
    #: Store failures too (replayed as the same exception type and message).
    idempotent_failures: bool = False

    #: Releases the lock when the pool child is gone (hard time limit, lost worker).
    Request = f"{hooks.__name__}:{hooks.UniqueRequest.__name__}"

    _unique_argument_key: ArgumentKey | None = None
    # (the app's UniqueConf, its settings generation, the attributes read,
    # (lifetime, lock timeout, on_duplicate)).
    _unique_resolved: tuple[UniqueConf, int, tuple[Any, ...], tuple[str, float, str]] | None = None
    # False for a class that resolves a lifetime or timeout its own way (the compat
    # classes read other settings): resolved at each call, as they may change.
    _unique_resolve_once = True
    _all_arguments_key: ArgumentKey | None = None
    _unique_family_head: tuple[str, str, str] | None = None  # (prefix, task name, keys.family_head)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Wrap the run this class resolves to (its own, or a mixin's) once.
        cls.run = idempotency.replaying(inspect.getattr_static(cls, "run"))
        # Celery's decorator puts each option in the class's body, where a plain
        # function given as unique_on would be bound to the task when read (a
        # subclass's own unique_on method is left as its author wrote it).
        key_function = cls.__dict__.get("unique_on")
        if cls.__dict__.get("_decorated") and isinstance(key_function, types.FunctionType):
            cls.unique_on = staticmethod(key_function)
        # Found wherever the class gets them (a mixin's too), not only in its own body.
        if any(inspect.getattr_static(cls, name) is not UniqueTask.__dict__[name] for name in _RESOLVERS):
            cls._unique_resolve_once = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Celery makes the one instance of a task as it registers it (the
        # decorator, or a lazy app's finalization, as a worker starts): a
        # unique_on that names no parameter is a typo, said here once rather
        # than at the first delay() and again by the worker's checks.
        if self.name and self.unique_on is not None and not callable(self.unique_on):
            self._argument_key(self.unique_on)

    # -- resolved options ---------------------------------------------------

    @property
    def unique_lifetime(self) -> str:
        """The lock lifetime: the ``lock`` attribute, else ``unique_default_lock``."""
        lifetime = check_choice(self.lock or get_conf(self._get_app()).default_lock, LIFETIMES, "lock")
        if self.idempotent and lifetime in (UNTIL_EXECUTING, UNTIL_EXPIRED):
            # Neither holds a lock while the body runs: two runs could store.
            raise ConfigurationError(
                f"{self.name}: idempotent=True needs a lifetime that holds the lock while running"
            )
        return lifetime

    @property
    def unique_lock_timeout(self) -> float:
        return check_lock_timeout(self.lock_timeout or get_conf(self._get_app()).lock_timeout)

    @property
    def unique_on_conflict(self) -> str:
        value = self.on_conflict or get_conf(self._get_app()).default_on_conflict
        return check_choice(value, ON_CONFLICT, "on_conflict")

    def _resolved_options(self, conf: UniqueConf) -> tuple[str, float, str]:
        """(lifetime, lock timeout, on_duplicate), resolved and checked once for the
        task's attributes and the settings as they are (again after either changed)."""
        attributes = (self.lock, self.lock_timeout, self.on_duplicate, self.idempotent)
        generation = conf.generation  # read first: a reload meanwhile makes what follows stale
        resolved = self._unique_resolved
        if (
            resolved is not None
            and resolved[0] is conf
            and resolved[1] == generation
            and resolved[2] == attributes
        ):
            return resolved[3]
        options = (
            self.unique_lifetime,
            self.unique_lock_timeout,
            check_choice(self.on_duplicate or conf.default_on_duplicate, ON_DUPLICATE, "on_duplicate"),
        )
        if self._unique_resolve_once:
            self._unique_resolved = (conf, generation, attributes, options)
        return options

    def check_unique_options(self) -> None:
        """Raise :class:`ConfigurationError` for an option of this task that
        cannot work (what a worker checks before it starts)."""
        # Each property checks the option it resolves.
        names = ["unique_lifetime", "unique_lock_timeout", "unique_on_conflict"]
        for name in names + (["unique_result_ttl"] if self.idempotent else []):
            getattr(self, name)
        if self.on_duplicate is not None:
            check_choice(self.on_duplicate, ON_DUPLICATE, "on_duplicate")
        self._argument_key(self.unique_on)  # unique_on names the task's parameters

    def check_unique_settings(self) -> None:
        """Raise :class:`ConfigurationError` for an app-wide setting this task
        depends on that cannot work: where its locks live (the app's Redis,
        unless a subclass keeps them elsewhere), checked without connecting.
        A worker says each such error once, not once per task."""
        _ = get_conf(self._get_app()).redis_target

    @property
    def unique(self) -> Lease:
        """The current run's lock: ``.fence`` (fencing token) and ``.lost``."""
        lease: Lease = getattr(self.request, runs.STATE, None) or runs.NOTHING_HELD
        return lease

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        runs.begin(self, task_id, args, kwargs)
        super().before_start(task_id, args, kwargs)

    # -- the key --------------------------------------------------------

    def _argument_key(self, unique_on: UniqueOn) -> ArgumentKey:
        if unique_on is not self.unique_on:
            return ArgumentKey(self.name, self.run, unique_on)
        built = self._unique_argument_key
        if built is None:
            built = self._unique_argument_key = ArgumentKey(self.name, self.run, unique_on)
        return built

    def unique_lock_key(
        self,
        args: Any = None,
        kwargs: Any = None,
        unique_options: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """The Redis key of the lock that a call with these arguments takes.

        With an explicit ``idempotency_key`` the key is that, not the arguments.
        """
        if idempotency_key is not None:
            argument_digest = digest({"idempotency_key": idempotency_key})
        else:
            unique_on = (unique_options or {}).get("unique_on", self.unique_on)
            argument_digest = self._argument_key(unique_on).digest(args, kwargs)
        prefix = self.unique_key_prefix
        head = self._unique_family_head
        if head is None or head[0] != prefix or head[1] != self.name:
            head = self._unique_family_head = (prefix, self.name, family_head(prefix, self.name))
        return lock_key(head[2] + argument_digest + "}")

    def arguments_digest(self, args: Any = None, kwargs: Any = None) -> str:
        """Digest of all arguments of a call (to tell an idempotency key's reuse)."""
        built = self._all_arguments_key
        if built is None:
            built = self._all_arguments_key = ArgumentKey(self.name, self.run, None)
        return built.digest(args, kwargs)

    @property
    def unique_result_ttl(self) -> float:
        return check_lock_timeout(self.result_ttl or get_conf(self._get_app()).result_ttl, "result_ttl")

    def stored_outcome(
        self, args: Any = None, kwargs: Any = None, idempotency_key: str | None = None
    ) -> idempotency.Outcome | None:
        """The outcome stored for a call (an idempotent task's), or None."""
        family = family_of(self.unique_lock_key(args, kwargs, idempotency_key=idempotency_key))
        stored = self.unique_store().client.get(result_key(family))
        return idempotency.read(get_conf(self._get_app()).sealer, family, stored.decode()) if stored else None

    def forget_outcome(
        self, args: Any = None, kwargs: Any = None, idempotency_key: str | None = None
    ) -> bool:
        """Delete the stored outcome of a call, so the next call runs again; True if there was one."""
        key = result_key(family_of(self.unique_lock_key(args, kwargs, idempotency_key=idempotency_key)))
        return bool(self.unique_store().client.delete(key))

    # -- publishing -----------------------------------------------------

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        unique_options = options.pop("unique_options", None) or {}
        idempotency_key = options.pop("idempotency_key", None)
        if idempotency_key is not None and not (self.idempotent and isinstance(idempotency_key, str)):
            raise ConfigurationError(f"{self.name}: idempotency_key needs a string and idempotent=True")
        if unique_options and not CALL_OPTIONS.issuperset(unique_options):
            raise ConfigurationError(f"unknown unique_options {sorted(set(unique_options) - CALL_OPTIONS)}")
        app = self._get_app()
        conf = get_conf(app)
        lifetime, task_timeout, task_on_duplicate = self._resolved_options(conf)

        def publish_unlocked() -> Any:
            """Publish without a lock."""
            result = super(UniqueTask, self).apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )
            result.duplicate = False
            return result

        if lifetime == WHILE_EXECUTING:
            if idempotency_key is not None or unique_options.get("unique_on") is not None:
                # The worker keys this lifetime on the arguments it receives.
                raise ConfigurationError(
                    f"{self.name}: idempotency_key and a per-call unique_on need a lifetime that "
                    "locks at delay(), not while_executing"
                )
            # Checked in the worker only. The message carries an owner of its own for
            # its running lock: a caller's task id may name several messages.
            if not task_id:  # as Celery: an empty id is none
                task_id, owner = new_task_id_and_owner()
            else:
                # Published again (a retry, a replace, a lost worker's message): the
                # owner it carried, or its bare id if none, re-enters the running lock.
                owner = headers.run_owner(options.get("headers"), task_id)
                current = _running_request(self)
                if owner == task_id and current is not None and current.id == task_id:
                    owner = headers.run_owner(current, task_id)  # replace() carries no headers
                elif owner == task_id and not options.get("retries"):
                    owner = new_owner(task_id)
            if owner != task_id:
                options["headers"] = {**(options.get("headers") or {}), headers.RUN_OWNER_HEADER: owner}
            return publish_unlocked()
        current = _running_request(self)
        running_lock = headers.from_context(current)
        # The running message published again with its own id: a retry or a
        # replace(). Celery's retry_on_worker_lost does the same from the
        # worker's main process, where no request runs: it counts "retries".
        of_current = current is not None and task_id is not None and task_id == current.id
        republish = of_current or (task_id is not None and bool(options.get("retries")))
        if of_current and running_lock is None:
            # A message that carried no lock (sent by name, or a canvas
            # member) comes back unchecked: dropping it would lose it.
            return publish_unlocked()
        if not republish and self._is_fan_in_message(options):
            # Never deduplicated: a dropped part would leave its fan-in waiting, a
            # dropped callback lose the results. A lifetime with a running lock
            # still keeps their runs apart in the worker; until_executed does not.
            return publish_unlocked()
        if not republish and self._is_canvas_member(options):
            if conf.on_canvas == "bypass":
                logger.info("%s: canvas member published without a uniqueness check", self.name)
                return publish_unlocked()
            if conf.on_canvas == "raise":
                raise ConfigurationError(
                    f"{self.name} is a UniqueTask used in a group, chord or chain "
                    "(unique_on_canvas = 'raise')"
                )

        on_duplicate = task_on_duplicate
        if unique_options.get("on_duplicate"):
            on_duplicate = check_choice(unique_options["on_duplicate"], ON_DUPLICATE, "on_duplicate")
        timeout = (
            check_lock_timeout(unique_options["lock_timeout"])
            if unique_options.get("lock_timeout")
            else task_timeout
        )
        # A message published again keeps its lock: the key and owner its header carries.
        carried = running_lock if of_current else None
        if republish and not of_current:
            carried = headers.from_message_headers(options.get("headers"))
        if carried is not None:
            assert task_id is not None  # a republished message's, given
            key, owner, handover = carried["key"], carried["owner"], carried["owner"]
        else:
            key = self.unique_lock_key(args, kwargs, unique_options, idempotency_key)
            if not task_id:  # as Celery: an empty id is none
                task_id, owner = new_task_id_and_owner()
            else:
                owner = new_owner(task_id)
            # A republished message without a header took its lock in the
            # worker (its bare id); a running task that enqueues its own key
            # hands its lock over; a call may take a lock that an earlier call
            # of this process took, gave up on and never published.
            if republish:
                handover = task_id
            elif running_lock is not None and running_lock["key"] == key:
                handover = running_lock["owner"]
            else:
                handover = orphans.releaser.abandoned(key)
        passes_on = running_lock is not None and running_lock["key"] == key
        ttl_ms = int((timeout + _delay_seconds(app, options)) * 1000)
        given = None
        if self.idempotent:
            # A retry keeps the producer's digest: JSON has turned tuples into lists since.
            given = (carried or {}).get("args") or self.arguments_digest(args, kwargs)

        def send(via: Any = producer) -> Any:
            # Built here, not before the lock is known ours: a duplicate needs no message.
            lock = headers.lock_header(key, owner, timeout, given)
            locked_headers = {**(options.get("headers") or {}), headers.HEADER: lock}
            return super(UniqueTask, self).apply_async(
                args, kwargs, task_id, via, link, link_error, shadow, **{**options, "headers": locked_headers}
            )

        call = publish.LockedCall(
            app, conf, key, task_id, owner, ttl_ms, handover, republish, on_duplicate, producer, send,
            publish_unlocked, given, idempotency_key,
        )  # fmt: skip
        published, result = publish.publish(self, call)
        if published and passes_on:
            runs.passed_on(current)
        return result

    @staticmethod
    def _is_fan_in_message(options: Mapping[str, Any]) -> bool:
        """A fan-in's part, or its callback or errback."""
        found = (options.get("headers") if options else None) or {}
        return headers.FAN_IN_HEADER in found or headers.FAN_IN_CALLBACK_HEADER in found

    @staticmethod
    def _is_canvas_member(options: Mapping[str, Any]) -> bool:
        if not options:
            return False  # a plain delay()
        if "chain" in options or "parent_id" in options:
            # "chain" (even empty) and an explicit parent_id are passed only
            # by Celery's chain and callback dispatch.
            return True
        return any(options.get(name) for name in _CANVAS_OPTIONS)

    def unique_store(self) -> LockStore:
        """The lock store of this task's locks: the app's, unless a subclass keeps
        them elsewhere (the compat classes). The producer and the worker's hooks
        both find it here, so they agree."""
        return get_conf(self._get_app()).locks

    def unique_location(self) -> str:
        """Where :meth:`unique_store` is, for messages (``host:port``; never a
        password), found without connecting: "" when it cannot be said."""
        try:
            return get_conf(self._get_app()).location
        except ConfigurationError:
            return ""

    @property
    def unique_key_prefix(self) -> str:
        """The key prefix of this task's locks (``unique_key_prefix`` unless a subclass says otherwise)."""
        return get_conf(self._get_app()).key_prefix
