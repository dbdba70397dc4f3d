"""The indexed addon manager calls events as mitmproxy's own would: in chain order, children after their parent,
errors logged per handler, AddonHalt ending the event, and a changed chain seen at the next event."""

import asyncio
import logging

from mitmproxy import exceptions, hooks
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import taddons, tflow

from addons.hookindex import IndexedAddonManager, index_hooks


class Recorder:
    def __init__(self, name: str, calls: list, children: list = ()):
        self.name, self.calls, self.addons = name, calls, list(children)

    def request(self, flow):
        self.calls.append(self.name)


class Silent:
    """Handles no flow event."""


class Raising(Recorder):
    def request(self, flow):
        super().request(flow)
        raise ValueError("boom")


class Halting(Recorder):
    def request(self, flow):
        super().request(flow)
        raise exceptions.AddonHalt()


class AsyncRecorder(Recorder):
    async def request(self, flow):
        self.calls.append(self.name)


def indexed(*addons):
    context = taddons.context()
    index_hooks(context.master)
    context.master.addons.add(*addons)
    return context


async def test_events_reach_handlers_in_chain_order_children_after_parents():
    calls = []
    with indexed(Recorder("a", calls, [Recorder("a.child", calls)]), Silent(), AsyncRecorder("b", calls)) as context:
        assert isinstance(context.master.addons, IndexedAddonManager)
        await context.master.addons.trigger_event(HttpRequestHook(tflow.tflow()))
    assert calls == ["a", "a.child", "b"]


async def test_an_error_is_logged_and_the_next_handler_still_runs(caplog):
    calls = []
    with indexed(Raising("a", calls), Recorder("b", calls)) as context, caplog.at_level(logging.ERROR):
        await context.master.addons.trigger_event(HttpRequestHook(tflow.tflow()))
    assert calls == ["a", "b"]
    assert "Addon error: boom" in caplog.text


async def test_addon_halt_ends_the_event():
    calls = []
    with indexed(Halting("a", calls), Recorder("b", calls)) as context:
        await context.master.addons.trigger_event(HttpRequestHook(tflow.tflow()))
        context.master.addons.trigger(HttpRequestHook(tflow.tflow()))
    assert calls == ["a", "a"]


async def test_a_changed_chain_is_seen_at_the_next_event():
    calls = []
    first, parent = Recorder("first", calls), Recorder("parent", calls)
    with indexed(first, parent) as context:
        manager = context.master.addons
        await manager.trigger_event(HttpRequestHook(tflow.tflow()))
        manager.remove(first)
        manager.add(Recorder("added", calls))
        await manager.trigger_event(HttpRequestHook(tflow.tflow()))
        # A parent's children may change without the manager's knowing (mitmproxy's script loader reorders its
        # scripts inside `configure`): every configure round makes the index stale.
        parent.addons.append(Recorder("late child", calls))
        manager.trigger(hooks.ConfigureHook(set()))
        await manager.trigger_event(HttpRequestHook(tflow.tflow()))
    assert calls == ["first", "parent", "parent", "added", "parent", "late child", "added"]


def test_an_async_handler_cannot_run_in_a_sync_trigger(caplog):
    calls = []
    with indexed(AsyncRecorder("a", calls), Recorder("b", calls)) as context, caplog.at_level(logging.ERROR):
        context.master.addons.trigger(HttpRequestHook(tflow.tflow()))
    assert calls == ["b"]
    assert "cannot be called from sync context" in caplog.text


class LogListener:
    def __init__(self):
        self.entries = []

    def add_log(self, entry):
        self.entries.append(entry.msg)


async def test_log_records_become_add_log_events_only_while_an_addon_handles_them():
    listener = LogListener()
    with indexed(Recorder("a", [])) as context:
        handler = context.master._legacy_log_events
        record = logging.LogRecord("test", logging.INFO, __file__, 1, "hello", (), None)
        assert not handler.filter(record)
        context.master.addons.add(listener)
        assert handler.filter(record)
        logging.getLogger("test.hookindex").warning("heard")
        await asyncio.sleep(0)  # the record was handed to the loop with call_soon_threadsafe: one turn delivers it
    assert [entry.endswith("heard") for entry in listener.entries] == [True]


class UpdateListener:
    def __init__(self):
        self.updated = []

    def update(self, flows):
        self.updated.append(flows)


async def test_a_flow_event_is_followed_by_update_as_mitmproxy_does_while_an_addon_handles_it():
    calls, listener, flow = [], UpdateListener(), tflow.tflow()
    with indexed(Recorder("a", calls)) as context:
        await context.master.addons.handle_lifecycle(HttpRequestHook(flow))
        context.master.addons.add(listener)
        await context.master.addons.handle_lifecycle(HttpRequestHook(flow))
    assert calls == ["a", "a"] and listener.updated == [[flow]]
