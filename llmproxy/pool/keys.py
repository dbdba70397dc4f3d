"""The owner's API keys, per service, and what each key can do right now.

A key is named everywhere by a short hash (`oai-1a2b3c4d`), never by itself. An OpenAI key that belongs to
several organisations is one pool entry per organisation, each with its own health and limits.
"""

import asyncio
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum

from llmproxy.store import KeyHealth
from llmproxy.store.storage import Storage

logger = logging.getLogger(__name__)

ACTIVE = "active"
REVOKED = "revoked"
OVER_QUOTA = "over_quota"
SHARED_SYNC_INTERVAL = 0.25  # seconds: how stale this instance's view of other instances' key states may be
DEFAULT_COOLDOWN = 10.0  # seconds, when a 429 says nothing about when to come back (or nothing believable)
# Seconds: the longest window either API limits by (requests per day). A longer wait, like a negative, infinite or
# unreadable one, is no figure the pool believes: it would take a key out of service for good.
MAX_WAIT = 86_400.0
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


class Verdict(Enum):
    """What an upstream answer means for the request and for the key that got it."""

    SUCCESS = "success"
    RATE_LIMITED = "rate_limited"  # cool the key down for this family, try another key
    REVOKED = "revoked"  # the key is suspected revoked: confirmed by the checker's own call before it retires
    OVER_QUOTA = "over_quota"  # the same, for an account without quota or credit
    FAMILY_FORBIDDEN = "family_forbidden"  # the key may not use this family's models (confirmed the same way)
    SERVER_ERROR = "server_error"  # try one other key, if one is free
    CLIENT_ERROR = "client_error"  # the request itself is wrong: pass the answer on, touch no key


RETIRING = (Verdict.REVOKED, Verdict.OVER_QUOTA, Verdict.FAMILY_FORBIDDEN)
# What each API's machine-readable error fields (`type`, `code`) say about the key, by status. Never the free-text
# message: both APIs echo the request in it ("Unrecognized request argument supplied: billing", "billing: Extra
# inputs are not permitted"), so a client could name any marker word. Sources: OpenAI, "Error codes" (API guide):
# 401 invalid_api_key / invalid authentication, 403 unsupported_country_region_territory, 429 rate_limit_exceeded /
# insufficient_quota / billing_not_active (and access_terminated, seen in the field); Anthropic, "Errors" (API
# reference): 401 authentication_error, 402 billing_error, 403 permission_error, 429 rate_limit_error,
# 529 overloaded_error.
_KEY_ERRORS: dict[str, Verdict] = {
    "insufficient_quota": Verdict.OVER_QUOTA,
    "billing_not_active": Verdict.OVER_QUOTA,
    "billing_hard_limit_reached": Verdict.OVER_QUOTA,
    "billing_error": Verdict.OVER_QUOTA,
    "access_terminated": Verdict.REVOKED,
    "account_deactivated": Verdict.REVOKED,
    "invalid_api_key": Verdict.REVOKED,
    "authentication_error": Verdict.REVOKED,
    "unsupported_country_region_territory": Verdict.CLIENT_ERROR,  # the proxy's location, the same for every key
}
# Anthropic reports an empty credit balance only in the text of a 400 invalid_request_error. In an answer to a
# client's request that text is a suspicion (it may echo the request); the checker's probe, which carries no client
# input, decides.
_CREDIT_TEXT = "credit balance is too low"


