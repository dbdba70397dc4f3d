"""How refusals reach the user: as real errors, or as an assistant message a chat frontend will show.

`PROXY_ERROR_FORMAT=error` (the default) keeps the error status and the API's JSON error, so SDKs raise properly.
`completion` answers HTTP 200 with a made-up assistant message in the client's own format, streamed as SSE when
the client asked to stream, because some chat frontends show nothing but message text.
"""

import json
import time
import uuid

from mitmproxy import ctx, exceptions, http

from addons.apierrors import fail_closed
from addons.body import parsed_body
from addons.flowstate import flow_state
from addons.routes import ROUTES_BY_NAME
from llmproxy.api import sse

ERROR_FORMATS = ("error", "completion")
_CHAT_ROUTES = ("openai.chat_completions", "anthropic.chat_completions")
# The routes whose answers are assistant messages, so that a refusal can be one too.
_MESSAGE_ROUTES = (*_CHAT_ROUTES, "openai.completions", "openai.responses", "anthropic.messages", "anthropic.complete")


def _json_stream(events: list[tuple[str | None, dict | str]]) -> bytes:
    """(event name or None, data) pairs as a stream, each dict as JSON."""
    return b"".join(sse.event(data if isinstance(data, str) else json.dumps(data), name) for name, data in events)


def fake_completion(route: str, model: str, text: str, stream: bool) -> tuple[bytes, str]:
    """(body, content type) of an assistant message saying `text`, in the format of `route`."""
    now, ident = int(time.time()), f"proxy-{uuid.uuid4().hex[:24]}"
    if route in _CHAT_ROUTES:
        if not stream:
            return json.dumps(
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": now,
                    "model": model,
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                }
            ).encode(), "application/json"

        def chunk(delta, finish):
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": now,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        return _json_stream(
            [(None, chunk({"role": "assistant", "content": text}, None)), (None, chunk({}, "stop")), (None, "[DONE]")]
        ), sse.MEDIA_TYPE
    if route == "openai.completions":
        choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
        body = {"id": ident, "object": "text_completion", "created": now, "model": model, "choices": [choice]}
        return (
            (_json_stream([(None, body), (None, "[DONE]")]), sse.MEDIA_TYPE)
            if stream
            else (json.dumps(body).encode(), "application/json")
        )
    if route == "openai.responses":
        response = {
            "id": ident,
            "object": "response",
            "created_at": now,
            "model": model,
            "status": "completed",
            "output": [
                {
                    "type": "message",
                    "id": f"msg_{ident}",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ],
            "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
        }
        if not stream:
            return json.dumps(response).encode(), "application/json"
        return _json_stream(
            [
                (
                    "response.output_text.delta",
                    {
                        "type": "response.output_text.delta",
                        "delta": text,
                        "item_id": f"msg_{ident}",
                        "output_index": 0,
                        "content_index": 0,
                        "sequence_number": 0,
                    },
                ),
                ("response.completed", {"type": "response.completed", "response": response, "sequence_number": 1}),
            ]
        ), sse.MEDIA_TYPE
    if route == "anthropic.complete":
        body = {"type": "completion", "id": ident, "completion": text, "stop_reason": "stop_sequence", "model": model}
        return (
            (_json_stream([("completion", body)]), sse.MEDIA_TYPE)
            if stream
            else (json.dumps(body).encode(), "application/json")
        )
    message = {
        "id": ident,
        "type": "message",
        "role": "assistant",
        "model": model,
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }
    if not stream:
        return json.dumps({**message, "content": [{"type": "text", "text": text}]}).encode(), "application/json"
    return _json_stream(
        [
            ("message_start", {"type": "message_start", "message": {**message, "content": [], "stop_reason": None}}),
            (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 0},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
    ), sse.MEDIA_TYPE


class RefusalFormat:
    """Rewrites error answers of generation routes into assistant messages when PROXY_ERROR_FORMAT=completion."""

    def load(self, loader):
        loader.add_option(
            "proxy_error_format",
            str,
            "error",
            "error: real error statuses; completion: HTTP 200 with the error as an assistant message.",
        )

    def configure(self, updated):
        if "proxy_error_format" in updated and ctx.options.proxy_error_format not in ERROR_FORMATS:
            raise exceptions.OptionsError(f"PROXY_ERROR_FORMAT must be one of {', '.join(ERROR_FORMATS)}.")

    @fail_closed
    async def response(self, flow: http.HTTPFlow) -> None:
        route = ROUTES_BY_NAME.get(flow_state(flow).route)
        response = flow.response
        if (
            ctx.options.proxy_error_format != "completion"
            or route is None
            or response.stream
            or response.status_code < 400
            or route.name not in _MESSAGE_ROUTES
        ):
            return
        try:
            error = json.loads(response.content).get("error", {})
            message = error.get("message") if isinstance(error, dict) else str(error)
        except (ValueError, AttributeError):
            message = response.text[:500]
        try:
            body = parsed_body(flow)
        except ValueError:
            body = {}
        text = f"**Proxy error (HTTP {response.status_code})**\n\n{message}"
        content, content_type = fake_completion(
            route.name, str(body.get("model", "")), text, body.get("stream") is True
        )
        headers = response.headers.copy()
        headers.pop("content-length", None)
        headers["content-type"] = content_type
        headers["x-proxy-error-status"] = str(response.status_code)
        headers.setdefault("x-proxy-error", "upstream_error")
        flow.response = http.Response.make(200, content, headers)
