"""The Gemini dialect (llmproxy/services/gemini.py) and the fake Gemini API (tests/fakes/gemini.py): the official
SDKs against the fake, and the runtime's readings of what the fake answers."""

import asyncio
import contextlib
import http.client
import itertools
import json
import math
import threading
import urllib.error
import urllib.request

import aiohttp
import openai
import pytest
from aiohttp import web
from google import genai
from google.genai import errors, types
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from llmproxy.api import sse
from llmproxy.api.routes import request_path
from llmproxy.api.usage import OUTPUT, PART, PROMPT, WHOLE, Usage
from llmproxy.families import parse_table
from llmproxy.pool.keys import PoolKey, Verdict
from llmproxy.pricing import DEFAULT_PRICES, parse_prices, price_of
from llmproxy.services import gemini
from tests.fakes.gemini import MODELS, NO_CONTENTS, FakeGemini
from tests.fakeupstream import REASONING_TOKENS, REPLY, THINKING
from tests.harness import wait_until

KEY = "AIzaSyFAKE-key-for-the-tests_0123456789"
PROMPT_TEXT = "Say hello to the tests"  # five words: the fake counts words as tokens
REPLY_TOKENS = len(REPLY.split())


@pytest.fixture(scope="module")
def _server(fake):
    server = FakeGemini(fake.url).start_in_thread()
    yield server
    server.stop_in_thread()


@pytest.fixture
def server(_server):
    _server.reset()
    return _server


def client(server: FakeGemini, key: str = KEY) -> genai.Client:
    return genai.Client(api_key=key, http_options=types.HttpOptions(base_url=server.url))


