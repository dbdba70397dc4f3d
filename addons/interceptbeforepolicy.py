"""mitmweb's intercept, at the point where an edit still decides what is sent.

mitmproxy pauses an intercepted flow once every addon has run its `request` hook, which here is after the
dispatcher's upstream call: edits changed nothing that was sent, yet the flow showed them, and `~q` (no response
yet) never matched. This addon runs first among the proxy's `request` hooks, right after mitmproxy's Intercept
addon (proxy.py places them), and waits there for the user's resume: what they edit is what the policy checks and
the upstream receives, and the key is still added last, out of sight.
"""

from mitmproxy import http

from addons.apierrors import error_response, fail_closed
from addons.flowstate import flow_state
from llmproxy.api import routes
from llmproxy.api.headers import upstream_request_headers


class InterceptBeforePolicy:
    """Holds an intercepted request before the policy; after the resume, its edits pass the same checks."""

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if not flow.intercepted or flow.response:
            return
        state = flow_state(flow)
        target = flow.request.data.method, flow.request.data.path
        await flow.wait_for_resume()
        if not flow.live:
            return  # killed in mitmweb
        route = state.route
        if route is None or route.kind != routes.FORWARD:
            return  # not a request for an API: answered locally, or passed through (./run.sh local)
        if (flow.request.data.method, flow.request.data.path) != target:
            state.decision = "blocked_path"
            flow.response = error_response(
                route.dialect,
                400,
                "The method and path of an intercepted request cannot be changed: its route was decided before the "
                "pause. Edit its body and headers, or send a new request.",
                "intercepted_target_changed",
            )
            return
        # Headers were filtered when the request arrived; an editor may have added any (a credential, say).
        fields = flow.request.headers.items(multi=True)
        flow.request.headers = http.Headers(upstream_request_headers(fields, route.wire))
