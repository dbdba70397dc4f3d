"""The options and the lifecycle of the proxy's backbone, the parts with no hook of their own: the store, the key
pool, the wait queue and the key checker (llmproxy/store, llmproxy/pool), and the upstream services' own settings
(llmproxy/services)."""

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from mitmproxy import ctx, exceptions

from llmproxy.pool.checker import KeyChecker
from llmproxy.pool.keys import KeyPool
from llmproxy.pool.queue import QUEUE_MODES, WaitQueue
from llmproxy.services.base import Service
from llmproxy.store import StoreUnavailable
from llmproxy.store.storage import Storage

STORES = ("sqlite", "redis")
_AT_LEAST_ONE = ("queue_timeout", "queue_heartbeat", "max_queued_per_identity")


class Backbone:
    """Declares and checks the backbone's options, hands their values over, and starts and stops its parts."""

    def __init__(
        self, services: Sequence[Service], storage: Storage, pool: KeyPool, queue: WaitQueue, checker: KeyChecker
    ):
        self.services = services
        self.storage = storage
        self.pool = pool
        self.queue = queue
        self.checker = checker

    def load(self, loader):
        loader.add_option(
            "data_dir", str, "data", "Folder for the SQLite store and logs, relative to the working directory."
        )
        loader.add_option("store", str, "sqlite", "sqlite (one instance) or redis (several instances sharing state).")
        loader.add_option("redis_url", str, "redis://127.0.0.1:6379/0", "The Redis server of STORE=redis.")
        loader.add_option(
            "queue_mode", str, "fair", "fair, fifo or none (refuse with 429 when no key is free).", choices=QUEUE_MODES
        )
        loader.add_option("queue_timeout", int, 300, "Seconds a request may wait for a key before it fails.")
        loader.add_option("queue_heartbeat", int, 10, "Seconds between heartbeat comments to waiting streams.")
        loader.add_option("max_queued_per_identity", int, 1, "Requests one identity may have waiting at once.")
        loader.add_option("check_keys", bool, True, "Check keys at start-up and periodically.")
        loader.add_option("key_check_interval", int, 3600, "Seconds between two checks of a working key.")
        for service in self.services:
            for option in service.options:
                loader.add_option(option.name, option.typespec, option.default, option.help)

    def configure(self, updated):
        options = ctx.options
        if updated & {"data_dir", "store", "redis_url"}:
            self._open_store()
        if "queue_mode" in updated and options.queue_mode not in QUEUE_MODES:
            raise exceptions.OptionsError(f"QUEUE_MODE must be one of {', '.join(QUEUE_MODES)}.")
        for name in _AT_LEAST_ONE:
            if name in updated and getattr(options, name) < 1:
                raise exceptions.OptionsError(f"{name.upper()} must be at least 1.")
        self.queue.mode = options.queue_mode
        self.queue.timeout = options.queue_timeout
        self.queue.max_per_identity = options.max_queued_per_identity
        self.checker.interval = options.key_check_interval
        for service in self.services:
            if names := {option.name for option in service.options} & updated:
                service.configure({name: getattr(options, name) for name in names})

    def _open_store(self) -> None:
        if ctx.options.store not in STORES:
            raise exceptions.OptionsError(f"STORE must be one of {', '.join(STORES)}.")
        if ctx.options.store == "redis":
            try:
                self.storage.open(ctx.options.redis_url)
            except StoreUnavailable as error:
                raise exceptions.OptionsError(str(error)) from None
            return
        path = Path(ctx.options.data_dir) / "proxy.sqlite3"
        try:
            self.storage.open(path)
        except (OSError, sqlite3.Error) as error:
            raise exceptions.OptionsError(f"DATA_DIR: cannot open the store at {path}: {error}.") from None

    def running(self):
        self.pool.start()
        if ctx.options.check_keys:
            self.checker.start()

    def done(self):
        self.checker.stop()
        self.storage.close()
