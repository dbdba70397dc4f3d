"""Token usage as the upstream reports it, from a JSON answer or from an SSE stream as it passes, by the kinds the
providers price differently: input, cache reads, cache writes (5-minute and 1-hour), output, and web searches.

For a stream the meter reads every event: OpenAI's final `usage` chunk (which the proxy asks for and, when the
client did not, removes again), the Responses API's last event (`response.completed`, `response.incomplete` or
`response.failed`: whichever ends the stream carries the usage), Anthropic's `message_start` and `message_delta`.
When a stream ends early the output is estimated from the text that did reach the client.

No figure is taken on trust, and reading never fails, whatever the answer's shape. A figure that is not a whole
number from 0 to MAX_FIGURE (negative, fractional, infinite, NaN, huge, text, a list, an object) reads as 0 and is
named in `Usage.odd` with the side of the bill it belongs to. Where 0 could count too little (a prompt or output
figure, a usage object that is no object), settlement counts that side at least as the proxy reserved it
(`Usage.at_least`); where it cannot (cached tokens are a part of the prompt, which then costs the dearer input
price; reasoning is a part of the output), 0 stands; for an odd web search count (or usage object) the searches the
answer shows are counted.
"""

import json
from dataclasses import asdict, dataclass, field, replace

from llmproxy.api import ANTHROPIC, sse

_RESPONSE_ENDINGS = ("response.completed", "response.incomplete", "response.failed")
CHARACTERS_PER_TOKEN = (
    4  # the usual English average of both tokenizers; only used when the upstream's figure is missing
)
MAX_FIGURE = 10**8  # tokens (or searches) one answer may report: a hundred times the largest context window (1M)
PROMPT_FIGURES = ("input", "cache_read", "cache_write_5m", "cache_write_1h")
# The side of the bill an odd figure belongs to (Usage.odd): the prompt, the output, the web searches, a part of
# another figure (cached or reasoning tokens), or the whole usage object.
PROMPT, OUTPUT, SEARCHES, PART, WHOLE = "prompt", "output", "searches", "part", "usage"


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
    odd: dict[str, str] = field(default_factory=dict)  # figures that were no count, read as 0: name -> side

    @property
    def prompt(self) -> int:
        return self.input + self.cache_read + self.cache_write_5m + self.cache_write_1h

    @property
    def total(self) -> int:
        """What token quotas count: every prompt token, cached or not, and every output token."""
        return self.prompt + self.output

    def counts(self) -> dict[str, int]:
        return {name: value for name, value in asdict(self).items() if name not in ("estimated", "odd")}

    def at_least(self, prompt: int, output: int, prompt_kind: str) -> "Usage":
        """This usage with each side that had an odd figure counted at least as reserved: the prompt as `prompt`
        tokens (what is missing counted as `prompt_kind`, the reservation's price), the output as `output`."""
        sides = set(self.odd.values())
        usage = replace(self)
        if sides & {PROMPT, WHOLE} and usage.prompt < prompt:
            setattr(usage, prompt_kind, getattr(usage, prompt_kind) + prompt - usage.prompt)
        if sides & {OUTPUT, WHOLE}:
            usage.output = max(usage.output, output)
        return usage


def estimate(prompt: int, text_characters: int, started: Usage | None = None) -> Usage:
    """Usage the upstream did not report: the prompt as estimated (or as a stream's start reported it), the output
    from the text that reached the client."""
    output = -(-text_characters // CHARACTERS_PER_TOKEN)
    return replace(started or Usage(prompt), output=output, estimated=True)


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value) -> list:
    return value if isinstance(value, list) else []


def _is_web_search(block) -> bool:
    """Whether a Messages content block is a web search, which Anthropic bills per search."""
    return _dict(block).get("type") == "server_tool_use" and block.get("name") == "web_search"


class _Figures:
    """One usage object's figures as counts; notes those that are none."""

    def __init__(self, usage: dict):
        self.usage = usage
        self.odd: dict[str, str] = {}

    def count(self, name: str, side: str, within: str | None = None) -> int:
        """The figure `name` (inside the object `within`); 0 when it is absent or null, and when it is odd."""
        figures, path = (self.usage.get(within), f"{within}.{name}") if within else (self.usage, name)
        if figures is None:
            return 0
        if not isinstance(figures, dict):
            self.odd[within] = side
            return 0
        value = figures.get(name)
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_FIGURE):
            return value or 0
        self.odd[path] = side
        return 0


def from_usage_object(usage) -> Usage | None:
    """A usage object's figures; None when there is none (absent or null) or it names no prompt figure."""
    if usage is None:
        return None
    if not isinstance(usage, dict):
        return Usage(odd={WHOLE: WHOLE})
    figures = _Figures(usage)
    count = figures.count
    if "prompt_tokens" in usage:  # chat completions, completions, embeddings: cached tokens are part of the prompt
        cached = count("cached_tokens", PART, "prompt_tokens_details")
        read = Usage(
            max(0, count("prompt_tokens", PROMPT) - cached),
            count("completion_tokens", OUTPUT),
            cached,
            reasoning=count("reasoning_tokens", PART, "completion_tokens_details"),
        )
    elif "input_tokens" in usage:
        # Responses API: cached tokens are part of input_tokens. Anthropic: cache reads and writes are not, and the
        # writes are split by lifetime under cache_creation (an answer without the split wrote 5-minute entries).
        cached = count("cached_tokens", PART, "input_tokens_details")
        one_hour = count("ephemeral_1h_input_tokens", PROMPT, "cache_creation")
        writes = (
            count("cache_creation_input_tokens", PROMPT)
            if "cache_creation_input_tokens" in usage
            else count("ephemeral_5m_input_tokens", PROMPT, "cache_creation") + one_hour
        )
        read = Usage(
            input=max(0, count("input_tokens", PROMPT) - cached),
            output=count("output_tokens", OUTPUT),
            cache_read=cached + count("cache_read_input_tokens", PROMPT),
            cache_write_5m=writes - min(one_hour, writes),
            cache_write_1h=min(one_hour, writes),
            reasoning=count("reasoning_tokens", PART, "output_tokens_details"),
            web_searches=count("web_search_requests", SEARCHES, "server_tool_use"),
        )
    else:
        return None
    read.odd = figures.odd
    return read


