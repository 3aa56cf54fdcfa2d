"""The public surface: exports, the exception hierarchy, settings validation."""

from __future__ import annotations

import contextlib
import pickle
import socket
import threading
from typing import Any

import pytest
import redis
from celery import Celery

import celery_unique
from celery_unique import exceptions
from celery_unique.conf import DEFAULTS, get_conf


def test_all_is_sorted_and_complete() -> None:
    assert celery_unique.__all__ == sorted(celery_unique.__all__)
    for name in celery_unique.__all__:
        assert hasattr(celery_unique, name)
    public_errors = {
        name
        for name, value in vars(exceptions).items()
        if isinstance(value, type)
        and issubclass(value, Exception)
        and value.__module__ == exceptions.__name__
        and not name.startswith("_")
    }
    assert public_errors <= set(celery_unique.__all__)


# One of each error, as its callers build them.
ERRORS = [
    exceptions.UniqueError("boom"),
    exceptions.ConfigurationError("bad"),
    exceptions.UniqueKeyError("bad key"),
    exceptions.LockBackendError("down"),
    exceptions.DuplicateTaskError("proj.add", "ab" * 32, "task-id", 12.5),
    exceptions.AlreadyQueued(12.5, "proj.add", "ab" * 32, "task-id"),
    exceptions.AlreadyQueued(10),
    exceptions.LockConflictError("proj.add", "ab" * 32, "task-id", None),
    exceptions.IdempotencyConflict("proj.add", "order-1", "ab" * 32, "cd" * 32),
    exceptions.ReplayedError("CardDeclined", "insufficient funds"),
    exceptions.SealBroken("fan-in callback"),
]


@pytest.mark.parametrize("error", ERRORS, ids=repr)
def test_errors_derive_from_one_base_and_pickle(error: exceptions.UniqueError) -> None:
    assert isinstance(error, exceptions.UniqueError)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)


@pytest.mark.parametrize("error", ERRORS, ids=repr)
def test_errors_come_back_whole_from_a_json_result_backend(error: exceptions.UniqueError) -> None:
    """Celery stores a task's exception as its type and ``args`` and rebuilds it as
    ``type(*args)`` (JSON results, the default): a caller's ``get()`` raises the same error."""
    backend = Celery(backend="cache+memory://", set_as_current=False).backend
    copy = backend.exception_to_python(backend.prepare_exception(error, serializer="json"))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)


def test_duplicate_error_carries_its_data_without_arguments() -> None:
    error = exceptions.DuplicateTaskError("proj.add", "ab" * 32, "task-id", 12.5)
    assert (error.existing_id, error.ttl, error.key_digest) == ("task-id", 12.5, "ab" * 32)
    assert "task-id" in str(error)


def _app(**conf: Any) -> Celery:
    app = Celery("conf-test", broker="redis://127.0.0.1:1/3", set_as_current=False)
    app.conf.update(conf)
    return app


def test_defaults_apply_when_nothing_is_set() -> None:
    conf = get_conf(_app())
    assert conf.lock_timeout == DEFAULTS["unique_lock_timeout"]
    assert conf.key_prefix == "celery_unique"
    assert conf.default_on_duplicate == "return_existing"
    assert conf.on_redis_error == "raise"
    assert conf.redis_url == "redis://127.0.0.1:1/3"
    assert conf.lock_replicas == 0


def test_replicas_wait_half_the_socket_timeout() -> None:
    conf = get_conf(_app(unique_lock_replicas=2, unique_redis_socket_timeout=0.5))
    assert conf.lock_replicas == 2
    assert conf.replica_timeout_ms == 250
    assert get_conf(_app(unique_redis_socket_timeout=0.001)).replica_timeout_ms == 1  # never 0: forever


def test_settings_are_read_from_app_conf_and_reload() -> None:
    app = _app(unique_lock_timeout=5, unique_redis_url="redis://127.0.0.1:2/0")
    conf = get_conf(app)
    assert conf.lock_timeout == 5.0
    assert conf.redis_url == "redis://127.0.0.1:2/0"
    app.conf.unique_lock_timeout = 7
    conf.reload()
    assert conf.lock_timeout == 7.0


