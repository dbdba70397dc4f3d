"""Checks of the fake upstream itself, with the official SDKs pointed straight at it (no proxy)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.fakeupstream import REPLY, start_in_thread, stop_in_thread

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fake():
    fake = start_in_thread()
    yield fake
    stop_in_thread(fake)


@pytest.fixture(autouse=True)
def clean(fake):
    fake.reset()


def oai(fake, key="sk-test-ok"):
    return openai.OpenAI(base_url=fake.url + "/v1", api_key=key, max_retries=0)


def ant(fake, key="sk-ant-test"):
    return anthropic.Anthropic(base_url=fake.url, api_key=key, max_retries=0)


def user(text):
    return [{"role": "user", "content": text}]


def test_chat_completion_and_recording(fake):
    raw = oai(fake).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=user("hi there"))
    completion = raw.parse()
    assert completion.choices[0].message.content == REPLY
    assert completion.model == "gpt-4o-mini" and completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == 2
    assert raw.headers["openai-organization"] == "org-FAKEORGID1234567890abcd"
    assert "__cf_bm" in raw.headers["set-cookie"]
    [recorded] = fake.wait_for_requests(1)
    assert (recorded.method, recorded.path, recorded.key) == ("POST", "/v1/chat/completions", "sk-test-ok")
    assert json.loads(recorded.body)["messages"] == user("hi there")
    assert ("authorization", "Bearer sk-test-ok") in recorded.headers


def test_chat_stream_with_usage(fake):
    stream = oai(fake).chat.completions.create(
        model="m", messages=user("go #fake:events=5"), stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 5
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_legacy_completions_embeddings_and_models(fake):
    client = oai(fake)
    assert client.completions.create(model="m", prompt="say #fake:body_bytes=100").choices[0].text == "fake " * 20
    assert "".join(c.choices[0].text for c in client.completions.create(model="m", prompt="x", stream=True)) == REPLY
    embeddings = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(embeddings.data) == 2 and len(embeddings.data[1].embedding) == 8
    assert "gpt-4o-mini" in [m.id for m in client.models.list()]


def test_responses_api(fake):
    client = oai(fake)
    response = client.responses.create(model="gpt-4.1-mini", input="hello")
    assert response.output_text == REPLY and response.status == "completed"
    assert response.usage.input_tokens == 1
    with client.responses.stream(model="gpt-4.1-mini", input="hi #fake:events=4") as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert sum(e.type == "response.output_text.delta" for e in events) == 4
    assert final.output_text == REPLY


def test_messages(fake):
    client = ant(fake)
    message = client.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=user("hi"),
                                     system="be brief")
    assert message.content[0].text == REPLY and message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 3 and message.model == "claude-haiku-4-5"
    with client.messages.stream(model="m", max_tokens=50, messages=user("#fake:events=6")) as stream:
        assert stream.get_final_text() == REPLY
    events = [e.type for e in client.messages.create(model="m", max_tokens=5, messages=user("x"), stream=True)]
    assert events == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                      "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert client.messages.count_tokens(model="m", messages=user("one two three")).input_tokens == 3
    assert [m.id for m in client.models.list()][0] == "claude-sonnet-4-5"
    assert {r.key for r in fake.requests} == {"sk-ant-test"}


def test_errors_surface_in_the_sdks(fake):
    with pytest.raises(openai.RateLimitError) as err:
        oai(fake, "sk-pool-429").chat.completions.create(model="m", messages=user("x"))
    assert err.value.response.headers["retry-after"] == "1" and err.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.AuthenticationError) as err:
        oai(fake).chat.completions.create(model="m", messages=user("#fake:error=invalid_key"))
    assert "sk-...t-ok" in err.value.message and "org-FAKEORGID1234567890abcd" in err.value.message
    with pytest.raises(openai.RateLimitError) as err:
        oai(fake, "sk-a-quota").chat.completions.create(model="m", messages=user("x"))
    assert err.value.code == "insufficient_quota"
    with pytest.raises(anthropic.AuthenticationError) as err:
        ant(fake, "sk-ant-401").messages.create(model="m", max_tokens=5, messages=user("#fake:echo_key=1"))
    assert "sk-ant-401" in str(err.value)
    with pytest.raises(anthropic.RateLimitError):
        ant(fake).messages.create(model="m", max_tokens=5, messages=user("#fake:status=429"))
    with pytest.raises(anthropic.BadRequestError, match="credit balance is too low"):
        ant(fake, "sk-ant-quota").messages.create(model="m", max_tokens=5, messages=user("x"))
    with pytest.raises(anthropic.InternalServerError) as err:
        ant(fake).messages.create(model="m", max_tokens=5, messages=user("#fake:error=overloaded"))
    assert err.value.status_code == 529


def test_key_overrides_through_control_api(fake):
    control = httpx.Client(base_url=fake.url)
    headers = {"x-api-key": "k1", "anthropic-version": "2023-06-01"}
    body = {"model": "m", "max_tokens": 5, "messages": user("x")}
    assert control.put("/_fake/keys/k1", json={"behaviour": "rate_limit", "retry_after": 7}).status_code == 204
    limited = control.post("/v1/messages", headers=headers, json=body)
    assert limited.status_code == 429 and limited.headers["retry-after"] == "7"
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert control.post("/v1/messages", headers=headers, json=body | {"messages": user("#fake:error=permission")}
                        ).status_code == 403  # a directive beats the override
    control.put("/_fake/keys/k1", json={"behaviour": "rate_limit_for", "seconds": 0.3})
    assert control.post("/v1/messages", headers=headers, json=body).status_code == 429
    time.sleep(0.35)
    assert control.post("/v1/messages", headers=headers, json=body).status_code == 200
    assert control.put("/_fake/keys/k1", json={"behaviour": "nonsense"}).status_code == 400
    control.put("/_fake/keys/k2-429", json={"behaviour": "ok"})
    assert control.post("/v1/messages", headers=headers | {"x-api-key": "k2-429"}, json=body).status_code == 200
    recorded = control.get("/_fake/requests").json()
    assert len(recorded) == 5 and recorded[0]["key"] == "k1" and json.loads(recorded[0]["body"]) == body
    assert control.delete("/_fake/requests").status_code == 204 and fake.requests == []
    assert control.post("/v1/messages", headers=headers | {"x-api-key": "k2-429"}, json=body).status_code == 429


def test_bad_requests_answer_in_the_api_format(fake):
    client = httpx.Client(base_url=fake.url)
    bad = client.post("/v1/chat/completions", headers={"Authorization": "Bearer sk-x"}, content=b"{nope")
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    bad = client.post("/v1/messages", headers={"x-api-key": "k", "anthropic-version": "2023-06-01"}, content=b"[")
    assert bad.status_code == 400 and bad.json()["type"] == "error"
    assert client.post("/v1/messages", headers={"x-api-key": "k"}, json={}).status_code == 400
    assert client.post("/v1/chat/completions", json={}).status_code == 401
    missing = client.get("/v1/messages/nope?x=1", headers={"x-api-key": "k"})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert client.get("/v2/what").json()["error"]["message"] == "Invalid URL (GET /v2/what)"
    assert [r.path for r in fake.requests][-2:] == ["/v1/messages/nope?x=1", "/v2/what"]


def test_streams_are_incremental_and_can_reset(fake):
    client = httpx.Client(base_url=fake.url, headers={"Authorization": "Bearer sk-x"})
    body = {"model": "m", "stream": True, "messages": user("#fake:interval_ms=150 #fake:delay_ms=50")}
    start = time.monotonic()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        arrivals = [time.monotonic() - start for line in response.iter_lines() if line]
    # The fake waits 50 ms, then 150 ms twice: the stream cannot end sooner, and it arrives in more than one piece.
    assert arrivals[-1] >= 0.35 and arrivals[-1] - arrivals[0] >= 0.1, arrivals
    body["messages"] = user("#fake:reset_after=2")
    lines = []
    with pytest.raises(httpx.RemoteProtocolError):
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines.extend(line for line in response.iter_lines() if line)
    assert len(lines) == 3 and "[DONE]" not in lines[-1]


def test_command_line():
    process = subprocess.Popen([sys.executable, "-m", "tests.fakeupstream", "--port", "0"], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline().strip()
        assert line.startswith("fake upstream listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}).json()["object"] == "list"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