def _error_fields(body: bytes) -> tuple[set[str], str]:
    """The error's machine-readable `type` and `code` values, and its message lower-cased."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError, RecursionError):
        return set(), ""
    if not isinstance(error, dict):
        return set(), ""
    fields = {value for name in ("type", "code") if isinstance(value := error.get(name), str)}
    message = error.get("message")
    return fields, message.lower() if isinstance(message, str) else ""


def classify(status: int, body: bytes) -> Verdict:
    """Reads an upstream status and error body the way both APIs document them: status and `type`/`code` only."""
    if status < 300:
        return Verdict.SUCCESS
    fields, message = _error_fields(body) if status >= 400 else (set(), "")
    if verdicts := [_KEY_ERRORS[field] for field in fields if field in _KEY_ERRORS]:
        return verdicts[0]
    if status == 401:
        return Verdict.REVOKED
    if status == 402:
        return Verdict.OVER_QUOTA
    if status == 403:
        return Verdict.FAMILY_FORBIDDEN
    if status in (429, 529):
        return Verdict.RATE_LIMITED
    if status >= 500:
        return Verdict.SERVER_ERROR
    if status == 400 and "invalid_request_error" in fields and _CREDIT_TEXT in message:
        return Verdict.OVER_QUOTA
    return Verdict.CLIENT_ERROR


def parse_duration(text: str) -> float | None:
    """OpenAI's reset format: `120ms`, `6m0s`, `1h2m3.5s`, or a plain number of seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def _wait(seconds: float | None) -> float | None:
    """`seconds` if it is a wait the pool believes: from 0 to MAX_WAIT."""
    return seconds if seconds is not None and 0 <= seconds <= MAX_WAIT else None


def _seconds_until(value: str, now: float) -> float | None:
    """Anthropic's reset format (RFC 3339 time) or OpenAI's duration, as seconds from `now` (a time already past
    is 0); None for a value that is no believable wait."""
    if (duration := parse_duration(value)) is not None:
        return _wait(duration)
    try:
        return _wait(max(0.0, datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() - now))
    except (ValueError, OverflowError, OSError):
        return None


def _header_figure(headers: Mapping[str, str], name: str, odd: set[str]) -> float | None:
    """A rate-limit header as a finite number, 0 or more; None when absent, or odd (then named in `odd`)."""
    if (value := headers.get(name)) is None:
        return None
    try:
        figure = float(value)
    except ValueError:
        figure = math.nan
    if math.isfinite(figure) and figure >= 0:
        return figure
    odd.add(name)
    return None


@dataclass
class Limits:
    """The latest rate-limit figures an upstream reported for a key and a family."""

    fraction_left: float  # the scarcer of requests and tokens, 0..1
    until: float  # when the window resets (time.time())
    requests: tuple[float, float] | None = None  # the request count's (limit, remaining), when reported
    sent: int = 0  # requests sent with the key since these figures came, which they cannot count yet


def read_limits(headers: Mapping[str, str], now: float, odd: set[str] | None = None) -> Limits | None:
    """Rate-limit headers of either API (`x-ratelimit-*`, `anthropic-ratelimit-*`) as one figure. A header that
    holds no believable figure is named in `odd` and read as absent (a reset: as now)."""
    odd = set() if odd is None else odd
    fractions, resets, requests = [], [], None
    for prefix in ("x-ratelimit-", "anthropic-ratelimit-"):
        for kind in ("requests", "tokens"):
            if prefix == "x-ratelimit-":
                limit, remaining, reset = (f"{prefix}{part}-{kind}" for part in ("limit", "remaining", "reset"))
            else:
                limit, remaining, reset = (f"{prefix}{kind}-{part}" for part in ("limit", "remaining", "reset"))
            total, left = _header_figure(headers, limit, odd), _header_figure(headers, remaining, odd)
            if total and left is not None:
                left = min(left, total)
                fractions.append(left / total)
                if (wait := _seconds_until(headers.get(reset, ""), now)) is None and reset in headers:
                    odd.add(reset)
                resets.append(wait or 0.0)
                requests = (total, left) if kind == "requests" else requests
    if not fractions:
        return None
    return Limits(min(fractions), now + max(resets), requests)


def retry_after(headers: Mapping[str, str], now: float, odd: set[str] | None = None) -> float:
    """Seconds a rate-limited key should rest: `retry-after(-ms)`, else the reset headers, else a default. A header
    that holds no believable wait is named in `odd` and passed over."""
    odd = set() if odd is None else odd
    for name, unit in (("retry-after-ms", 0.001), ("retry-after", 1)):
        if (value := headers.get(name)) is None:
            continue
        figure = parse_duration(value)
        if (seconds := _wait(figure * unit if figure is not None else None)) is not None:
            return seconds
        odd.add(name)
    if (limits := read_limits(headers, now, odd)) and limits.until > now:
        return limits.until - now
    return DEFAULT_COOLDOWN