@pytest.mark.parametrize(
    ("setting", "before", "after", "read"),
    [
        ("unique_key_prefix", "old", "new", lambda c: c.key_prefix),
        ("unique_redis_url", "redis://127.0.0.1:2/0", "redis://127.0.0.1:3/0", lambda c: c.locks.location),
        ("unique_signing_key", "old-key-" * 4, "new-key-" * 4, lambda c: c.sealer._signing[0]),
    ],
)
def test_a_reload_during_a_read_leaves_nothing_stale(
    setting: str, before: str, after: str, read: Any
) -> None:
    """A value cached by a read that a reload overtook (another thread, Django's
    setting_changed) belongs to the settings before it: it is not kept after."""
    app = _app(**{setting: before})
    conf = get_conf(app)
    expected_after = read(get_conf(_app(**{setting: after})))
    settings_read = conf._get

    def read_while_reloaded(name: str) -> Any:
        value = settings_read(name)
        if name == setting and app.conf.get(setting) == before:
            app.conf[setting] = after
            conf.reload()  # what the other thread does meanwhile
        return value

    conf._get = read_while_reloaded  # type: ignore[method-assign]
    read(conf)  # began before the reload: the old value, for this call only
    conf._get = settings_read  # type: ignore[method-assign]
    assert read(conf) == expected_after


def test_redis_url_falls_back_to_a_redis_result_backend() -> None:
    app = Celery(
        "x", broker="amqp://guest@localhost//", backend="redis://127.0.0.1:4/1", set_as_current=False
    )
    assert get_conf(app).redis_url == "redis://127.0.0.1:4/1"


def test_missing_redis_is_a_configuration_error() -> None:
    app = Celery("x", broker="amqp://guest@localhost//", set_as_current=False)
    with pytest.raises(exceptions.ConfigurationError, match="unique_redis_url"):
        _ = get_conf(app).redis_url


@pytest.mark.parametrize(
    ("setting", "value", "attribute"),
    [
        ("unique_lock_timeout", 0, "lock_timeout"),
        ("unique_lock_timeout", "10", "lock_timeout"),
        ("unique_default_on_duplicate", "drop", "default_on_duplicate"),
        ("unique_on_redis_error", "ignore", "on_redis_error"),
        ("unique_key_prefix", "a{b}", "key_prefix"),
        ("unique_redis_url", 5, "redis_url"),
        ("unique_result_ttl", -1, "result_ttl"),
        ("unique_redis_socket_timeout", "5s", "socket_timeout"),
        ("unique_redis_connect_timeout", 0, "connect_timeout"),
        ("unique_lock_replicas", -1, "lock_replicas"),
        ("unique_lock_replicas", 1.5, "lock_replicas"),
        ("unique_lock_replicas", True, "lock_replicas"),
        ("unique_lock_replicas", "1", "lock_replicas"),
    ],
)
def test_invalid_settings_are_configuration_errors(setting: str, value: Any, attribute: str) -> None:
    with pytest.raises(exceptions.ConfigurationError, match=setting.removeprefix("unique_")):
        getattr(get_conf(_app(**{setting: value})), attribute)


def test_a_sentinel_broker_is_used_with_its_master_name() -> None:
    app = Celery(
        "x",
        broker="sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380",
        set_as_current=False,
    )
    app.conf.broker_transport_options = {"master_name": "mymaster"}
    url, options = get_conf(app).redis_target
    assert url == "sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380"
    assert options == {"master_name": "mymaster"}


def test_a_sentinel_url_without_a_master_name_is_a_configuration_error() -> None:
    app = _app(unique_redis_url="sentinel://127.0.0.1:26379")
    with pytest.raises(exceptions.ConfigurationError, match="master_name"):
        _ = get_conf(app).redis_url


def test_clients_match_the_url_scheme() -> None:
    from redis.sentinel import SentinelConnectionPool

    from celery_unique.clients import make_client

    # Neither connects yet (a cluster client would: it is tested on a real cluster).
    sentinel = make_client("sentinel://:secret@127.0.0.1:26379/2", {"master_name": "m"})
    assert isinstance(sentinel.connection_pool, SentinelConnectionPool)
    assert sentinel.connection_pool.connection_kwargs["db"] == 2
    assert sentinel.connection_pool.connection_kwargs["password"] == "secret"
    assert isinstance(make_client("redis://127.0.0.1:1/0"), redis.Redis)
    with pytest.raises(exceptions.ConfigurationError, match="database 0"):
        make_client("redis+cluster://127.0.0.1:1/3")


def test_an_unknown_scheme_is_reported_without_the_url() -> None:
    app = _app(unique_redis_url="mongodb://user:secret@host/db")
    with pytest.raises(exceptions.ConfigurationError) as raised:
        _ = get_conf(app).redis_url
    assert "'mongodb'" in str(raised.value) and "secret" not in str(raised.value)


def test_errors_lists_every_invalid_setting() -> None:
    conf = get_conf(_app(unique_default_lock="sometimes", unique_redis_socket_timeout="5s"))
    assert sorted(str(e).split()[0] for e in conf.errors()) == [
        "unique_default_lock",
        "unique_redis_socket_timeout",
    ]
    assert get_conf(_app()).errors() == []


