"""The last word on every request: nothing leaves the proxy unless the live policy pipeline sent it.

mitmproxy fails open: a script that fails to import, a reload that breaks it, an option its `configure` rejects
(the script is then left unregistered or half-configured), or an addon that raises, all leave mitmproxy
forwarding requests as they came. This addon is registered on the master itself, once per process, at the end
of the chain, so it outlives every reload of the script and runs after every other `request` hook (the user's
own scripts included). A request that has no answer by then may only go to the pipe of a pipeline that
configured and started completely; anything else gets a 503 in its API's format.
"""

import logging

from mitmproxy import ctx, http

from addons.apierrors import error_response
from addons.flowstate import flow_state
from llmproxy.api.errors import api_of_request

logger = logging.getLogger(__name__)

NOT_LOADED = (
    "The proxy's policy is not loaded (its script failed to load or reload, or a setting was refused; the proxy's "
    "log says why), so it forwards nothing."
)


class FailClosed:
    """Refuses every request that the live pipeline did not answer, point at its pipe, or pass through."""

    def __init__(self):
        self.pipes: dict[object, tuple[str, int]] = {}  # attached pipeline -> the loopback address of its pipe

    def attach(self, pipeline: object, pipe_address: tuple[str, int]) -> None:
        """A pipeline that configured and started completely; flows pointed at its pipe may leave."""
        self.pipes[pipeline] = pipe_address

    def detach(self, pipeline: object) -> None:
        self.pipes.pop(pipeline, None)

    def running(self):
        # mitmproxy exits when an error was logged during start-up; say why, unless the failure said it already.
        errorcheck = ctx.master.addons.get("errorcheck")  # mitmproxy's own
        if not self.pipes and not (errorcheck and errorcheck.logger.has_errored):
            logger.error(NOT_LOADED)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Another script may ask to stream the request body; it would leave before any check read it.
        flow.request.stream = False

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        destination = (flow.request.host, flow.request.port)
        if destination in self.pipes.values():
            return
        if self.pipes and flow_state(flow).passthrough:  # under forward_proxy, a host other than the APIs'
            return
        api = api_of_request(flow.request.pretty_host, flow.request.data.path)
        if not self.pipes:
            flow.response = error_response(api, 503, NOT_LOADED, "policy_not_loaded")
            return
        logger.error("%s %s had no answer and no route after every addon ran; refused.", flow.id, flow.request.method)
        flow.response = error_response(
            api, 502, "The proxy did not route this request, so it was not sent anywhere.", "not_routed"
        )