def post(server: FakeGemini, target: str, payload, key: str | None = KEY, headers=None) -> tuple[int, bytes]:
    """A raw request to the fake: its status and body, whatever the status."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(server.url + target, data=body, headers=headers or {})
    if key is not None:
        request.add_header("x-goog-api-key", key)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def contents(text: str = PROMPT_TEXT) -> dict:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}]}


# -- the official SDKs against the fake -------------------------------------------------------------------------------


def test_google_genai_generates_content_and_its_path_round_trips(server):
    sdk = client(server)
    response = sdk.models.generate_content(model="gemini-2.5-flash", contents=PROMPT_TEXT)
    assert response.text == REPLY
    assert response.usage_metadata.prompt_token_count == 5
    assert response.usage_metadata.thoughts_token_count == REASONING_TOKENS
    (recorded,) = server.requests
    assert dict(recorded.headers)["x-goog-api-key"] == KEY and recorded.key == KEY
    call = gemini.parse_native_path(recorded.path.encode())
    assert call == gemini.NativeCall(recorded.path.split("/")[1], "gemini-2.5-flash", gemini.GENERATE)
    assert gemini.upstream_path(call) == recorded.path


def test_google_genai_streams_server_sent_events(server):
    sdk = client(server)
    chunks = list(sdk.models.generate_content_stream(model="gemini-2.5-flash", contents="Hi #fake:events=5"))
    assert "".join(chunk.text for chunk in chunks) == REPLY
    assert len(chunks) == 5
    assert [chunk.candidates[0].finish_reason for chunk in chunks][-1] == types.FinishReason.STOP
    assert chunks[-1].usage_metadata.candidates_token_count == REPLY_TOKENS
    (recorded,) = server.requests
    # The fake marks the ending after its last write, which the client may read first.
    wait_until(lambda: recorded.stream_ending is not None)
    assert recorded.path.endswith(":streamGenerateContent?alt=sse") and recorded.stream_ending == "completed"
    call = gemini.parse_native_path(recorded.path.encode())
    assert call.streams and call.sse and gemini.upstream_path(call) == recorded.path


def test_google_genai_counts_tokens(server):
    sdk = client(server)
    assert sdk.models.count_tokens(model="gemini-2.5-flash", contents="one two three").total_tokens == 3
    assert gemini.parse_native_path(server.requests[0].path.encode()).counts_tokens


def test_google_genai_lists_models_page_by_page(server):
    sdk = client(server)
    names = [model.name for model in sdk.models.list(config={"page_size": 2})]
    assert names == [f"models/{model}" for model, _, _ in MODELS]
    pages = [recorded.path for recorded in server.requests]
    assert len(pages) == 3 and all("pageSize=2" in page for page in pages) and "pageToken=" in pages[-1]


def test_google_genai_raises_an_invalid_key_as_client_error_400(server):
    sdk = client(server, "AIza-revoked-401")
    with pytest.raises(errors.ClientError) as raised:
        sdk.models.generate_content(model="gemini-2.5-flash", contents="Hi")
    assert raised.value.code == 400 and raised.value.status == "INVALID_ARGUMENT"
    assert raised.value.message == "API key not valid. Please pass a valid API key."
    assert raised.value.details["error"]["details"][0]["reason"] == "API_KEY_INVALID"
    assert gemini.key_verdict(400, json.dumps(raised.value.details).encode()) == gemini.REVOKED


def test_openai_sdk_works_against_the_openai_compatible_endpoint(server, fake):
    sdk = openai.OpenAI(api_key=KEY, base_url=server.url + "/v1beta/openai/", max_retries=0)
    messages = [{"role": "user", "content": "Hi"}]
    assert sdk.chat.completions.create(model="gemini-2.5-flash", messages=messages).choices[0].message.content == REPLY
    stream = sdk.chat.completions.create(model="gemini-2.5-flash", messages=messages, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == REPLY
    assert {dict(recorded.headers)["Authorization"] for recorded in fake.requests} == {f"Bearer {KEY}"}
    assert [recorded.path for recorded in fake.requests] == ["/v1/chat/completions"] * 2
    assert [recorded.path for recorded in server.requests] == [gemini.OPENAI_COMPATIBLE_PATH] * 2


def test_openai_compatible_errors_are_googles_in_a_list(server, fake):
    sdk = openai.OpenAI(api_key="AIza-revoked-401", base_url=server.url + "/v1beta/openai/", max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.chat.completions.create(model="gemini-2.5-flash", messages=[{"role": "user", "content": "Hi"}])
    (error,) = raised.value.body
    assert error["error"]["status"] == "INVALID_ARGUMENT"
    assert gemini.key_verdict(400, json.dumps(raised.value.body).encode()) == gemini.REVOKED
    assert not fake.requests  # the key was refused before anything went on


@contextlib.contextmanager
def serving(handler):
    """A one-route aiohttp server on its own loop and thread, for answers the fake does not give."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    runner = web.AppRunner(app)

    async def start() -> int:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner.addresses[0][1]

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def test_an_error_event_after_the_stream_began_raises_in_google_genai():
    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse.event(json.dumps({"candidates": [{"content": {"parts": [{"text": "Hel"}]}}]})))
        await response.write(gemini.sse_error_event(429, "Too many requests in flight.", "concurrency_limit"))
        await response.write_eof()
        return response

    with serving(answer) as url:
        sdk = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=url))
        stream = sdk.models.generate_content_stream(model="gemini-2.5-flash", contents="Hi")
        assert next(stream).text == "Hel"
        with pytest.raises(errors.ClientError) as raised:
            next(stream)
    assert (raised.value.code, raised.value.status) == (429, "RESOURCE_EXHAUSTED")
    assert raised.value.message == "Too many requests in flight."


# -- request targets --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/v1beta/models/gemini-2.5-flash:generateContent", ("v1beta", "gemini-2.5-flash", "generateContent", False)),
        (b"/v1/models/gemini-2.0-flash-001:countTokens", ("v1", "gemini-2.0-flash-001", "countTokens", False)),
        (
            b"/v1beta/models/gemini-3-pro-preview:streamGenerateContent?alt=sse",
            ("v1beta", "gemini-3-pro-preview", "streamGenerateContent", True),
        ),
        (
            b"/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            ("v1beta", "gemini-2.5-flash", "streamGenerateContent", False),
        ),
        (b"//v1beta//models/gemma-3-27b-it:generateContent", ("v1beta", "gemma-3-27b-it", "generateContent", False)),
        (b"/v1beta/models/tuned_model.v2:generateContent", ("v1beta", "tuned_model.v2", "generateContent", False)),
    ],
)
def test_native_paths_are_taken_apart(target, expected):
    call = gemini.parse_native_path(target)
    assert (call.version, call.model, call.method, call.sse) == expected
    assert gemini.upstream_path(call) == request_path(target).decode() + ("?alt=sse" if call.sse else "")