def _searches_unknown(usage: Usage) -> bool:
    """Whether the usage's web search count was odd, or the whole usage object."""
    return bool({SEARCHES, WHOLE} & set(usage.odd.values()))


def _from_answer(answer: dict) -> Usage | None:
    """The usage of a whole answer: its usage object, the web searches among a Responses answer's items, and for an
    odd search count the searches a Messages answer shows."""
    usage = from_usage_object(answer.get("usage"))
    if usage is not None:
        usage.web_searches += sum(_dict(item).get("type") == "web_search_call" for item in _list(answer.get("output")))
        if _searches_unknown(usage):
            usage.web_searches += sum(map(_is_web_search, _list(answer.get("content"))))
    return usage


def _loads(data: bytes | str):
    """Parsed JSON, or None for what is none (invalid, not UTF-8, nested beyond the parser's depth)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def read_answer(body: bytes) -> tuple[Usage | None, str]:
    """A buffered answer's reported usage (None when it reports none) and its generated text, parsed once."""
    data = _loads(body)
    if not isinstance(data, dict):
        return None, ""
    parts = []
    for choice in map(_dict, _list(data.get("choices"))):  # chat completions, completions
        parts.append(choice.get("text") or _dict(choice.get("message")).get("content") or "")
    for item in map(_dict, _list(data.get("output"))):  # Responses API
        parts.extend(_dict(content).get("text", "") for content in _list(item.get("content")))
    parts.extend(_dict(block).get("text", "") for block in _list(data.get("content")))  # Claude
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
        self.web_searches = 0  # Anthropic's web searches seen, for a search count that is no count
        self._anthropic_usage = None
        self._events = sse.Parser(comments=drop_usage_chunk)  # comments pass on too where events are written anew
        self.response_id = None  # the Responses API's response, named in its first event (affinity), as it came

    def feed(self, chunk: bytes) -> bytes:
        """Reads the events `chunk` completes. An event left unterminated when the stream ends is not read (nor,
        when events are dropped, passed on): a client would discard it, and the upstream did not finish it."""
        items = self._events.feed(chunk)
        if not self.drop_usage_chunk:
            for item in items:
                self._read(item)
            return chunk  # passed on untouched, as it came
        # The events kept are written anew: the same data, type and ID for the client's parser, comments kept.
        return b"".join(bytes(item) for item in items if isinstance(item, sse.Comment) or self._read(item))

    def finish(self, prompt_estimate: int) -> Usage:
        """The stream's usage: the upstream's figures, or an estimate of the output from what was streamed."""
        if self.usage is not None:
            return self.usage
        return estimate(prompt_estimate, self.text_characters, self.started)

    def _read(self, event: sse.Event) -> bool:
        """Learns from one event; False when the event is to be left out."""
        data = event.data
        if not data or data == "[DONE]":
            return True
        payload = _loads(data)
        if not isinstance(payload, dict):
            return True
        if self.api == ANTHROPIC:
            self._read_anthropic(payload)
            return True
        if payload.get("type") == "response.created" and isinstance(created := payload.get("response"), dict):
            self.response_id = created.get("id")
        if payload.get("type") in _RESPONSE_ENDINGS:
            self.usage = _from_answer(_dict(payload.get("response"))) or self.usage
        elif isinstance(delta := payload.get("delta"), str):  # Responses API text deltas
            self._text(delta)
        for choice in map(_dict, _list(payload.get("choices"))):
            self._text(choice.get("text") or _dict(choice.get("delta")).get("content") or "")
        if (usage := from_usage_object(payload.get("usage"))) is not None:
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
            self._anthropic_usage = _dict(payload.get("message")).get("usage")
            self.started = from_usage_object(self._anthropic_usage)
        elif kind == "content_block_start":
            self.web_searches += _is_web_search(payload.get("content_block"))
        elif kind == "content_block_delta":
            delta = _dict(payload.get("delta"))
            self._text(delta.get("text") or delta.get("thinking") or delta.get("partial_json") or "")
        elif kind == "message_delta" and payload.get("usage") is not None:
            # The final figures; newer API versions repeat the input and cache figures here, older ones do not.
            final = payload["usage"]
            if isinstance(final, dict):
                final = self._anthropic_usage = {"input_tokens": 0, **_dict(self._anthropic_usage), **final}
            self.usage = from_usage_object(final)
            if self.started and WHOLE in self.started.odd:  # what the start did not say, the end may not repeat
                self.usage.odd[WHOLE] = WHOLE
            if _searches_unknown(self.usage):
                self.usage.web_searches += self.web_searches
