"""One redaction policy: everything between ``scheme://`` and the last ``@`` of a MongoDB URI is masked."""

from __future__ import annotations

import logging

import pytest

from beanie_tasks import cli, redact
from beanie_tasks.redact import redact_text, redact_uri, scrub, secrets_in


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        # An unencoded '@' in the password: the credentials end at the LAST '@'.
        ("mongodb://user:S3c@retPw6@host/db", "mongodb://***@host/db"),
        (
            "mongodb://user:S3c@retPw6@h1:27017,h2:27017/db?replicaSet=rs0",
            "mongodb://***@h1:27017,h2:27017/db?replicaSet=rs0",
        ),
        (
            "mongodb+srv://user:S3c@retPw6@cluster0.abcde.mongodb.net/app",
            "mongodb+srv://***@cluster0.abcde.mongodb.net/app",
        ),
        ("mongodb://alice:s3cret@db.example.com/app", "mongodb://***@db.example.com/app"),
        (
            "mongodb+srv://alice:p%40ss@cluster0.abcde.mongodb.net/?retryWrites=true&w=majority",
            "mongodb+srv://***@cluster0.abcde.mongodb.net/?retryWrites=true&w=majority",
        ),
        # Userinfo without a password: the user name is masked too.
        ("mongodb://alice@db.example.com/", "mongodb://***@db.example.com/"),
        ("mongodb+srv://alice@cluster0.example.net/x", "mongodb+srv://***@cluster0.example.net/x"),
        # Other characters an unencoded password may hold.
        ("mongodb://u:a/b?c#d:e@@h:27017/db", "mongodb://***@h:27017/db"),
        ("MongoDB://User:Pw@Host/db", "MongoDB://***@Host/db"),
        # No credentials: unchanged.
        ("mongodb://db1:27017,db2:27017/?replicaSet=rs0", "mongodb://db1:27017,db2:27017/?replicaSet=rs0"),
        ("mongodb://127.0.0.1:1/db", "mongodb://127.0.0.1:1/db"),
        # Secret query options.
        (
            "mongodb://h/?tlsCertificateKeyFilePassword=hush&tls=true",
            "mongodb://h/?tlsCertificateKeyFilePassword=***&tls=true",
        ),
        (
            "mongodb://u:p@h/?authMechanismProperties=AWS_SESSION_TOKEN:tok",
            "mongodb://***@h/?authMechanismProperties=***",
        ),
    ],
)
def test_redact_uri(uri: str, expected: str) -> None:
    assert redact_uri(uri) == expected
    assert redact_text(f"error: cannot reach {uri} within 5 s") == f"error: cannot reach {expected} within 5 s"
    assert redact_text(expected) == expected  # idempotent


def test_several_uris_in_one_text() -> None:
    text = (
        "primary mongodb://bob:S3c@retPw6@h1:27017,h2:27017/x (timeout) or mongodb+srv://carol:x@y@cluster/z; "
        "fallback 'mongodb://dave@h3/' and mongodb://h4/plain, mail ops@example.com"
    )
    masked = redact_text(text)
    assert masked == (
        "primary mongodb://***@h1:27017,h2:27017/x (timeout) or mongodb+srv://***@cluster/z; "
        "fallback 'mongodb://***@h3/' and mongodb://h4/plain, mail ops@example.com"
    )


def test_uris_back_to_back_lose_every_secret() -> None:
    masked = redact_text("mongodb://a:S3c@retPw6@h1,mongodb://b:hunter2@h2")
    assert masked == "mongodb://***@h1,mongodb://***@h2"


def test_secrets_in_takes_the_password_up_to_the_last_at() -> None:
    assert secrets_in("mongodb://user:S3c@retPw6@host/db") == ["S3c@retPw6"]
    assert secrets_in("mongodb+srv://user:p%40ss@cluster/db") == ["p%40ss", "p@ss"]
    assert secrets_in("mongodb://user@host/db") == []
    assert secrets_in("mongodb://host/db") == []


def test_scrub_also_removes_known_secrets_outside_a_uri() -> None:
    secrets = secrets_in("mongodb://user:S3c@retPw6@host/db")
    assert scrub("auth failed with password S3c@retPw6 at mongodb://user:S3c@retPw6@host", secrets) == (
        "auth failed with password *** at mongodb://***@host"
    )


def test_the_cli_uses_the_same_policy() -> None:
    for text in ("see mongodb://user:S3c@retPw6@host/db", "mongodb+srv://user@cluster/x", "mongodb://h/?password=x"):
        assert cli.redact(text) == redact_text(text)
    assert not hasattr(cli, "_URI_CREDENTIALS")


def test_library_logs_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    logger = redact.get_logger("beanie_tasks.test_redact")
    caplog.set_level(logging.INFO, logger="beanie_tasks.test_redact")
    logger.warning("lost %s: %s", "mongodb://user:S3c@retPw6@host/db", "timeout")
    logger.info("nothing to hide in %s", "mongodb://host/db")
    try:
        raise ConnectionError("cannot reach mongodb://user:S3c@retPw6@host/db")
    except ConnectionError:
        logger.exception("outage")
    assert "S3c" not in caplog.text and "retPw6" not in caplog.text
    assert "lost mongodb://***@host/db: timeout" in caplog.text
    assert "cannot reach mongodb://***@host/db" in caplog.text
    clean = caplog.records[1]
    assert clean.args == ("mongodb://host/db",)  # a record with nothing to hide is left alone


def test_every_library_logger_is_redacted() -> None:
    from beanie_tasks import admin, clock, dependencies, schedule, store, task, wakeup, worker

    for module in (admin, clock, dependencies, schedule, store, task, wakeup, worker):
        assert any(isinstance(f, redact.RedactingFilter) for f in module.log.filters), module.__name__