@dataclass(frozen=True)
class KeyAffinity:
    """The key a request's conversation lives on (decided by addons/affinity.py)."""

    key_id: str
    pinned: bool = False  # the key holds state of the conversation that no other key can read: it or none
    min_headroom: float = 0.0  # a key with less headroom (0..1) than this gives way to the key with the most
    unavailable: tuple[str, str] = ("", "")  # (code, message) for a pinned request whose key no longer serves


@dataclass
class PoolKey:
    service: str  # the name of the service it is a key of (llmproxy/services)
    secret: str = field(repr=False)
    prefix: str = "key"  # its id's prefix: the service's key_prefix
    organization: str | None = None
    id: str = ""
    state: str = ACTIVE
    families: set[str] | None = None  # None: not checked yet, assumed to serve every family
    last_used: float = 0.0
    cooldown_until: dict[str, float] = field(default_factory=dict)  # family -> time.time()
    limits: dict[str, Limits] = field(default_factory=dict)  # family -> latest figures
    probing: set[str] = field(default_factory=set)  # families where one request tests a key after its rest
    # A suspicion from one answer, out of rotation until the checker's probe decides: the suspected state (revoked,
    # over quota) for the whole key, or families it may not be allowed to use.
    suspected: str | None = None
    suspected_families: set[str] = field(default_factory=set)
    in_flight: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        digest = hashlib.sha256((self.secret + (self.organization or "")).encode()).hexdigest()[:8]
        self.id = f"{self.prefix}-{digest}"

    def __str__(self) -> str:
        return self.id

    def serves(self, family: str) -> bool:
        return (
            self.state == ACTIVE
            and not self.suspected
            and family not in self.suspected_families
            and (self.families is None or family in self.families)
        )

    def headroom(self, family: str, now: float) -> float:
        """How much of its rate limit the key has left for `family`, the requests sent since the figures came
        taken off (several conversations on one key would otherwise all see the last request left): 1 when unknown
        or reset since."""
        limits = self.limits.get(family)
        if limits is None or limits.until <= now:
            return 1.0
        if not (limits.requests and limits.sent):
            return limits.fraction_left
        limit, remaining = limits.requests
        return max(0.0, min(limits.fraction_left, (remaining - limits.sent) / limit))

    def is_free(self, family: str, now: float) -> bool:
        if self.cooldown_until.get(family, 0) > now or self.headroom(family, now) <= 0:
            return False
        return family not in self.probing or not self.in_flight.get(family)


