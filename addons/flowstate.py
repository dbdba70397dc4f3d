"""Each flow's FlowState (llmproxy/flowstate.py), kept beside the flow object rather than in its metadata, and what
the addons read through it: the flow's route, its parsed body.

`flow.metadata` is serialised by `-w` and HAR exports and deep-copied with the flow, so it holds no runtime state;
keyed weakly by the flow, a state goes when its flow goes.
"""

import functools
import json
import weakref

from mitmproxy import http
from mitmproxy.net.http import url

from llmproxy.api.body import parse_body
from llmproxy.api.routes import FORWARD, Route
from llmproxy.flowstate import FlowState

_states: "weakref.WeakKeyDictionary[http.HTTPFlow, FlowState]" = weakref.WeakKeyDictionary()


def flow_state(flow: http.HTTPFlow) -> FlowState:
    """The flow's state; an empty one for a flow no addon has seen yet."""
    if (state := _states.get(flow)) is None:
        state = _states[flow] = FlowState()
    return state


def new_flow_state(flow: http.HTTPFlow) -> FlowState:
    """A fresh state for a request that arrives, or arrives again: mitmweb replays a flow as the same object."""
    state = _states[flow] = FlowState()
    return state


def forward_route(flow: http.HTTPFlow) -> Route | None:
    """The route of a live, still unanswered flow that is to go upstream; None for every other flow."""
    if flow.response or not flow.live:
        return None
    route = flow_state(flow).route
    return route if route is not None and route.kind == FORWARD else None


def parsed_body(flow: http.HTTPFlow) -> dict:
    """The body of a forwarded request as a dict, parsed once per arrival; raises BodyError when it is not a JSON
    object."""
    state = flow_state(flow)
    if state.body is None:
        state.body = parse_body(flow.request.raw_content or b"")
    return state.body


def replace_body(flow: http.HTTPFlow, body: dict) -> None:
    """Makes `body` what the upstream will receive, and what later addons read."""
    flow.request.content = json.dumps(body).encode()
    flow_state(flow).body = body


@functools.lru_cache(maxsize=64)
def upstream_target(upstream_url: str) -> tuple[bytes, bytes, int, bytes]:
    """(scheme, host, port, path) of a flow's `upstream_url` as mitmproxy parses it: one per route, parsed once."""
    return url.parse(upstream_url)