@pytest.mark.parametrize(
    "target",
    [
        b"/v1beta/models/..:generateContent",
        b"/v1beta/models/gemini..flash:generateContent",
        b"/v1beta/models/%2e%2e:generateContent",
        b"/v1beta/models/gemini%2d2.5:generateContent",
        b"/v1beta/models/tunedModels/x:generateContent",
        b"/v1beta/models/a/../b:generateContent",
        b"/v1beta/models/:generateContent",
        b"/v1beta/models/" + b"g" * 101 + b":generateContent",
        b"/v1beta/models/.hidden:generateContent",
        b"/v1beta/models/gemini-2.5-flash:generatecontent",
        b"/v1beta/models/gemini-2.5-flash:embedContent",
        b"/v1beta/models/gemini-2.5-flash:generateContent/",
        b"/v1beta/models/gemini-2.5-flash;x:generateContent",
        b"/v1beta/models/gemini-2.5-flash",
        b"/v2/models/gemini-2.5-flash:generateContent",
        b"/v1beta/openai/chat/completions",
        b"/v1beta/models/gemini 2.5:generateContent",
        b"/v1beta/models/gemini\x00:generateContent",
        b"/v1beta/models/g\xc3\xa9mini:generateContent",
    ],
)
def test_native_paths_refused(target):
    assert gemini.parse_native_path(target) is None


@given(st.text(max_size=120))
def test_any_model_id_the_parser_accepts_is_strict_and_round_trips(model):
    target = f"/v1beta/models/{model}:generateContent".encode("utf-8", "surrogatepass")
    call = gemini.parse_native_path(target)
    if call is not None:
        assert gemini._MODEL_ID.fullmatch(call.model) and ".." not in call.model
        assert gemini.upstream_path(call).encode() == request_path(target)


@given(st.from_regex(gemini.MODEL_ID, fullmatch=True).filter(lambda model: ".." not in model))
def test_every_strict_model_id_round_trips(model):
    target = f"/v1/models/{model}:streamGenerateContent?alt=sse"
    assert gemini.upstream_path(gemini.parse_native_path(target.encode())) == target


def test_the_query_keeps_only_alt_sse_on_a_stream_and_never_a_key():
    stream = gemini.parse_native_path(b"/v1beta/models/gemini-2.5-flash:streamGenerateContent?key=AIzaSECRET&alt=sse")
    assert stream.sse and stream.key_in_query
    assert gemini.upstream_path(stream) == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    spelled = gemini.parse_native_path(b"/v1beta/models/m:streamGenerateContent?%6Bey=AIzaSECRET&%24alt=sse")
    assert spelled.sse and spelled.key_in_query
    rest = gemini.parse_native_path(b"/v1/models/m:streamGenerateContent?%24alt=json%3Benum-encoding%3Dint")
    assert not rest.sse and gemini.upstream_path(rest) == "/v1/models/m:streamGenerateContent"
    generate = gemini.parse_native_path(b"/v1beta/models/m:generateContent?alt=sse")
    assert not generate.sse and not generate.key_in_query
    assert gemini.upstream_path(generate) == "/v1beta/models/m:generateContent"


def test_the_fake_takes_a_key_from_the_query_too(server):
    status, _ = post(server, f"/v1beta/models/gemini-2.5-flash:generateContent?key={KEY}", contents(), key=None)
    assert status == 200 and server.requests[0].key == KEY
    assert gemini.parse_native_path(server.requests[0].path.encode()).key_in_query


# -- usage ------------------------------------------------------------------------------------------------------------


def expected_usage(prompt: int = 5, thoughts: int = REASONING_TOKENS) -> Usage:
    return Usage(input=prompt, output=REPLY_TOKENS + thoughts, reasoning=thoughts)


