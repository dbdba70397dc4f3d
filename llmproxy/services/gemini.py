"""Google AI (the Gemini API at generativelanguage.googleapis.com): its wire format, a third dialect next to
OpenAI's and Anthropic's.

Clients call it natively, `POST /{v1beta|v1}/models/{model}:{generateContent|streamGenerateContent|countTokens}`
with the key in `x-goog-api-key`, and through Google's OpenAI-compatible endpoint, `POST
/v1beta/openai/chat/completions` with the key as a Bearer token, whose answers are OpenAI's (llmproxy.api.usage reads
them). This module holds what the proxy needs of the native format: the request target taken apart and rebuilt
(never copied), the usage read from answers and streams, errors in Google's shape, and what an error says about the
key that got it.

Streams: google-genai (the Python SDK; 3.6.1 calls `/v1/` by default) always asks for
`streamGenerateContent?alt=sse`, server-sent events framed with CRLF, one GenerateContentResponse per event
(google/genai/models.py). Without `alt=sse` Google streams one JSON array, its
elements arriving one by one: what the deprecated google-generativeai SDK gets over REST (google-ai-generativelanguage
sends `$alt=json;enum-encoding=int`, transports/rest_base.py). The meter reads both.
"""

import json
import re
import urllib.parse
from dataclasses import dataclass, field, replace

from llmproxy.api import GEMINI, OPENAI, sse
from llmproxy.api.routes import FORWARD, LOCAL, request_path
from llmproxy.api.usage import OUTPUT, PART, PROMPT, WHOLE, Usage, _dict, _Figures, _list, _loads, estimate
from llmproxy.pool.keys import MAX_WAIT, Verdict, parse_duration
from llmproxy.services.base import Endpoint, Outgoing, Service, under

SERVICE = "google-ai"  # the service's name in settings (GOOGLE_AI_KEY) and routes (/proxy/google-ai/...)
UPSTREAM = "https://generativelanguage.googleapis.com"
KEY_HEADER = "x-goog-api-key"
OPENAI_COMPATIBLE_PATH = "/v1beta/openai/chat/completions"
GENERATE, STREAM, COUNT_TOKENS = "generateContent", "streamGenerateContent", "countTokens"

# A model id as it may stand in a path the proxy builds: no `/`, `%`, `?`, `:` or `..` can reach the upstream path.
MODEL_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
_MODEL_ID = re.compile(MODEL_ID)
_NATIVE_PATH = re.compile(rf"/(v1beta|v1)/models/({MODEL_ID}):({GENERATE}|{STREAM}|{COUNT_TOKENS})".encode())


@dataclass(frozen=True)
class NativeCall:
    """A native request target, taken apart: the upstream path is rebuilt from these parts alone."""

    version: str  # "v1beta" or "v1"
    model: str  # without `models/`
    method: str  # GENERATE, STREAM or COUNT_TOKENS
    sse: bool = False  # a stream asked for as server-sent events (`alt=sse`); else Google streams a JSON array
    # The client put a key in the query (`?key=`): the proxy never reads it nor sends it on (upstream_path leaves it
    # out; the pool's key goes in a header), so the service layer should refuse the request rather than run it
    # under another credential, and keep the target out of its logs.
    key_in_query: bool = False

    @property
    def streams(self) -> bool:
        return self.method == STREAM

    @property
    def counts_tokens(self) -> bool:
        return self.method == COUNT_TOKENS


def parse_native_path(target: bytes) -> NativeCall | None:
    """The native call a request target (path and query, runs of slashes merged as routes.py does) names, or None.

    Of the query only `alt=sse` on a stream is kept (`$alt` is Google's other spelling of it). Anything else is
    dropped: `$alt=json;enum-encoding=int` only asks for enums as numbers, and protobuf's JSON parser reads their
    names as well; `key` is noted in `key_in_query`, never used."""
    match = _NATIVE_PATH.fullmatch(request_path(target))
    if match is None or b".." in match[2]:
        return None
    version, model, method = (part.decode() for part in match.groups())
    query = urllib.parse.parse_qsl(target.partition(b"?")[2].decode("latin-1"), keep_blank_values=True)
    sse_asked = any(name in ("alt", "$alt") and value == "sse" for name, value in query)
    return NativeCall(version, model, method, method == STREAM and sse_asked, any(name == "key" for name, _ in query))


