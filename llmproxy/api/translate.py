"""The OpenAI chat format for Claude (`POST /proxy/anthropic/v1/chat/completions`), translated both ways.

Requests are translated to the Messages API (system messages, roles, merged consecutive turns, stop sequences,
sampling, `max_tokens`, images, tools); answers come back as `chat.completion` objects, and streams event by
event as `chat.completion.chunk`s with a finish reason and the closing `data: [DONE]`.
"""

import json
import re
import time

from llmproxy.api import sse
from llmproxy.api.usage import Usage, from_usage_object

DEFAULT_MAX_TOKENS = 4096  # the Messages API requires one; OpenAI clients often send none
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
    "refusal": "content_filter",
}
_DATA_URL = re.compile(r"data:(?P<media>[\w/+.-]+);base64,(?P<data>.+)", re.DOTALL)


def _blocks(content) -> list[dict]:
    """OpenAI message content as Messages API content blocks."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for part in content:
        if part.get("type") == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif part.get("type") == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            if match := _DATA_URL.fullmatch(url):
                blocks.append(
                    {"type": "image", "source": {"type": "base64", "media_type": match["media"], "data": match["data"]}}
                )
            else:
                blocks.append({"type": "image", "source": {"type": "url", "url": url}})
    return blocks


def _text_of(content) -> str:
    return "\n".join(block["text"] for block in _blocks(content) if block["type"] == "text")


def chat_to_messages(body: dict) -> dict:
    """An OpenAI chat request as a Messages API request."""
    system, turns = [], []
    for message in body["messages"]:
        role = message["role"]
        if role in ("system", "developer"):
            system.append(_text_of(message.get("content")))
            continue
        if role in ("tool", "function"):
            result = {"tool_use_id": message.get("tool_call_id", ""), "content": _text_of(message.get("content"))}
            role, blocks = "user", [{"type": "tool_result", **result}]
        else:
            blocks = _blocks(message.get("content"))
            if name := message.get("name"):
                blocks = [{"type": "text", "text": f"{name}: "}, *blocks] if role == "user" else blocks
            for call in message.get("tool_calls") or []:
                function = call.get("function", {})
                try:
                    arguments = json.loads(function.get("arguments") or "{}")
                except ValueError:
                    arguments = {}
                blocks.append(
                    {"type": "tool_use", "id": call.get("id", ""), "name": function.get("name", ""), "input": arguments}
                )
        if turns and turns[-1]["role"] == role:  # the Messages API wants turns to alternate
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if not turns or turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": [{"type": "text", "text": "(continue)"}]})
    request = {
        "model": body["model"],
        "messages": turns,
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS,
        "stream": body.get("stream") is True,
    }
    if system:
        request["system"] = "\n\n".join(system)
    if stop := body.get("stop"):
        request["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if isinstance(body.get("temperature"), (int, float)):
        request["temperature"] = min(1.0, max(0.0, float(body["temperature"])))  # Claude's range is 0..1
    if isinstance(body.get("top_p"), (int, float)):
        request["top_p"] = body["top_p"]
    if isinstance(body.get("user"), str):
        request["metadata"] = {"user_id": body["user"]}
    if tools := body.get("tools"):
        request["tools"] = [
            {
                "name": t["function"]["name"],
                "description": t["function"].get("description", ""),
                "input_schema": t["function"].get("parameters") or {"type": "object"},
            }
            for t in tools
            if t.get("type") == "function"
        ]
        choice = body.get("tool_choice")
        if choice == "required":
            request["tool_choice"] = {"type": "any"}
        elif choice == "none":
            request["tool_choice"] = {"type": "none"}
        elif isinstance(choice, dict):
            request["tool_choice"] = {"type": "tool", "name": choice.get("function", {}).get("name", "")}
    return request


def _usage(usage) -> dict:
    """Claude's usage in OpenAI's shape, its figures read as billing reads them (an odd one as 0)."""
    figures = from_usage_object(usage) or Usage()
    return {"prompt_tokens": figures.prompt, "completion_tokens": figures.output, "total_tokens": figures.total}


def message_to_chat(answer: bytes | str) -> bytes:
    """A Messages API answer (or error) as an OpenAI chat completion (or error)."""
    data = json.loads(answer)
    if data.get("type") == "error" or "error" in data:
        error = data.get("error") or {}
        return json.dumps(
            {
                "error": {
                    "message": error.get("message", ""),
                    "type": error.get("type", "api_error"),
                    "param": None,
                    "code": None,
                }
            }
        ).encode()
    text = "".join(block.get("text", "") for block in data.get("content", []) if block.get("type") == "text")
    calls = [
        {
            "id": block["id"],
            "type": "function",
            "function": {"name": block["name"], "arguments": json.dumps(block.get("input", {}))},
        }
        for block in data.get("content", [])
        if block.get("type") == "tool_use"
    ]
    message = {
        "role": "assistant",
        "content": text or (None if calls else ""),
        **({"tool_calls": calls} if calls else {}),
    }
    return json.dumps(
        {
            "id": f"chatcmpl-{data.get('id', '')}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": data.get("model", ""),
            "choices": [
                {"index": 0, "message": message, "finish_reason": FINISH_REASONS.get(data.get("stop_reason"), "stop")}
            ],
            "usage": _usage(data.get("usage")),
        }
    ).encode()


class MessagesToChatStream:
    """Messages API stream events in, OpenAI chat chunks out (with `[DONE]`), event by event."""

    def __init__(self, include_usage: bool):
        self.include_usage = include_usage
        self.id, self.model, self.created = "chatcmpl-", "", int(time.time())
        self.usage: dict = {}
        self.tool_index: dict[int, int] = {}  # content block index -> tool call index
        self._events = sse.Parser()

    def _chunk(self, delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage:
            chunk["usage"] = usage
        return sse.event(json.dumps(chunk))

    def feed(self, chunk: bytes) -> bytes:
        return b"".join(self._translate(event.data) for event in self._events.feed(chunk))

    def _translate(self, data: str) -> bytes:
        try:
            payload = json.loads(data)
        except ValueError:
            return b""
        kind = payload.get("type")
        if kind == "message_start":
            message = payload.get("message", {})
            self.id, self.model = f"chatcmpl-{message.get('id', '')}", message.get("model", "")
            self.usage = message.get("usage") if isinstance(message.get("usage"), dict) else {}
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start" and payload.get("content_block", {}).get("type") == "tool_use":
            block = payload["content_block"]
            index = self.tool_index.setdefault(payload.get("index", 0), len(self.tool_index))
            return self._chunk(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": block.get("id"),
                            "type": "function",
                            "function": {"name": block.get("name"), "arguments": ""},
                        }
                    ]
                }
            )
        if kind == "content_block_delta":
            delta = payload.get("delta", {})
            if delta.get("type") == "text_delta":
                return self._chunk({"content": delta.get("text", "")})
            if delta.get("type") == "input_json_delta":
                index = self.tool_index.get(payload.get("index", 0), 0)
                return self._chunk(
                    {"tool_calls": [{"index": index, "function": {"arguments": delta.get("partial_json", "")}}]}
                )
        if kind == "message_delta":
            if isinstance(payload.get("usage"), dict):
                self.usage = {**self.usage, **payload["usage"]}
            finish = FINISH_REASONS.get(payload.get("delta", {}).get("stop_reason"), "stop")
            return self._chunk({}, finish)
        if kind == "message_stop":
            return (self._chunk({}, usage=_usage(self.usage)) if self.include_usage else b"") + sse.event("[DONE]")
        if kind == "error":
            return sse.event(message_to_chat(data).decode())
        return b""  # ping, content_block_start/stop of text
