"""What celery-unique keeps in Redis and later trusts: signed, and optionally encrypted.

A fan-in's callback and errback become messages a worker publishes, and its
part reports become their arguments: anyone who may write the key prefix could
otherwise choose what a worker publishes, to which queue. So these values are
*sealed* when stored and *opened* when read back:

* signed: ``s1.<HMAC-SHA256, hex>.<the text>``, with ``unique_signing_key``
  (under Django, by default, a key derived from ``SECRET_KEY``);
* encrypted, when ``unique_encryption_key`` is set: ``e1.<base64 of a nonce
  and the AES-256-GCM ciphertext>``, which authenticates as it hides. It also
  covers the stores that hold user data: idempotent outcomes and split
  contexts (which are otherwise plain JSON).

Either way the seal covers what the value is (its *purpose*) and where it
belongs (its *binding*: a fan-in's token and part, a lock's family), so a value
cannot be replayed in another context or field. A value that does not open
raises :class:`~celery_unique.exceptions.SealBroken`: it was written by someone
without the key, or by a process configured with another one. Old keys stay
accepted for reading while they are listed in ``unique_signing_key_fallbacks``
or ``unique_encryption_key_fallbacks`` (rotation: put the new key first, keep
the old one as a fallback until what it sealed has expired).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Callable, Sequence
from typing import Any

from celery_unique.exceptions import ConfigurationError, SealBroken

SIGNED, ENCRYPTED = "s1.", "e1."

# What is sealed (a seal's purpose: a value of one cannot pass for another).
CALLBACK = "fan-in callback"  # a fan-in's callback or errback: signed
PART = "fan-in part's report"  # the callback's arguments: signed
OUTCOME = "idempotent outcome"  # encrypted when a key is set
CONTEXT = "context entry"  # encrypted when a key is set

#: Under Django, the app config sets this: the default signing key, derived from SECRET_KEY.
default_signing_key: Callable[[], bytes | None] | None = None


def as_key(value: Any, name: str) -> bytes:
    """A key setting as bytes: a non-empty str or bytes."""
    if isinstance(value, str) and value:
        return value.encode()
    if isinstance(value, bytes) and value:
        return value
    raise ConfigurationError(f"{name} must be a non-empty string or bytes")


def derived(secret: bytes, purpose: str) -> bytes:
    """A 256-bit key for one use, derived from a configured secret."""
    return hmac.new(secret, f"celery-unique/{purpose}".encode(), hashlib.sha256).digest()


class Sealer:
    """Seals and opens values with the configured keys (the first one seals)."""

    def __init__(self, signing: Sequence[bytes], encryption: Sequence[bytes]) -> None:
        self._signing = [derived(key, "sign") for key in signing]
        self._encryption: list[Any] = []
        if encryption:
            try:
                from cryptography.hazmat.primitives.ciphers.aead import AESGCM
            except ImportError:
                raise ConfigurationError(
                    "unique_encryption_key needs the cryptography package: "
                    "pip install celery-unique[encryption]"
                ) from None
            self._encryption = [AESGCM(derived(key, "encrypt")) for key in encryption]

    @property
    def encrypts(self) -> bool:
        return bool(self._encryption)

    @property
    def signs(self) -> bool:
        return bool(self._signing or self._encryption)

    def seal(self, purpose: str, binding: str, text: str) -> str:
        """``text`` sealed for ``purpose`` at ``binding``: encrypted when a key is set, else signed."""
        if self._encryption:
            nonce = os.urandom(12)
            sealed = self._encryption[0].encrypt(nonce, text.encode(), _bound(purpose, binding))
            return ENCRYPTED + base64.b64encode(nonce + sealed).decode("ascii")
        if not self._signing:
            raise ConfigurationError(
                "a fan-in's callbacks are signed: set unique_signing_key (CELERY_UNIQUE_SIGNING_KEY "
                "under Django, where SECRET_KEY is used when it is not set)"
            )
        return SIGNED + _mac(self._signing[0], purpose, binding, text) + "." + text

    def open(self, purpose: str, binding: str, stored: str) -> str:
        """The text that :meth:`seal` sealed; :class:`SealBroken` when no key opens it."""
        if stored.startswith(SIGNED):
            mac, _, text = stored[len(SIGNED) :].partition(".")
            for key in self._signing:
                if hmac.compare_digest(mac, _mac(key, purpose, binding, text)):
                    return text
        elif stored.startswith(ENCRYPTED):
            try:
                raw = base64.b64decode(stored[len(ENCRYPTED) :], validate=True)
            except ValueError:
                raw = b""
            for cipher in self._encryption:
                try:
                    opened: bytes = cipher.decrypt(raw[:12], raw[12:], _bound(purpose, binding))
                except Exception:  # cryptography's InvalidTag, or a value too short
                    continue
                return opened.decode()
        raise SealBroken(purpose)

    def maybe_seal(self, purpose: str, binding: str, text: str) -> str:
        """For stores of user data: encrypted when a key is set, else the text as it is."""
        return self.seal(purpose, binding, text) if self._encryption else text

    def maybe_open(self, purpose: str, binding: str, stored: str) -> str:
        """The inverse of :meth:`maybe_seal`. Plain text (no encryption key, or written
        before one was set) is taken as it is; an encrypted value must open."""
        if stored.startswith(ENCRYPTED):
            return self.open(purpose, binding, stored)
        return stored


def _bound(purpose: str, binding: str) -> bytes:
    return f"{purpose}\x00{binding}".encode()


def _mac(key: bytes, purpose: str, binding: str, text: str) -> str:
    message = _bound(purpose, binding) + b"\x00" + text.encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()