def upstream_path(call: NativeCall) -> str:
    """The path (and query) to send upstream."""
    return f"/{call.version}/models/{call.model}:{call.method}" + ("?alt=sse" if call.sse else "")


# -- usage ------------------------------------------------------------------------------------------------------------


def from_usage_metadata(metadata) -> Usage | None:
    """A `usageMetadata` object's figures; None when there is none or it names no prompt figure.

    Google's fields (google-genai types.GenerateContentResponseUsageMetadata): `promptTokenCount` includes the
    `cachedContentTokenCount`; `totalTokenCount` is prompt + candidates + toolUsePrompt + thoughts, so thoughts are
    not part of `candidatesTokenCount` and are billed as output ("Output price (including thinking tokens)", the
    pricing page); `toolUsePromptTokenCount` is the results of Google's own tools fed back to the model, billed as
    input. A total above the sum of its parts (a kind of token this reader does not know yet) counts as output, the
    dearer side; a total is only trusted so when no figure was odd."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        return Usage(odd={WHOLE: WHOLE})
    if "promptTokenCount" not in metadata:
        return None
    figures = _Figures(metadata)
    count = figures.count
    prompt, cached = count("promptTokenCount", PROMPT), count("cachedContentTokenCount", PART)
    tool_prompt = count("toolUsePromptTokenCount", PROMPT)
    thoughts = count("thoughtsTokenCount", OUTPUT)
    output = count("candidatesTokenCount", OUTPUT) + thoughts
    total = count("totalTokenCount", PART)
    if not figures.odd:
        output = max(output, total - prompt - tool_prompt)
    usage = Usage(input=max(0, prompt - cached) + tool_prompt, output=output, cache_read=cached, reasoning=thoughts)
    usage.odd = figures.odd
    return usage


def _texts(answer: dict) -> list[str]:
    """The text parts of a GenerateContentResponse's candidates (thought summaries included: billed output)."""
    return [
        text
        for candidate in map(_dict, _list(answer.get("candidates")))
        for part in map(_dict, _list(_dict(candidate.get("content")).get("parts")))
        if isinstance(text := part.get("text"), str)
    ]


def read_answer(body: bytes) -> tuple[Usage | None, str]:
    """A buffered GenerateContentResponse's usage (None when it reports none) and its generated text."""
    answer = _loads(body)
    if not isinstance(answer, dict):
        return None, ""
    return from_usage_metadata(answer.get("usageMetadata")), "".join(_texts(answer))


class JsonArrayItems:
    """Cuts a streamed JSON array into its object elements, wherever the chunks split it; `feed` returns each
    element's bytes once it is complete. It looks only at brackets, braces and strings (a regular expression jumps
    over everything else), so a long text or base64 image costs no byte-by-byte loop."""

    _OUTSIDE_STRING = re.compile(rb'[\[\]{}"]')
    _INSIDE_STRING = re.compile(rb'["\\]')

    def __init__(self) -> None:
        self._depth = 0  # 1 inside the array, 2 and more inside an element
        self._in_string = False
        self._escaped = False  # a backslash ended the last chunk: the next byte is escaped
        self._element = bytearray()  # the unfinished element's start, from earlier chunks

    def feed(self, chunk: bytes) -> list[bytes]:
        elements, position, start = [], 0, 0 if self._depth >= 2 else None
        while position < len(chunk):
            if self._escaped:
                self._escaped, position = False, position + 1
            elif self._in_string:
                if (match := self._INSIDE_STRING.search(chunk, position)) is None:
                    break
                position = match.end()
                if match[0] == b"\\":
                    self._escaped = True
                else:
                    self._in_string = False
            elif (match := self._OUTSIDE_STRING.search(chunk, position)) is None:
                break
            else:
                position = match.end()
                if match[0] == b'"':
                    self._in_string = True
                elif match[0] in b"[{":
                    self._depth += 1
                    start = match.start() if self._depth == 2 else start
                elif self._depth:
                    self._depth -= 1
                    if self._depth == 1 and start is not None:
                        elements.append(bytes(self._element + chunk[start:position]))
                        self._element.clear()
                        start = None
        if start is not None:
            self._element += chunk[start:]
        return elements


class GeminiStreamMeter:
    """Follows a native stream (SSE with `sse`, else a JSON array), with StreamMeter's interface: `feed` passes the
    bytes on unchanged, `finish` gives the usage.

    Every chunk carries `usageMetadata`, a running count, and the last one wins. The last chunk names a candidate's
    `finishReason`; a stream that broke off before it ends with a count that may lack output which did reach the
    client, so then the output counts at least as estimated from the text streamed."""

    def __init__(self, sse_framed: bool = True, keep_text: bool = False):
        self.keep_text = keep_text  # for the prompt log
        self.usage: Usage | None = None
        self.finished = False
        self.text_characters = 0
        self.text_parts: list[str] = []
        self.response_id = None  # the first `responseId`, as it came
        self._reader = sse.Parser() if sse_framed else JsonArrayItems()

    def feed(self, chunk: bytes) -> bytes:
        for item in self._reader.feed(chunk):
            self._read(item.data if isinstance(item, sse.Event) else item)
        return chunk

    def finish(self, prompt_estimate: int) -> Usage:
        """The stream's usage: the upstream's last figures, or an estimate from what was streamed."""
        if self.usage is None:
            return estimate(prompt_estimate, self.text_characters)
        streamed = estimate(0, self.text_characters).output
        if self.finished or streamed <= self.usage.output:
            return self.usage
        return replace(self.usage, output=streamed, estimated=True)

    def _read(self, data: str | bytes) -> None:
        payload = _loads(data)
        if not isinstance(payload, dict):
            return
        if self.response_id is None:
            self.response_id = payload.get("responseId")
        if (usage := from_usage_metadata(payload.get("usageMetadata"))) is not None:
            self.usage = usage
        self.finished |= any(_dict(candidate).get("finishReason") for candidate in _list(payload.get("candidates")))
        for text in _texts(payload):
            self.text_characters += len(text)
            if self.keep_text and text:
                self.text_parts.append(text)


# -- errors -----------------------------------------------------------------------------------------------------------

# HTTP statuses as google.rpc.Code names them (google/rpc/code.proto gives each code's HTTP mapping).
STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
ERROR_DOMAIN = "llm-key-proxy"  # the ErrorInfo domain of the proxy's own errors (Google's say googleapis.com)


def status_name(status: int) -> str:
    return STATUS_NAMES.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")


def error_body(status: int, message: str, code: str) -> dict:
    """An error of the proxy's own in Google's shape, which google-genai raises as APIError (`code`, `status`,
    `message`); the proxy's machine-readable code is the ErrorInfo reason, where Google puts its own."""
    detail = {"@type": ERROR_INFO, "reason": code, "domain": ERROR_DOMAIN}
    return {"error": {"code": status, "message": message, "status": status_name(status), "details": [detail]}}


def sse_error_event(status: int, message: str, code: str) -> bytes:
    """An error after an `alt=sse` stream began: google-genai raises on an event whose data is an error object
    (_api_client.py, request_streamed)."""
    return sse.event(json.dumps(error_body(status, message, code)))


# -- what an error says about the key ---------------------------------------------------------------------------------