def test_configuration_errors_name_each_task_and_its_option() -> None:
    from celery_unique import UniqueTask
    from celery_unique.checks import configuration_errors

    app = _app()
    assert configuration_errors(app) == []  # an app without unique tasks has nothing to check

    def task(name: str, **options: Any) -> None:
        @app.task(base=UniqueTask, name=name, shared=False, **options)
        def run(order_id: int) -> None: ...

    task("fine")
    task("lifetime", lock="until_execute")
    task("duplicate", on_duplicate="drop")
    task("timeout", lock_timeout=-5)
    task("stored", idempotent=True, lock="until_expired")
    found = {str(error).split(":")[0]: str(error) for error in configuration_errors(app)}
    assert sorted(found) == ["duplicate", "lifetime", "stored", "timeout"]
    assert "until_execute" in found["lifetime"] and "'drop'" in found["duplicate"]
    assert "-5" in found["timeout"]


def test_a_unique_on_typo_is_an_error_as_the_task_is_registered() -> None:
    """Not at the first delay(): as the decorator runs on a finalized app, or as a
    lazy app registers its tasks (a worker's start), with the task named once."""
    from celery_unique import UniqueTask

    ready = _app()
    ready.finalize()
    with pytest.raises(exceptions.ConfigurationError) as raised:

        @ready.task(base=UniqueTask, name="names", shared=False, unique_on=("order",))
        def run(order_id: int) -> None: ...

    assert str(raised.value) == "names: unique_on names ['order'] are not parameters of the task"

    lazy = _app()

    @lazy.task(base=UniqueTask, name="bound", bind=True, shared=False, unique_on=("self",))
    def bound(self: Any, order_id: int) -> None: ...

    with pytest.raises(exceptions.ConfigurationError, match=r"bound: unique_on names \['self'\]"):
        lazy.finalize()

    fine = _app()

    @fine.task(base=UniqueTask, name="fine", bind=True, shared=False, unique_on=("order_id",))
    def good(self: Any, order_id: int) -> None: ...

    fine.finalize()
    assert fine.tasks["fine"].unique_lock_key((1,)) == fine.tasks["fine"].unique_lock_key((), {"order_id": 1})


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://admin:hunter2/x@127.0.0.1:7000",  # an unquoted "/" in the password
        "sentinel://:hunter2@127.0.0.1:99999",  # a port out of range
        "u:hunter2@127.0.0.1:6379",  # no scheme at all (its first characters hold the password)
    ],
)
def test_a_bad_url_is_a_configuration_error_without_its_secret(url: str) -> None:
    app = _app(unique_redis_url=url, unique_redis_transport_options={"master_name": "m"})
    with pytest.raises(exceptions.ConfigurationError) as raised:
        _ = get_conf(app).redis_url
    assert "hunter2" not in str(raised.value)


def test_the_first_node_gives_credentials_and_tls_options_to_every_node() -> None:
    from celery_unique.clients import _first_node_options

    options = _first_node_options(
        "rediss+cluster://app%40tenant:p%2Fss@10.0.0.1:7000?ssl_cert_reqs=none;rediss+cluster://10.0.0.2:7000"
    )
    assert options == {"username": "app@tenant", "password": "p/ss", "ssl": True, "ssl_cert_reqs": "none"}


def test_sentinels_keep_the_timeouts_when_they_have_their_own_password() -> None:
    from celery_unique.clients import make_client

    client = make_client(
        "sentinel://127.0.0.1:26379",
        {"master_name": "m", "sentinel_kwargs": {"password": "sentinel-secret"}},
        socket_timeout=2.0,
        socket_connect_timeout=1.0,
    )
    [sentinel] = client.connection_pool.sentinel_manager.sentinels
    kwargs = sentinel.connection_pool.connection_kwargs
    assert kwargs["password"] == "sentinel-secret"
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (2.0, 1.0)


