"""Errors the proxy produces itself, in the shape of the API the client is talking to.

OpenAI clients parse `{"error": {"message", "type", "code"}}`; Anthropic clients parse
`{"type": "error", "error": {"type", "message"}}`. Both SDKs raise their usual exception classes for
these bodies, so a user sees a sentence, not a traceback.
"""

import json

from llmproxy.api import ANTHROPIC, GEMINI, sse
from llmproxy.api.routes import merge_slashes
from llmproxy.services import BUILT_IN, dialect_of_path, gemini

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
    if api == GEMINI:
        return gemini.error_body(status, message, code)
    if api == ANTHROPIC:
        error_type = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": error_type, "message": message}}
    return {"error": {"message": message, "type": _openai_type(status), "param": None, "code": code}}


def sse_error_event(api: str, status: int, message: str, code: str) -> bytes:
    """An SSE event that makes the SDKs' stream parsers raise, for errors after the stream began."""
    return error_event(api, error_body(api, status, message, code))


def error_event(api: str, body: dict) -> bytes:
    """An error body as an SSE event: Anthropic's SDK raises on an event named `error`, OpenAI's on data with one."""
    return sse.event(json.dumps(body), "error" if api == ANTHROPIC else None)


def api_of_path(raw_path: bytes) -> str:
    """Which dialect's error format a request target expects."""
    return dialect_of_path(merge_slashes(raw_path))


def api_of_request(host: str, raw_path: bytes) -> str:
    """Which dialect's error format a request expects: its host's, when an app names the API's own host (the forward
    proxy), else its target's."""
    return next((service.dialect for service in BUILT_IN if host in service.hosts), None) or api_of_path(raw_path)
