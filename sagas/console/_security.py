"""Who may act in the console: the operator token, a signed login cookie, and CSRF tokens for forms.

Without a token the console is read-only. With one, a browser logs in once (the token is checked, then
a signed cookie says so) and every form carries a CSRF token: the HMAC of a
random per-browser value kept in its own cookie (a signed double-submit token). Scripts send the token
as ``Authorization: Bearer ...`` on the JSON API, which needs no CSRF token (a browser never adds that
header by itself).

The signing secret (of the login cookie, the CSRF tokens and the messages after an action) is derived
from the token (an HMAC of it with a fixed label), so a restart of the console, or a second console with
the same token, accepts the cookies and open forms of the first; changing the token logs everyone out.
Without a token it is random per process.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

AUTH_COOKIE = "sagas_console_auth"
CSRF_COOKIE = "sagas_console_csrf"
CSRF_FIELD = "csrf"
#: What the signing secret is derived for, from the token.
_SECRET_LABEL = b"sagas-console signing secret v1"


class Guard:
    """The token checks of one console; ``token`` None makes it read-only."""

    def __init__(self, token: str | None, *, secret: bytes | None = None) -> None:
        self.token = token or None
        if secret is None:
            secret = (
                hmac.new(self.token.encode(), _SECRET_LABEL, hashlib.sha256).digest()
                if self.token is not None
                else secrets.token_bytes(32)
            )
        self._secret = secret

    @property
    def can_act(self) -> bool:
        """Whether actions are possible at all (a token was configured)."""
        return self.token is not None

    def _sign(self, purpose: str, value: str) -> str:
        return hmac.new(self._secret, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    def token_matches(self, given: str | None) -> bool:
        """Whether ``given`` is the console's token (compared in constant time)."""
        if self.token is None or not given:
            return False
        return hmac.compare_digest(given.encode(), self.token.encode())

    def bearer_ok(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries the token as a bearer token."""
        scheme, _, value = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(value.strip())

    def login_cookie(self) -> str:
        """The value of the cookie that says this browser gave the token."""
        if self.token is None:
            raise RuntimeError("a read-only console has no login")
        return self._sign("auth", hashlib.sha256(self.token.encode()).hexdigest())

    def logged_in(self, cookie: str | None) -> bool:
        """Whether a login cookie is valid for this console (and its current token)."""
        return self.token is not None and bool(cookie) and hmac.compare_digest(str(cookie), self.login_cookie())

    @staticmethod
    def new_csrf_seed() -> str:
        """A random per-browser value for the CSRF cookie."""
        return secrets.token_hex(32)

    def csrf_token(self, seed: str) -> str:
        """The CSRF token forms carry for the browser whose CSRF cookie holds ``seed``."""
        return self._sign("csrf", seed)

    def csrf_ok(self, seed: str | None, given: str | None) -> bool:
        """Whether a form's CSRF token matches the browser's CSRF cookie."""
        if not seed or not given:
            return False
        return hmac.compare_digest(given.encode(), self.csrf_token(seed).encode())

    def sign_message(self, message: str) -> str:
        """A signature for a message a redirect carries to the next page."""
        return self._sign("message", message)

    def message_ok(self, message: str, signature: str | None) -> bool:
        return bool(message) and bool(signature) and hmac.compare_digest(str(signature), self.sign_message(message))
