"""Signed, expiring values for the web pages: session cookies, CSRF tokens and proof-of-work challenges.

A value is `payload.expires.mac`, the MAC an HMAC-SHA256 under a key derived from ADMIN_KEY and the value's
purpose. Nothing is kept server-side, so every instance sharing the same ADMIN_KEY accepts what another signed,
and a changed ADMIN_KEY ends every session at once.
"""

import hmac
import time

# A payload is URL-safe text without dots: what cookies, form fields and JSON carry unchanged.
_PAYLOAD_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_:~")


class Signer:
    """Signs and verifies values for one purpose ("session", "csrf", "pow"...); a value signed for one purpose
    never verifies for another."""

    def __init__(self, secret: str, purpose: str):
        # Without a secret anyone could sign: such a signer signs nothing and accepts nothing.
        key = secret.encode("utf-8", "surrogateescape")
        self._key = hmac.new(key, f"llmproxy:{purpose}".encode(), "sha256") if secret else None

    def sign(self, payload: str, lifetime: float, now: float | None = None) -> str:
        """`payload` (URL-safe characters, no dots), valid for `lifetime` seconds."""
        if not self._key:
            raise ValueError("a signer without a secret signs nothing")
        if not payload or not set(payload) <= _PAYLOAD_CHARACTERS:
            raise ValueError("a signed payload is URL-safe text without dots")
        expires = int((time.time() if now is None else now) + lifetime)
        return f"{payload}.{expires}.{self._mac(f'{payload}.{expires}')}"

    def verify(self, signed: str, now: float | None = None) -> str | None:
        """The payload of a value this signer signed and that has not expired, else None."""
        if not self._key:
            return None
        payload, _, rest = signed.partition(".")
        expires, _, mac = rest.partition(".")
        if not payload or not expires.isdigit() or not hmac.compare_digest(mac, self._mac(f"{payload}.{expires}")):
            return None
        if int(expires) < (time.time() if now is None else now):
            return None
        return payload

    def _mac(self, message: str) -> str:
        mac = self._key.copy()
        mac.update(message.encode("ascii", "replace"))
        return mac.hexdigest()
