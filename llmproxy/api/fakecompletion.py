"""An assistant message the proxy makes up, in the format of the route the client called: chat completions, text
completions, the Responses API, Messages, text completions for Claude; as JSON or, when the client asked to
stream, as SSE. Chat frontends that show nothing but message text show it (PROXY_ERROR_FORMAT=completion).
"""

import json
import time
import uuid

from llmproxy.api import sse

_CHAT_ROUTES = ("openai.chat_completions", "anthropic.chat_completions")
# The routes whose answers are assistant messages, so that a refusal can be one too.
MESSAGE_ROUTES = (*_CHAT_ROUTES, "openai.completions", "openai.responses", "anthropic.messages", "anthropic.complete")


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
