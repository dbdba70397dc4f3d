"""A fake OpenAI + Anthropic upstream for the proxy's tests, demo mode and benchmark.

It serves both APIs on one port, answers in their real wire formats (so the official
SDKs parse it), and records every request that reaches it (``FakeUpstream.requests``,
or ``GET /_fake/requests``), with how a streamed answer ended: ``completed``, ``aborted``
by ``reset_after``, or ``cancelled`` because the peer left, and how many content events it sent.

How a request is answered is decided by, in order of precedence:

1. Directives anywhere in the raw request body (so in any message, ``system``,
   ``prompt`` or ``input`` text), written ``#fake:NAME=VALUE``:

   ``status=500``          answer this HTTP status with a matching error body
   ``error=KIND``          answer this error in the API's own format; KIND is one of
                           rate_limit, invalid_key, insufficient_quota, credit_balance,
                           overloaded, server_error, permission
   ``retry_after=N``       seconds in the ``retry-after`` header of a rate limit
   ``echo_key=1``          error messages contain the full API key presented
   ``delay_ms=N``          wait before sending the response headers
   ``events=N``            content chunks when streaming (default 3)
   ``interval_ms=N``       wait between streamed content chunks (default 0)
   ``stall_ms=N``          when streaming, stall this long after the first content chunk
   ``reset_after=N``       when streaming, drop the connection after N content chunks
   ``body_bytes=N``        the answer's text is N bytes long
   ``tool=NAME``           answer with a call to tool NAME (arguments from ``TOOL_INPUTS``) unless the
                           last turn already carries a tool result; Responses calls are ``custom_tool_call``
                           when the request defines NAME as a ``custom`` tool, else ``function_call``
   ``redacted_thinking=1`` (Anthropic, with thinking on) add a ``redacted_thinking`` block
   ``server_tool=1``       (Anthropic) a ``web_search`` server tool use and its result before the text
   ``end=KIND``            (Responses) end ``incomplete`` (as at max_output_tokens) or ``failed``

   Three directives take any JSON value (``NaN`` and ``Infinity`` included) and are read from the prompt
   texts, so that their quotes need no escaping: ``#fake:usage={"output_tokens": -1}``. A key override
   takes them as parameters too, applied before the prompt's.

   ``usage=JSON``          every usage object the answer carries (stream events included) is changed: an
                           object's fields replace the usage's fields of those names, anything else replaces
                           the whole usage object; several ``usage`` directives apply in order
   ``response_id=JSON``    (Responses) the response's id, in the answer and in every stream event
   ``headers=JSON``        an object of response headers set on the answer, success or error (a 429's
                           ``retry-after`` included); a string is sent as it is (control characters and lone
                           surrogates, which a header cannot carry, as ``\\uXXXX``), ``null`` leaves the
                           header out, any other value is sent as its JSON text; names that are no HTTP
                           token, and the framing headers (content-type, content-length, transfer-encoding),
                           are ignored

2. A per-key override: ``PUT /_fake/keys/{key}`` with ``{"behaviour": B, ...params}``,
   B one of ok, slow, rate_limit_for (param ``seconds``) or an error KIND above;
   params are directive names (``delay_ms``, ``retry_after``, ``usage``, ``headers``, ...), plus ``models`` (the ids
   ``GET /v1/models`` lists for this key) and ``organizations`` (the org ids
   ``GET /v1/organizations`` lists, the first being the default).
   ``DELETE /_fake/keys/{key}`` removes it; ``DELETE /_fake/requests`` clears everything.

3. Markers in the key: ``-429`` rate limit, ``-401`` invalid key, ``-quota`` out of
   quota/credit, ``-500`` server error, ``-slow`` 300 ms delay; anything else is ok.

The answer also follows the request as the real APIs do: Anthropic ``thinking`` (``enabled``,
validated like the API, or ``adaptive``) starts it with a signed thinking block, and a Responses
``reasoning`` object with a reasoning item (carrying ``encrypted_content`` when ``include`` asks for
``reasoning.encrypted_content``). Unknown fields, roles and block types are answered normally: the
fake must never be stricter than the proxy under test. With ``strict_fields`` set (tests of what
the proxy makes of refusals), an unknown top-level field is refused as the real APIs refuse it, with
its name echoed in the message: ``Unrecognized request argument supplied: NAME`` (OpenAI) and
``NAME: Extra inputs are not permitted`` (Anthropic).

Each key stands for an organisation of its own (``KeyAccounts``): it has its own prompt cache, whose
reads and writes the usage reports (OpenAI ``cached_tokens``, Anthropic ``cache_read_input_tokens`` and
``cache_creation_input_tokens``), and a key override's ``budget`` (requests per ``budget_seconds``,
default 60) is a request rate limit with honest ``x-ratelimit-*`` / ``anthropic-ratelimit-*`` figures.

Besides the usual OpenAI and Anthropic routes it answers ``POST /v1/responses/compact`` (Codex's
remote compaction) and ``POST /v1/responses/input_tokens``; any other route, a websocket upgrade
included, is recorded and answered 404.

Run standalone with ``python -m tests.fakeupstream --port 0``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import math
import os
import re
import signal
import struct
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from tests.fakes.server import FakeServer

OPENAI_ORG = "org-FAKEORGID1234567890abcd"
OPENAI_PROJECT = "proj_FAKEPROJECT123456"
ANTHROPIC_ORG = "00000000-fake-org0-0000-000000000000"
REPLY = "Hello from the fake upstream."
DIRECTIVE = re.compile(r"#fake:([a-z_]+)=([A-Za-z0-9_.-]+)")
JSON_DIRECTIVES = ("usage", "response_id", "headers")  # their values are JSON, read from the prompt texts
JSON_DIRECTIVE = re.compile(rf"#fake:({'|'.join(JSON_DIRECTIVES)})=")
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
HEADER_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")  # what aiohttp cannot send in a header
FRAMING_HEADERS = {"content-type", "content-length", "transfer-encoding"}  # the fake frames its answers itself
KEY_MARKERS = {"-429": "rate_limit", "-401": "invalid_key", "-quota": "insufficient_quota", "-500": "server_error"}
ERROR_KINDS = {
    "rate_limit",
    "invalid_key",
    "insufficient_quota",
    "credit_balance",
    "overloaded",
    "server_error",
    "permission",
}
STATUS_KINDS = {
    400: "bad_request",
    401: "invalid_key",
    402: "insufficient_quota",
    403: "permission",
    404: "not_found",
    429: "rate_limit",
    503: "overloaded",
    529: "overloaded",
}
TEXT_KEYS = ("messages", "content", "text", "system", "prompt", "input", "instructions")
OPENAI_MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1-mini", "text-embedding-3-small")
ANTHROPIC_MODELS = (
    ("claude-sonnet-4-5", "Claude Sonnet 4.5"),
    ("claude-haiku-4-5", "Claude Haiku 4.5"),
    ("claude-opus-4-1", "Claude Opus 4.1"),
)
# What ``#fake:tool=NAME`` calls its tool with; a string is a freeform (``custom``) tool's input.
TOOL_INPUTS: dict[str, Any] = {
    "Bash": {"command": "echo fake-tool-ran", "description": "Print a marker"},
    "exec": 'text("fake-tool-ran")',
    "get_weather": {"city": "Paris"},
}
THINKING = "Let me think about that."
REASONING_TOKENS = 16
ENDINGS = ("completed", "incomplete", "failed")
# The top-level fields each API accepts, for ``strict_fields``.
KNOWN_FIELDS = {
    "/v1/chat/completions": {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "n",
        "stop",
        "tools",
        "tool_choice",
        "response_format",
        "user",
        "seed",
        "logprobs",
        "top_logprobs",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "parallel_tool_calls",
        "reasoning_effort",
        "verbosity",
        "prediction",
        "store",
        "metadata",
        "service_tier",
        "modalities",
        "audio",
        "prompt_cache_key",
        "safety_identifier",
        "web_search_options",
    },
    "/v1/messages": {
        "model",
        "messages",
        "max_tokens",
        "system",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "tools",
        "tool_choice",
        "metadata",
        "thinking",
        "service_tier",
        "context_management",
        "output_config",
        "container",
        "mcp_servers",
    },
}
BUDGET_TOO_SMALL = "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
BUDGET_TOO_BIG = (
    "`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our documentation at "
    "https://docs.claude.com/en/docs/build-with-claude/extended-thinking"
    "#max-tokens-and-context-window-size"
)


@dataclass
class RecordedRequest:
    """One request exactly as it reached the fake, and for a streamed answer how that stream ended."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    key: str | None
    # A streamed answer's end: "completed", "aborted" (by reset_after) or "cancelled" (the peer left, or the fake
    # stopped); and the content events (what ``events=N`` counts) written before it.
    stream_ending: str | None = None
    content_events_sent: int = 0

    def to_json(self) -> dict[str, Any]:
        """The JSON shape served by ``GET /_fake/requests``."""
        return {
            "method": self.method,
            "path": self.path,
            "headers": [list(h) for h in self.headers],
            "body": self.body.decode("utf-8", errors="replace"),
            "key": self.key,
            "stream_ending": self.stream_ending,
            "content_events_sent": self.content_events_sent,
        }


