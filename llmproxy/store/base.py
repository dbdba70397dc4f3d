"""What every store implements (the `Store` protocol), and the types, errors and validation the backends share.

Users are stored under the SHA-256 of their token: the token itself is shown once, at creation, and kept
nowhere, so a copy of the store lets nobody in.
"""

import asyncio
import functools
import hashlib
import time
from dataclasses import dataclass
from typing import Protocol

USER_TYPES = ("normal", "special", "temporary")
# Fields an administrator may set; everything else about a user is the proxy's own bookkeeping.
EDITABLE_FIELDS = {
    "nickname": (str, type(None)),
    "type": (str,),
    "max_ips": (int, type(None)),
    "token_limits": (dict,),
    "rate_limit": (int, type(None)),
    "expires_at": (int, float, type(None)),
    "admin_note": (str, type(None)),
}
JSON_COLUMNS = ("ips", "token_limits")  # user fields the backends keep as JSON text
USER_COLUMNS = (
    "id",
    "token_hash",
    "nickname",
    "type",
    "created_at",
    "last_used_at",
    "ips",
    "max_ips",
    "token_limits",
    "rate_limit",
    "expires_at",
    "admin_note",
    "prompt_count",
    "disabled_at",
    "disabled_reason",
)
# What a settled request adds to its user's figures of a family besides the tokens token quotas count (`used`): its
# cost in nano-dollars (10⁻⁹ USD, whole numbers, so that sums and quota checks are exact in both stores) and its
# tokens by the kinds llmproxy/api/usage.py reads. Like `used`, they start afresh with each quota period.
SPENT_FIGURES = (
    "cost_nanousd",
    "input",
    "output",
    "cache_read",
    "cache_write_5m",
    "cache_write_1h",
    "reasoning",
    "web_searches",
)
USAGE_FIGURES = ("used", "reserved", "reserved_nanousd", *SPENT_FIGURES)  # a family's figures, as get_user shows them
# Why `admit` disabled a user.
EXPIRED_REASON = "Temporary token expired."
IP_LIMIT_REASON = "IP address limit exceeded."


@dataclass(frozen=True)
class KeyHealth:
    state: str  # "revoked" or "over_quota"; an active key has no record
    reason: str
    changed_at: float


class UserError(ValueError):
    """A user record an administrator asked for is not valid; the message says why."""


class StoreUnavailable(RuntimeError):
    """The shared store cannot be reached; requests that need it get 503 until it is back."""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def validate_fields(fields: dict) -> dict:
    """The editable fields of `fields`, type-checked; unknown or read-only fields are refused."""
    for name, value in fields.items():
        if name not in EDITABLE_FIELDS:
            raise UserError(f"{name!r} cannot be set; settable fields: {', '.join(sorted(EDITABLE_FIELDS))}.")
        if not isinstance(value, EDITABLE_FIELDS[name]) or isinstance(value, bool):
            raise UserError(f"{name!r} has the wrong type.")
    if fields.get("type", "normal") not in USER_TYPES:
        raise UserError(f"'type' must be one of {', '.join(USER_TYPES)}.")
    if "nickname" in fields and fields["nickname"] is not None and len(fields["nickname"]) > 80:
        raise UserError("'nickname' must be at most 80 characters.")
    limits = fields.get("token_limits", {})
    if not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in limits.items()
    ):
        raise UserError("'token_limits' maps family names to whole numbers of tokens.")
    return fields


def import_records(users: list[dict]) -> list[tuple[dict, dict]]:
    """(exported user, record to store) for each user of an export, validated before anything is written."""
    records = []
    for user in users:
        if not isinstance(user, dict) or not isinstance(user.get("token_hash"), str) or len(user["token_hash"]) != 64:
            raise UserError("Each imported user needs the 64-character 'token_hash' of an export.")
        editable = validate_fields({k: v for k, v in user.items() if k in EDITABLE_FIELDS})
        kept = {
            k: user[k]
            for k in ("created_at", "last_used_at", "ips", "prompt_count", "disabled_at", "disabled_reason")
            if k in user
        }
        record = {"id": user["token_hash"][:16], "token_hash": user["token_hash"], "created_at": time.time()}
        records.append((user, {**record, **kept, **editable}))
    return records


def spent_amounts(spent: dict[str, int] | None) -> list[int]:
    """The amounts of SPENT_FIGURES in `spent`, in their order (0 for those it leaves out)."""
    if unknown := set(spent or {}) - set(SPENT_FIGURES):
        raise ValueError(f"not a spent figure: {min(unknown)!r}")
    return [int((spent or {}).get(name, 0)) for name in SPENT_FIGURES]


