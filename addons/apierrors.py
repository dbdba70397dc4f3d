"""Errors on the mitmproxy side: a refusal as a response in the client's API format (llmproxy/api/errors.py), and
the guards that make a failing hook refuse where mitmproxy would carry on (forward the flow, keep the setting).
"""

import functools
import inspect
import json
import logging

from mitmproxy import exceptions, http

from addons.flowstate import flow_state
from llmproxy import scrub
from llmproxy.api.errors import api_of_path, error_body
from llmproxy.config import ConfigError
from llmproxy.store import StoreUnavailable

logger = logging.getLogger(__name__)


def error_response(
    api: str, status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> http.Response:
    """A complete JSON error response; `code` also goes into `x-proxy-error` for log readers."""
    return http.Response.make(
        status,
        json.dumps(error_body(api, status, message, code)),
        {"content-type": "application/json", "x-proxy-error": code, **(headers or {})},
    )


def fail_closed(hook):
    """Turns an exception in a flow hook into a 500 for the client instead of mitmproxy's log-and-forward.

    mitmproxy logs an addon's exception and carries on with the flow, which for a proxy means forwarding a
    request that a check never finished looking at. No key is ever on the flow itself, but the request
    must still not go anywhere: a response set here ends it. A flow that has its answer already (the upstream's,
    or a refusal) keeps it: an error after the answer is logged and costs the client nothing. A synchronous hook
    stays synchronous: a coroutine per hook and request is CPU the proxy spends on nothing.
    """
    if inspect.iscoroutinefunction(hook):

        @functools.wraps(hook)
        async def guarded(self, flow: http.HTTPFlow):
            try:
                return await hook(self, flow)
            except Exception as error:
                _failed(self, hook, flow, error)

        return guarded

    @functools.wraps(hook)
    def guarded_sync(self, flow: http.HTTPFlow):
        try:
            return hook(self, flow)
        except Exception as error:
            _failed(self, hook, flow, error)

    return guarded_sync


def _failed(addon: object, hook, flow: http.HTTPFlow, error: Exception) -> None:
    """A guarded hook's failure: logged, and the flow answered with an error unless it has its answer."""
    if isinstance(error, StoreUnavailable):
        logger.warning("%s.%s: %s", type(addon).__name__, hook.__name__, error)
        message = "The proxy's shared store is unavailable; try again shortly."
        _end_flow(flow, 503, message, "store_unavailable", {"retry-after": "5"})
        return
    name = f"{type(addon).__name__}.{hook.__name__}"
    logger.error("%s failed on %s: %s: %s", name, flow.id, type(error).__name__, scrub.text(str(error)))
    tried = flow_state(flow).keys  # the dispatcher's attempts with a key
    fate = "it may have reached the upstream API" if tried else "it was not sent upstream"
    _end_flow(
        flow, 500, f"The proxy hit an internal error while handling this request; {fate}.", "proxy_internal_error"
    )


def refuses_config_errors(configure):
    """Makes a ConfigError of the plain readers (llmproxy) in a `configure` hook refuse the setting: mitmproxy rolls
    an option back only on OptionsError, and logs any other exception and keeps the value."""

    @functools.wraps(configure)
    def refusing(self, updated: set[str]) -> None:
        try:
            configure(self, updated)
        except ConfigError as error:
            raise exceptions.OptionsError(str(error)) from None

    return refusing


def _end_flow(flow: http.HTTPFlow, status: int, message: str, code: str, headers: dict | None = None) -> None:
    """Answers the flow with an error in its client's API format, unless it has an answer already."""
    state = flow_state(flow)
    if flow.live and flow.response is None:
        dialect = state.dialect or api_of_path(flow.request.data.path)
        flow.response = error_response(dialect, status, message, code, headers)
        state.decision = code.removeprefix("proxy_")