def test_usage_and_text_of_a_buffered_answer(server):
    status, body = post(server, "/v1beta/models/gemini-2.5-flash:generateContent", contents())
    assert status == 200
    assert gemini.read_answer(body) == (expected_usage(), REPLY)
    config = {"generationConfig": {"thinkingConfig": {"thinkingBudget": 0}}}
    _, body = post(server, "/v1beta/models/gemini-2.5-flash:generateContent", contents() | config)
    assert gemini.read_answer(body) == (expected_usage(thoughts=0), REPLY)
    _, body = post(server, "/v1beta/models/gemini-2.5-flash:countTokens", contents())
    assert gemini.read_answer(body) == (None, "")


def cut(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(body), *cuts})
    return [body[start:end] for start, end in itertools.pairwise(points)]


@pytest.mark.parametrize("sse_framed", [True, False])
def test_a_stream_reads_the_same_however_it_is_chunked(server, sse_framed):
    thoughts = {"generationConfig": {"thinkingConfig": {"includeThoughts": True}}}
    target = "/v1beta/models/gemini-2.5-pro:streamGenerateContent" + ("?alt=sse" if sse_framed else "")
    status, body = post(server, target, contents("Hi #fake:events=4") | thoughts)
    assert status == 200
    if not sse_framed:
        assert len(json.loads(body)) == 4 + 4  # a JSON array, whole: four thought summary pieces, four of the reply

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.integers(0, len(body)), max_size=40))
    def check(cuts):
        meter = gemini.GeminiStreamMeter(sse_framed, keep_text=True)
        assert b"".join(meter.feed(chunk) for chunk in cut(body, cuts)) == body
        assert meter.finish(1000) == expected_usage(prompt=2)
        assert "".join(meter.text_parts) == THINKING + REPLY
        assert meter.finished and meter.response_id

    check()
    one_byte_at_a_time = gemini.GeminiStreamMeter(sse_framed)
    for offset in range(len(body)):
        one_byte_at_a_time.feed(body[offset : offset + 1])
    assert one_byte_at_a_time.finish(1000) == expected_usage(prompt=2)


def test_a_stream_cut_short_counts_at_least_the_output_that_reached_the_client(server):
    status, body = post(server, "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", contents("Hi"))
    assert status == 200
    first_event = body[: body.index(b"\r\n\r\n") + 4]
    meter = gemini.GeminiStreamMeter()
    meter.feed(first_event)
    streamed = meter.text_characters
    assert streamed == len("Hello fro") and not meter.finished
    assert meter.finish(1000) == Usage(input=1, output=math.ceil(streamed / 4), estimated=True)
    nothing = gemini.GeminiStreamMeter()
    nothing.feed(b'data: {"candidates": [{"content": {"parts": [{"text": "12345678"}]}}]}\n\n')
    assert nothing.finish(7) == Usage(input=7, output=2, estimated=True)


def test_the_fake_drops_a_stream_when_asked(server):
    body = json.dumps(contents("Hi #fake:reset_after=1")).encode()
    target = server.url + "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
    request = urllib.request.Request(target, data=body, headers={"x-goog-api-key": KEY})
    with urllib.request.urlopen(request, timeout=10) as response, pytest.raises(http.client.IncompleteRead):
        response.read()
    (recorded,) = server.requests
    assert (recorded.stream_ending, recorded.content_events_sent) == ("aborted", 1)


@pytest.mark.parametrize(
    "odd",
    ["-1", "NaN", "Infinity", '"12"', "1e20", "100000001", "1.5", "true", "[]", "{}"],
)
def test_odd_output_figures_read_as_zero_and_are_named(server, odd):
    text = f'Hi #fake:usage={{"candidatesTokenCount": {odd}}}'
    _, body = post(server, "/v1beta/models/gemini-2.0-flash:generateContent", contents(text))
    usage, _ = gemini.read_answer(body)
    assert usage == Usage(input=3, output=0, odd={"candidatesTokenCount": OUTPUT})
    assert usage.at_least(3, 50, "input").output == 50


