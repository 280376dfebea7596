"""Keep credentials out of logs and error messages: the one redaction policy of the library and CLI.

Every MongoDB URI (``mongodb://`` or ``mongodb+srv://``) found in a text loses its whole
userinfo: everything between ``scheme://`` and the LAST ``@`` of the URI becomes ``***``,
user name included, so ``mongodb://user:S3c@retPw6@host/db`` prints as
``mongodb://***@host/db``. Passwords are often not percent-encoded, and may hold ``@``,
``:``, ``/`` or ``?``; cutting at the last ``@`` masks them whole. The price: an ``@``
later in the URI (in a query option, say) is taken for the end of the credentials too, so
the mask may hide more than the password, never less. Secret query options
(``password=``, ``tlsCertificateKeyFilePassword=``...) are masked as well.
"""

from __future__ import annotations

import logging
import re
import urllib.parse

MASK = "***"

_SCHEME = r"mongodb(?:\+srv)?://"
# scheme://userinfo@ : userinfo runs to the last '@' of the URI, which ends at whitespace or
# where another URI begins.
_CREDENTIALS = re.compile(
    rf"(?P<scheme>{_SCHEME})(?P<userinfo>(?:(?!{_SCHEME})\S)*)@",
    re.IGNORECASE,
)
# Secret-bearing query options a URI may carry.
_SECRET_OPTIONS = re.compile(
    r"(?P<key>(?:password|tlsCertificateKeyFilePassword|authMechanismProperties|aws_session_token)=)[^&\s]*",
    re.IGNORECASE,
)


def redact_uri(uri: str) -> str:
    """The URI with its userinfo (and secret query options) replaced by ``***``."""
    return redact_text(uri)


def redact_text(text: str) -> str:
    """Mask the userinfo and secret options of every MongoDB URI found anywhere in ``text``."""
    text = _CREDENTIALS.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _SECRET_OPTIONS.sub(lambda m: f"{m['key']}{MASK}", text)


def secrets_in(uri: str) -> list[str]:
    """The literal secrets of a URI (its password, raw and decoded), to scrub from foreign messages.

    The password is what follows the first ``:`` of the userinfo, which ends at the last ``@``,
    as ``redact_text`` has it.
    """
    match = _CREDENTIALS.match(uri.strip())
    if match is None:
        return []
    _user, colon, raw = match["userinfo"].partition(":")
    if not colon or not raw:
        return []
    return sorted({raw, urllib.parse.unquote(raw)}, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    """``redact_text``, plus removal of known secrets that appear outside a URI."""
    text = redact_text(text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Applies ``redact_text`` to every record of a logger: its message and its traceback.

    A record without credentials is left exactly as it was.
    """

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it when the record is emitted
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            trace = self._formatter.formatException(record.exc_info)
            clean = redact_text(trace)
            if clean != trace:
                record.exc_text = clean
        return True


_FILTER = RedactingFilter()


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)``, with every record it emits redacted."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger
