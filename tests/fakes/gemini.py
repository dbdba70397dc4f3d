"""A fake Google AI (Gemini API) for the proxy's tests.

It answers as generativelanguage.googleapis.com does, in its formats (google-genai parses it):

- `POST /{v1beta|v1}/models/{model}:generateContent`, `:streamGenerateContent` (`alt=sse`: server-sent events
  framed with CRLF, as Google frames them; without it one JSON array streamed element by element, as the
  deprecated SDK's REST transport gets it) and `:countTokens`; `GET /{v1beta|v1}/models` (pageSize, pageToken,
  nextPageToken) and `GET .../models/{model}`.
- `POST /v1beta/openai/chat/completions`, Google's OpenAI-compatible endpoint: the request goes on to the fake
  OpenAI upstream's `/v1/chat/completions` and its answer comes back; errors are Google's, wrapped in a list of one
  (as that endpoint answers them).

The key is the `x-goog-api-key` header or the `?key=` query (a Bearer token on the OpenAI-compatible endpoint).
Google's checks come in Google's order and words: the key (none: 403 PERMISSION_DENIED; a `-401` key: 400
INVALID_ARGUMENT with the API_KEY_INVALID reason), then the payload (not JSON, or a top-level field the API does not
know: `Invalid JSON payload received. Unknown name "x": Cannot find field.`), then the model (404 NOT_FOUND), then
the contents (required).

How a request is answered is fakeupstream's: its key markers (`-429`, `-401`, `-quota`, `-500`, `-slow`), per-key
overrides (`set_key_behaviour`, `models` naming the models a key lists and may use) and `#fake:` directives in the
prompt texts (status, error, echo_key, delay_ms, events, interval_ms, stall_ms, reset_after, body_bytes, tool,
usage), read by its own code; the answer text is its reply. The errors its kinds stand for, in Google's words:
rate_limit is a 429 RESOURCE_EXHAUSTED with QuotaFailure, Help and RetryInfo (`retryDelay`: retry_after) details,
insufficient_quota and credit_balance a 400 FAILED_PRECONDITION (no billing account where the free tier is not
offered), permission a 403 PERMISSION_DENIED, server_error a 500 INTERNAL, overloaded a 503 UNAVAILABLE; echo_key
adds a DebugInfo detail naming the key. The `usage` directive applies to every `usageMetadata`; `headers` is not
supported. Every request is recorded (`requests`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from typing import Any

import aiohttp
from aiohttp import web

from tests.fakeupstream import (
    REASONING_TOKENS,
    THINKING,
    Behaviour,
    Call,
    FakeUpstream,
    RecordedRequest,
    _bearer,
    _dict,
    _id,
    _list,
    _override_figures,
    _tool_input,
    _words,
)

KEY_HEADER = "x-goog-api-key"
OPENAI_COMPATIBLE = "/v1beta/openai/chat/completions"
# (id, display name, thinks): a model that thinks reports thoughtsTokenCount unless its thinkingBudget is 0.
MODELS = (
    ("gemini-2.5-pro", "Gemini 2.5 Pro", True),
    ("gemini-2.5-flash", "Gemini 2.5 Flash", True),
    ("gemini-2.5-flash-lite", "Gemini 2.5 Flash-Lite", True),
    ("gemini-2.0-flash", "Gemini 2.0 Flash", False),
    ("gemini-3-pro-preview", "Gemini 3 Pro Preview", True),
)
THINKING_MODELS = {model for model, _, thinks in MODELS if thinks}
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 1000  # the models list's (the API reference, models.list)
GENERATE_FIELDS = (
    "model",
    "contents",
    "tools",
    "toolConfig",
    "safetySettings",
    "systemInstruction",
    "generationConfig",
    "cachedContent",
    "labels",
    "serviceTier",
    "store",
    "continuationToken",
)
COUNT_TOKENS_FIELDS = ("model", "contents", "generateContentRequest")


def _spellings(names: tuple[str, ...]) -> set[str]:
    """Both names protobuf's JSON parser accepts for each field: its JSON name and its proto name."""
    return set(names) | {re.sub(r"[A-Z]", lambda m: "_" + m[0].lower(), name) for name in names}


KNOWN_FIELDS = {
    "generateContent": _spellings(GENERATE_FIELDS),
    "streamGenerateContent": _spellings(GENERATE_FIELDS),
    "countTokens": _spellings(COUNT_TOKENS_FIELDS),
}
_NATIVE = re.compile(r"/(v1beta|v1)/models/([^/:]+):([A-Za-z]+)")
_MODEL = re.compile(r"/(v1beta|v1)/models/([^/:]+)")
_MODELS = re.compile(r"/(v1beta|v1)/models")

INVALID_KEY = "API key not valid. Please pass a valid API key."
MISSING_KEY = (
    "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other "
    "form of API consumer identity to call this API."
)
RATE_LIMITED = (
    "You exceeded your current quota, please check your plan and billing details. For more information on this "
    "error, head to: https://ai.google.dev/gemini-api/docs/rate-limits. To monitor your current usage, head to: "
    "https://ai.dev/rate-limit. \n* Quota exceeded for metric: "
    "generativelanguage.googleapis.com/generate_content_free_tier_requests, limit: 10, model: {model}\n"
    "Please retry in {seconds}s."
)
NO_CONTENTS = "* GenerateContentRequest.contents: contents is not specified"
UNKNOWN_FIELD = 'Invalid JSON payload received. Unknown name "{name}": Cannot find field.'
# kind -> HTTP status, Google status, message
ERRORS = {
    "missing_key": (403, "PERMISSION_DENIED", MISSING_KEY),
    "invalid_key": (400, "INVALID_ARGUMENT", INVALID_KEY),
    "rate_limit": (429, "RESOURCE_EXHAUSTED", RATE_LIMITED),
    "insufficient_quota": (
        400,
        "FAILED_PRECONDITION",
        "User location is not supported for the API use without a billing account linked.",
    ),
    "permission": (403, "PERMISSION_DENIED", "The caller does not have permission"),
    "bad_request": (400, "INVALID_ARGUMENT", "Request contains an invalid argument."),
    "not_found": (404, "NOT_FOUND", "Requested entity was not found."),
    "server_error": (
        500,
        "INTERNAL",
        "An internal error has occurred. Please retry or report in "
        "https://developers.generativeai.google/guide/troubleshooting",
    ),
    "overloaded": (503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
}


def _prompt_texts(payload: dict) -> list[str]:
    """The text parts of a request's contents and system instruction (a countTokens request may hold a whole
    generation request)."""
    request = _dict(payload.get("generateContentRequest") or payload.get("generate_content_request")) or payload
    contents = [*_list(request.get("contents")), request.get("systemInstruction") or request.get("system_instruction")]
    return [
        text
        for content in contents
        for part in _list(_dict(content).get("parts"))
        if isinstance(text := _dict(part).get("text"), str)
    ]


def _google_headers(call: Call) -> dict[str, str]:
    """The headers Google's front end sends with an answer."""
    return {
        "server": "scaffolding on HTTPServer2",
        "server-timing": f"gfet4t7; dur={int((time.monotonic() - call.started) * 1000)}",
        "vary": "Origin, X-Origin, Referer",
        "x-content-type-options": "nosniff",
        "x-frame-options": "SAMEORIGIN",
        "x-xss-protection": "0",
    }


class FakeGemini(FakeUpstream):
    """The fake; `start()` it on a loop, or `start_in_thread()`. Its answers to the OpenAI-compatible endpoint come
    from the fake OpenAI upstream at `openai_fake_url`."""

    def __init__(self, openai_fake_url: str) -> None:
        super().__init__()
        self.openai_fake_url = openai_fake_url.rstrip("/")

    def make_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    def models_of(self, key: str | None) -> list[str]:
        """The models `key` lists and may use: its override's `models`, else all."""
        return list(self._overrides.get(key, {}).get("models") or [model for model, _, _ in MODELS])

    # -- dispatch -------------------------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        """Records the request, then answers it after Google's checks, in Google's order."""
        body = await request.read()
        compatible = request.path == OPENAI_COMPATIBLE
        key = (_bearer(request) if compatible else request.headers.get(KEY_HEADER) or request.query.get("key")) or None
        recorded = RecordedRequest(
            request.method,
            request.raw_path,
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
            body,
            key,
        )
        if not request.path.startswith("/_fake/"):
            self.requests.append(recorded)
        try:
            payload = json.loads(body) if body else {}
        except (ValueError, RecursionError):
            payload = None
        texts_of = _dict if compatible else lambda value: {"messages": _prompt_texts(_dict(value))}
        call = Call(request, "gemini", key, texts_of(payload), Behaviour())
        native = _NATIVE.fullmatch(request.path)
        posts = request.method == "POST" and bool(native or compatible)
        lists = request.method == "GET" and bool(_MODELS.fullmatch(request.path) or _MODEL.fullmatch(request.path))
        if not (posts or lists):
            return self._google_error(call, "not_found", compatible)
        if key is None:
            return self._google_error(call, "missing_key", compatible)
        call.behaviour = self._behaviour(key, body.decode("utf-8", errors="replace"), call.payload)
        if request.method == "POST" and (budget := self._overrides.get(key, {}).get("budget")) is not None:
            self._accounts.charge(call, int(budget), float(self._overrides[key].get("budget_seconds", 60)))
        if call.behaviour.delay_ms and not compatible:  # the fake OpenAI upstream waits for the compatible endpoint
            await asyncio.sleep(call.behaviour.delay_ms / 1000)
        if call.behaviour.error:
            return self._google_error(call, call.behaviour.error, compatible, model=native[2] if native else None)
        if request.method == "GET":
            return self._models_list(call)
        if not isinstance(payload, dict):
            return self._google_error(
                call, "bad_request", compatible, "Invalid JSON payload received. Unexpected token."
            )
        if compatible:
            return await self._openai_compatible(call, body)
        return await self._native(call, payload, *native.groups(), recorded)

    # -- native endpoints -----------------------------------------------------------------------------------------

    async def _native(
        self, call: Call, payload: dict, version: str, model: str, method: str, recorded: RecordedRequest
    ) -> web.StreamResponse:
        if method not in KNOWN_FIELDS:
            return self._google_error(call, "not_found", message=f"Method not found: {method}")
        if unknown := sorted(set(payload) - KNOWN_FIELDS[method]):
            return self._google_error(call, "bad_request", message=UNKNOWN_FIELD.format(name=unknown[0]))
        if model not in self.models_of(call.key):
            message = (
                f"models/{model} is not found for API version {version}, or is not supported for {method}. Call "
                "ListModels to see the list of available models and their supported methods."
            )
            return self._google_error(call, "not_found", message=message)
        if method == "countTokens":
            tokens = call.prompt_tokens
            answer = {"totalTokens": tokens, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": tokens}]}
            return web.json_response(answer, headers=_google_headers(call), dumps=_pretty)
        if not _list(payload.get("contents")):
            return self._google_error(call, "bad_request", message=NO_CONTENTS)
        chunks = self._generation(call, model, payload)
        for chunk in chunks:  # the `usage` directive, applied by fakeupstream's own code
            holder = {"usage": chunk["usageMetadata"]}
            _override_figures(holder, call.behaviour)
            chunk["usageMetadata"] = holder["usage"]
        if method == "generateContent":
            return web.json_response(_whole(chunks), headers=_google_headers(call), dumps=_pretty)
        if call.request.query.get("alt") == "sse":
            frames = [(f"data: {json.dumps(chunk)}\r\n\r\n".encode(), True) for chunk in chunks]
            return await self._send_frames(call, frames, "text/event-stream", recorded)
        frames = [((b"[" if n == 0 else b"\n,\r\n") + _pretty(chunk).encode(), True) for n, chunk in enumerate(chunks)]
        return await self._send_frames(call, [*frames, (b"\n]", False)], "application/json; charset=UTF-8", recorded)

    def _generation(self, call: Call, model: str, payload: dict) -> list[dict]:
        """The answer as its stream's chunks (GenerateContentResponse objects): thought summaries if asked for, then
        the reply's pieces or a function call; every chunk with the usage so far, the last with the finishReason."""
        contents = _list(payload.get("contents"))
        last_parts = map(_dict, _list(_dict(contents[-1]).get("parts")))
        tool = call.tool_call(any("functionResponse" in part or "function_response" in part for part in last_parts))
        config = _dict(payload.get("generationConfig") or payload.get("generation_config"))
        thinking = _dict(config.get("thinkingConfig") or config.get("thinking_config"))
        budget = thinking.get("thinkingBudget", thinking.get("thinking_budget"))
        thoughts = REASONING_TOKENS if model in THINKING_MODELS and budget != 0 else 0
        parts: list[dict] = []
        if thoughts and (thinking.get("includeThoughts") or thinking.get("include_thoughts")) is True:
            parts += [{"text": piece, "thought": True} for piece in call.pieces(THINKING)]
        if tool:  # Gemini sends a function call whole, never in pieces
            parts.append({"functionCall": {"name": tool, "args": _tool_input(tool)}})
        else:
            parts += [{"text": piece} for piece in call.chunks()]
        prompt, response_id = call.prompt_tokens, _id("", 22)
        chunks, answered = [], ""
        for index, part in enumerate(parts):
            if not part.get("thought"):
                answered += part.get("text") or json.dumps(part.get("functionCall"))
            candidates = _words(answered) if answered else 0
            usage = {"promptTokenCount": prompt, "candidatesTokenCount": candidates, "thoughtsTokenCount": thoughts}
            usage = {name: count for name, count in usage.items() if count}  # proto3 JSON leaves zeros out
            usage["totalTokenCount"] = prompt + candidates + thoughts
            usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
            candidate: dict[str, Any] = {"content": {"parts": [part], "role": "model"}, "index": 0}
            if index == len(parts) - 1:
                candidate["finishReason"] = "STOP"
            chunks.append(
                {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model, "responseId": response_id}
            )
        return chunks

    def _models_list(self, call: Call) -> web.Response:
        """`GET /models` (paged) and `GET /models/{model}`."""
        names = {model: name for model, name, _ in MODELS}
        models = [_model_resource(model, names.get(model, model)) for model in self.models_of(call.key)]
        if single := _MODEL.fullmatch(call.request.path):
            found = [resource for resource in models if resource["name"] == f"models/{single[2]}"]
            if not found:
                message = f"Model is not found: models/{single[2]} for api version {single[1]}"
                return self._google_error(call, "not_found", message=message)
            return web.json_response(found[0], headers=_google_headers(call), dumps=_pretty)
        query = call.request.query
        try:
            size = min(int(query.get("pageSize") or DEFAULT_PAGE_SIZE), MAX_PAGE_SIZE) or DEFAULT_PAGE_SIZE
            start = int(base64.urlsafe_b64decode(query["pageToken"])) if query.get("pageToken") else 0
        except ValueError:
            return self._google_error(call, "bad_request", message="Invalid page token.")
        answer: dict[str, Any] = {"models": models[start : start + size]}
        if start + size < len(models):
            answer["nextPageToken"] = base64.urlsafe_b64encode(str(start + size).encode()).decode()
        return web.json_response(answer, headers=_google_headers(call), dumps=_pretty)

    # -- the OpenAI-compatible endpoint ---------------------------------------------------------------------------

    async def _openai_compatible(self, call: Call, body: bytes) -> web.StreamResponse:
        """The fake OpenAI upstream's answer, streamed through; its errors in Google's shape."""
        headers = {"Authorization": f"Bearer {call.key}", "Content-Type": "application/json"}
        assert self._session is not None
        async with self._session.post(
            f"{self.openai_fake_url}/v1/chat/completions", data=body, headers=headers
        ) as upstream:
            if upstream.status >= 400:
                try:
                    message = _dict(_dict(json.loads(await upstream.read())).get("error")).get("message")
                except ValueError:
                    message = None
                kind = "bad_request" if upstream.status < 500 else "server_error"
                return self._google_error(call, kind, True, message, status=upstream.status)
            response = web.StreamResponse(
                status=upstream.status, headers={"Content-Type": upstream.headers["Content-Type"]}
            )
            await response.prepare(call.request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    # -- answers --------------------------------------------------------------------------------------------------

    def _google_error(
        self,
        call: Call,
        kind: str,
        in_list: bool = False,
        message: str | None = None,
        status: int | None = None,
        model: str | None = None,
    ) -> web.Response:
        """An error as Google answers it (`in_list`: as the OpenAI-compatible endpoint does, a list of one)."""
        kind = {"credit_balance": "insufficient_quota"}.get(kind, kind)
        code, google_status, text = ERRORS[kind]
        status = call.behaviour.status or status or code
        retry_after = call.behaviour.retry_after
        error: dict[str, Any] = {
            "code": status,
            "message": message or text.format(model=model or "gemini-2.5-flash", seconds=retry_after),
            "status": google_status,
        }
        details: list[dict] = []
        if kind == "invalid_key":
            details += [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                },
                {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": text},
            ]
        elif kind == "rate_limit":
            violation = {
                "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                "quotaDimensions": {"location": "global", "model": model or "gemini-2.5-flash"},
                "quotaValue": "10",
            }
            link = {
                "description": "Learn more about Gemini API quotas",
                "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
            }
            details += [
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [violation]},
                {"@type": "type.googleapis.com/google.rpc.Help", "links": [link]},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_after}s"},
            ]
        elif message and message.startswith("Invalid JSON payload"):
            details.append(
                {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"description": message}]}
            )
        if call.behaviour.echo_key and call.key:
            details.append({"@type": "type.googleapis.com/google.rpc.DebugInfo", "detail": f"API key: {call.key}"})
        if details:
            error["details"] = details
        answer: Any = [{"error": error}] if in_list else {"error": error}
        return web.json_response(answer, status=status, headers=_google_headers(call), dumps=_pretty)

    async def _send_frames(
        self, call: Call, frames: list[tuple[bytes, bool]], content_type: str, recorded: RecordedRequest
    ) -> web.StreamResponse:
        """Writes a stream frame by frame (SSE events or JSON array elements; True marks a content frame) with
        fakeupstream's interval, stall and reset directives; `recorded` learns how it ended."""
        b = call.behaviour
        response = web.StreamResponse(headers=_google_headers(call) | {"Content-Type": content_type})
        response.enable_chunked_encoding()
        try:
            await response.prepare(call.request)
            for index, (frame, is_content) in enumerate(frames):
                if index and b.reset_after is not None and recorded.content_events_sent >= b.reset_after:
                    recorded.stream_ending = "aborted"
                    await self._abort(call.request)
                    return response
                if is_content and recorded.content_events_sent and b.interval_ms:
                    await asyncio.sleep(b.interval_ms / 1000)
                await response.write(frame)
                if is_content:
                    recorded.content_events_sent += 1
                    if recorded.content_events_sent == 1 and b.stall_ms:
                        await asyncio.sleep(b.stall_ms / 1000)
            await response.write_eof()
            recorded.stream_ending = "completed"
        except ConnectionResetError:
            recorded.stream_ending = "cancelled"
        except asyncio.CancelledError:
            recorded.stream_ending = "cancelled"
            raise
        return response


def _pretty(value: Any) -> str:
    """JSON as Google's front end writes a whole answer: indented by two spaces."""
    return json.dumps(value, indent=2)


def _whole(chunks: list[dict]) -> dict:
    """A buffered answer: the stream's chunks in one, their text parts joined (thoughts apart), the last usage."""
    parts: list[dict] = []
    for chunk in chunks:
        for part in chunk["candidates"][0]["content"]["parts"]:
            if parts and "text" in part and "text" in parts[-1] and part.get("thought") == parts[-1].get("thought"):
                parts[-1] = parts[-1] | {"text": parts[-1]["text"] + part["text"]}
            else:
                parts.append(part)
    last = chunks[-1]
    return last | {"candidates": [last["candidates"][0] | {"content": {"parts": parts, "role": "model"}}]}


def _model_resource(model: str, display_name: str) -> dict:
    """A Model resource as the models list gives it."""
    return {
        "name": f"models/{model}",
        "version": "001",
        "displayName": display_name,
        "description": f"Fake {display_name}",
        "inputTokenLimit": 1048576,
        "outputTokenLimit": 65536,
        "supportedGenerationMethods": ["generateContent", "countTokens", "createCachedContent", "batchGenerateContent"],
        "temperature": 1,
        "topP": 0.95,
        "topK": 64,
        "maxTemperature": 2,
        "thinking": model in THINKING_MODELS,
    }