def test_odd_figures_of_each_side(server):
    def read(usage_directive: str, model: str = "gemini-2.5-flash") -> Usage:
        text = f"Hi #fake:usage={usage_directive}"
        _, body = post(server, f"/v1beta/models/{model}:streamGenerateContent?alt=sse", contents(text))
        meter = gemini.GeminiStreamMeter()
        meter.feed(body)
        return meter.finish(99)

    prompt_odd = read('{"promptTokenCount": -5}')
    assert prompt_odd.odd == {"promptTokenCount": PROMPT} and prompt_odd.input == 0
    assert prompt_odd.at_least(40, 0, "input").input == 40
    thoughts_odd = read('{"thoughtsTokenCount": "many"}')
    assert (thoughts_odd.odd, thoughts_odd.output, thoughts_odd.reasoning) == (
        {"thoughtsTokenCount": OUTPUT},
        REPLY_TOKENS,
        0,
    )
    cached = read('{"cachedContentTokenCount": 2, "promptTokenCount": 30, "totalTokenCount": 51}')
    assert (cached.input, cached.cache_read, cached.output, cached.odd) == (28, 2, REPLY_TOKENS + 16, {})
    cached_odd = read('{"cachedContentTokenCount": -2}', "gemini-2.0-flash")
    assert (cached_odd.input, cached_odd.cache_read, cached_odd.odd) == (3, 0, {"cachedContentTokenCount": PART})
    tools = read('{"toolUsePromptTokenCount": 7}', "gemini-2.0-flash")
    assert (tools.input, tools.output) == (3 + 7, REPLY_TOKENS)
    beyond_its_parts = read('{"totalTokenCount": 1000}', "gemini-2.0-flash")
    assert beyond_its_parts.output == 1000 - 3
    whole = read('"no usage here"')
    assert whole.odd == {WHOLE: WHOLE} and whole.at_least(12, 34, "input") == Usage(12, 34, odd={WHOLE: WHOLE})
    null_is_none = read('{"promptTokenCount": null}', "gemini-2.0-flash")
    assert (null_is_none.input, null_is_none.odd) == (0, {})


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"promptTokenCount": 10, "candidatesTokenCount": 5, "thoughtsTokenCount": 7}, Usage(10, 12, reasoning=7)),
        (  # a total below its parts: the parts count
            {"promptTokenCount": 10, "candidatesTokenCount": 5, "thoughtsTokenCount": 7, "totalTokenCount": 11},
            Usage(10, 12, reasoning=7),
        ),
        (
            {"promptTokenCount": 10, "cachedContentTokenCount": 4, "toolUsePromptTokenCount": 3, "totalTokenCount": 13},
            Usage(input=9, cache_read=4),
        ),
        (
            {"promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": "20"},
            Usage(10, 5, odd={"totalTokenCount": PART}),
        ),
    ],
)  # fmt: skip
def test_usage_metadata_figures(metadata, expected):
    assert gemini.from_usage_metadata(metadata) == expected


def test_usage_metadata_without_a_prompt_figure_is_no_usage():
    assert gemini.from_usage_metadata({"candidatesTokenCount": 5, "totalTokenCount": 9}) is None
    meter = gemini.GeminiStreamMeter()
    meter.feed(b'data: {"candidates": [{"content": {"parts": [{"text": "abcdefgh"}]}, "finishReason": "STOP"}], ')
    meter.feed(b'"usageMetadata": {"totalTokenCount": 9}}\r\n\r\n')
    assert meter.finish(99) == Usage(input=99, output=2, estimated=True)


def test_usage_metadata_of_any_shape_never_fails():
    for metadata in (None, 3, "x", [], {}, {"promptTokenCount": 10**30}, {"promptTokenCount": {"a": 1}}):
        gemini.from_usage_metadata(metadata)
    for body in (b"", b"[]", b"null", b"{", b"\xff", b"[" * 100_000, b'{"candidates": 5, "usageMetadata": []}'):
        gemini.read_answer(body)
        meter = gemini.GeminiStreamMeter(sse_framed=False)
        meter.feed(body)
        meter.finish(1)


@settings(max_examples=200)
@given(
    st.lists(st.dictionaries(st.text(max_size=5), st.text(alphabet='[]{}"\\ab,:\n', max_size=8)), max_size=4), st.data()
)
def test_json_array_items_are_cut_out_wherever_the_chunks_split(elements, data):
    body = json.dumps(elements, indent=1).encode()
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=12))
    reader = gemini.JsonArrayItems()
    assert [json.loads(item) for chunk in cut(body, cuts) for item in reader.feed(chunk)] == elements