def test_the_lock_client_makes_one_attempt_per_call() -> None:
    """Whatever redis-py's default retries: on an outage a call costs one attempt.

    The server reads the first command of each connection and hangs up (a Redis that
    dies under it); the commands it received are counted. (Some redis-py versions'
    pools also reconnect once, sending nothing, when a fresh connection is already
    closed: that costs no timeout, and is not counted.)
    """
    from celery_unique.clients import make_client

    commands: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as server:

        def serve() -> None:
            while True:
                try:
                    connection, _ = server.accept()
                except OSError:
                    return  # closed
                with connection:
                    connection.settimeout(2)
                    with contextlib.suppress(OSError):
                        if data := connection.recv(65536):
                            commands.append(data)

        threading.Thread(target=serve, daemon=True).start()
        client = make_client(f"redis://127.0.0.1:{server.getsockname()[1]}/0", socket_timeout=1)
        with pytest.raises(redis.ConnectionError):
            client.ping()
        client.close()
        server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread, which ends
    assert len(commands) == 1, commands


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("redis://h", "redis://h:6379/0"),
        ("redis://h:6379", "redis://h:6379/"),
        ("redis://h:6379/0/", "redis://h/0"),
        ("redis://H:6379/2", "redis://h?db=2"),
        ("redis://h/5?db=2", "redis://h/2"),  # ?db= wins over the path, as redis-py reads it
        ("rediss://:p%40ss@h?ssl_cert_reqs=none&db=1", "rediss://:p%40ss@h:6379/1?ssl_cert_reqs=none"),
        ("redis+socket:///tmp/redis.sock", "unix:///tmp/redis.sock?db=0"),
        ("redis://[::1]", "redis://[::1]:6379/0"),
        ("sentinel://a;sentinel://b:26380", "sentinel://a:26379/0;sentinel://b:26380/"),
    ],
)
def test_equivalent_urls_are_one_location(one: str, other: str) -> None:
    from celery_unique.clients import normalised_url

    assert normalised_url(one) == normalised_url(other)


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("redis://h:6379/0", "redis://h:6380/0"),
        ("redis://h/0", "redis://h/1"),
        ("redis://h/0", "rediss://h/0"),
        ("redis://h/0", "redis://g/0"),
        ("redis://:a@h/0", "redis://:b@h/0"),  # another user is another client
        ("unix:///a.sock", "unix:///b.sock"),
    ],
)
def test_other_urls_are_other_locations(one: str, other: str) -> None:
    from celery_unique.clients import normalised_url

    assert normalised_url(one) != normalised_url(other)


@pytest.mark.parametrize(
    "url", ["redis://:hunter2@h:63a79/0", "redis://h:6379/hunter2", "redis://h/?db=hunter2"]
)
def test_an_unreadable_port_or_database_is_refused_without_the_url(url: str) -> None:
    from celery_unique.clients import normalised_url

    with pytest.raises(exceptions.ConfigurationError) as raised:
        normalised_url(url, "ONCE['settings']['url']")
    assert str(raised.value).startswith("ONCE['settings']['url'] has a port or database")
    assert "hunter2" not in str(raised.value)


def test_redis_socket_urls_are_unix_socket_clients() -> None:
    """kombu's and celery-once's spelling of a Unix socket URL."""
    from redis.connection import UnixDomainSocketConnection

    from celery_unique.clients import make_client

    client = make_client("redis+socket:///tmp/redis.sock?db=2")
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class is UnixDomainSocketConnection
    assert (kwargs["path"], kwargs["db"]) == ("/tmp/redis.sock", 2)


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("redis://user:pw-secret@cache.internal:6380/2", "cache.internal:6380"),
        ("rediss://cache.internal", "cache.internal:6379"),
        ("unix:///run/redis.sock?db=1", "unix:/run/redis.sock"),
        ("redis+socket:///run/redis.sock", "unix:/run/redis.sock"),
        ("redis+cluster://:pw-secret@n1:7000;redis+cluster://n2:7001", "the cluster at n1:7000,n2:7001"),
        ("sentinel://:pw-secret@s1:26379;sentinel://s2:26379", "the Sentinels at s1:26379,s2:26379"),
    ],
)
def test_a_location_names_the_server_and_never_the_password(url: str, said: str) -> None:
    from celery_unique.clients import location

    assert location(url) == said and "secret" not in location(url)


def _first_argument(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[0] if args else kwargs["order_id"]


@pytest.mark.parametrize("bind", [False, True])
@pytest.mark.parametrize(
    "key_function", [_first_argument, lambda args, kwargs: args[0]], ids=["def", "lambda"]
)
def test_a_key_function_given_to_the_decorator_is_called_with_args_and_kwargs(
    key_function: Any, bind: bool
) -> None:
    """Celery's decorator makes each option a class attribute: a plain function
    given as unique_on must not come back bound to the task."""
    from celery_unique import UniqueTask

    app = _app()

    @app.task(base=UniqueTask, name="keyed", bind=bind, shared=False, unique_on=key_function)
    def keyed(*args: Any) -> None: ...

    task = app.tasks["keyed"]
    assert task.unique_lock_key((7, "ignored")) == task.unique_lock_key((7, "other"))
    assert task.unique_lock_key((7,)) != task.unique_lock_key((8,))


def test_a_subclass_s_own_unique_on_method_is_called_bound() -> None:
    from celery_unique import UniqueTask

    class ByOrder(UniqueTask):  # type: ignore[misc]
        abstract = True

        def unique_on(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return (self.name, args[0])

    app = _app()

    @app.task(base=ByOrder, name="by_order", shared=False)
    def by_order(order: int, note: str) -> None: ...

    task = app.tasks["by_order"]
    assert task.unique_lock_key((7, "a")) == task.unique_lock_key((7, "b")) != task.unique_lock_key((8, "a"))
