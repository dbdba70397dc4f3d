"""`request_settled`: the one event that ends a request's accounting, whatever became of it.

The dispatcher triggers it once per request it took on: after a buffered answer, at the end of a stream, when the
client left, when the upstream failed or the request was refused while it waited. Its listeners (the quota keeper,
the metrics, the prompt log) bill, count and log the request from the figures it carries.
"""

import functools
import logging
from dataclasses import dataclass

from mitmproxy import hooks, http

from llmproxy import scrub
from llmproxy.api.usage import Usage

logger = logging.getLogger(__name__)


@dataclass
class RequestSettledHook(hooks.Hook):
    """A request is over and its usage final. Handlers must be synchronous: it is triggered from callbacks and
    `finally` blocks that cannot wait."""

    flow: http.HTTPFlow
    usage: Usage | None  # what the upstream reported, or the proxy estimated; None: nothing was produced
    cost: int  # of `usage`, in nano-dollars at the configured prices
    completion: str  # the generated text when prompt logging keeps it, else ""


def settlement_listener(handler):
    """Makes a `request_settled` handler's failure a log line (scrubbed: an exception may quote an upstream
    message, and with it a key) that stops neither the other listeners nor the answer, which the client has or
    is receiving."""

    @functools.wraps(handler)
    def contained(self, flow: http.HTTPFlow, usage: Usage | None, cost: int, completion: str) -> None:
        try:
            handler(self, flow, usage, cost, completion)
        except Exception as error:  # whatever it is, the answer must not pay for it
            logger.error(
                "%s.request_settled failed on %s: %s: %s",
                type(self).__name__,
                flow.id,
                type(error).__name__,
                scrub.text(str(error)),
            )

    return contained