# -- errors and key verdicts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "text", "status", "verdict"),
    [
        ("AIza-revoked-401", "Hi", 400, gemini.REVOKED),
        ("AIza-busy-429", "Hi", 429, gemini.RATE_LIMITED),
        ("AIza-broke-quota", "Hi", 400, gemini.OVER_QUOTA),
        ("AIza-down-500", "Hi", 500, gemini.SERVER_ERROR),
        (None, "Hi", 403, gemini.FORBIDDEN),
        (KEY, "Hi #fake:error=permission", 403, gemini.FORBIDDEN),
        (KEY, "Hi #fake:error=overloaded", 503, gemini.SERVER_ERROR),
        (KEY, "Hi #fake:status=504", 504, gemini.SERVER_ERROR),
        (KEY, "Hi #fake:error=credit_balance", 400, gemini.OVER_QUOTA),
        (KEY, "Hi #fake:status=400", 400, gemini.CLIENT_ERROR),
        (KEY, "Hi", 200, gemini.SUCCESS),
    ],
)
def test_key_verdict_of_each_error_the_fake_gives(server, key, text, status, verdict):
    answer_status, body = post(server, "/v1beta/models/gemini-2.5-flash:generateContent", contents(text), key=key)
    assert answer_status == status
    assert gemini.key_verdict(answer_status, body) == verdict


def test_key_verdict_of_the_fakes_request_errors(server):
    target = "/v1beta/models/gemini-2.5-flash:generateContent"
    unknown_field = post(server, target, contents() | {"reasoning": {}})
    assert unknown_field[0] == 400
    error = json.loads(unknown_field[1])["error"]
    assert error["message"] == 'Invalid JSON payload received. Unknown name "reasoning": Cannot find field.'
    assert error["details"][0]["fieldViolations"][0]["description"] == error["message"]
    snake_case = post(server, target, contents() | {"system_instruction": {"parts": [{"text": "Be brief"}]}})
    no_contents = post(server, target, {"contents": []})
    assert json.loads(no_contents[1])["error"]["message"] == NO_CONTENTS
    unknown_model = post(server, "/v1beta/models/gemini-9-ultra:generateContent", contents())
    not_json = post(server, target, b"{not json")
    assert [answer[0] for answer in (snake_case, no_contents, unknown_model, not_json)] == [200, 400, 404, 400]
    for status, body in (unknown_field, no_contents, unknown_model, not_json):
        assert gemini.key_verdict(status, body) == gemini.CLIENT_ERROR


def test_retry_delay_of_a_rate_limit(server):
    target = "/v1beta/models/gemini-2.5-flash:generateContent"
    status, body = post(server, target, contents("Hi #fake:retry_after=7"), key="AIza-busy-429")
    assert status == 429 and gemini.retry_delay(body) == 7.0
    details = json.loads(body)["error"]["details"]
    assert [detail["@type"].rsplit(".", 1)[1] for detail in details] == ["QuotaFailure", "Help", "RetryInfo"]
    assert gemini.retry_delay(b'{"error": {"details": [{"retryDelay": "0.5s"}]}}') == 0.5
    for odd in ('"-3s"', '"1e9s"', "12", '"soon"', "null"):
        assert gemini.retry_delay(f'{{"error": {{"details": [{{"retryDelay": {odd}}}]}}}}'.encode()) is None
    assert gemini.retry_delay(b"not json") is None


def google_error(status: int, google_status: str, *details: dict, message: str = "") -> bytes:
    return json.dumps(
        {"error": {"code": status, "message": message, "status": google_status, "details": details}}
    ).encode()


