"""Lock keys: which arguments make a task unique, and how they become a key.

A call is bound to the task's signature with defaults applied, so ``f(1)``,
``f(x=1)`` and ``f(1, y=<default>)`` are one call. The chosen arguments are
written as canonical JSON (sorted keys, ASCII only, tagged encodings for the
types JSON would confuse) and hashed with SHA-256. Raw arguments never appear
in a key.

Every key of one lock lives under a *family*::

    <prefix>:v1:{<task name>:<digest>}:lock

The braces are a Redis Cluster hash tag, so every key of a family (lock,
fence, stored result) hashes to one slot and one Lua script may touch them all.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date, datetime, time, timezone
from decimal import Decimal
from typing import Any

from celery_unique.exceptions import ConfigurationError, UniqueKeyError

KEY_VERSION = "v1"

# Tagged values are one-key objects whose key starts with NUL. A user dict
# with such a key is written in the pair-list form, so the two never collide.
TAG = "\x00"

UniqueOn = Sequence[str] | Callable[[tuple[Any, ...], dict[str, Any]], Any] | None

_dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode


def _tagged(tag: str, value: Any) -> dict[str, Any]:
    return {TAG + tag: value}


def _plain_keys(value: Mapping[Any, Any]) -> bool:
    return all(type(k) is str and not k.startswith(TAG) for k in value)


def _encode(value: Any) -> Any:
    """Turn ``value`` into JSON-native data that keeps its type apart."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or kind is float or value is None:
        return value
    if kind is list:
        return [_encode(item) for item in value]
    if kind is dict:
        return _encode_mapping(value)
    if isinstance(value, tuple):
        return _tagged("tuple", [_encode(item) for item in value])
    if isinstance(value, (str, int, float)):
        # str/int/float subclasses (enums among them) travel as their base value.
        return value
    if isinstance(value, list):
        return [_encode(item) for item in value]
    if isinstance(value, Mapping):
        return _encode_mapping(value)
    if isinstance(value, (set, frozenset)):
        tag = "frozenset" if isinstance(value, frozenset) else "set"
        return _tagged(tag, sorted(_dumps(_encode(item)) for item in value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _tagged("bytes", base64.b64encode(bytes(value)).decode("ascii"))
    if isinstance(value, datetime):
        if value.tzinfo is not None and value.utcoffset() is not None:
            # Equal instants in other zones are one call.
            value = value.astimezone(timezone.utc)
        return _tagged("datetime", value.isoformat())
    if isinstance(value, date):
        return _tagged("date", value.isoformat())
    if isinstance(value, time):
        return _tagged("time", value.isoformat())
    if isinstance(value, uuid.UUID):
        return _tagged("uuid", value.hex)
    if isinstance(value, Decimal):
        return _tagged("decimal", str(value))
    raise UniqueKeyError(f"a value of type {kind.__qualname__} cannot be part of a lock key")


def _encode_mapping(value: Mapping[Any, Any]) -> Any:
    if _plain_keys(value):
        return {key: _encode(item) for key, item in value.items()}
    pairs = sorted(([_dumps(_encode(k)), _encode(v)] for k, v in value.items()), key=_first)
    return _tagged("dict", pairs)


def _first(pair: list[Any]) -> Any:
    return pair[0]


def canonical_json(value: Any) -> str:
    """Return the canonical JSON text of ``value`` (the input of the digest)."""
    try:
        return _dumps(_encode(value))
    except RecursionError as exc:
        raise UniqueKeyError(
            "a self-referencing or too deeply nested value cannot be part of a lock key"
        ) from exc
    except ValueError as exc:  # an integer too long to write (Python's int_max_str_digits)
        raise UniqueKeyError(f"a value cannot be part of a lock key: {exc}") from exc


def digest(value: Any) -> str:
    """SHA-256 hex digest of the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value).encode("ascii")).hexdigest()


# Types whose canonical JSON is JSON's own (exact types: a subclass, an enum
# among them, is written as its base value by _encode).
_NATIVE = frozenset((str, int, float, bool, type(None)))


def _digest_of_arguments(arguments: Mapping[str, Any]) -> str:
    """:func:`digest` of bound arguments; when every one is a plain scalar, without
    the walk that tags other types (the same text, for the most common call). Their
    names are parameter names, never a tag."""
    if not all(type(value) in _NATIVE for value in arguments.values()):
        return digest(arguments)
    try:
        text = _dumps(arguments)
    except ValueError:  # an integer too long to write: said as digest() says it
        return digest(arguments)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def validate_prefix(prefix: str, setting: str = "unique_key_prefix") -> str:
    if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
        raise ConfigurationError(f"{setting} must be a non-empty string without braces, got {prefix!r}")
    return prefix


_TAG_ESCAPES = str.maketrans({"%": "%25", "{": "%7B", "}": "%7D"})
_TAG_UNESCAPES = {"25": "%", "7B": "{", "7D": "}"}


def tag_name(task_name: str) -> str:
    """The task name as it appears in a hash tag: a brace would end the tag early."""
    return task_name.translate(_TAG_ESCAPES)


def task_name_of_tag(name: str) -> str:
    """The inverse of :func:`tag_name`."""
    return re.sub("%(25|7B|7D)", lambda found: _TAG_UNESCAPES[found.group(1)], name)


def family_key(prefix: str, task_name: str, key_digest: str) -> str:
    """The common head of every key of one lock (the hash tag is in braces)."""
    return family_head(prefix, task_name) + key_digest + "}"


def family_head(prefix: str, task_name: str) -> str:
    """What every family of one task's locks starts with: its family key is
    this, the argument digest and ``}``."""
    return f"{prefix}:{KEY_VERSION}:{{{tag_name(task_name)}:"


def lock_key(family: str) -> str:
    return family + ":lock"


def run_key(family: str) -> str:
    return family + ":run"


def fence_key(family: str) -> str:
    return family + ":fence"


def result_key(family: str) -> str:
    return family + ":result"


def args_key(family: str) -> str:
    return family + ":args"


def done_key(family: str) -> str:
    return family + ":done"


def validate_token(token: str) -> str:
    """A fan-in or context token: a non-empty string without braces (it is a hash tag)."""
    if not isinstance(token, str) or not token or "{" in token or "}" in token or len(token) > 200:
        raise ConfigurationError(
            f"a token must be a string of 1-200 characters without braces, got {token!r}"
        )
    return token


def fan_in_key(prefix: str, token: str) -> str:
    """A fan-in's context (with a glob-escaped prefix and the token ``*``: a SCAN pattern for all)."""
    return f"{prefix}:{KEY_VERSION}:{{fanin:{validate_token(token)}}}:ctx"


def fan_in_due_key(prefix: str) -> str:
    """The sorted set of fan-in tokens by when the workers' sweep should look at them."""
    return f"{prefix}:{KEY_VERSION}:{{fanin}}:due"


def context_family(prefix: str, name: str) -> str:
    return f"{prefix}:{KEY_VERSION}:{{context:{validate_token(name)}}}"


def glob_escape(text: str) -> str:
    """``text`` matched literally by a SCAN pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def reaper_key(prefix: str, name: str) -> str:
    """A key of the reaper's (its leader, the workers' beats, its figures): one slot for all."""
    return f"{prefix}:{KEY_VERSION}:{{reaper}}:{name}"


def workers_key(prefix: str) -> str:
    """The reaper's set of the workers that beat (their ids)."""
    return reaper_key(prefix, "workers")


