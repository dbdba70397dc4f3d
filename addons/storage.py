"""The store options, and the addon that opens the configured store (llmproxy.store) for the others."""

import sqlite3
from pathlib import Path

from mitmproxy import ctx, exceptions

from llmproxy.store import SQLiteStore, StoreUnavailable, open_store

STORES = ("sqlite", "redis")


class Storage:
    """Opens the configured store; other addons reach it as `ctx.master.addons.get("storage").store`."""

    def __init__(self):
        self.store = None

    def load(self, loader):
        loader.add_option(
            "data_dir", str, "data", "Folder for the SQLite store and logs, relative to the working directory."
        )
        loader.add_option("store", str, "sqlite", "sqlite (one instance) or redis (several instances sharing state).")
        loader.add_option("redis_url", str, "redis://127.0.0.1:6379/0", "The Redis server of STORE=redis.")

    def configure(self, updated):
        if not updated & {"data_dir", "store", "redis_url"}:
            return
        if ctx.options.store not in STORES:
            raise exceptions.OptionsError(f"STORE must be one of {', '.join(STORES)}.")
        if self.store:
            self.store.close()
        if ctx.options.store == "redis":
            try:
                self.store = open_store(ctx.options.redis_url)
            except StoreUnavailable as error:
                raise exceptions.OptionsError(str(error)) from None
            return
        path = Path(ctx.options.data_dir) / "proxy.sqlite3"
        try:
            self.store = open_store(path)
        except (OSError, sqlite3.Error) as error:
            raise exceptions.OptionsError(f"DATA_DIR: cannot open the store at {path}: {error}.") from None

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

    def done(self):
        if self.store:
            self.store.close()
