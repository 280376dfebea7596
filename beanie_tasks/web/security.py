"""What keeps the dashboard safe to expose: the auth hook, CSRF tokens, and redaction of stored values.

CSRF uses a double-submit token signed with HMAC: the cookie holds ``nonce.signature``
and every action must send the same value back (form field or ``X-CSRF-Token`` header).
The signature means a cookie planted from a sibling subdomain is refused too. It is a
few lines of the standard library; the form libraries that offer it (starlette-wtf,
WTForms) would bring a forms framework the dashboard does not use.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request

from beanie_tasks.redact import MASK, redact_text

CSRF_COOKIE = "bt_csrf"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
# Keys whose values are never shown, at any depth of a payload or result.
SENSITIVE_KEYS = re.compile(r"pass(word|wd)?|secret|token|api[_-]?key|credential|authorization|private", re.IGNORECASE)

AuthHook = Callable[[Request], "bool | Awaitable[bool]"]
Redactor = Callable[[dict[str, Any]], dict[str, Any]]


async def allowed(auth: AuthHook | None, request: Request) -> bool:
    """The mounting app's verdict on this request (no hook: everyone may look)."""
    if auth is None:
        return True
    verdict = auth(request)
    if inspect.isawaitable(verdict):
        verdict = await verdict
    return bool(verdict)


class Csrf:
    """Issues and checks the signed double-submit token."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    def sign(self, nonce: str) -> str:
        return hmac.new(self.secret, nonce.encode(), hashlib.sha256).hexdigest()

    def issue(self) -> str:
        nonce = secrets.token_urlsafe(24)
        return f"{nonce}.{self.sign(nonce)}"

    def valid_cookie(self, value: str | None) -> bool:
        if not value or "." not in value:
            return False
        nonce, signature = value.rsplit(".", 1)
        return hmac.compare_digest(signature, self.sign(nonce))

    def token_for(self, request: Request) -> str:
        """The request's token when its cookie is genuine, else a new one (set by the response)."""
        cookie = request.cookies.get(CSRF_COOKIE)
        return cookie if cookie is not None and self.valid_cookie(cookie) else self.issue()

    def check(self, request: Request, sent: str | None) -> bool:
        cookie = request.cookies.get(CSRF_COOKIE)
        if not self.valid_cookie(cookie) or not sent:
            return False
        assert cookie is not None
        return hmac.compare_digest(cookie, sent)


def mask_sensitive(value: Any) -> Any:
    """A copy of ``value`` with every sensitive key's value masked, and MongoDB URIs stripped of credentials."""
    if isinstance(value, Mapping):
        return {key: MASK if SENSITIVE_KEYS.search(str(key)) else mask_sensitive(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_sensitive(item) for item in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def redacted(document: dict[str, Any], hook: Redactor | None) -> dict[str, Any]:
    """What the dashboard may show of a stored document: the class's hook first, then the default masks."""
    shown = dict(document)
    if hook is not None:
        shown = hook(shown)
    masked: dict[str, Any] = mask_sensitive(shown)
    return masked