def alive_key(prefix: str, worker_id: str) -> str:
    """A worker's short-lived key (the reaper's): it is alive while the key exists."""
    return reaper_key(prefix, f"alive:{worker_id}")


def record_key(prefix: str, worker_id: str) -> str:
    """A worker's last record (JSON), which the reaper reads."""
    return reaper_key(prefix, f"worker:{worker_id}")


def family_of(key: str) -> str:
    """The family of any key built here (everything before the last colon)."""
    return key.rpartition(":")[0]


def digest_of_key(key: str) -> str:
    """The argument digest inside a key of any family (for logs and errors)."""
    tag = key[key.index("{") + 1 : key.rindex("}")]
    return tag.rpartition(":")[2]


class ArgumentKey:
    """Computes the argument digest of calls to one task.

    Built once per task (and per distinct ``unique_on``): the signature is
    inspected here, not on every call.
    """

    def __init__(self, task_name: str, func: Callable[..., Any], unique_on: UniqueOn) -> None:
        self.task_name = task_name
        self.signature = inspect.signature(func)
        parameters = self.signature.parameters.values()
        # Plain parameters (the common case) are bound by hand: Signature.bind
        # costs more than the rest of the key.
        self._plain: tuple[str, ...] | None = None
        if all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters):
            self._plain = tuple(self.signature.parameters)
            self._defaults = {p.name: p.default for p in parameters if p.default is not p.empty}
        self.key_function: Callable[[tuple[Any, ...], dict[str, Any]], Any] | None = None
        self.names: tuple[str, ...] | None = None
        if callable(unique_on):
            self.key_function = unique_on
        elif unique_on is not None:
            self.names = self._check_names(unique_on)

    def _check_names(self, unique_on: Iterable[str]) -> tuple[str, ...]:
        if isinstance(unique_on, str):
            unique_on = (unique_on,)
        names = tuple(unique_on)
        unknown = [n for n in names if n not in self.signature.parameters]
        if unknown:
            raise ConfigurationError(
                f"{self.task_name}: unique_on names {unknown} are not parameters of the task"
            )
        return names

    def material(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        """What identifies the call: chosen arguments by name, or the key function's value."""
        if self.key_function is not None:
            return self.key_function(tuple(args), dict(kwargs))
        arguments = self._bind_plain(args, kwargs) if self._plain is not None else None
        if arguments is None:
            arguments = self._bind(args, kwargs)
        if self.names is not None:
            return {name: arguments[name] for name in self.names}
        return dict(arguments)

    def _bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise UniqueKeyError(
                f"{self.task_name}: the arguments do not match the task's signature ({exc})"
            ) from exc
        bound.apply_defaults()
        return bound.arguments

    def _bind_plain(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
        """Bind to plain parameters; None when the call is not valid (bind() explains)."""
        names = self._plain
        assert names is not None
        if len(args) > len(names):
            return None
        arguments = dict(zip(names, args, strict=False))
        for name, value in kwargs.items():
            if name in arguments or name not in self.signature.parameters:
                return None
            arguments[name] = value
        if len(arguments) < len(names):
            for name in names:
                if name not in arguments:
                    if name not in self._defaults:
                        return None
                    arguments[name] = self._defaults[name]
        return arguments

    def digest(self, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None) -> str:
        material = self.material(args or (), kwargs or {})
        try:
            if self.key_function is None:
                return _digest_of_arguments(material)
            return digest(material)
        except UniqueKeyError as exc:
            raise self._named(material, exc) from exc

    def _named(self, material: Any, error: UniqueKeyError) -> UniqueKeyError:
        """``error`` naming what could not be encoded: an argument, or the key function's value."""
        what = "the value the unique_on function returned"
        if self.key_function is None:
            for name, value in material.items():
                try:
                    canonical_json(value)
                except UniqueKeyError as found:
                    what, error = f"argument {name!r}", found
                    break
        return UniqueKeyError(
            f"{self.task_name}: cannot build a lock key from {what} ({error}): pass unique_on= "
            "to choose other arguments, or a key function"
        )