def reason(name: str) -> dict:
    return {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": name, "domain": "googleapis.com"}


@pytest.mark.parametrize(
    ("status", "body", "verdict"),
    [
        (403, google_error(403, "PERMISSION_DENIED", reason("BILLING_DISABLED")), gemini.OVER_QUOTA),
        (403, google_error(403, "PERMISSION_DENIED", reason("CONSUMER_SUSPENDED")), gemini.REVOKED),
        (403, google_error(403, "PERMISSION_DENIED", reason("SERVICE_DISABLED")), gemini.REVOKED),
        (403, google_error(403, "PERMISSION_DENIED", reason("API_KEY_SERVICE_BLOCKED")), gemini.REVOKED),
        (403, google_error(403, "PERMISSION_DENIED", message="Your API key was reported as leaked."), gemini.FORBIDDEN),
        (
            400,
            google_error(400, "INVALID_ARGUMENT", reason("API_KEY_INVALID"), message="API key expired."),
            gemini.REVOKED,
        ),
        (400, b"[" + google_error(400, "INVALID_ARGUMENT", reason("API_KEY_INVALID")) + b"]", gemini.REVOKED),
        (401, google_error(401, "UNAUTHENTICATED"), gemini.REVOKED),
        (429, google_error(429, "RESOURCE_EXHAUSTED", {"violations": [{"quotaValue": "0"}]}), gemini.FORBIDDEN),
        (429, google_error(429, "RESOURCE_EXHAUSTED", {"violations": [{"quotaValue": False}]}), gemini.RATE_LIMITED),
        (
            429,
            google_error(429, "RESOURCE_EXHAUSTED", message="Your prepayment credits are depleted."),
            gemini.RATE_LIMITED,
        ),
        (429, b"", gemini.RATE_LIMITED),
        # Never the message: it echoes the request.
        (400, google_error(400, "INVALID_ARGUMENT", message='Unknown name "API_KEY_INVALID"'), gemini.CLIENT_ERROR),
        (
            400,
            google_error(400, "INVALID_ARGUMENT", message="billing not enabled, CONSUMER_SUSPENDED"),
            gemini.CLIENT_ERROR,
        ),
        (400, b"<html>Bad Request</html>", gemini.CLIENT_ERROR),
        (404, b"null", gemini.CLIENT_ERROR),
        (502, b"", gemini.SERVER_ERROR),
        (204, b"", gemini.SUCCESS),
    ],
)
def test_key_verdict_reads_machine_fields_only(status, body, verdict):
    assert gemini.key_verdict(status, body) == verdict


@pytest.mark.parametrize(
    ("status", "name"),
    [(400, "INVALID_ARGUMENT"), (401, "UNAUTHENTICATED"), (403, "PERMISSION_DENIED"), (404, "NOT_FOUND"),
     (413, "INVALID_ARGUMENT"), (429, "RESOURCE_EXHAUSTED"), (500, "INTERNAL"), (502, "INTERNAL"),
     (503, "UNAVAILABLE"), (504, "DEADLINE_EXCEEDED")],
)  # fmt: skip
def test_the_proxys_own_errors_are_googles_shape(status, name):
    body = gemini.error_body(status, "Model gemini-9 is not allowed here.", "model_not_allowed")
    error = errors.APIError(status, body)
    assert (error.code, error.status, error.message) == (status, name, "Model gemini-9 is not allowed here.")
    assert body["error"]["details"][0]["reason"] == "model_not_allowed"


# -- keys and their checks --------------------------------------------------------------------------------------------


def send(server: FakeGemini, request: gemini.CheckRequest) -> tuple[int, bytes]:
    upstream = urllib.request.Request(
        server.url + request.path, data=request.body or None, headers=dict(request.headers), method=request.method
    )
    try:
        with urllib.request.urlopen(upstream, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_the_key_check_lists_the_models_a_key_may_use(server):
    request = gemini.check_request(KEY)
    assert KEY not in repr(request) and KEY not in str(request)
    status, body = send(server, request)
    assert status == 200 and gemini.model_ids(body) == [model for model, _, _ in MODELS]
    assert server.requests[0].path == "/v1beta/models?pageSize=1000" and server.requests[0].key == KEY
    server.set_key_behaviour("AIza-small", models=["gemini-2.5-flash-lite"])
    assert gemini.model_ids(send(server, gemini.check_request("AIza-small"))[1]) == ["gemini-2.5-flash-lite"]
    status, body = send(server, gemini.check_request("AIza-revoked-401"))
    assert gemini.key_verdict(status, body) == gemini.REVOKED


def test_model_ids_of_odd_lists():
    odd = {"models": [{"name": "models/ok-1"}, {"name": "models/../x"}, {"name": "models/a/b"}, {"name": 3}, 7, {}]}
    assert gemini.model_ids(json.dumps(odd).encode()) == ["ok-1"]
    for body in (b"", b"[]", b'{"models": 5}', b'{"data": [{"id": "gpt-4o"}]}'):
        assert gemini.model_ids(body) == []


def test_the_probe_tells_a_working_key_from_a_dead_one(server):
    status, body = send(server, gemini.probe_request(KEY, "gemini-2.5-flash"))
    assert status == 400 and json.loads(body)["error"]["message"] == NO_CONTENTS
    assert gemini.key_verdict(status, body) == gemini.CLIENT_ERROR
    assert gemini.key_verdict(*send(server, gemini.probe_request("AIza-revoked-401", "gemini-2.5-flash"))) == "revoked"
    assert KEY not in repr(gemini.probe_request(KEY, "gemini-2.5-flash"))
    for model in ("../admin", "a/b", "", "x?y"):
        with pytest.raises(ValueError):
            gemini.probe_request(KEY, model)


def test_auth_headers():
    assert gemini.auth_headers(KEY) == [("x-goog-api-key", KEY)]
    assert gemini.auth_headers(KEY, openai_compatible=True) == [("authorization", f"Bearer {KEY}")]


# -- defaults ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("gemini-2.5-pro", "gemini-pro"),
        ("gemini-3-pro-preview", "gemini-pro"),
        ("gemini-3.1-pro-preview", "gemini-pro"),
        ("gemini-pro-latest", "gemini-pro"),
        ("gemini-2.5-flash", "gemini-flash"),
        ("gemini-2.0-flash-001", "gemini-flash"),
        ("gemini-3-flash-preview", "gemini-flash"),
        ("gemini-flash-latest", "gemini-flash"),
        ("gemini-2.5-flash-lite", "gemini-flash-lite"),
        ("gemini-2.5-flash-lite-preview-09-2025", "gemini-flash-lite"),
        ("gemini-2.0-flash-lite", "gemini-flash-lite"),
        ("gemini-exp-1206", "gemini"),
        ("gemma-3-27b-it", "gemini"),
        ("gpt-4o", None),
    ],
)
def test_default_families(model, family):
    rules = parse_table("GOOGLE_AI_FAMILIES", gemini.DEFAULT_FAMILIES)
    assert next((rule.family for rule in rules if rule.matches(model)), None) == family


