"""Token usage as the upstream reports it, from a JSON answer or from an SSE stream as it passes.

For a stream the meter reads every event: OpenAI's final `usage` chunk (which the proxy asks for and, when the
client did not, removes again), the Responses API's last event (`response.completed`, `response.incomplete` or
`response.failed`: whichever ends the stream carries the usage), Anthropic's `message_start` and `message_delta`.
When a stream ends early the count is estimated from the text that did reach the client.
"""

import json
from dataclasses import dataclass

from addons.apierrors import ANTHROPIC

_RESPONSE_ENDINGS = ("response.completed", "response.incomplete", "response.failed")
CHARACTERS_PER_TOKEN = 4  # the usual English average of both tokenizers; only used when the upstream's figure is missing


@dataclass
class Usage:
    input: int = 0
    output: int = 0
    estimated: bool = False

    @property
    def total(self) -> int:
        return self.input + self.output


def _from_usage_object(usage: dict) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    if "prompt_tokens" in usage:  # chat completions, completions, embeddings
        return Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
    if "input_tokens" in usage:  # Responses API, Anthropic (cache reads and writes are input too)
        cached = sum(int(usage.get(k) or 0) for k in ("cache_creation_input_tokens", "cache_read_input_tokens"))
        return Usage(int(usage.get("input_tokens") or 0) + cached, int(usage.get("output_tokens") or 0))
    return None


def read_answer(body: bytes) -> tuple[Usage | None, str]:
    """A buffered answer's reported usage (None when it reports none) and its generated text, parsed once."""
    try:
        data = json.loads(body)
    except ValueError:
        return None, ""
    if not isinstance(data, dict):
        return None, ""
    parts = []
    for choice in data.get("choices") or []:  # chat completions, completions
        parts.append(choice.get("text") or (choice.get("message") or {}).get("content") or "")
    for item in data.get("output") or []:  # Responses API
        parts.extend(c.get("text", "") for c in item.get("content") or [] if isinstance(c, dict))
    parts.extend(block.get("text", "") for block in data.get("content") or [] if isinstance(block, dict))  # Claude
    parts.append(data.get("completion") or "")  # Claude text completions
    return _from_usage_object(data.get("usage")), "".join(part for part in parts if isinstance(part, str))


class StreamMeter:
    """Follows an SSE stream event by event; `feed` returns the bytes to pass on."""

    def __init__(self, api: str, drop_usage_chunk: bool, keep_text: bool = False):
        self.api = api
        self.drop_usage_chunk = drop_usage_chunk  # the proxy asked for OpenAI's usage chunk; the client did not
        self.keep_text = keep_text  # for the prompt log
        self.usage: Usage | None = None
        self.input_seen = 0
        self.text_characters = 0
        self.text_parts: list[str] = []
        self._anthropic_usage: dict = {}
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        self._pending += chunk
        *events, self._pending = self._pending.replace(b"\r\n", b"\n").split(b"\n\n")
        kept = [event for event in events if self._read(event)]
        if not self.drop_usage_chunk:
            return chunk  # passed on untouched, as it came
        return b"".join(event + b"\n\n" for event in kept)

    def flush(self) -> bytes:
        """What is left of an unterminated last event, once the stream has ended."""
        rest, self._pending = self._pending, b""
        return rest if self.drop_usage_chunk else b""

    def finish(self, prompt_estimate: int) -> Usage:
        """The stream's usage: the upstream's figures, or an estimate from what was streamed."""
        if self.usage is not None:
            return self.usage
        output = -(-self.text_characters // CHARACTERS_PER_TOKEN)
        return Usage(self.input_seen or prompt_estimate, output, estimated=True)

    def _read(self, event: bytes) -> bool:
        """Learns from one event; False when the event is to be left out."""
        data = b"\n".join(line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:"))
        if not data or data == b"[DONE]":
            return True
        try:
            payload = json.loads(data)
        except ValueError:
            return True
        if not isinstance(payload, dict):
            return True
        if self.api == ANTHROPIC:
            self._read_anthropic(payload)
            return True
        if payload.get("type") in _RESPONSE_ENDINGS:
            response = payload.get("response") if isinstance(payload.get("response"), dict) else {}
            self.usage = _from_usage_object(response.get("usage")) or self.usage
        elif isinstance(delta := payload.get("delta"), str):  # Responses API text deltas
            self._text(delta)
        for choice in payload.get("choices") or []:
            self._text(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
        if (usage := _from_usage_object(payload.get("usage"))) is not None:
            self.usage = usage
            return not (self.drop_usage_chunk and not payload.get("choices"))
        return True

    def _text(self, text) -> None:
        if isinstance(text, str) and text:
            self.text_characters += len(text)
            if self.keep_text:
                self.text_parts.append(text)

    def _read_anthropic(self, payload: dict) -> None:
        kind = payload.get("type")
        if kind == "message_start":
            message = payload.get("message") if isinstance(payload.get("message"), dict) else {}
            self._anthropic_usage = message.get("usage") if isinstance(message.get("usage"), dict) else {}
            self.input_seen = (_from_usage_object(self._anthropic_usage) or Usage()).input
        elif kind == "content_block_delta":
            delta = payload.get("delta") if isinstance(payload.get("delta"), dict) else {}
            self._text(delta.get("text") or delta.get("thinking") or delta.get("partial_json") or "")
        elif kind == "message_delta" and isinstance(payload.get("usage"), dict):
            # The final figures; newer API versions repeat the input and cache figures here, older ones do not.
            self._anthropic_usage = {"input_tokens": 0, **self._anthropic_usage, **payload["usage"]}
            self.usage = _from_usage_object(self._anthropic_usage)
