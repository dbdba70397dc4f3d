"""The official SDKs against the real proxy, which forwards to the fake upstream with pooled keys."""

import json
import time

import anthropic
import httpx
import openai
import pytest

from tests.conftest import ANTHROPIC_KEYS, OPENAI_KEYS

pytestmark = pytest.mark.e2e

CLIENT_TOKEN = "sk-client-placeholder-token"


def openai_client(proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/proxy/openai/v1", api_key=CLIENT_TOKEN, max_retries=0)


def anthropic_client(proxy) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{proxy.url}/proxy/anthropic", api_key=CLIENT_TOKEN, max_retries=0)


def header(recorded, name: str) -> str | None:
    values = [value for key, value in recorded.headers if key.lower() == name]
    return values[0] if values else None


def assert_clean_upstream_request(recorded, path: str):
    """Only the allowlisted headers and our key reached the upstream, at the path from our own table."""
    assert recorded.path == path
    names = {key.lower() for key, _ in recorded.headers}
    assert not names & {"x-forwarded-for", "forwarded", "x-real-ip", "cookie", "openai-organization", "api-key"}
    assert header(recorded, "accept-encoding") == "identity"
    assert CLIENT_TOKEN not in json.dumps(recorded.headers)


def test_openai_chat_completion(proxy, fake):
    completion = openai_client(proxy).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hello"}]
    )
    assert completion.choices[0].message.content
    (recorded,) = fake.requests
    assert_clean_upstream_request(recorded, "/v1/chat/completions")
    assert recorded.key in OPENAI_KEYS
    assert json.loads(recorded.body)["messages"] == [{"role": "user", "content": "Hello"}]


def test_openai_chat_completion_streamed(proxy, fake):
    stream = openai_client(proxy).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hi #fake:events=5"}], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text
    assert_clean_upstream_request(fake.requests[0], "/v1/chat/completions")


def test_keys_rotate_least_recently_used(proxy, fake):
    client = openai_client(proxy)
    for n in range(4):  # four conversations (one would stay on its key): each takes the least recently used key
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": f"x {n}"}])
    used = [recorded.key for recorded in fake.requests]
    assert set(used) == set(OPENAI_KEYS)
    assert used[0] != used[1] and used[:2] == used[2:]


def test_openai_responses_completions_and_embeddings(proxy, fake):
    client = openai_client(proxy)
    assert client.responses.create(model="gpt-4o", input="Hello").output_text
    streamed = client.responses.create(model="gpt-4o", input="Hello", stream=True)
    assert any(event.type == "response.output_text.delta" for event in streamed)
    assert client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Hello").choices[0].text
    assert client.embeddings.create(model="text-embedding-3-small", input="Hello").data[0].embedding
    assert [r.path for r in fake.requests] == ["/v1/responses", "/v1/responses", "/v1/completions", "/v1/embeddings"]


def test_anthropic_messages(proxy, fake):
    message = anthropic_client(proxy).messages.create(
        model="claude-sonnet-5", max_tokens=50, messages=[{"role": "user", "content": "Hello"}]
    )
    assert message.content[0].text
    (recorded,) = fake.requests
    assert_clean_upstream_request(recorded, "/v1/messages")
    assert recorded.key == ANTHROPIC_KEYS[0]
    assert header(recorded, "anthropic-version")
    assert header(recorded, "authorization") is None


def test_anthropic_messages_streamed(proxy, fake):
    with anthropic_client(proxy).messages.stream(
        model="claude-sonnet-5", max_tokens=50, messages=[{"role": "user", "content": "Hi #fake:events=4"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.stop_reason == "end_turn"


def test_anthropic_count_tokens_and_legacy_complete(proxy, fake):
    client = anthropic_client(proxy)
    counted = client.messages.count_tokens(model="claude-sonnet-5", messages=[{"role": "user", "content": "Hello"}])
    assert counted.input_tokens > 0
    response = httpx.post(
        f"{proxy.url}/proxy/anthropic/v1/complete",
        json={"model": "claude-2", "prompt": "\n\nHuman: Hi\n\nAssistant:", "max_tokens_to_sample": 20},
    )
    assert response.status_code == 200 and response.json()["completion"]
    assert [r.path for r in fake.requests] == ["/v1/messages/count_tokens", "/v1/complete"]


def test_v1_segment_is_optional(proxy, fake):
    client = openai.OpenAI(base_url=f"{proxy.url}/proxy/openai", api_key=CLIENT_TOKEN, max_retries=0)
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert fake.requests[0].path == "/v1/chat/completions"


def test_models_are_listed_locally(proxy, fake):
    openai_models = [model.id for model in openai_client(proxy).models.list()]
    anthropic_models = [model.id for model in anthropic_client(proxy).models.list()]
    assert "gpt-4o" in openai_models and "claude-sonnet-5" in anthropic_models
    assert fake.requests == []


def test_response_headers_name_no_account(proxy, fake):
    raw = openai_client(proxy).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "x"}]
    )
    names = {name.lower() for name in raw.headers}
    assert not names & {"openai-organization", "openai-project", "set-cookie", "cf-ray", "server", "openai-version"}
    assert "x-ratelimit-remaining-requests" in names
    assert raw.headers["access-control-allow-origin"] == "*"
    message = anthropic_client(proxy).messages.with_raw_response.create(
        model="claude-sonnet-5", max_tokens=5, messages=[{"role": "user", "content": "x"}]
    )
    assert "anthropic-organization-id" not in {name.lower() for name in message.headers}


def test_stream_is_not_buffered(proxy, fake):
    """The first event reaches the client long before the upstream has produced the last one."""
    started = time.monotonic()
    arrivals = []
    stream = openai_client(proxy).chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "#fake:events=6 #fake:interval_ms=250"}],
        stream=True,
    )
    for _ in stream:
        arrivals.append(time.monotonic() - started)
    assert len(arrivals) >= 6
    assert arrivals[-1] - arrivals[0] >= 1.0  # 6 gaps of 250 ms on the upstream side arrived spread out, not at once


def test_client_credentials_never_reach_upstream(proxy, fake):
    httpx.post(
        f"{proxy.url}/proxy/openai/v1/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]},
        headers={
            "authorization": f"Bearer {CLIENT_TOKEN}",
            "x-api-key": CLIENT_TOKEN,
            "api-key": CLIENT_TOKEN,
            "openai-organization": "org-client",
            "openai-project": "proj_client",
            "cookie": f"session={CLIENT_TOKEN}",
            "x-forwarded-for": "203.0.113.9",
            "forwarded": "for=203.0.113.9",
            "x-real-ip": "203.0.113.9",
            "cf-connecting-ip": "203.0.113.9",
            "true-client-ip": "203.0.113.9",
            "connection": "keep-alive, x-custom-hop",
            "x-custom-hop": "1",
            "user-agent": "test-agent/1.0",
        },
    )
    (recorded,) = fake.requests
    names = {key.lower() for key, _ in recorded.headers}
    assert "203.0.113.9" not in json.dumps(recorded.headers)
    assert CLIENT_TOKEN not in json.dumps(recorded.headers)
    assert not names & {"x-custom-hop", "cf-connecting-ip", "true-client-ip", "openai-project"}
    assert header(recorded, "user-agent") == "test-agent/1.0"
    assert header(recorded, "authorization") == f"Bearer {recorded.key}"