SUCCESS, RATE_LIMITED, REVOKED, FORBIDDEN = "success", "rate_limited", "revoked", "forbidden"
OVER_QUOTA, SERVER_ERROR, CLIENT_ERROR = "over_quota", "server_error", "client_error"
# ErrorInfo reasons (google/api/error_reason.proto) that say the key cannot call this API at all, from here: invalid
# or expired (Google says both with API_KEY_INVALID, 400 INVALID_ARGUMENT), restricted to other APIs, referrers,
# addresses or apps, its project suspended, or the API not enabled in it.
_KEY_UNUSABLE = {
    "API_KEY_INVALID",
    "API_KEY_SERVICE_BLOCKED",
    "API_KEY_HTTP_REFERRER_BLOCKED",
    "API_KEY_IP_ADDRESS_BLOCKED",
    "API_KEY_ANDROID_APP_BLOCKED",
    "API_KEY_IOS_APP_BLOCKED",
    "CONSUMER_SUSPENDED",
    "CONSUMER_INVALID",
    "SERVICE_DISABLED",
}
_NO_BILLING = {"BILLING_DISABLED"}


def _error(body: bytes) -> dict:
    """The `error` object of an error body: Google's, or the list of one that the OpenAI-compatible endpoint and a
    JSON-array stream wrap it in."""
    data = _loads(body)
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    return _dict(_dict(data).get("error"))


def _details(error: dict) -> list[dict]:
    return [detail for detail in _list(error.get("details")) if isinstance(detail, dict)]


def _has_zero_quota(error: dict) -> bool:
    """Whether a QuotaFailure names a quota of 0: the model is not in the key's plan (a free tier without it)."""
    violations = (_dict(violation) for detail in _details(error) for violation in _list(detail.get("violations")))
    quotas = (violation.get("quotaValue") for violation in violations)
    return any(not isinstance(quota, bool) and quota in ("0", 0) for quota in quotas)


def key_verdict(status: int, body: bytes) -> str:
    """What an answer means for the key that got it, from the HTTP status and the machine-readable fields (`status`,
    ErrorInfo `reason`, QuotaFailure `quotaValue`) only: Google's messages echo the request ("Unknown name \\"x\\"").

    - revoked: an unusable key (_KEY_UNUSABLE), or 401.
    - over_quota: billing off (BILLING_DISABLED), or 400 FAILED_PRECONDITION, which Gemini answers a key without a
      billing account where its free tier is not offered ("User location is not supported for the API use without
      a billing account linked"). Used-up prepaid credit comes as a bare 429 RESOURCE_EXHAUSTED, told apart from a
      rate limit only by its text: a rate limit here.
    - forbidden: 403 PERMISSION_DENIED without such a reason (the model, or the files, are not the key's), and a
      429 whose quota is 0 (the model is not in the key's plan).
    - rate_limited: any other 429 (retry_delay() says for how long); server_error: 5xx; client_error: the rest.
    """
    if status < 300:
        return SUCCESS
    error = _error(body) if status >= 400 else {}
    reasons = {reason for detail in _details(error) if isinstance(reason := detail.get("reason"), str)}
    google_status = error.get("status")
    if reasons & _KEY_UNUSABLE or status == 401:
        return REVOKED
    if reasons & _NO_BILLING:
        return OVER_QUOTA
    if status >= 500:
        return SERVER_ERROR
    if status == 429 or google_status == "RESOURCE_EXHAUSTED":
        return FORBIDDEN if _has_zero_quota(error) else RATE_LIMITED
    if google_status == "FAILED_PRECONDITION":
        return OVER_QUOTA
    if status == 403:
        return FORBIDDEN
    return CLIENT_ERROR


def retry_delay(body: bytes) -> float | None:
    """The seconds a RetryInfo detail asks to wait (a protobuf Duration, `"26s"`, `"0.5s"`); None when there is none
    or it is no wait the pool believes. Google sends no retry-after header."""
    for detail in _details(_error(body)):
        if isinstance(delay := detail.get("retryDelay"), str):
            seconds = parse_duration(delay)
            return seconds if seconds is not None and 0 <= seconds <= MAX_WAIT else None
    return None


# -- keys and their checks --------------------------------------------------------------------------------------------


def auth_headers(key: str, openai_compatible: bool = False) -> list[tuple[str, str]]:
    """The headers that authenticate a request with `key`: `x-goog-api-key` natively, a Bearer token on the
    OpenAI-compatible endpoint (which takes no other)."""
    return [("authorization", f"Bearer {key}")] if openai_compatible else [(KEY_HEADER, key)]