@dataclass
class Behaviour:
    """How to answer one request; built from key markers, overrides and directives."""

    error: str | None = None
    status: int | None = None
    retry_after: int = 1
    echo_key: bool = False
    delay_ms: int = 0
    events: int = 3
    interval_ms: int = 0
    stall_ms: int = 0
    reset_after: int | None = None
    body_bytes: int | None = None
    tool: str | None = None
    redacted_thinking: bool = False
    server_tool: bool = False
    end: str = "completed"
    usage: list[Any] = field(default_factory=list)  # ``usage`` directive values, applied in order
    response_id: list[Any] = field(default_factory=list)  # ``response_id`` directive values, the last one counts
    headers: dict[str, Any] = field(default_factory=dict)

    def apply(self, name: str, value: Any) -> None:
        """Set one parameter from a directive or override; bad names or values are ignored."""
        try:
            if name == "error":
                if value in ERROR_KINDS:
                    self.error = value
            elif name == "status":
                status = int(value)
                self.status = None if status < 400 else status
                self.error = (
                    None
                    if status < 400
                    else STATUS_KINDS.get(status, "server_error" if status >= 500 else "bad_request")
                )
            elif name in ("echo_key", "redacted_thinking", "server_tool"):
                setattr(self, name, str(value).lower() in ("1", "true", "yes"))
            elif name == "tool":
                self.tool = str(value) or None
            elif name == "end":
                if value in ENDINGS:
                    self.end = value
            elif name in ("usage", "response_id"):
                getattr(self, name).append(value)
            elif name == "headers":
                if isinstance(value, dict):
                    self.headers |= value
            elif name in ("retry_after", "delay_ms", "events", "interval_ms", "stall_ms", "reset_after", "body_bytes"):
                setattr(self, name, max(0, int(value)))
        except (TypeError, ValueError):
            pass


