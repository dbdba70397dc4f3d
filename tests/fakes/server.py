"""What every fake server shares: serving its aiohttp application on a port, on the caller's event loop or on a
loop of its own in a daemon thread, and the client session a fake that calls the fake upstream makes its calls with.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Self

import aiohttp
from aiohttp import web


class FakeServer:
    """A fake HTTP server: a subclass says what it serves (``make_app``) and whether it calls another server
    (``make_session``). ``start()`` it on a loop, or ``start_in_thread()``; it then listens at ``url``."""

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.requests: list = []  # what the fake received, in its own record type
        self._session: aiohttp.ClientSession | None = None  # the one ``make_session`` made, while started
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    def wait_for_requests(self, n: int, timeout: float = 5) -> list:
        """Poll (from any thread) until at least ``n`` requests were recorded."""
        deadline = time.monotonic() + timeout
        while len(self.requests) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"expected {n} requests, got {len(self.requests)}")
            time.sleep(0.005)
        return list(self.requests)

    def make_app(self) -> web.Application:
        """The application the fake serves."""
        raise NotImplementedError

    def make_session(self) -> aiohttp.ClientSession | None:
        """The session the fake calls other servers with, made on the fake's loop; None if it calls none."""
        return None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Start listening; ``port`` 0 picks a free one."""
        app = self.make_app()
        self._session = self.make_session()  # before listening: the first request may need it
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.host, self.port = host, self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening and drop open connections, then close the session (the handlers using it are gone)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> Self:
        """Start on an event loop of its own in a daemon thread; returns the fake once it listens."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=type(self).__name__, daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        asyncio.run_coroutine_threadsafe(self.start(host, port), loop).result(timeout=10)
        return self

    def stop_in_thread(self) -> None:
        """Stop a fake started by ``start_in_thread`` and end its thread; nothing if it was not started so."""
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = self._thread = None