@dataclass(frozen=True)
class CheckRequest:
    """A request of the proxy's own with a key (a check or a probe), its path under the upstream URL; its headers
    hold the key, so its repr leaves them out."""

    method: str
    path: str
    headers: list[tuple[str, str]] = field(repr=False)
    body: bytes = b""


def check_request(key: str) -> CheckRequest:
    """The periodic key check, which costs nothing: the models the key may use (1000 is the page size's maximum;
    Google lists some fifty). A key that cannot call the API at all is refused here too."""
    return CheckRequest("GET", "/v1beta/models?pageSize=1000", auth_headers(key))


def probe_request(key: str, model: str) -> CheckRequest:
    """The probe that decides a suspicion without client input or tokens: a generation with no contents, which a
    working key gets refused as invalid ("* GenerateContentRequest.contents: contents is not specified", 400
    INVALID_ARGUMENT) and a dead one as dead."""
    if not _MODEL_ID.fullmatch(model) or ".." in model:
        raise ValueError(f"no Gemini model id: {model!r}")
    headers = [*auth_headers(key), ("content-type", "application/json")]
    return CheckRequest("POST", f"/v1beta/models/{model}:{GENERATE}", headers, b'{"contents": []}')


def model_ids(body: bytes) -> list[str]:
    """The model ids (`name` without `models/`) a models list names; none when it has another shape. A name that is
    no model id the proxy would put in a path is left out."""
    names = (_dict(model).get("name") for model in _list(_dict(_loads(body)).get("models")))
    ids = (name.removeprefix("models/") for name in names if isinstance(name, str))
    return [model for model in ids if _MODEL_ID.fullmatch(model) and ".." not in model]


# -- defaults for the settings ----------------------------------------------------------------------------------------

# Model families (llmproxy/families.py's format), first match first, the last the service's fallback: Gemini 2.0,
# 2.5, 3 and 3.x name their tiers `-pro`, `-flash` and `-flash-lite` (gemini-2.5-flash-lite, gemini-3-pro-preview,
# gemini-flash-latest); Gemma and LearnLM models are served by the same API.
DEFAULT_FAMILIES = [
    "gemini-flash-lite=gemini-*flash-lite*",
    "gemini-flash=gemini-*flash*",
    "gemini-pro=gemini-*pro*",
    "gemini=gemini-*|gemma-*|learnlm-*",
]
# Prices (config.yaml's model_prices format: input/output/cache read/cache write 5m/1h, USD per million tokens) of
# the paid tier's standard requests, as ai.google.dev/gemini-api/docs/pricing gave them in 2026 (read from LiteLLM's
# copy of that page, model_prices_and_context_window.json, in December 2026): check them against the page. Google
# bills no cache writes (implicit caching is free; an explicit cache's creation is input plus storage by the hour).
# Pro models bill prompts over 200k tokens at the long-context tier (2.5 Pro 2.50/15/0.25, 3 Pro 4/18/0.40), which
# one price per model cannot say: such prompts count at the tier below. Image output (the -image models) is billed
# far above text output and is counted as text. The fallback is the dearest current model, so that a USD quota
# does not under-count a model not listed.
DEFAULT_PRICES = [
    "gemini-2.0-flash-lite*=0.075/0.3/0.019/0/0",  # cache reads 0.01875, rounded up to a whole nano-dollar a token
    "gemini-2.0-flash*=0.1/0.4/0.025/0/0",
    "gemini-2.5-flash-lite*=0.1/0.4/0.01/0/0",
    "gemini-2.5-flash*=0.3/2.5/0.03/0/0",
    "gemini-2.5-pro*=1.25/10/0.125/0/0",
    "gemini-3*-flash-lite*=0.25/1.5/0.025/0/0",
    "gemini-3.5-flash*=1.5/9/0.15/0/0",
    "gemini-3*-flash*=0.5/3/0.05/0/0",
    "gemini-3*-pro*=2/12/0.2/0/0",
    f"{SERVICE}=2/12/0.2/0/0",
]


