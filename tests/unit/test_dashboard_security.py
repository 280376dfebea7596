"""The dashboard's safety helpers: signed CSRF tokens and the masking of credentials."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette")

from beanie_tasks.web.security import Csrf, mask_sensitive, redacted


def test_csrf_token_is_signed() -> None:
    csrf = Csrf(b"k" * 32)
    token = csrf.issue()
    assert csrf.valid_cookie(token)
    nonce, _signature = token.rsplit(".", 1)
    assert not csrf.valid_cookie(f"{nonce}.{'0' * 64}")
    assert not csrf.valid_cookie(nonce)
    assert not csrf.valid_cookie(None)
    assert not Csrf(b"other key").valid_cookie(token)


def test_sensitive_keys_are_masked_at_any_depth() -> None:
    shown = mask_sensitive(
        {
            "to": "ada@example.com",
            "smtp": {"password": "p1", "hosts": [{"api_key": "k1", "name": "a"}]},
            "Authorization": "Bearer x",
            "dsn": "mongodb://user:pw@db:27017/app",
        }
    )
    assert shown == {
        "to": "ada@example.com",
        "smtp": {"password": "***", "hosts": [{"api_key": "***", "name": "a"}]},
        "Authorization": "***",
        "dsn": "mongodb://***@db:27017/app",
    }


def test_a_class_hook_runs_before_the_default_masks() -> None:
    document = {"card": "4111111111111111", "lease_token": "abc", "note": "x"}
    shown = redacted(document, lambda d: d | {"card": d["card"][-4:]})
    assert shown == {"card": "1111", "lease_token": "***", "note": "x"}
    assert document["card"] == "4111111111111111"
