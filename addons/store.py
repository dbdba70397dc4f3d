"""State that must survive a restart, behind one small interface.

SQLite (one file, WAL) is the default; a shared store for several instances implements the same methods.
Every method is one atomic operation on the store: callers never read, decide in Python, then write.
"""

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import ctx, exceptions


@dataclass(frozen=True)
class KeyHealth:
    state: str  # "revoked" or "over_quota"; an active key has no record
    reason: str
    changed_at: float


class SQLiteStore:
    """The embedded store: a single SQLite file in write-ahead-log mode."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)  # autocommit: each statement is its own transaction
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL keeps committed work across a process crash
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS key_health (key_id TEXT PRIMARY KEY, state TEXT NOT NULL,"
            " reason TEXT NOT NULL, changed_at REAL NOT NULL)"
        )

    def key_health(self) -> dict[str, KeyHealth]:
        """Every key that is not active, by key id."""
        rows = self.db.execute("SELECT key_id, state, reason, changed_at FROM key_health")
        return {key_id: KeyHealth(state, reason, changed_at) for key_id, state, reason, changed_at in rows}

    def set_key_health(self, key_id: str, state: str | None, reason: str = "") -> None:
        """Records a key as revoked or over quota; `state=None` makes it active again."""
        if state is None:
            self.db.execute("DELETE FROM key_health WHERE key_id = ?", (key_id,))
        else:
            self.db.execute(
                "INSERT INTO key_health (key_id, state, reason, changed_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (key_id) DO UPDATE SET state = excluded.state, reason = excluded.reason,"
                " changed_at = excluded.changed_at",
                (key_id, state, reason, time.time()),
            )

    def close(self) -> None:
        self.db.close()


class Storage:
    """Opens the configured store; other addons reach it as `ctx.master.addons.get("storage").store`."""

    def __init__(self):
        self.store: SQLiteStore | None = None

    def load(self, loader):
        loader.add_option(
            "data_dir", str, "data", "Folder for the SQLite store, relative to the working directory."
        )

    def configure(self, updated):
        if "data_dir" in updated:
            if self.store:
                self.store.close()
            path = Path(ctx.options.data_dir) / "proxy.sqlite3"
            try:
                self.store = SQLiteStore(path)
            except (OSError, sqlite3.Error) as error:
                raise exceptions.OptionsError(f"DATA_DIR: cannot open the store at {path}: {error}.") from None

    def done(self):
        if self.store:
            self.store.close()
