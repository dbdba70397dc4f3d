"""Who a request is: a presented token compared with a secret, the user a token names, and an identity as logs,
metrics and mitmweb may show it."""

import hashlib
import hmac

from llmproxy.store import Store


def secret_matches(presented: str, secret: str) -> bool:
    """Whether `presented` (as `presented_token` read it) is `secret`, byte for byte, in constant time.

    Both are encoded as mitmproxy decoded the header, so a byte that is not UTF-8 is compared as the byte it was
    instead of raising. An empty secret never matches.
    """
    return bool(secret) and hmac.compare_digest(_as_sent(presented), _as_sent(secret))


def user_of_token(store: Store, token: str) -> dict | None:
    """The user whose token was presented, or None. A token that is not UTF-8 is nobody's: tokens are text."""
    if not token or not _is_utf8(token):
        return None
    return store.user_by_token(token)


def admit_token(store: Store, token: str, ip: str, max_ips: int, auto_ban: bool) -> tuple[dict | None, str]:
    """Store.admit for the token that was presented; a token that is not UTF-8 is nobody's, as in user_of_token."""
    if not token or not _is_utf8(token):
        return None, "ok"
    return store.admit(token, ip, max_ips, auto_ban)


def _as_sent(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def _is_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a byte that was not UTF-8, decoded by mitmproxy as a lone surrogate
        return False
    return True


def identity_digest(identity: str) -> str:
    """An identity (user id or client address) as logs, metrics and mitmweb may show it: a short, stable hash."""
    return hashlib.sha256(identity.encode()).hexdigest()[:16]
