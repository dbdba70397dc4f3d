"""The wiring (addons/wiring.py): every collaborator is handed over, no addon looks another up by name, and every
lifecycle hook is synchronous, as mitmproxy's script reload calls them."""

import ast
import inspect
from pathlib import Path

from mitmproxy.test import taddons, tflow

from addons.failclosed import FailClosed
from addons.settlement import RequestSettledHook, settlement_listener
from addons.wiring import build_addons
from llmproxy import scrub
from llmproxy.config import ConfigSources

ROOT = Path(__file__).resolve().parent.parent
LIFECYCLE_HOOKS = ("load", "configure", "running", "done")


def sources() -> dict[Path, ast.Module]:
    """Every module of addons/ and llmproxy/, parsed."""
    return {
        path: ast.parse(path.read_text(), str(path))
        for package in ("addons", "llmproxy")
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def addon_lookups() -> list[tuple[str, ast.expr]]:
    """(file, name) of every `<...>.addons.get(<name>)` call in the project."""
    return [
        (path.name, node.args[0])
        for path, tree in sources().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get"
        and isinstance(node.func.value, ast.Attribute)
        and node.func.value.attr == "addons"
    ]


def name_of(addon) -> str:
    """The name mitmproxy registers an addon under."""
    return getattr(addon, "name", type(addon).__name__.lower())


def test_no_addon_of_this_proxy_is_looked_up_by_name():
    """A lookup hides a dependency and turns a rename into a failure at run time: collaborators are passed in.
    What is left are lookups of mitmproxy's own addons (mitmweb's flow list, the script loader), by literal name."""
    ours = {name_of(addon) for addon in build_addons(ConfigSources({}), FailClosed())}
    for file, name in addon_lookups():
        assert isinstance(name, ast.Constant), f"{file} looks up an addon by a computed name: {ast.unparse(name)}"
        assert name.value not in ours, f"{file} looks up this proxy's addon {name.value!r} by name"


def test_every_lifecycle_hook_is_synchronous():
    """mitmproxy's script reload calls load, configure, running and done with invoke_addon_sync, which refuses a
    coroutine (and an `async def running` stops the reload watcher)."""
    for path, tree in sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for method in node.body:
                    assert not (isinstance(method, ast.AsyncFunctionDef) and method.name in LIFECYCLE_HOOKS), (
                        f"{path.name}: {node.name}.{method.name} is async"
                    )
    built = build_addons(ConfigSources({}), FailClosed())
    for addon in built:
        for hook in LIFECYCLE_HOOKS:
            if (method := getattr(addon, hook, None)) is not None:
                assert not inspect.iscoroutinefunction(method), f"{type(addon).__name__}.{hook} is async"


def test_the_addons_register_and_load_together():
    """Built once, every addon registers under its own name and declares its options without a collision."""
    with taddons.context() as tctx:
        built = build_addons(ConfigSources({}), FailClosed())
        for addon in built:
            tctx.master.addons.add(addon)
        assert len({name_of(addon) for addon in built}) == len(built)
        assert "queue_mode" in tctx.options and "data_dir" in tctx.options


def test_a_failing_settlement_listener_stops_no_other(caplog):
    """`request_settled` reaches every listener even when one fails, and the failure is logged without the key an
    upstream message may quote."""
    secret = "sk-in-an-upstream-message"
    scrub.register([secret])

    class Failing:
        @settlement_listener
        def request_settled(self, flow, usage, cost, completion):
            raise RuntimeError(f"boom with {secret}")

    class Counting:
        def __init__(self):
            self.settled = []

        @settlement_listener
        def request_settled(self, flow, usage, cost, completion):
            self.settled.append((flow, usage, cost, completion))

    counting, flow = Counting(), tflow.tflow()
    with taddons.context(Failing(), counting) as tctx:
        tctx.master.addons.trigger(RequestSettledHook(flow, None, 0, ""))
    assert RequestSettledHook.name == "request_settled"
    assert counting.settled == [(flow, None, 0, "")]
    assert "Failing.request_settled failed" in caplog.text and secret not in caplog.text