def changes_users(method):
    """Marks a store method that changes or removes users: what this process read of them before is stale."""

    @functools.wraps(method)
    def changing(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        finally:
            self.users_version += 1

    return changing


class Store(Protocol):
    """The state that must survive a restart (or be shared by instances): SQLiteStore and RedisStore.

    Every operation is one atomic step on the store: callers never read, decide in Python, then write. Times are
    `time.time()`. A shared store that cannot be reached raises StoreUnavailable from any operation.
    """

    users_version: int  # counts this process's changes to existing users (changes_users), for what it keeps of them

    # -- keys

    def key_health(self) -> dict[str, KeyHealth]:
        """Every key that is not active, by key id."""

    def set_key_health(self, key_id: str, state: str | None, reason: str = "") -> None:
        """Records a key as revoked or over quota, replacing its record; `state=None` makes it active again."""

    def set_key_rest(self, key_id: str, family: str, until: float) -> None:
        """Records that a key rests for a family until `until`, replacing an earlier rest."""

    def key_rests(self) -> dict[tuple[str, str], float]:
        """Every rest that has not ended yet: (key id, family) -> until; ended rests are forgotten."""

    def key_states(self) -> tuple[dict[str, KeyHealth], dict[tuple[str, str], float]]:
        """key_health() and key_rests() together, in one step: what a pool on a shared store reads before each
        choice of a key."""

    # -- users

    def create_user(self, fields: dict) -> tuple[str, dict]:
        """A new user with a fresh 256-bit token: (token, user); only its hash is kept. UserError for bad fields."""

    def get_user(self, user_id: str) -> dict | None:
        """The user (USER_COLUMNS and `usage`: family -> USAGE_FIGURES), or None if there is none with that id."""

    def user_by_token(self, token: str) -> dict | None:
        """The user whose token this is, found by its hash, or None."""

    def list_users(self) -> list[dict]:
        """Every user, as get_user shows them, in no promised order."""

    def update_user(self, user_id: str, fields: dict) -> dict | None:
        """Sets editable fields (UserError for any other) and returns the user, or None if there is none."""

    def set_disabled(self, user_id: str, reason: str | None) -> dict | None:
        """Disables a user with a reason, or (reason None) enables it again; returns the user or None."""

    def delete_user(self, user_id: str) -> bool:
        """Removes a user with its token and usage; whether there was one."""

    def export_users(self) -> list[dict]:
        """Every user with its token hash (never the token) and usage, for import_users here or in another store."""

    def import_users(self, users: list[dict]) -> int:
        """Creates or replaces users from an export, all or none (UserError before any write); returns how many."""

    def admit(self, token: str, ip: str, max_ips: int, auto_ban: bool) -> tuple[dict | None, str]:
        """A request presenting `token` from `ip`, as the gatekeeper lets it in: (the user afterwards, USER_COLUMNS
        without usage, or None if the token is nobody's; the visit). A temporary user past `expires_at` is disabled
        first. A visit of a user neither disabled nor special is noted: "ok", "limited" (a new address over the
        user's `max_ips`, else over `max_ips`; refused) or "banned" (the same, and the user is now disabled); 0 means
        no limit. Anyone else's visit is "ok" and not noted."""

    # -- usage

    def reserve(
        self,
        user_id: str,
        family: str,
        tokens: int,
        limit: int | None,
        cost: int = 0,
        cost_limit: int | None = None,
        total_cost_limit: int | None = None,
    ) -> bool:
        """Sets `tokens` and `cost` (nano-dollars) aside if, with them, the family's used + reserved tokens stay
        within `limit`, its cost within `cost_limit`, and the user's cost over every family within `total_cost_limit`
        (None: no limit)."""

    def settle(
        self,
        user_id: str,
        family: str,
        reserved: int,
        used: int,
        reserved_cost: int = 0,
        spent: dict[str, int] | None = None,
        counters: dict[str, int] | None = None,
    ) -> asyncio.Future | None:
        """Replaces a reservation (`reserved` tokens, `reserved_cost` nano-dollars) by what the request really used:
        `used` tokens and its SPENT_FIGURES in `spent` (0 and nothing for a failed request, which is no prompt), and
        adds `counters` as add_to_counters does, in the same step: a request's bill is one write. With nothing
        reserved (0, 0: a user without limits), it bills an existing user all the same. None once written; a store
        that writes in the background returns a Future of the running event loop (if any), done once the bill is
        written or, logged by the store, could not be; it reads anything it changes only after writing it."""

    def reset_usage(self, user_id: str | None = None) -> None:
        """Starts a new quota period for one user or for all: used and spent figures to 0, reservations kept."""

    def add_to_counters(self, **amounts: int) -> None:
        """Adds each amount to its named counter (a new counter starts at 0). Counters named `day:...`
        (llmproxy/usage_days.py) are daily counters: they are read by daily_counters, not by counters."""

    def counters(self) -> dict[str, int]:
        """Every counter's total but the daily counters' (read every second or two; those grow day by day)."""

    def daily_counters(self, first_day: str) -> dict[str, int]:
        """Every daily counter of `first_day` (an ISO date) or later, by its full name."""

    # -- windows: rate limits, requests in flight, waits

    def hit_rate_window(
        self, identity: str, limit: int, window: float, bucket: str = ""
    ) -> tuple[bool, int, float, str]:
        """Counts a request in a sliding window if it has room: (allowed, remaining, reset at, hit for a refund)."""

    def refund_rate_window(self, identity: str, hit: str, bucket: str = "") -> None:
        """Takes back a counted request (a hit of hit_rate_window) that the proxy itself refused afterwards."""

    def active_identities(self, window: float) -> int:
        """Identities with a counted request of the default bucket in the last `window` seconds."""

    def record_wait(self, family: str, seconds: float) -> None:
        """Notes how long a request of the family waited for a key, for the estimated wait."""

    def recent_waits(self, family: str, window: float) -> list[float]:
        """The waits of the family's requests dispatched in the last `window` seconds."""

    def enter(self, identity: str, limit: int) -> bool:
        """Counts a request in flight for `identity` unless it already has `limit` (0: no limit)."""

    def leave(self, identity: str) -> None:
        """Ends one of `identity`'s requests in flight; nothing if it has none."""

    def close(self) -> None:
        """Releases the connection; the store is not used afterwards."""

    # -- affinity: which key holds a conversation's cache or a response's state

    def affinity(self, space: str, name: str, ttl: float) -> str | None:
        """What `name` is bound to in `space`, or None if unknown or unused for `ttl` seconds; a hit is a use."""

    def bind_affinity(self, space: str, name: str, value: str, expected: str | None, ttl: float, capacity: int) -> str:
        """Binds `name` to `value` if now bound to `expected` (compare-and-set) and returns the binding after."""
