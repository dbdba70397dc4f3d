"""The admin API's wire format: its endpoints, its OpenAPI description, and users as it shows them; and the
lock-out after failed logins that the API and the admin pages share."""

import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from llmproxy.pricing import usd
from llmproxy.store import EDITABLE_FIELDS, USAGE_FIGURES, KeyHealth, UserError

if TYPE_CHECKING:
    from llmproxy.pool.keys import PoolKey

USER_ID = r"(?P<user>[0-9a-f]{16})"  # a user id in a path: the admin API's and the admin pages'
# (method, path pattern, the AdminApi method that answers); the pattern must match the whole path.
ROUTES = [
    ("GET", r"/admin/users", "list_users"),
    ("POST", r"/admin/users", "create_user"),
    ("GET", r"/admin/users/export", "export_users"),
    ("POST", r"/admin/users/import", "import_users"),
    ("GET", rf"/admin/users/{USER_ID}", "get_user"),
    ("PATCH", rf"/admin/users/{USER_ID}", "update_user"),
    ("DELETE", rf"/admin/users/{USER_ID}", "delete_user"),
    ("POST", rf"/admin/users/{USER_ID}/disable", "disable_user"),
    ("POST", rf"/admin/users/{USER_ID}/enable", "enable_user"),
    ("POST", rf"/admin/users/{USER_ID}/reset-usage", "reset_user_usage"),
    ("POST", r"/admin/quotas/reset", "reset_all_usage"),
    ("GET", r"/admin/keys", "list_keys"),
    ("POST", r"/admin/keys/recheck", "recheck_keys"),
    ("GET", r"/admin/openapi.json", "openapi"),
]


def usage_view(figures: dict) -> dict:
    """A family's usage figures as the APIs show them: costs in USD rather than the store's nano-dollars."""
    shown = {name: value for name, value in figures.items() if name not in ("cost_nanousd", "reserved_nanousd")}
    return {**shown, "cost_usd": usd(figures["cost_nanousd"]), "reserved_usd": usd(figures["reserved_nanousd"])}


def public_user(user: dict) -> dict:
    """A user as the admin API shows it: everything but the token hash, with costs in USD and their sum."""
    shown = {key: value for key, value in user.items() if key != "token_hash"}
    shown["usage"] = {family: usage_view(figures) for family, figures in user["usage"].items()}
    shown["cost_usd"] = usd(sum(figures["cost_nanousd"] for figures in user["usage"].values()))
    return shown


class QuotaLimits(Protocol):
    """The quotas a user is held to (the QuotaKeeper addon)."""

    quotas: dict[str, int]
    cost_quotas: dict[str, int]

    def limit_for(self, user: dict, family: str) -> int | None: ...

    def cost_limit_for(self, user: dict, family: str) -> int | None: ...


def _usd_or_none(nanodollars: int | None) -> float | None:
    return None if nanodollars is None else usd(nanodollars)


def own_usage(user: dict, quotas: QuotaLimits) -> dict:
    """What a user may see of themselves, as `GET /user/usage` answers it and /user/lookup shows it: state, prompts,
    and per family the usage figures with the token `limit` and `cost_limit_usd` (None: unlimited)."""
    families = set(user["usage"]) | set(user["token_limits"]) | set(quotas.quotas) | set(quotas.cost_quotas)
    shown, unused = public_user(user), usage_view(dict.fromkeys(USAGE_FIGURES, 0))
    return {
        "nickname": user["nickname"],
        "type": user["type"],
        "promptCount": user["prompt_count"],
        "disabled": user["disabled_at"] is not None,
        "disabledReason": user["disabled_reason"],
        "expiresAt": user["expires_at"],
        "costUsd": shown["cost_usd"],
        "costLimitUsd": _usd_or_none(quotas.cost_limit_for(user, "total")),
        "usage": {
            family: {
                **shown["usage"].get(family, unused),
                "limit": quotas.limit_for(user, family),
                "cost_limit_usd": _usd_or_none(quotas.cost_limit_for(user, family)),
            }
            for family in sorted(families - {"total"})
        },
    }


def expired_temporary_users(users: Iterable[dict], before: float) -> list[str]:
    """The ids of the temporary users that expired before `before`."""
    return [
        user["id"]
        for user in users
        if user["type"] == "temporary" and user["expires_at"] is not None and user["expires_at"] < before
    ]