@dataclass
class Call:
    """A request being answered: what the endpoint handlers need."""

    request: web.Request
    api: str
    key: str | None
    payload: dict[str, Any]
    behaviour: Behaviour
    started: float = field(default_factory=time.monotonic)
    cache_read: int = 0  # prompt tokens read from the key's prompt cache (KeyAccounts)
    cache_written: int = 0  # prompt tokens written to it
    limit_headers: dict[str, str] = field(default_factory=dict)  # the key's budget, when it has one

    @property
    def stream(self) -> bool:
        return self.payload.get("stream") is True

    @property
    def model(self) -> str:
        return str(self.payload.get("model") or "fake-model")

    @property
    def prompt_tokens(self) -> int:
        """A crude token count: the words in the request's text."""
        return max(1, len(" ".join(_texts(self.payload)).split()))

    def reply(self) -> str:
        """The answer text: the fixed reply, or ``body_bytes`` bytes of filler."""
        n = self.behaviour.body_bytes
        return REPLY if n is None else ("fake " * (n // 5 + 1))[:n]

    def chunks(self) -> list[str]:
        """The reply split into ``events`` non-empty pieces (repeated if too short)."""
        text, n = self.reply(), self.behaviour.events
        while 0 < len(text) < n:
            text += " " + text
        return [text[len(text) * i // n : len(text) * (i + 1) // n] for i in range(n)]

    def pieces(self, text: str) -> list[str]:
        """``text`` (tool input, thinking) split into ``events`` pieces, at least two: clients must join them."""
        n = min(max(2, self.behaviour.events), len(text))
        return [text[len(text) * i // n : len(text) * (i + 1) // n] for i in range(n)]

    def tool_call(self, has_result: bool) -> str | None:
        """The tool to call, if ``#fake:tool`` asks for one and the turn has no tool result yet."""
        return None if has_result else self.behaviour.tool


Event = tuple[str | None, Any, bool]  # (SSE event name, data, is a content chunk)


def _texts(value: Any) -> list[str]:
    """All prompt strings in a request payload (messages, parts, system, prompt, input).

    Walked with a stack, not recursion: any JSON shape, however deep, must be countable.
    """
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            stack.extend(reversed([item[k] for k in TEXT_KEYS if k in item]))
    return found


def _json_directives(payload: Any) -> list[tuple[str, Any]]:
    """The directives with JSON values in the prompt texts, in order, with their values parsed."""
    found = []
    for text in _texts(payload):
        for match in JSON_DIRECTIVE.finditer(text):
            # no JSON value follows: ignored like any bad directive
            with contextlib.suppress(ValueError, RecursionError):
                found.append((match[1], json.JSONDecoder().raw_decode(text, match.end())[0]))
    return found


def _override_figures(answer: Any, behaviour: Behaviour) -> None:
    """Applies the ``usage`` and ``response_id`` directives to an answer or its stream events, in place."""
    stack, seen = [answer], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:  # stream events share objects (a Responses stream's final response)
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            if behaviour.response_id and item.get("object") == "response":
                item["id"] = behaviour.response_id[-1]
            if behaviour.usage and isinstance(item.get("usage"), dict):
                usage = item["usage"]
                for override in behaviour.usage:
                    usage = usage | override if isinstance(usage, dict) and isinstance(override, dict) else override
                item["usage"] = usage
            stack.extend(value for name, value in item.items() if name != "usage")
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def _dict(value: Any) -> dict:
    """``value`` if it is an object, else empty: odd shapes of known fields must not crash the fake."""
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _opaque(size: int = 192) -> str:
    """A base64 blob like the APIs' signatures and encrypted contents."""
    return base64.b64encode(os.urandom(size)).decode()


def _tool_input(name: str) -> dict:
    """A tool's input as a JSON object (a freeform tool's string is wrapped, objects are what APIs take)."""
    value = TOOL_INPUTS.get(name, {})
    return value if isinstance(value, dict) else {"input": value}


def _find_tool(tools: Any, name: str) -> tuple[str, str | None] | None:
    """Type and namespace of the Responses tool definition called ``name``, looking inside namespaces."""
    pending: list[tuple[Any, str | None]] = [(tool, None) for tool in _list(tools)]
    while pending:
        tool, namespace = pending.pop(0)
        if not isinstance(tool, dict):
            continue
        if tool.get("type") == "namespace":
            pending += [(inner, str(tool.get("name"))) for inner in _list(tool.get("tools"))]
        elif tool.get("name") == name:
            return str(tool.get("type")), namespace
    return None


def _words(text: str) -> int:
    return max(1, len(text.split()))


def _id(prefix: str, length: int = 24) -> str:
    return prefix + uuid.uuid4().hex[:length]


def _sse(name: str | None, data: Any) -> bytes:
    """One server-sent event, with an ``event:`` line if named."""
    body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {name}\n" if name else "").encode() + f"data: {body}\n\n".encode()


def _bearer(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer X`` header."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def _mask(key: str) -> str:
    return f"{key[:3]}...{key[-4:]}" if len(key) > 8 else "***"


def _response_usage(input_tokens: int, output_tokens: int, reasoning_tokens: int, cached: int = 0) -> dict:
    """A Responses API usage object."""
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": input_tokens + output_tokens,
    }


def _response_message(call: Call, index: int, status: str) -> tuple[dict, str, list[tuple[str, dict, bool]]]:
    """A Responses message output item, its text, and its stream events (named, unnumbered)."""
    text, item_id = call.reply(), _id("msg_", 32)
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item = {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": [part]}
    where = {"item_id": item_id, "output_index": index, "content_index": 0}
    steps = [
        (
            "response.output_item.added",
            {"output_index": index, "item": item | {"status": "in_progress", "content": []}},
            False,
        ),
        ("response.content_part.added", where | {"part": part | {"text": ""}}, False),
    ]
    steps += [("response.output_text.delta", where | {"delta": p, "logprobs": []}, True) for p in call.chunks()]
    steps += [
        ("response.output_text.done", where | {"text": text, "logprobs": []}, False),
        ("response.content_part.done", where | {"part": part}, False),
        ("response.output_item.done", {"output_index": index, "item": item}, False),
    ]
    return item, text, steps


def _response_tool_call(
    call: Call, name: str, definition: tuple[str, str | None] | None, index: int, status: str
) -> tuple[dict, str, list[tuple[str, dict, bool]]]:
    """A Responses ``custom_tool_call`` (for a ``custom`` tool) or ``function_call`` item, its input, and
    its stream events."""
    kind, namespace = definition or ("function", None)
    if kind == "custom":  # freeform input: a plain string, streamed as such
        value = TOOL_INPUTS.get(name, {})
        text = value if isinstance(value, str) else json.dumps(value)
        item = {
            "type": "custom_tool_call",
            "id": _id("ctc_", 48),
            "call_id": _id("call_"),
            "name": name,
            "input": text,
            "status": status,
        }
        field, event = "input", "response.custom_tool_call_input"
    else:
        text = json.dumps(_tool_input(name))
        item = {
            "type": "function_call",
            "id": _id("fc_", 48),
            "call_id": _id("call_"),
            "name": name,
            "arguments": text,
            "status": status,
        }
        field, event = "arguments", "response.function_call_arguments"
    if namespace is not None:
        item["namespace"] = namespace
    where = {"item_id": item["id"], "output_index": index}
    steps = [
        (
            "response.output_item.added",
            {"output_index": index, "item": item | {field: "", "status": "in_progress"}},
            False,
        )
    ]
    steps += [(f"{event}.delta", where | {"delta": p}, True) for p in call.pieces(text)]
    steps += [
        (f"{event}.done", where | {field: text}, False),
        ("response.output_item.done", {"output_index": index, "item": item}, False),
    ]
    return item, text, steps


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _block_events(call: Call, index: int, block: dict) -> list[tuple[str, dict, bool]]:
    """One Messages content block streamed the way the API streams its kind."""

    def delta(body: dict, is_content: bool = True) -> tuple[str, dict, bool]:
        return "content_block_delta", {"index": index, "delta": body}, is_content

    kind, deltas = block["type"], []
    opening = block
    if kind == "text":
        opening = block | {"text": ""}
        deltas = [delta({"type": "text_delta", "text": p}) for p in call.chunks()]
    elif kind == "thinking":
        opening = block | {"thinking": "", "signature": ""}
        deltas = [delta({"type": "thinking_delta", "thinking": p}) for p in call.pieces(block["thinking"])]
        deltas.append(delta({"type": "signature_delta", "signature": block["signature"]}, False))
    elif kind in ("tool_use", "server_tool_use"):
        opening = block | {"input": {}}
        deltas = [
            delta({"type": "input_json_delta", "partial_json": p}) for p in call.pieces(json.dumps(block["input"]))
        ]
    # Anything else (redacted thinking, a server tool's result) arrives whole in its content_block_start.
    return [
        ("content_block_start", {"index": index, "content_block": opening}, False),
        *deltas,
        ("content_block_stop", {"index": index}, False),
    ]


class FakeUpstream(FakeServer):
    """The fake server; ``start()`` it on a loop, or use ``start_in_thread()``."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[RecordedRequest] = []
        self._overrides: dict[str, dict[str, Any]] = {}
        self._accounts = KeyAccounts()
        self.strict_fields = False  # refuse unknown top-level fields as the real APIs do, echoing their names
        self._routes = {
            ("POST", "/v1/chat/completions"): ("openai", self._chat),
            ("POST", "/v1/completions"): ("openai", self._completions),
            ("POST", "/v1/responses"): ("openai", self._responses),
            ("POST", "/v1/responses/compact"): ("openai", self._compact),
            ("POST", "/v1/responses/input_tokens"): ("openai", self._input_tokens),
            ("POST", "/v1/embeddings"): ("openai", self._embeddings),
            ("POST", "/v1/messages"): ("anthropic", self._messages),
            ("POST", "/v1/messages/count_tokens"): ("anthropic", self._count_tokens),
            ("POST", "/v1/complete"): ("anthropic", self._complete),
            ("GET", "/v1/models"): (None, self._models),
            ("GET", "/v1/organizations"): ("openai", self._organizations),
        }

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/_fake/requests", self._list_requests)
        app.router.add_delete("/_fake/requests", self._clear_requests)
        app.router.add_put("/_fake/keys/{key}", self._put_key)
        app.router.add_delete("/_fake/keys/{key}", self._delete_key)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    def reset(self) -> None:
        """Forget recorded requests and per-key overrides; lenient about fields again."""
        self.requests.clear()
        self._overrides.clear()
        self._accounts = KeyAccounts()
        self.strict_fields = False

    def set_key_behaviour(self, key: str, behaviour: str = "ok", **params: Any) -> None:
        """Override how ``key`` is answered (same as ``PUT /_fake/keys/{key}``)."""
        if behaviour not in ERROR_KINDS | {"ok", "slow", "rate_limit_for"}:
            raise ValueError(f"unknown behaviour {behaviour!r}")
        float(params.get("seconds", 1))  # rate_limit_for's parameter must be a number
        self._overrides[key] = {"behaviour": behaviour, **params}

    def clear_key_behaviour(self, key: str) -> None:
        """Remove the override for ``key``."""
        self._overrides.pop(key, None)

    # -- control endpoints ---------------------------------------------------------

    async def _list_requests(self, request: web.Request) -> web.Response:
        return web.json_response([r.to_json() for r in self.requests])

    async def _clear_requests(self, request: web.Request) -> web.Response:
        self.reset()
        return web.Response(status=204)

    async def _put_key(self, request: web.Request) -> web.Response:
        try:
            spec = await request.json()
            self.set_key_behaviour(request.match_info["key"], **spec)
        except (ValueError, TypeError) as err:
            return web.json_response({"error": str(err)}, status=400)
        return web.Response(status=204)

    async def _delete_key(self, request: web.Request) -> web.Response:
        self.clear_key_behaviour(request.match_info["key"])
        return web.Response(status=204)

    # -- dispatch ------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        """Record the request, check auth and body, pick a behaviour, then answer."""
        body = await request.read()
        key = _bearer(request) or request.headers.get("x-api-key") or None
        recorded = RecordedRequest(
            request.method,
            request.raw_path,
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
            body,
            key,
        )
        if not request.path.startswith("/_fake/"):  # a mistyped control call is no API request
            self.requests.append(recorded)
        api, handler = self._routes.get((request.method, request.path), (None, None))
        api = api or self._guess_api(request)
        call = Call(request, api, key, {}, Behaviour())
        if handler is None:
            return self._error(call, "not_found", f"Invalid URL ({request.method} {request.path})")
        if api == "openai":
            call.key = _bearer(request)  # OpenAI takes no x-api-key
        if call.key is None:
            return self._error(call, "missing_key")
        if api == "anthropic" and "anthropic-version" not in request.headers:
            return self._error(call, "bad_request", "anthropic-version: header is required")
        if request.method == "POST":
            try:
                call.payload = json.loads(body)
                if not isinstance(call.payload, dict):
                    raise ValueError("not an object")
            except (ValueError, RecursionError):
                return self._error(call, "bad_request", "We could not parse the JSON body of your request.")
            known = KNOWN_FIELDS.get(request.path, call.payload.keys()) if self.strict_fields else call.payload.keys()
            if unknown := sorted(set(call.payload) - set(known)):
                message = (
                    f"{unknown[0]}: Extra inputs are not permitted"
                    if api == "anthropic"
                    else f"Unrecognized request argument supplied: {unknown[0]}"
                )
                return self._error(call, "bad_request", message)
        call.behaviour = self._behaviour(call.key, body.decode("utf-8", errors="replace"), call.payload)
        if request.method == "POST" and (budget := self._overrides.get(call.key, {}).get("budget")) is not None:
            self._accounts.charge(call, int(budget), float(self._overrides[call.key].get("budget_seconds", 60)))
        if call.behaviour.delay_ms:
            await asyncio.sleep(call.behaviour.delay_ms / 1000)
        if call.behaviour.error:
            return self._error(call, call.behaviour.error)
        self._accounts.use_cache(call, body)
        result = handler(call)
        if isinstance(result, web.StreamResponse):  # a handler's own validation error
            return result
        _override_figures(result, call.behaviour)
        if isinstance(result, list):
            return await self._send_stream(call, result, recorded)
        return web.json_response(result, headers=self._headers(call))

    @staticmethod
    def _guess_api(request: web.Request) -> str:
        """Which API an unrouted or shared path belongs to (default OpenAI)."""
        path = request.path
        if path.startswith(("/v1/messages", "/v1/complete/")) or path == "/v1/complete":
            return "anthropic"
        if "anthropic-version" in request.headers or (
            "x-api-key" in request.headers and "Authorization" not in request.headers
        ):
            return "anthropic"
        return "openai"

    def _behaviour(self, key: str, body_text: str, payload: dict[str, Any]) -> Behaviour:
        """Key markers, replaced by a key override, refined by prompt directives."""
        behaviour = Behaviour()
        override = self._overrides.get(key)
        if override is not None:
            self._apply_override(behaviour, override)
        else:
            behaviour.error = next((kind for marker, kind in KEY_MARKERS.items() if marker in key), None)
            if "-slow" in key:
                behaviour.delay_ms = 300
        for name, value in DIRECTIVE.findall(body_text):
            if name not in JSON_DIRECTIVES:  # read whole below
                behaviour.apply(name, value)
        for name, value in _json_directives(payload):
            behaviour.apply(name, value)
        return behaviour

    @staticmethod
    def _apply_override(behaviour: Behaviour, override: dict[str, Any]) -> None:
        """Apply a per-key override; ``rate_limit_for`` limits until N s after its first 429."""
        kind = override["behaviour"]
        for name, value in override.items():
            behaviour.apply(name, value)
        if kind in ERROR_KINDS:
            behaviour.error = kind
        elif kind == "slow" and "delay_ms" not in override:
            behaviour.delay_ms = 500
        elif kind == "rate_limit_for":
            now = time.monotonic()
            until = override.setdefault("until", now + float(override.get("seconds", 1)))
            if now < until:
                behaviour.error = "rate_limit"
                behaviour.retry_after = max(1, math.ceil(until - now))

    # -- responses -----------------------------------------------------------------

    @staticmethod
    def _headers(call: Call, status: int = 200) -> dict[str, str]:
        """The provider-specific headers a real response carries (the proxy must filter them)."""
        common = {
            "server": "cloudflare",
            "cf-ray": uuid.uuid4().hex[:16] + "-AMS",
            "set-cookie": "__cf_bm=fake; path=/",
        }
        remaining = "0" if status == 429 else "499"
        if call.api == "anthropic":
            reset = (datetime.now(UTC) + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
            headers = (
                common
                | {
                    "request-id": _id("req_011CV"),
                    "anthropic-organization-id": ANTHROPIC_ORG,
                    "anthropic-ratelimit-requests-limit": "500",
                    "anthropic-ratelimit-requests-remaining": remaining,
                    "anthropic-ratelimit-requests-reset": reset,
                    "anthropic-ratelimit-tokens-limit": "100000",
                    "anthropic-ratelimit-tokens-remaining": "99000",
                    "anthropic-ratelimit-tokens-reset": reset,
                    "x-robots-tag": "none",
                }
                | call.limit_headers
            )
        else:
            headers = (
                common
                | {
                    "openai-organization": OPENAI_ORG,
                    "openai-project": OPENAI_PROJECT,
                    "openai-version": "2020-10-01",
                    "openai-processing-ms": str(int((time.monotonic() - call.started) * 1000)),
                    "x-request-id": _id("req_", 32),
                    "x-ratelimit-limit-requests": "500",
                    "x-ratelimit-remaining-requests": remaining,
                    "x-ratelimit-reset-requests": "120ms",
                    "x-ratelimit-limit-tokens": "30000",
                    "x-ratelimit-remaining-tokens": "29990",
                    "x-ratelimit-reset-tokens": "20ms",
                }
                | call.limit_headers
            )
        if status == 429:
            headers["retry-after"] = str(call.behaviour.retry_after)
        for name, value in call.behaviour.headers.items():  # the ``headers`` directive
            if not HEADER_NAME.fullmatch(name) or name.lower() in FRAMING_HEADERS:
                continue
            headers = {k: v for k, v in headers.items() if k.lower() != name.lower()}
            if value is not None:
                text = value if isinstance(value, str) else json.dumps(value)
                headers[name] = HEADER_FORBIDDEN.sub(lambda m: f"\\u{ord(m[0]):04x}", text)
        return headers

    def _error(self, call: Call, kind: str, message: str | None = None) -> web.Response:
        """An error response in the API's own format."""
        build = self._anthropic_error if call.api == "anthropic" else self._openai_error
        message = message or f"Invalid request ({call.request.method} {call.request.path})"
        status, body = build(kind, call.key, call.behaviour.echo_key, message)
        status = call.behaviour.status or status
        return web.json_response(body, status=status, headers=self._headers(call, status))

    @staticmethod
    def _openai_error(kind: str, key: str | None, echo: bool, message: str) -> tuple[int, dict]:
        """Status and body of an OpenAI error."""
        key_text = key if echo or not key else _mask(key)
        status, type_, code, text = {
            "bad_request": (400, "invalid_request_error", None, message),
            "not_found": (404, "invalid_request_error", None, message),
            "missing_key": (
                401,
                "invalid_request_error",
                None,
                (
                    "You didn't provide an API key. You need to provide your API key in an Authorization "
                    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
                ),
            ),
            "invalid_key": (
                401,
                "invalid_request_error",
                "invalid_api_key",
                (
                    f"Incorrect API key provided: {key_text} (organization {OPENAI_ORG}). You can find "
                    "your API key at https://platform.openai.com/account/api-keys."
                ),
            ),
            "permission": (
                403,
                "request_forbidden",
                "unsupported_country_region_territory",
                "Country, region, or territory not supported",
            ),
            "rate_limit": (
                429,
                "requests",
                "rate_limit_exceeded",
                (
                    f"Rate limit reached in organization {OPENAI_ORG} on requests per min (RPM): "
                    "Limit 500, Used 500, Requested 1. Please try again in 120ms."
                ),
            ),
            "insufficient_quota": (
                429,
                "insufficient_quota",
                "insufficient_quota",
                "You exceeded your current quota, please check your plan and billing details.",
            ),
            "server_error": (
                500,
                "server_error",
                None,
                "The server had an error while processing your request. Sorry about that!",
            ),
            "overloaded": (503, "server_error", None, "The engine is currently overloaded, please try again later."),
        }[kind.replace("credit_balance", "insufficient_quota")]
        if echo and key and key not in text:
            text += f" (API key: {key})"
        return status, {"error": {"message": text, "type": type_, "param": None, "code": code}}

    @staticmethod
    def _anthropic_error(kind: str, key: str | None, echo: bool, message: str) -> tuple[int, dict]:
        """Status and body of an Anthropic error."""
        status, type_, text = {
            "bad_request": (400, "invalid_request_error", message),
            "not_found": (404, "not_found_error", "Not Found"),
            "missing_key": (401, "authentication_error", "x-api-key header is required"),
            "invalid_key": (401, "authentication_error", "invalid x-api-key"),
            "permission": (
                403,
                "permission_error",
                "Your API key does not have permission to use the specified resource.",
            ),
            "rate_limit": (
                429,
                "rate_limit_error",
                "Number of requests has exceeded your per-minute rate limit. Please try again later.",
            ),
            "credit_balance": (
                400,
                "invalid_request_error",
                (
                    "Your credit balance is too low to access the Anthropic API. "
                    "Please go to Plans & Billing to upgrade or purchase credits."
                ),
            ),
            "server_error": (500, "api_error", "Internal server error"),
            "overloaded": (529, "overloaded_error", "Overloaded"),
        }[kind.replace("insufficient_quota", "credit_balance")]
        if echo and key:
            text += f": {key}"
        return status, {"type": "error", "error": {"type": type_, "message": text}, "request_id": _id("req_011CV")}

    async def _send_stream(self, call: Call, events: list[Event], recorded: RecordedRequest) -> web.StreamResponse:
        """Write each event separately, honouring interval, stall and reset directives; ``recorded`` learns how the
        stream ended and how many content events it carried."""
        b = call.behaviour
        response = web.StreamResponse(
            headers=self._headers(call)
            | {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        )
        response.enable_chunked_encoding()
        try:
            await response.prepare(call.request)
            for index, (name, data, is_content) in enumerate(events):
                if index and b.reset_after is not None and recorded.content_events_sent >= b.reset_after:
                    recorded.stream_ending = "aborted"  # before the peer can notice
                    await self._abort(call.request)
                    return response
                if is_content and recorded.content_events_sent and b.interval_ms:
                    await asyncio.sleep(b.interval_ms / 1000)
                await response.write(_sse(name, data))
                if is_content:
                    recorded.content_events_sent += 1
                    if recorded.content_events_sent == 1 and b.stall_ms:
                        await asyncio.sleep(b.stall_ms / 1000)
            await response.write_eof()
            recorded.stream_ending = "completed"
        except ConnectionResetError:  # a write found the peer gone (aiohttp's default)
            recorded.stream_ending = "cancelled"
        except asyncio.CancelledError:  # the handler was cancelled: the fake stops (or runs with handler_cancellation)
            recorded.stream_ending = "cancelled"
            raise
        return response

    @staticmethod
    async def _abort(request: web.Request) -> None:
        """Drop the connection once what was written has left, without ending the body."""
        transport = request.transport
        while transport is not None and not transport.is_closing() and transport.get_write_buffer_size():
            await asyncio.sleep(0.001)
        if transport is not None:
            transport.abort()

    # -- OpenAI endpoints ----------------------------------------------------------

    def _chat(self, call: Call) -> dict | list[Event]:
        """``POST /v1/chat/completions``; a tool result is a last message with role ``tool``."""
        base = {
            "id": _id("chatcmpl-"),
            "created": int(time.time()),
            "model": call.model,
            "system_fingerprint": "fp_fake",
        }
        messages = _list(call.payload.get("messages"))
        tool = call.tool_call(bool(messages) and _dict(messages[-1]).get("role") == "tool")
        text = json.dumps(_tool_input(tool)) if tool else call.reply()
        finish, call_id = ("tool_calls" if tool else "stop"), _id("call_")
        usage = {
            "prompt_tokens": call.prompt_tokens,
            "completion_tokens": _words(text),
            "total_tokens": call.prompt_tokens + _words(text),
            "prompt_tokens_details": {"cached_tokens": call.cache_read, "audio_tokens": 0},
        }
        if not call.stream:
            message = {"role": "assistant", "content": text, "refusal": None}
            if tool:
                message |= {
                    "content": None,
                    "tool_calls": [{"id": call_id, "type": "function", "function": {"name": tool, "arguments": text}}],
                }
            return base | {
                "object": "chat.completion",
                "usage": usage,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            }
        with_usage = bool(_dict(call.payload.get("stream_options")).get("include_usage"))

        def chunk(delta: dict, finish: str | None) -> dict:
            extra = {"usage": None} if with_usage else {}
            return (
                base
                | {
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                }
                | extra
            )

        if tool:  # the real API names the call in the first chunk, then streams its arguments
            events: list[Event] = [
                (
                    None,
                    chunk(
                        {
                            "role": "assistant",
                            "content": None,
                            "tool_calls": [
                                {
                                    "index": 0,
                                    "id": call_id,
                                    "type": "function",
                                    "function": {"name": tool, "arguments": ""},
                                }
                            ],
                        },
                        None,
                    ),
                    False,
                )
            ]
            events += [
                (None, chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, None), True)
                for piece in call.pieces(text)
            ]
        else:
            events = [(None, chunk({"role": "assistant", "content": ""}, None), False)]
            events += [(None, chunk({"content": piece}, None), True) for piece in call.chunks()]
        events.append((None, chunk({}, finish), False))
        if with_usage:
            events.append((None, base | {"object": "chat.completion.chunk", "choices": [], "usage": usage}, False))
        return [*events, (None, "[DONE]", False)]

    def _completions(self, call: Call) -> dict | list[Event]:
        """``POST /v1/completions`` (legacy text completions)."""
        base = {"id": _id("cmpl-"), "object": "text_completion", "created": int(time.time()), "model": call.model}
        text = call.reply()
        usage = {
            "prompt_tokens": call.prompt_tokens,
            "completion_tokens": _words(text),
            "total_tokens": call.prompt_tokens + _words(text),
        }

        def choice(piece: str, finish: str | None) -> dict:
            return {"text": piece, "index": 0, "logprobs": None, "finish_reason": finish}

        if not call.stream:
            return base | {"choices": [choice(text, "stop")], "usage": usage}
        events: list[Event] = [(None, base | {"choices": [choice(p, None)]}, True) for p in call.chunks()]
        events.append((None, base | {"choices": [choice("", "stop")]}, False))
        if _dict(call.payload.get("stream_options")).get("include_usage"):
            events.append((None, base | {"choices": [], "usage": usage}, False))
        return [*events, (None, "[DONE]", False)]

    def _responses(self, call: Call) -> dict | list[Event]:
        """``POST /v1/responses`` (Responses API), with the real streaming event sequence.

        The output is a reasoning item if the request has ``reasoning``, then a message or a tool call;
        a tool result is a ``*_call_output`` item after the last user item.
        """
        payload, end = call.payload, call.behaviour.end
        items = _list(payload.get("input"))
        users = [n for n, item in enumerate(items) if _dict(item).get("role") == "user"]
        tool = call.tool_call(
            any(
                _dict(item).get("type") in ("function_call_output", "custom_tool_call_output")
                for item in items[users[-1] + 1 if users else 0 :]
            )
        )
        output: list[dict] = []
        steps: list[tuple[str, dict, bool]] = []
        reasoning = isinstance(payload.get("reasoning"), dict)
        if reasoning:  # no summary text: the fake only shows the item's shape
            thought = {"type": "reasoning", "id": _id("rs_", 48), "summary": []}
            if "reasoning.encrypted_content" in _list(payload.get("include")):
                thought["encrypted_content"] = _opaque()
            output.append(thought)
            steps += [
                ("response.output_item.added", {"output_index": 0, "item": thought}, False),
                ("response.output_item.done", {"output_index": 0, "item": thought}, False),
            ]
        status = "completed" if end == "completed" else "incomplete"
        if tool:
            tools = _list(payload.get("tools")) + [  # Codex also sends tools as ``additional_tools`` input items
                t for item in items if _dict(item).get("type") == "additional_tools" for t in _list(item.get("tools"))
            ]
            item, text, more = _response_tool_call(call, tool, _find_tool(tools, tool), len(output), status)
        else:
            item, text, more = _response_message(call, len(output), status)
        output.append(item)
        steps += more
        thinking_tokens = REASONING_TOKENS if reasoning else 0
        response = {
            "id": _id("resp_", 32),
            "object": "response",
            "created_at": int(time.time()),
            "status": end,
            "error": {"code": "server_error", "message": "The model failed to generate a response."}
            if end == "failed"
            else None,
            "incomplete_details": {"reason": "max_output_tokens"} if end == "incomplete" else None,
            "instructions": payload.get("instructions"),
            "model": call.model,
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "metadata": {},
            "temperature": 1.0,
            "top_p": 1.0,
            "usage": _response_usage(
                call.prompt_tokens, _words(text) + thinking_tokens, thinking_tokens, call.cache_read
            ),
        }
        if not call.stream:
            return response
        in_progress = response | {
            "status": "in_progress",
            "error": None,
            "incomplete_details": None,
            "output": [],
            "usage": None,
        }
        steps = [
            ("response.created", {"response": in_progress}, False),
            ("response.in_progress", {"response": in_progress}, False),
            *steps,
            (f"response.{end}", {"response": response}, False),
        ]  # .completed, .incomplete or .failed
        return [
            (name, {"type": name, "sequence_number": n} | data, content)
            for n, (name, data, content) in enumerate(steps)
        ]

    def _compact(self, call: Call) -> dict:
        """``POST /v1/responses/compact``: the history folded into one opaque compaction item, never streamed."""
        return {
            "id": _id("resp_", 32),
            "object": "response.compaction",
            "created_at": int(time.time()),
            "output": [{"type": "compaction", "id": _id("cmp_", 48), "encrypted_content": _opaque(512)}],
            "usage": _response_usage(call.prompt_tokens, 2 * REASONING_TOKENS, REASONING_TOKENS),
        }

    def _input_tokens(self, call: Call) -> dict:
        """``POST /v1/responses/input_tokens``."""
        return {"object": "response.input_tokens", "input_tokens": call.prompt_tokens}

    def _embeddings(self, call: Call) -> dict:
        """``POST /v1/embeddings``: small deterministic vectors, float or base64."""
        inputs = call.payload.get("input")
        inputs = inputs if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else [inputs]
        data = []
        for index, item in enumerate(inputs):
            digest = hashlib.sha256(json.dumps(item).encode()).digest()
            vector = [round(b / 255 - 0.5, 4) for b in digest[:8]]
            embedding: Any = vector
            if call.payload.get("encoding_format") == "base64":
                embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        return {
            "object": "list",
            "data": data,
            "model": call.model,
            "usage": {"prompt_tokens": call.prompt_tokens, "total_tokens": call.prompt_tokens},
        }

    def _models(self, call: Call) -> dict:
        """``GET /v1/models`` in whichever API's list shape the request looks like.

        A key override's ``models`` parameter (a list of ids) replaces the default list for that key.
        """
        models = self._overrides.get(call.key, {}).get("models")
        if call.api == "openai":
            return {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 1715367049, "owned_by": "system"}
                    for m in models or OPENAI_MODELS
                ],
            }
        data = [
            {"type": "model", "id": m, "display_name": name, "created_at": "2025-09-29T00:00:00Z"}
            for m, name in ([(m, m) for m in models] if models else ANTHROPIC_MODELS)
        ]
        return {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}

    def _organizations(self, call: Call) -> dict:
        """``GET /v1/organizations``: one default organisation, or the key override's ``organizations`` ids
        (the first is the default)."""
        ids = self._overrides.get(call.key, {}).get("organizations") or [OPENAI_ORG]
        return {
            "object": "list",
            "data": [
                {"object": "organization", "id": org, "is_default": index == 0, "title": f"Org {index}"}
                for index, org in enumerate(ids)
            ],
        }

    # -- Anthropic endpoints -------------------------------------------------------

    def _messages(self, call: Call) -> dict | list[Event] | web.Response:
        """``POST /v1/messages``, with the real streaming event sequence.

        The content is a thinking block if thinking is on, a web search if asked, then a tool use or the
        text; a tool result is a ``tool_result`` block in the last user message.
        """
        payload, b = call.payload, call.behaviour
        thinking = _dict(payload.get("thinking"))
        if thinking.get("type") == "enabled":  # the API's own checks, so a client's budgets meet them here too
            budget, max_tokens = thinking.get("budget_tokens"), payload.get("max_tokens")
            if not _is_int(budget) or budget < 1024:
                return self._error(call, "bad_request", BUDGET_TOO_SMALL)
            if _is_int(max_tokens) and budget >= max_tokens:
                return self._error(call, "bad_request", BUDGET_TOO_BIG)
        thinks = thinking.get("type") in ("enabled", "adaptive")
        users = [message for message in _list(payload.get("messages")) if _dict(message).get("role") == "user"]
        tool = call.tool_call(
            bool(users) and any(_dict(block).get("type") == "tool_result" for block in _list(users[-1].get("content")))
        )
        blocks: list[dict] = []
        if thinks:  # the signature comes even when the text is omitted: clients must send it back
            blocks.append(
                {
                    "type": "thinking",
                    "thinking": "" if thinking.get("display") == "omitted" else THINKING,
                    "signature": _opaque(),
                }
            )
            if b.redacted_thinking:
                blocks.append({"type": "redacted_thinking", "data": _opaque(256)})
        if b.server_tool:
            search_id = _id("srvtoolu_01", 22)
            blocks += [
                {"type": "server_tool_use", "id": search_id, "name": "web_search", "input": {"query": "fake"}},
                {
                    "type": "web_search_tool_result",
                    "tool_use_id": search_id,
                    "content": [
                        {
                            "type": "web_search_result",
                            "url": "https://example.com/",
                            "title": "Example",
                            "encrypted_content": _opaque(),
                            "page_age": None,
                        }
                    ],
                },
            ]
        if tool:
            blocks.append({"type": "tool_use", "id": _id("toolu_01", 22), "name": tool, "input": _tool_input(tool)})
        else:
            blocks.append({"type": "text", "text": call.reply()})
        answer = json.dumps(blocks[-1]["input"]) if tool else blocks[-1]["text"]
        usage = {
            "input_tokens": call.prompt_tokens - call.cache_read - call.cache_written,
            "cache_creation_input_tokens": call.cache_written,
            "cache_read_input_tokens": call.cache_read,
            "cache_creation": {"ephemeral_5m_input_tokens": call.cache_written, "ephemeral_1h_input_tokens": 0},
            "output_tokens": _words(answer) + (_words(THINKING) if thinks else 0),
            "service_tier": "standard",
        }
        if b.server_tool:
            usage["server_tool_use"] = {"web_search_requests": 1}
        stop = "tool_use" if tool else "end_turn"
        message = {
            "id": _id("msg_01", 22),
            "type": "message",
            "role": "assistant",
            "model": call.model,
            "content": blocks,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": usage,
        }
        if not call.stream:
            return message
        start = message | {
            "content": [],
            "stop_reason": None,
            "usage": {name: value for name, value in usage.items() if name != "server_tool_use"} | {"output_tokens": 1},
        }
        steps: list[tuple[str, dict, bool]] = [("message_start", {"message": start}, False)]
        for index, block in enumerate(blocks):
            events = _block_events(call, index, block)
            steps += [*events[:1], ("ping", {}, False), *events[1:]] if index == 0 else events
        # The final usage repeats the input and cache figures, as the current API does.
        final = {
            name: usage[name]
            for name in (
                "input_tokens",
                "cache_creation_input_tokens",
                "cache_read_input_tokens",
                "output_tokens",
                "server_tool_use",
            )
            if name in usage
        }
        steps += [
            ("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None}, "usage": final}, False),
            ("message_stop", {}, False),
        ]
        return [(name, {"type": name} | data, content) for name, data, content in steps]

    def _count_tokens(self, call: Call) -> dict:
        """``POST /v1/messages/count_tokens``."""
        return {"input_tokens": call.prompt_tokens}

    def _complete(self, call: Call) -> dict | list[Event]:
        """``POST /v1/complete`` (legacy text completions)."""
        base = {"type": "completion", "id": _id("compl_01", 22), "model": call.model}
        if not call.stream:
            return base | {"completion": " " + call.reply(), "stop_reason": "stop_sequence", "stop": "\n\nHuman:"}
        events: list[Event] = [
            ("completion", base | {"completion": p, "stop_reason": None}, True) for p in call.chunks()
        ]
        events.append(("completion", base | {"completion": "", "stop_reason": "stop_sequence"}, False))
        return events


# -- each key's organisation: its prompt cache and its request budget -------------------------------------------

CACHE_BLOCK = 128  # words: prompts are cached in steps of this many (OpenAI caches in 128-token steps)
CACHE_MINIMUM = 1024  # words: shorter prompts are never cached (both APIs' minimum for most models)
CACHE_LIFETIME = 300.0  # seconds a cached prefix lives after its last use (both APIs' default)
CACHED_PATHS = ("/v1/chat/completions", "/v1/responses", "/v1/messages")
PROMPT_ORDER = ("system", "instructions", "messages", "input", "prompt")  # the order in which the APIs read a prompt


class KeyAccounts:
    """What the organisation behind each key keeps from one request to the next.

    The prompt cache: a prompt is its words in PROMPT_ORDER, cut into blocks of CACHE_BLOCK words (a rest shorter
    than a block is never cached). The leading blocks that the same key saw, for the same model, within
    CACHE_LIFETIME are read from the cache; the blocks after them are written to it. OpenAI caches every prompt of
    CACHE_MINIMUM words or more; Anthropic only a request that has ``cache_control`` somewhere.

    The request budget: ``budget`` requests per ``budget_seconds`` window, the window starting with the key's
    first request after the last one ended; over it, a 429 with ``retry-after`` until the window ends.
    """

    def __init__(self) -> None:
        self._caches: dict[str | None, OrderedDict[bytes, float]] = {}  # key -> prefix digest -> last use
        self._windows: dict[str | None, list[float]] = {}  # key -> [window start, requests counted]

    def use_cache(self, call: Call, body: bytes) -> None:
        """Reads and writes the key's cache for the call's prompt; sets ``cache_read`` and ``cache_written``."""
        if call.request.path not in CACHED_PATHS or (call.api == "anthropic" and b'"cache_control"' not in body):
            return
        words = " ".join(_texts([call.payload.get(name) for name in PROMPT_ORDER])).split()
        if len(words) < CACHE_MINIMUM:
            return
        running, prefixes = hashlib.sha256(call.model.encode()), []
        for start in range(0, len(words) - CACHE_BLOCK + 1, CACHE_BLOCK):
            running.update(" ".join(words[start : start + CACHE_BLOCK]).encode() + b"\n")
            prefixes.append(running.copy().digest())
        cache, now = self._caches.setdefault(call.key, OrderedDict()), time.monotonic()
        while cache and next(iter(cache.values())) <= now - CACHE_LIFETIME:
            cache.popitem(last=False)
        hits = next((n for n, prefix in enumerate(prefixes) if prefix not in cache), len(prefixes))
        for prefix in prefixes:
            cache[prefix] = now
            cache.move_to_end(prefix)
        call.cache_read, call.cache_written = hits * CACHE_BLOCK, (len(prefixes) - hits) * CACHE_BLOCK

    def charge(self, call: Call, budget: int, seconds: float) -> None:
        """Counts the call against the key's budget, or makes it a rate limit; sets the limit headers."""
        now = time.monotonic()
        window = self._windows.get(call.key)
        if window is None or now >= window[0] + seconds:
            window = self._windows[call.key] = [now, 0]
        reset = window[0] + seconds - now
        if window[1] >= budget:
            call.behaviour.error, call.behaviour.retry_after = "rate_limit", max(1, math.ceil(reset))
        else:
            window[1] += 1
        remaining = str(budget - int(window[1]))
        if call.api == "anthropic":
            at = (datetime.now(UTC) + timedelta(seconds=reset)).strftime("%Y-%m-%dT%H:%M:%SZ")
            call.limit_headers = {
                "anthropic-ratelimit-requests-limit": str(budget),
                "anthropic-ratelimit-requests-remaining": remaining,
                "anthropic-ratelimit-requests-reset": at,
            }
        else:
            call.limit_headers = {
                "x-ratelimit-limit-requests": str(budget),
                "x-ratelimit-remaining-requests": remaining,
                "x-ratelimit-reset-requests": f"{reset:.3f}s",
            }


def start_in_thread(host: str = "127.0.0.1", port: int = 0) -> FakeUpstream:
    """Start a fake on its own event loop in a daemon thread; returns once listening."""
    return FakeUpstream().start_in_thread(host, port)


def stop_in_thread(fake: FakeUpstream) -> None:
    """Stop a fake started by ``start_in_thread`` and end its thread."""
    fake.stop_in_thread()


async def _serve(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    fake = FakeUpstream()
    await fake.start(host, port)
    print(f"fake upstream listening on {fake.url}", flush=True)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    await stopped.wait()
    await fake.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI + Anthropic upstream for tests and demos.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
