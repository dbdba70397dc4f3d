"""Errors the proxy produces itself, in the shape of the API the client is talking to.

OpenAI clients parse `{"error": {"message", "type", "code"}}`; Anthropic clients parse
`{"type": "error", "error": {"type", "message"}}`. Both SDKs raise their usual exception classes for
these bodies, so a user sees a sentence, not a traceback.
"""

import functools
import json
import logging
import re

from mitmproxy import http

from addons import scrub
from addons.flowstate import flow_state
from llmproxy.api import ANTHROPIC, OPENAI, sse
from llmproxy.store import StoreUnavailable

logger = logging.getLogger(__name__)

SERVICE_NAMES = {OPENAI: "OpenAI", ANTHROPIC: "Anthropic"}
_SLASH_RUNS = re.compile(rb"//+")

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    426: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def _openai_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(api: str, status: int, message: str, code: str) -> dict:
    """The JSON error object for `api`."""
    if api == ANTHROPIC:
        error_type = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": error_type, "message": message}}
    return {"error": {"message": message, "type": _openai_type(status), "param": None, "code": code}}


def error_response(
    api: str, status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> http.Response:
    """A complete JSON error response; `code` also goes into `x-proxy-error` for log readers."""
    return http.Response.make(
        status,
        json.dumps(error_body(api, status, message, code)),
        {"content-type": "application/json", "x-proxy-error": code, **(headers or {})},
    )


def sse_error_event(api: str, status: int, message: str, code: str) -> bytes:
    """An SSE event that makes the SDKs' stream parsers raise, for errors after the stream began."""
    return error_event(api, error_body(api, status, message, code))


def error_event(api: str, body: dict) -> bytes:
    """An error body as an SSE event: Anthropic's SDK raises on an event named `error`, OpenAI's on data with one."""
    return sse.event(json.dumps(body), "error" if api == ANTHROPIC else None)


def merge_slashes(raw_path: bytes) -> bytes:
    """`raw_path` with each run of slashes as one (`/proxy/openai/v1//chat` -> `/proxy/openai/v1/chat`)."""
    return _SLASH_RUNS.sub(b"/", raw_path)


def api_of_path(raw_path: bytes) -> str:
    """Which API's error format a request target expects."""
    return ANTHROPIC if merge_slashes(raw_path).startswith(b"/proxy/anthropic") else OPENAI


def fail_closed(hook):
    """Turns an exception in a flow hook into a 500 for the client instead of mitmproxy's log-and-forward.

    mitmproxy logs an addon's exception and carries on with the flow, which for a proxy means forwarding a
    request that a check never finished looking at. No key is ever on the flow itself, but the request
    must still not go anywhere: a response set here ends it. A flow that has its answer already (the upstream's,
    or a refusal) keeps it: an error after the answer is logged and costs the client nothing.
    """

    @functools.wraps(hook)
    async def guarded(self, flow: http.HTTPFlow):
        try:
            return await hook(self, flow)
        except StoreUnavailable as error:
            logger.warning("%s.%s: %s", type(self).__name__, hook.__name__, error)
            message = "The proxy's shared store is unavailable; try again shortly."
            _end_flow(flow, 503, message, "store_unavailable", {"retry-after": "5"})
        except Exception as error:
            name = f"{type(self).__name__}.{hook.__name__}"
            logger.error("%s failed on %s: %s: %s", name, flow.id, type(error).__name__, scrub.text(str(error)))
            tried = flow_state(flow).keys  # the dispatcher's attempts with a key
            fate = "it may have reached the upstream API" if tried else "it was not sent upstream"
            _end_flow(
                flow,
                500,
                f"The proxy hit an internal error while handling this request; {fate}.",
                "proxy_internal_error",
            )

    return guarded


def _end_flow(flow: http.HTTPFlow, status: int, message: str, code: str, headers: dict | None = None) -> None:
    """Answers the flow with an error in its client's API format, unless it has an answer already."""
    state = flow_state(flow)
    if flow.live and flow.response is None:
        dialect = state.dialect or api_of_path(flow.request.data.path)
        flow.response = error_response(dialect, status, message, code, headers)
        state.decision = code.removeprefix("proxy_")
