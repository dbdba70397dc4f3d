"""The owner's API keys, per service. A key is named everywhere by a short hash, never by itself."""

import hashlib
import time
from dataclasses import dataclass, field

from addons import scrub
from addons.apierrors import ANTHROPIC, OPENAI

ACTIVE = "active"
REVOKED = "revoked"
OVER_QUOTA = "over_quota"
_ID_PREFIX = {OPENAI: "oai", ANTHROPIC: "ant"}


@dataclass
class PoolKey:
    api: str
    secret: str = field(repr=False)
    id: str = ""
    state: str = ACTIVE
    last_used: float = 0.0

    def __post_init__(self):
        self.id = f"{_ID_PREFIX[self.api]}-{hashlib.sha256(self.secret.encode()).hexdigest()[:8]}"

    def __str__(self) -> str:
        return self.id

    def auth_header(self) -> tuple[str, str]:
        """The header that authenticates a request with this key upstream."""
        if self.api == ANTHROPIC:
            return "x-api-key", self.secret
        return "authorization", f"Bearer {self.secret}"


class KeyPool:
    """Hands out the least recently used active key of a service."""

    def __init__(self, secrets: dict[str, list[str]]):
        self.keys = {
            OPENAI: [PoolKey(OPENAI, secret) for secret in secrets.get("openai_key", [])],
            ANTHROPIC: [PoolKey(ANTHROPIC, secret) for secret in secrets.get("anthropic_key", [])],
        }
        scrub.register([key.secret for keys in self.keys.values() for key in keys])

    def choose(self, api: str) -> PoolKey | None:
        """The active key used longest ago, now marked as used; None when the service has none."""
        active = [key for key in self.keys[api] if key.state == ACTIVE]
        if not active:
            return None
        key = min(active, key=lambda k: k.last_used)
        key.last_used = time.monotonic()
        return key

    def counts(self, api: str) -> dict[str, int]:
        """Keys of a service by state, for the status page."""
        keys = self.keys[api]
        return {
            "total": len(keys),
            "active": sum(key.state == ACTIVE for key in keys),
            "revoked": sum(key.state == REVOKED for key in keys),
            "overQuota": sum(key.state == OVER_QUOTA for key in keys),
        }
