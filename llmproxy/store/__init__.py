"""The durable state: the `Store` protocol and its backends, SQLite (one instance) and Redis (several).

RedisStore lives in llmproxy.store.redis and is not imported here: only deployments with Redis need its client.
"""

from pathlib import Path

from llmproxy.store.base import (
    EDITABLE_FIELDS,
    SPENT_FIGURES,
    USAGE_FIGURES,
    USER_TYPES,
    KeyHealth,
    Store,
    StoreUnavailable,
    UserError,
    token_hash,
)
from llmproxy.store.sqlite import SQLiteStore

__all__ = [
    "EDITABLE_FIELDS",
    "SPENT_FIGURES",
    "USAGE_FIGURES",
    "USER_TYPES",
    "KeyHealth",
    "SQLiteStore",
    "Store",
    "StoreUnavailable",
    "UserError",
    "open_store",
    "token_hash",
]


def open_store(url_or_path: str | Path) -> Store:
    """A SQLiteStore on the file at a Path, or a RedisStore on the server of a URL (StoreUnavailable if unreachable)."""
    if isinstance(url_or_path, Path):
        return SQLiteStore(url_or_path)
    from llmproxy.store.redis import RedisStore

    return RedisStore(url_or_path)
