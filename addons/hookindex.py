"""mitmproxy's addon manager, calling each event only on the addons that handle it.

For every event, mitmproxy walks its whole chain (about 57 entries with this proxy's addons, 36 of them its own),
entering a context manager, a coroutine and two generators per entry, whether or not the entry handles the
event; a request passes 9 events, 4 of them `update`s that nothing handles under mitmdump. That walk was 37% of
the proxy's CPU under load (issue 18). This manager keeps, per event name, the handlers in chain order, and
calls only those. The index is rebuilt lazily after anything that can change the chain or an addon's children:
registering or removing an addon (a script's load and reload) and every `configure` round (the script loader
reorders scripts there). Errors are handled as mitmproxy handles them: logged per handler, `AddonHalt` stops
the event.
"""

import contextlib
import inspect
import types

from mitmproxy import exceptions, flow, hooks
from mitmproxy.addonmanager import AddonManager, safecall, traverse


class IndexedAddonManager(AddonManager):
    """An AddonManager whose events go straight to their handlers."""

    _handlers: dict[str, list]  # event name -> bound handlers in chain order; empty when stale

    def register(self, addon):
        self._handlers = {}
        try:
            return super().register(addon)
        finally:
            self._handlers = {}  # the addon's load may have moved entries of the chain

    def remove(self, addon):
        self._handlers = {}
        try:
            super().remove(addon)
        finally:
            self._handlers = {}

    def clear(self):
        super().clear()
        self._handlers = {}

    def handlers(self, name: str) -> list:
        """The callables handling event `name`, in the order mitmproxy would call them."""
        if (found := self._handlers.get(name)) is None:
            found = self._handlers[name] = list(self._find_handlers(name))
        return found

    def _find_handlers(self, name: str):
        for addon in traverse(self.chain):
            func = getattr(addon, name, None)
            if func is None or isinstance(func, types.ModuleType):  # a module imported under a hook's name
                continue
            if not callable(func):
                raise exceptions.AddonManagerError(f"Addon handler {name} ({addon}) not callable")
            yield func

    async def handle_lifecycle(self, event: hooks.Hook):
        """A flow event, then the `update` event mitmproxy follows it with, only if an addon handles `update`
        (mitmweb's view; nothing under mitmdump)."""
        args = event.args()
        await self._call(event.name, args)
        if args and isinstance(args[0], flow.Flow) and self.handlers("update"):
            await self._call("update", [[args[0]]])

    async def trigger_event(self, event: hooks.Hook):
        await self._call(event.name, event.args())

    async def _call(self, name: str, args: list):
        with self._event(name):
            for func in self.handlers(name):
                try:  # safecall's handling, without entering a context manager per call
                    result = func(*args)
                    if result is not None and inspect.isawaitable(result):
                        await result
                except (exceptions.AddonHalt, exceptions.OptionsError):
                    raise
                except Exception:
                    _log_failure()

    def trigger(self, event: hooks.Hook):
        args = event.args()
        with self._event(event.name):
            for func in self.handlers(event.name):
                try:
                    if inspect.iscoroutinefunction(func):
                        raise exceptions.AddonManagerError(
                            f"Async handler {event.name} ({func}) cannot be called from sync context"
                        )
                    func(*args)
                except (exceptions.AddonHalt, exceptions.OptionsError):
                    raise
                except Exception:
                    _log_failure()

    @contextlib.contextmanager
    def _event(self, name: str):
        """One event: AddonHalt ends it, and a `configure` round leaves the index stale."""
        try:
            yield
        except exceptions.AddonHalt:
            pass
        finally:
            if name == "configure":
                self._handlers = {}


def _log_failure() -> None:
    """The handler's exception being handled, logged as mitmproxy's safecall logs it."""
    with safecall():
        raise


def index_hooks(master) -> None:
    """Makes `master`'s addon manager an IndexedAddonManager (once per process; the chain stays as it is)."""
    if not isinstance(master.addons, IndexedAddonManager):
        master.addons.__class__ = IndexedAddonManager
        master.addons._handlers = {}
        # mitmproxy turns every log record, debug ones included, into the deprecated `add_log` event: formatted,
        # and handed to the event loop from any thread. Built only when an addon still handles it.
        master._legacy_log_events.addFilter(lambda record: bool(master.addons.handlers("add_log")))
