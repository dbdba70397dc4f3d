"""Each flow's FlowState (llmproxy/flowstate.py), kept beside the flow object rather than in its metadata.

`flow.metadata` is serialised by `-w` and HAR exports and deep-copied with the flow, so it holds no runtime state;
keyed weakly by the flow, a state goes when its flow goes.
"""

import weakref

from mitmproxy import http

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