@pytest.mark.parametrize(
    ("model", "prices"),
    [
        ("gemini-2.5-pro", ("1.25", "10", "0.125")),
        ("gemini-2.5-flash", ("0.3", "2.5", "0.03")),
        ("gemini-2.5-flash-lite", ("0.1", "0.4", "0.01")),
        ("gemini-2.0-flash-001", ("0.1", "0.4", "0.025")),
        ("gemini-3-pro-preview", ("2", "12", "0.2")),
        ("gemini-3-flash-preview", ("0.5", "3", "0.05")),
        ("gemini-flash-latest", ("2", "12", "0.2")),  # not listed: the fallback, the dearest
    ],
)
def test_default_prices(model, prices):
    table = parse_prices(DEFAULT_PRICES + gemini.DEFAULT_PRICES)
    price = price_of(table, gemini.SERVICE, model, "no-such-family")
    assert (price.input, price.output, price.cache_read) == tuple(map(type(price.input), prices))
    assert price.cache_write_5m == price.cache_write_1h == 0


@pytest.mark.parametrize(
    "key, model, verdict",
    [
        (KEY, "gemini-2.5-flash", Verdict.CLIENT_ERROR),  # a working key: the empty generation is refused as invalid
        ("AIza-revoked-401", "gemini-2.5-flash", Verdict.REVOKED),
        (KEY, "gemini/../x", Verdict.CLIENT_ERROR),  # no model the proxy puts in a path: nothing is sent
    ],
)
async def test_the_services_probe_asks_the_api_with_no_contents(server, key, model, verdict):
    async with aiohttp.ClientSession() as session:
        _, found = await gemini.GoogleAI().probe(PoolKey("google-ai", key, "gai"), model, session, URL(server.url))
    assert found is verdict
    assert len(server.requests) == (0 if "/" in model else 1)
