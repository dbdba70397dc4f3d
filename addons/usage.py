"""Token usage as the upstream reports it, from a JSON answer or from an SSE stream as it passes, by the kinds the
providers price differently: input, cache reads, cache writes (5-minute and 1-hour), output, and web searches.

For a stream the meter reads every event: OpenAI's final `usage` chunk (which the proxy asks for and, when the
client did not, removes again), the Responses API's last event (`response.completed`, `response.incomplete` or
`response.failed`: whichever ends the stream carries the usage), Anthropic's `message_start` and `message_delta`.
When a stream ends early the output is estimated from the text that did reach the client.
"""

import json
from dataclasses import asdict, dataclass, replace

from addons.apierrors import ANTHROPIC

_RESPONSE_ENDINGS = ("response.completed", "response.incomplete", "response.failed")
CHARACTERS_PER_TOKEN = 4  # the usual English average of both tokenizers; only used when the upstream's figure is missing


@dataclass
class Usage:
    """A request's tokens by price. The prompt is split into `input` (billed at the input price) and the tokens
    read from or written to the prompt cache; `reasoning` is the part of `output` the model spent thinking."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    reasoning: int = 0
    web_searches: int = 0
    estimated: bool = False

    @property
    def prompt(self) -> int:
        return self.input + self.cache_read + self.cache_write_5m + self.cache_write_1h

    @property
    def total(self) -> int:
        """What token quotas count: every prompt token, cached or not, and every output token."""
        return self.prompt + self.output

    def counts(self) -> dict[str, int]:
        return {name: value for name, value in asdict(self).items() if name != "estimated"}


def _count(figures, name: str) -> int:
    value = figures.get(name) if isinstance(figures, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _from_usage_object(usage) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    if "prompt_tokens" in usage:  # chat completions, completions, embeddings: cached tokens are part of the prompt
        cached = _count(usage.get("prompt_tokens_details"), "cached_tokens")
        return Usage(max(0, _count(usage, "prompt_tokens") - cached), _count(usage, "completion_tokens"), cached,
                     reasoning=_count(usage.get("completion_tokens_details"), "reasoning_tokens"))  # fmt: skip
    if "input_tokens" not in usage:
        return None
    # Responses API: cached tokens are part of input_tokens. Anthropic: cache reads and writes are not, and the
    # writes are split by lifetime under cache_creation (an answer without the split wrote 5-minute entries).
    cached = _count(usage.get("input_tokens_details"), "cached_tokens")
    split = usage.get("cache_creation")
    one_hour = _count(split, "ephemeral_1h_input_tokens")
    writes = _count(usage, "cache_creation_input_tokens") if "cache_creation_input_tokens" in usage \
        else _count(split, "ephemeral_5m_input_tokens") + one_hour  # fmt: skip
    return Usage(
        input=max(0, _count(usage, "input_tokens") - cached),
        output=_count(usage, "output_tokens"),
        cache_read=cached + _count(usage, "cache_read_input_tokens"),
        cache_write_5m=writes - min(one_hour, writes),
        cache_write_1h=min(one_hour, writes),
        reasoning=_count(usage.get("output_tokens_details"), "reasoning_tokens"),
        web_searches=_count(usage.get("server_tool_use"), "web_search_requests"),
    )


def _from_answer(answer: dict) -> Usage | None:
    """The usage of a whole answer: its usage object, and the web searches among a Responses answer's items."""
    usage = _from_usage_object(answer.get("usage"))
    if usage is not None and isinstance(answer.get("output"), list):
        usage.web_searches += sum(isinstance(item, dict) and item.get("type") == "web_search_call"
                                  for item in answer["output"])  # fmt: skip
    return usage


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
    return _from_answer(data), "".join(part for part in parts if isinstance(part, str))


class StreamMeter:
    """Follows an SSE stream event by event; `feed` returns the bytes to pass on."""

    def __init__(self, api: str, drop_usage_chunk: bool, keep_text: bool = False):
        self.api = api
        self.drop_usage_chunk = drop_usage_chunk  # the proxy asked for OpenAI's usage chunk; the client did not
        self.keep_text = keep_text  # for the prompt log
        self.usage: Usage | None = None
        self.started: Usage | None = None  # Anthropic's figures at message_start: the prompt's, final already
        self.text_characters = 0
        self.text_parts: list[str] = []
        self._anthropic_usage: dict = {}
        self._pending = b""
        self.response_id: str | None = None  # the Responses API's response, named in its first event (affinity)

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
        """The stream's usage: the upstream's figures, or an estimate of the output from what was streamed."""
        if self.usage is not None:
            return self.usage
        output = -(-self.text_characters // CHARACTERS_PER_TOKEN)
        return replace(self.started or Usage(prompt_estimate), output=output, estimated=True)

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
        if payload.get("type") == "response.created" and isinstance(created := payload.get("response"), dict):
            self.response_id = created.get("id") if isinstance(created.get("id"), str) else None
        if payload.get("type") in _RESPONSE_ENDINGS:
            response = payload.get("response") if isinstance(payload.get("response"), dict) else {}
            self.usage = _from_answer(response) or self.usage
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
            self.started = _from_usage_object(self._anthropic_usage)
        elif kind == "content_block_delta":
            delta = payload.get("delta") if isinstance(payload.get("delta"), dict) else {}
            self._text(delta.get("text") or delta.get("thinking") or delta.get("partial_json") or "")
        elif kind == "message_delta" and isinstance(payload.get("usage"), dict):
            # The final figures; newer API versions repeat the input and cache figures here, older ones do not.
            self._anthropic_usage = {"input_tokens": 0, **self._anthropic_usage, **payload["usage"]}
            self.usage = _from_usage_object(self._anthropic_usage)
