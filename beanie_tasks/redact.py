"""Keep credentials out of logs and error messages: a URI's password is never printed."""

from __future__ import annotations

import re
import urllib.parse

# scheme://user:password@  (the password is everything up to the last '@' before the host list)
_CREDENTIALS = re.compile(r"(?P<scheme>mongodb(?:\+srv)?://)(?P<user>[^:@/\s]*)(?::[^@\s]*)?@", re.IGNORECASE)
# Secret-bearing query options a URI may carry.
_SECRET_OPTIONS = re.compile(
    r"(?P<key>(?:password|tlsCertificateKeyFilePassword|authMechanismProperties|aws_session_token)=)[^&\s]*",
    re.IGNORECASE,
)
MASK = "***"


def redact_uri(uri: str) -> str:
    """The URI with its password (and secret query options) replaced by ``***``; the user name stays."""
    return redact_text(uri)


def redact_text(text: str) -> str:
    """Mask every MongoDB URI password and secret option found anywhere in ``text``."""
    text = _CREDENTIALS.sub(_mask_credentials, text)
    return _SECRET_OPTIONS.sub(lambda m: f"{m['key']}{MASK}", text)


def _mask_credentials(match: re.Match[str]) -> str:
    return f"{match['scheme']}{match['user']}:{MASK}@" if match["user"] else f"{match['scheme']}{MASK}@"


def secrets_in(uri: str) -> list[str]:
    """The literal secrets of a URI (its password, raw and decoded), to scrub from foreign messages."""
    match = re.match(r"mongodb(?:\+srv)?://[^:@/\s]*:(?P<password>[^@\s]*)@", uri, re.IGNORECASE)
    if match is None or not match["password"]:
        return []
    raw = match["password"]
    return sorted({raw, urllib.parse.unquote(raw)}, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    """``redact_text``, plus removal of known secrets that appear outside a URI."""
    text = redact_text(text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text