class KeyPool:
    """Hands out the key with the most rate-limit headroom, least recently used first among equals.

    `all_families(service)` names every family of a service, for a key that turns out not to serve one of them."""

    def __init__(
        self,
        keys: Mapping[str, list[PoolKey]],
        storage: Storage,
        all_families: Callable[[str], list[str]],
    ):
        self.keys = {service: list(service_keys) for service, service_keys in keys.items()}  # service -> its keys
        self.storage = storage
        self.all_families = all_families
        self._listeners: list[Callable[[], None]] = []
        self._confirm: Callable[[PoolKey, Verdict, str, str], None] | None = None
        self._synced = -SHARED_SYNC_INTERVAL  # when the shared store's key states were last read (monotonic)

    def start(self) -> None:
        """Takes each key's health from the store, once it is open; warns when there is no key at all."""
        if not any(self.keys.values()):
            logger.warning(
                "No API key is configured: set OPENAI_KEY, ANTHROPIC_KEY or another service's keys (comma-separated, "
                "in the environment, .env or config.yaml); until then every generation request gets 503."
            )
        self._load_health(self.all_keys())

    def _load_health(self, keys: Iterable[PoolKey], health: dict[str, KeyHealth] | None = None) -> None:
        """Takes each key's state from the store (`health`, when already read from it); tells the listeners when a
        key came back."""
        health = self.storage.store.key_health() if health is None else health
        came_back = False
        for key in keys:
            was_active = key.state == ACTIVE
            key.state = health[key.id].state if key.id in health else ACTIVE
            came_back |= key.state == ACTIVE and not was_active
        if came_back:
            self._changed()

    def all_keys(self) -> Iterable[PoolKey]:
        return (key for keys in self.keys.values() for key in keys)

    def on_key_usable(self, listener: Callable[[], None]) -> None:
        """`listener` is called whenever a key may have become usable (a rest ended, a key came back)."""
        self._listeners.append(listener)

    def on_suspicion(self, confirm: Callable[[PoolKey, Verdict, str, str], None]) -> None:
        """`confirm(key, verdict, family, model)` is called when an answer makes a key suspect; it decides."""
        self._confirm = confirm

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def serving(self, service: str, family: str) -> list[PoolKey]:
        """Keys that can serve the family at all, resting or not."""
        self._sync_shared()
        return [key for key in self.keys[service] if key.serves(family)]

    def _sync_shared(self) -> None:
        """With a shared store, what other instances learned (retired keys, rests) counts here too, within
        SHARED_SYNC_INTERVAL: reading it for every choice was two of a request's round trips to Redis, and a key
        another instance just saw rest costs at most one more 429 here, after which it rests here too."""
        if not self.storage.shared or time.monotonic() - self._synced < SHARED_SYNC_INTERVAL:
            return
        health, rests = self.storage.store.key_states()  # one round trip
        self._synced = time.monotonic()
        self._load_health(self.all_keys(), health)
        by_id = {key.id: key for key in self.all_keys()}
        for (key_id, family), until in rests.items():
            if (key := by_id.get(key_id)) and until > key.cooldown_until.get(family, 0):
                key.cooldown_until[family] = until
                key.probing.add(family)

    def choose(
        self, service: str, family: str, exclude: Iterable[PoolKey] = (), affinity: KeyAffinity | None = None
    ) -> PoolKey | None:
        """The free key with the most headroom (least recently used among equals), now counted in flight.

        An affinity's key is taken instead while it is free and has `min_headroom` left (or as much as the best
        key); a pinned affinity takes its key or none."""
        now = time.time()
        excluded = {key.id for key in exclude}
        free = [
            k for k in self.candidates(service, family, affinity) if k.id not in excluded and k.is_free(family, now)
        ]
        if not free:
            return None
        key = max(free, key=lambda k: (k.headroom(family, now), -k.last_used))
        kept = next((k for k in free if affinity and k.id == affinity.key_id), None)
        if kept and kept.headroom(family, now) >= min(affinity.min_headroom, key.headroom(family, now)):
            key = kept
        if (limits := key.limits.get(family)) is not None:
            limits.sent += 1
        key.last_used = now
        key.in_flight[family] = key.in_flight.get(family, 0) + 1
        return key

    def candidates(self, service: str, family: str, affinity: KeyAffinity | None = None) -> list[PoolKey]:
        """The keys that serve the family, only the affinity's own when it is pinned."""
        keys = self.serving(service, family)
        return [k for k in keys if k.id == affinity.key_id] if affinity and affinity.pinned else keys

    def seconds_until_free(self, service: str, family: str, affinity: KeyAffinity | None = None) -> float | None:
        """When the first resting key of the family (or the pinned key) can be used again; None if no key serves
        the family."""
        keys = self.candidates(service, family, affinity)
        if not keys:
            return None
        now = time.time()
        ends = [
            max(k.cooldown_until.get(family, 0), k.limits[family].until if k.headroom(family, now) <= 0 else 0)
            for k in keys
        ]
        return max(0.0, min(ends) - now)

    def release(
        self,
        key: PoolKey,
        family: str,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        model: str = "",
        may_suspect: bool = True,
        verdict: Verdict | None = None,
    ) -> Verdict:
        """Ends a request made with `key` and learns from its answer; returns what the answer means (`verdict`, when
        the key's service read it already; else as OpenAI and Anthropic answer).

        An answer that would retire the key only makes it suspect (`may_suspect`: the request has not already
        made another key suspect), and the checker's probe, which carries no client input, decides."""
        key.in_flight[family] = max(0, key.in_flight.get(family, 0) - 1)
        now, odd = time.time(), set()
        if (limits := read_limits(headers, now, odd)) is not None:
            key.limits[family] = limits
        verdict = verdict or classify(status, body)
        if verdict is Verdict.SUCCESS:
            key.probing.discard(family)
        elif verdict is Verdict.RATE_LIMITED:
            rest = retry_after(headers, now, odd)
            key.cooldown_until[family] = now + rest
            key.probing.add(family)
            self.storage.store.set_key_rest(key.id, family, now + rest)
            logger.info("key %s rests %.1f s for %s after a %d", key.id, rest, family, status)
            asyncio.get_running_loop().call_later(rest, self._changed)
        elif verdict in RETIRING and may_suspect:
            self._suspect(key, verdict, family, model, status)
        if odd:
            logger.warning(
                "key %s: the upstream's %s held no believable figure after a %d; passed over",
                key.id,
                ", ".join(sorted(odd)),
                status,
            )
        if verdict in (Verdict.SUCCESS, Verdict.CLIENT_ERROR, Verdict.SERVER_ERROR) or not may_suspect:
            self._changed()  # a probing key proved itself, or a slot was given back
        return verdict

    def _suspect(self, key: PoolKey, verdict: Verdict, family: str, model: str, status: int) -> None:
        """Takes the key (or the family on it) out of rotation and asks the checker to confirm with `model`."""
        if verdict is Verdict.FAMILY_FORBIDDEN:
            key.suspected_families.add(family)
        else:
            key.suspected = REVOKED if verdict is Verdict.REVOKED else OVER_QUOTA
        logger.warning("key %s is suspected %s after a %d; the key checker confirms", key.id, verdict.value, status)
        self._confirm(key, verdict, family, model)

    def clear_suspicion(self, key: PoolKey, family: str, reason: str) -> None:
        """The checker found the key (or its family) working: back into rotation."""
        key.suspected = None
        key.suspected_families.discard(family)
        logger.info("key %s is back: %s", key.id, reason)
        self._changed()

    def forbid_family(self, key: PoolKey, family: str, reason: str) -> None:
        """The checker confirmed that the key may not use the family's models, as it learns other capabilities."""
        key.suspected_families.discard(family)
        key.families = (set(key.families) if key.families is not None else set(self.all_families(key.service))) - {
            family
        }
        logger.warning("key %s no longer serves %s (%s)", key.id, family, reason)
        self._changed()

    def abandon(self, key: PoolKey, family: str) -> None:
        """Ends a request that got no answer (network error, timeout, client gone)."""
        key.in_flight[family] = max(0, key.in_flight.get(family, 0) - 1)
        self._changed()

    def add_organizations(self, key: PoolKey, organizations: list[str]) -> None:
        """Adds a pool entry for each further organisation of an OpenAI key; requests with it name the org."""
        known = {(k.secret, k.organization) for k in self.keys[key.service]}
        for organization in organizations:
            if (key.secret, organization) not in known:
                clone = PoolKey(key.service, key.secret, key.prefix, organization)
                self._load_health([clone])
                self.keys[key.service].append(clone)
                logger.info("key %s has organisation entry %s", key.id, clone.id)
        self._changed()

    def set_state(self, key: PoolKey, state: str, reason: str) -> None:
        """Retires a key or brings it back; persisted, so a restart does not hand a dead key out again."""
        key.suspected = None
        if key.state == state:
            return
        key.state = state
        logger.warning("key %s is now %s (%s)", key.id, state, reason)
        self.storage.store.set_key_health(key.id, None if state == ACTIVE else state, reason)
        if state == ACTIVE:
            self._changed()

    def counts(self, service: str, family: str | None = None) -> dict[str, int]:
        """Keys of a service (and family) by state, for the status page.

        A key whose families are unknown counts for every family while it works, and for none once retired.
        """
        keys = [
            k
            for k in self.keys[service]
            if family is None or (family in k.families if k.families is not None else k.state == ACTIVE)
        ]
        return {
            "total": len(keys),
            "active": sum(key.state == ACTIVE for key in keys),
            "revoked": sum(key.state == REVOKED for key in keys),
            "overQuota": sum(key.state == OVER_QUOTA for key in keys),
        }
