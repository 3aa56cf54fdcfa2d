"""Sealing what is stored: signatures, encryption, bindings, key rotation."""

from __future__ import annotations

import pytest

from celery_unique.exceptions import ConfigurationError, SealBroken
from celery_unique.sealing import CALLBACK, PART, Sealer


def test_a_signed_value_opens_only_where_and_as_what_it_was_sealed() -> None:
    sealer = Sealer([b"key"], [])
    sealed = sealer.seal(CALLBACK, "token-1", '{"task": "t"}')
    assert sealed.startswith("s1.") and sealed.endswith('{"task": "t"}')  # signed, in clear
    assert sealer.open(CALLBACK, "token-1", sealed) == '{"task": "t"}'
    for purpose, binding in ((CALLBACK, "token-2"), (PART, "token-1")):
        with pytest.raises(SealBroken):
            sealer.open(purpose, binding, sealed)  # moved to another context, or passed for a part


def test_a_forged_or_altered_value_does_not_open() -> None:
    sealer = Sealer([b"key"], [])
    sealed = sealer.seal(CALLBACK, "t", '{"task": "t", "args": []}')
    forged = sealed.replace('"args": []', '"args": ["FORGED"]')
    for value in (
        forged,
        '{"task": "t"}',
        "s1.",
        "e1.bm90IGEgY2lwaGVydGV4dA==",
        Sealer([b"other"], []).seal(CALLBACK, "t", "x"),
    ):
        with pytest.raises(SealBroken, match="did not verify"):
            sealer.open(CALLBACK, "t", value)


def test_rotation_old_keys_still_open_what_they_sealed() -> None:
    old = Sealer([b"old"], [])
    rotated = Sealer([b"new", b"old"], [])
    sealed_before = old.seal(CALLBACK, "t", "x")
    assert rotated.open(CALLBACK, "t", sealed_before) == "x"
    assert rotated.seal(CALLBACK, "t", "x") != old.seal(CALLBACK, "t", "x")  # the first key seals
    with pytest.raises(SealBroken):
        Sealer([b"new"], []).open(CALLBACK, "t", sealed_before)  # the fallback dropped


def test_encrypted_values_hide_their_text_and_rotate() -> None:
    old, new = Sealer([], [b"k1"]), Sealer([], [b"k2", b"k1"])
    sealed = old.seal(PART, "t\x00p", '{"secret": "s3cr3t"}')
    assert sealed.startswith("e1.") and "s3cr3t" not in sealed
    assert new.open(PART, "t\x00p", sealed) == '{"secret": "s3cr3t"}'
    with pytest.raises(SealBroken):
        new.open(PART, "t\x00q", sealed)  # bound to its part
    assert old.seal(PART, "t", "x") != old.seal(PART, "t", "x")  # a new nonce each time


def test_user_data_is_in_clear_without_an_encryption_key_and_sealed_with_one() -> None:
    plain, encrypting = Sealer([b"key"], []), Sealer([], [b"k"])
    assert plain.maybe_seal("outcome", "f", "{}") == "{}"
    sealed = encrypting.maybe_seal("outcome", "f", "{}")
    assert sealed != "{}" and encrypting.maybe_open("outcome", "f", sealed) == "{}"
    assert encrypting.maybe_open("outcome", "f", "{}") == "{}"  # written before the key was set


def test_no_signing_key_is_a_clear_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="unique_signing_key"):
        Sealer([], []).seal(CALLBACK, "t", "x")