# -- the service ------------------------------------------------------------------------------------------------------
_VERDICTS = {
    "success": Verdict.SUCCESS,
    "rate_limited": Verdict.RATE_LIMITED,
    "revoked": Verdict.REVOKED,
    "over_quota": Verdict.OVER_QUOTA,
    "forbidden": Verdict.FAMILY_FORBIDDEN,
    "server_error": Verdict.SERVER_ERROR,
    "client_error": Verdict.CLIENT_ERROR,
}
_METHOD_ENDPOINTS = {
    GENERATE: Endpoint("generate_content", "POST", FORWARD, parametric=True),
    STREAM: Endpoint("stream_generate_content", "POST", FORWARD, parametric=True, streams=True),
    COUNT_TOKENS: Endpoint("count_tokens", "POST", FORWARD, parametric=True, counts_tokens=True),
}


class GoogleAI(Service):
    """Google AI's Gemini API with `GOOGLE_AI_KEY` keys, natively (`/proxy/google-ai/v1beta/models/<model>:
    generateContent`, `:streamGenerateContent?alt=sse`, `:countTokens`, as google-genai calls it) and through
    Google's OpenAI-compatible endpoint (`/proxy/google-ai/v1beta/openai/chat/completions`)."""

    name = SERVICE
    title = "Google AI (Gemini)"
    dialect = GEMINI
    key_setting = "google_ai_key"
    key_prefix = "gai"
    default_url = UPSTREAM
    endpoints = (
        *_METHOD_ENDPOINTS.values(),
        Endpoint("openai_chat_completions", "POST", FORWARD, OPENAI_COMPATIBLE_PATH, wire=OPENAI),
        Endpoint("models", "GET", LOCAL, client_path="/v1beta/models"),
        Endpoint("models_v1", "GET", LOCAL, client_path="/v1/models"),
    )
    families = tuple(DEFAULT_FAMILIES)
    models = ("gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite")

    @property
    def client_base(self) -> str:
        return f"/proxy/{self.name}"  # google-genai's base_url: it adds the version itself

    def match(self, target: bytes) -> tuple[Endpoint, str, str] | None:
        """A native call. A key in the query is refused (it would stand in logs and in mitmweb), and so is a stream
        that does not ask for SSE (`alt=sse`), the one framing the proxy passes on."""
        call = parse_native_path(target)
        if call is None or call.key_in_query or (call.method == STREAM and not call.sse):
            return None
        return _METHOD_ENDPOINTS[call.method], upstream_path(call), call.model

    async def prepare(self, request, route, key, base) -> Outgoing:
        headers = auth_headers(key.secret, openai_compatible=route.wire == OPENAI)
        return Outgoing(request.url, [*request.headers, *headers], request.body)

    def check_headers(self, key) -> dict[str, str]:
        return dict(auth_headers(key.secret))

    def verdict(self, status: int, headers, body: bytes) -> Verdict:
        return _VERDICTS[key_verdict(status, body)]

    def check_url(self, key, base):
        return under(base, "/v1beta/models").with_query({"pageSize": "1000"})

    def read_check(self, key, status: int, body: bytes) -> tuple[Verdict, list[str]]:
        verdict = self.verdict(status, {}, body)
        return verdict, model_ids(body) if verdict is Verdict.SUCCESS else []

    async def probe(self, key, model: str, session, base) -> tuple[int, Verdict]:
        """`probe_request`'s generation with no contents; the model names its path."""
        try:
            probe = probe_request(key.secret, model)
        except ValueError:  # no model the proxy would put in a path: nothing to probe with
            return 0, Verdict.CLIENT_ERROR
        headers = {**self.checker_headers(key), **dict(probe.headers)}
        async with session.post(under(base, probe.path), data=probe.body, headers=headers) as response:
            status, body = response.status, await response.read()
        return status, self.verdict(status, response.headers, body)
