"""Google AI (Gemini) through the proxy, end to end: google-genai on the native routes, the openai SDK on Google's
OpenAI-compatible route, against the fake Gemini API (tests/fakes/gemini.py)."""

import json

import httpx
import openai
import pytest
from google import genai
from google.genai import types

from tests.conftest import CANARY, proxy_env
from tests.fakes.gemini import FakeGemini

pytestmark = pytest.mark.e2e

GEMINI_KEYS = [f"AIzaCanary{CANARY}-one-429", f"AIzaCanary{CANARY}-two"]  # the first always rate-limited
PROXY_KEY = f"proxy-canary-{CANARY}"


@pytest.fixture(scope="module")
def gemini_server(fake):
    server = FakeGemini(fake.url).start_in_thread()
    yield server
    server.stop_in_thread()


@pytest.fixture
def gemini(gemini_server):
    gemini_server.reset()
    return gemini_server


@pytest.fixture
def proxy(fake, gemini, start_proxy):
    return start_proxy(
        proxy_env(
            fake,
            GOOGLE_AI_KEY=",".join(GEMINI_KEYS),
            GOOGLE_AI_UPSTREAM_URL=gemini.url,
            GATEKEEPER="proxy_key",
            PROXY_KEY=PROXY_KEY,
        )
    )


def client(proxy, key: str = PROXY_KEY) -> genai.Client:
    return genai.Client(api_key=key, http_options=types.HttpOptions(base_url=f"{proxy.url}/proxy/google-ai"))


def test_google_genai_generates_streams_and_counts_through_the_proxy_with_the_pools_keys(proxy, gemini):
    sdk = client(proxy)  # kept: a google-genai client closes its connections when it goes
    answer = sdk.models.generate_content(model="gemini-2.5-flash", contents="Say hello")
    assert answer.text and answer.usage_metadata.prompt_token_count
    streamed = sdk.models.generate_content_stream(model="gemini-2.5-pro", contents="Say hello")
    assert "".join(chunk.text or "" for chunk in streamed)
    assert sdk.models.count_tokens(model="gemini-2.5-flash", contents="Say hello").total_tokens
    sent = [request for request in gemini.requests if ":" in request.path]
    assert {request.key for request in sent} <= set(GEMINI_KEYS) and sent[-1].key == GEMINI_KEYS[1]
    assert all(PROXY_KEY not in json.dumps(request.headers) for request in gemini.requests)
    assert any(request.path.endswith(":streamGenerateContent?alt=sse") for request in sent)
    proxy.wait_for_log('"route": "google-ai.stream_generate_content"')  # a stream's line is written as it ends
    log = proxy.log()
    assert '"route": "google-ai.generate_content"' in log and '"family": "gemini-flash"' in log
    assert '"route": "google-ai.stream_generate_content"' in log and '"family": "gemini-pro"' in log
    assert all(key not in log for key in GEMINI_KEYS) and PROXY_KEY not in log
    billed = [json.loads(line[line.index("{") :]) for line in log.splitlines() if '"route": "google-ai.' in line]
    assert all(entry["usage"] and entry["usage"]["input"] for entry in billed if "generate" in entry["route"])


def test_the_openai_compatible_route_of_google_ai(proxy, gemini):
    sdk = openai.OpenAI(base_url=f"{proxy.url}/proxy/google-ai/v1beta/openai", api_key=PROXY_KEY, max_retries=0)
    answer = sdk.chat.completions.create(model="gemini-2.5-flash", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content
    assert gemini.requests[-1].path == "/v1beta/openai/chat/completions"
    assert gemini.requests[-1].key == GEMINI_KEYS[1]


def test_the_model_list_and_the_status_page_show_google_ai(proxy):
    sdk = client(proxy)
    listed = [model.name for model in sdk.models.list()]
    assert listed == ["models/gemini-2.5-pro", "models/gemini-2.5-flash", "models/gemini-2.5-flash-lite"]
    status = httpx.get(f"{proxy.url}/status").json()
    assert status["google-ai"]["keys"]["total"] == 2
    assert status["endpoints"]["google-ai"].endswith("/proxy/google-ai")
    assert {"gemini-flash", "gemini-pro"} <= set(status["families"])


@pytest.mark.parametrize(
    "target",
    [
        "/proxy/google-ai/v1beta/models/gemini-2.5-flash:generateContent?key=" + PROXY_KEY,  # a key in the URL
        "/proxy/google-ai/v1beta/models/gemini-2.5-flash:streamGenerateContent",  # a stream not asked as SSE
        "/proxy/google-ai/v1beta/models/gemini-2.5-flash:embedContent",
        "/proxy/google-ai/v1beta/models/..:generateContent",
        "/proxy/google-ai/v1beta/models/gemini%2F..:generateContent",
        "/proxy/google-ai/v1beta/files",
        "/proxy/google-ai/v1beta/cachedContents",
    ],
)
def test_anything_but_the_generation_calls_is_refused_in_googles_format(proxy, gemini, target):
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    answer = httpx.post(f"{proxy.url}{target}", json=body, headers={"x-goog-api-key": PROXY_KEY})
    assert answer.status_code == 404
    assert answer.json()["error"]["status"] == "NOT_FOUND" and PROXY_KEY not in answer.text
    assert gemini.requests == []


def test_a_wrong_proxy_key_and_an_unknown_model_get_googles_errors(proxy, gemini):
    wrong, right = client(proxy, key="wrong"), client(proxy)
    with pytest.raises(genai.errors.ClientError) as refused:
        wrong.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert refused.value.code == 401 and refused.value.status == "UNAUTHENTICATED"
    with pytest.raises(genai.errors.ClientError) as refused:
        right.models.generate_content(model="claude-sonnet-4-5", contents="hi")
    assert refused.value.code == 400
    assert gemini.requests == []


def test_the_owners_output_cap_holds_for_gemini_requests(fake, gemini, start_proxy):
    capped = start_proxy(
        proxy_env(
            fake, GOOGLE_AI_KEY=GEMINI_KEYS[1], GOOGLE_AI_UPSTREAM_URL=gemini.url, MAX_OUTPUT_TOKENS_GOOGLE_AI="50"
        )
    )
    sdk = client(capped, key="anything")
    config = types.GenerateContentConfig(max_output_tokens=4000, temperature=0.5)
    sdk.models.generate_content(model="gemini-2.5-flash", contents="hi", config=config)
    sdk.models.generate_content(model="gemini-2.5-flash", contents="hi")  # names no limit: gets the cap
    sdk.models.generate_content(model="gemini-2.5-flash", contents="hi", config={"max_output_tokens": 20})
    sent = [json.loads(request.body)["generationConfig"] for request in gemini.requests]
    assert sent == [{"maxOutputTokens": 50, "temperature": 0.5}, {"maxOutputTokens": 50}, {"maxOutputTokens": 20}]
