"""The store the proxy runs with, opened (and opened anew when its settings change) for everything that uses it."""

from pathlib import Path

from llmproxy.store import SQLiteStore, Store, StoreUnavailable, open_store


class Storage:
    """Holds the open store; its users read `storage.store` at each use, so that a reopened store counts at once."""

    def __init__(self):
        self.store: Store | None = None

    def open(self, url_or_path: str | Path) -> None:
        """Opens a SQLite file (a Path) or a Redis server (a URL) in place of the current store. Raises
        StoreUnavailable, OSError or sqlite3.Error, with the current store closed."""
        self.close()
        self.store = open_store(url_or_path)

    def close(self) -> None:
        if self.store:
            self.store.close()
            self.store = None

    @property
    def shared(self) -> bool:
        """Whether other instances share this store (their key health and rests must be read from it)."""
        return not isinstance(self.store, SQLiteStore)

    def healthy(self) -> bool:
        try:
            self.store.counters()
        except StoreUnavailable:
            return False
        return True