def users_cost_nanousd(users: Iterable[dict]) -> int:
    """What stored users (as the store gives them) spent in this quota period, together."""
    return sum(figures["cost_nanousd"] for user in users for figures in user["usage"].values())


def sorted_users(users: list[dict], fields: list[str], descending: bool = True) -> list[dict]:
    """Users (as public_user shows them) sorted by `fields`, the first deciding; missing values last either way,
    as the original did. UserError for a field users do not have."""
    if unknown := [field for field in fields if users and field not in users[0]]:
        raise UserError(f"Cannot sort by {unknown[0]!r}.")
    ordered = list(users)
    for field in reversed(fields):
        present = [user for user in ordered if user[field] is not None]
        present.sort(key=lambda user: user[field], reverse=descending)
        ordered = present + [user for user in ordered if user[field] is None]
    return ordered


def key_view(keys: Iterable["PoolKey"], health: dict[str, KeyHealth], checked_at: dict[str, float]) -> list[dict]:
    """Every pool key by its id (a hash, never the key): its state, why it retired, families, rests and last check."""
    now = time.time()
    return [
        {
            "id": key.id,
            "service": key.service,
            "organization": key.organization is not None,
            "state": key.state,
            "reason": health[key.id].reason if key.id in health else None,
            "retired_at": health[key.id].changed_at if key.id in health else None,
            "suspected": key.suspected,
            "suspected_families": sorted(key.suspected_families),
            "families": sorted(key.families) if key.families is not None else None,
            "resting": {f: round(until - now, 1) for f, until in key.cooldown_until.items() if until > now},
            "checked_at": checked_at.get(key.id),
        }
        for key in keys
    ]


def openapi_description() -> dict:
    """OpenAPI 3.1 description of the admin API, generated from the route table."""
    summaries = {
        "list_users": "List users (query `sort=field,field`, largest first)",
        "create_user": "Create a user; the response holds its token, shown only this once",
        "export_users": "Every user with token hash and usage, for import elsewhere",
        "import_users": 'Create or replace users from an export: {"users": [...]}',
        "get_user": "One user",
        "update_user": f"Set fields: {', '.join(sorted(EDITABLE_FIELDS))}",
        "delete_user": "Delete a user",
        "disable_user": 'Disable a user: {"reason": "..."}',
        "enable_user": "Enable a disabled user",
        "reset_user_usage": "Start a new quota period for one user",
        "reset_all_usage": "Start a new quota period for everyone",
        "list_keys": "Key ids (hashes) and health",
        "recheck_keys": "Check every key again now",
        "openapi": "This description",
    }
    paths: dict = {}
    for method, pattern, handler in ROUTES:
        path = pattern.replace(USER_ID, "{user_id}")
        operation = {
            "summary": summaries[handler],
            "operationId": handler,
            "security": [{"adminKey": []}],
            "responses": {
                "200": {"description": "OK"},
                "401": {"description": "No or wrong admin key"},
                "429": {"description": "Too many failed logins"},
            },
        }
        if "{user_id}" in path:
            operation["parameters"] = [
                {
                    "name": "user_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
                }
            ]
        paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "LLM key-sharing proxy: admin API", "version": "1"},
        "components": {"securitySchemes": {"adminKey": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }


class FailedLogins:
    """Failed admin logins per address: after `limit` within `window` seconds, that address must wait until the
    oldest of them is `window` old. The admin API and the login form count against the same record."""

    def __init__(self, limit: int = 5, window: float = 300.0):
        self.limit = limit
        self.window = window
        self._failures: dict[str, deque] = {}

    def wait(self, ip: str) -> int:
        """Seconds the address must wait before it may try again; 0 if it may try now."""
        failures = self._failures.get(ip)
        if failures is None:
            return 0
        while failures and failures[0] < time.time() - self.window:
            failures.popleft()
        if not failures:
            del self._failures[ip]
            return 0
        return int(failures[0] + self.window - time.time()) + 1 if len(failures) >= self.limit else 0

    def failed(self, ip: str) -> None:
        self._failures.setdefault(ip, deque()).append(time.time())
