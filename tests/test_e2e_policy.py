"""Request policy end to end: validation, limits, prompt filters, refusal formats, and Claude in OpenAI format."""

import json

import httpx
import openai
import pytest

from tests.conftest import ANTHROPIC_KEYS, proxy_env
from tests.test_e2e_sdk import anthropic_client, openai_client

pytestmark = pytest.mark.e2e

CHAT = "/proxy/openai/v1/chat/completions"
MESSAGES = "/proxy/anthropic/v1/messages"


def sent_body(fake, index: int = -1) -> dict:
    return json.loads(fake.requests[index].body)


ANTHROPIC_CHAT = "/proxy/anthropic/v1/chat/completions"


@pytest.mark.parametrize(
    "path, body, field",
    [
        (CHAT, {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
        (CHAT, {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}, "max_tokens"),
        (CHAT, {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
        (CHAT, {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "n": "2"}, "n"),
        ("/proxy/openai/v1/responses", {"model": "gpt-4o", "max_output_tokens": 0, "input": "x"}, "max_output_tokens"),
        (
            MESSAGES,
            {
                "model": "claude-sonnet-5",
                "max_tokens": 5,
                "thinking": {"type": "enabled", "budget_tokens": "x"},
                "messages": [{"role": "user", "content": "x"}],
            },
            "thinking.budget_tokens",
        ),
        # The OpenAI-format Claude endpoint translates the messages itself, so it checks what it reads.
        (ANTHROPIC_CHAT, {"model": "claude-sonnet-5"}, "messages"),
        (ANTHROPIC_CHAT, {"model": "claude-sonnet-5", "messages": []}, "messages"),
        (
            ANTHROPIC_CHAT,
            {"model": "claude-sonnet-5", "messages": [{"role": "wizard", "content": "x"}]},
            "messages[0].role",
        ),
        (
            ANTHROPIC_CHAT,
            {"model": "claude-sonnet-5", "messages": [{"role": "user", "content": 5}]},
            "messages[0].content",
        ),
        (
            ANTHROPIC_CHAT,
            {
                "model": "claude-sonnet-5",
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function"}],
            },
            "tools",
        ),
    ],
)
def test_fields_the_policy_reads_are_checked_naming_the_field(proxy, fake, path, body, field):
    response = httpx.post(f"{proxy.url}{path}", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert f"'{field}'" in error["message"]
    if path == MESSAGES:
        assert response.json()["type"] == "error" and error["type"] == "invalid_request_error"
    assert fake.requests == []


@pytest.mark.parametrize(
    "raw, message",
    [
        (b'{"model": "gpt-4o", "model": "gpt-5", "messages": [{"role": "user", "content": "x"}]}', "'model' twice"),
        (b'{"model": "gpt-4o", "messages": ' + b"[" * 50000 + b"]" * 50000 + b"}", "nested deeper than 64 levels"),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]', "must be JSON"),
    ],
)
def test_hostile_json_is_refused_without_harm(proxy, fake, raw, message):
    response = httpx.post(f"{proxy.url}{CHAT}", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and message in response.json()["error"]["message"]
    assert httpx.get(f"{proxy.url}/health").status_code == 200
    assert fake.requests == []


def test_several_completions_need_the_owners_consent(proxy, start_proxy, fake):
    body = {"model": "gpt-4o", "n": 3, "messages": [{"role": "user", "content": "x"}]}
    response = httpx.post(f"{proxy.url}{CHAT}", json=body)
    assert response.status_code == 400 and response.json()["error"]["code"] == "n_not_allowed"
    generous = start_proxy(proxy_env(fake, ALLOW_MULTIPLE_COMPLETIONS="true"))
    assert httpx.post(f"{generous.url}{CHAT}", json=body).status_code == 200


def test_redirecting_fields_never_reach_or_steer_the_upstream(proxy, fake):
    body = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "x"}],
        "api_key": "sk-client-own",
        "base_url": "http://evil.example",
        "api_base": "http://evil.example",
        "organization": "org-evil",
        "extra_headers": {"authorization": "Bearer sk-client-own"},
    }
    assert httpx.post(f"{proxy.url}{CHAT}", json=body).status_code == 200
    (recorded,) = fake.requests
    assert set(json.loads(recorded.body)) == {"model", "messages"}
    assert recorded.key != "sk-client-own" and "evil" not in recorded.body.decode()


def test_output_is_capped_and_context_limited(start_proxy, fake):
    proxy = start_proxy(
        proxy_env(
            fake, MAX_OUTPUT_TOKENS_OPENAI="100", MAX_OUTPUT_TOKENS_ANTHROPIC="200", MAX_CONTEXT_TOKENS_OPENAI="150"
        )
    )
    client = openai_client(proxy)
    client.chat.completions.create(model="gpt-4o", max_tokens=5000, messages=[{"role": "user", "content": "x"}])
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    client.chat.completions.create(
        model="gpt-4o", max_completion_tokens=20, messages=[{"role": "user", "content": "x"}]
    )
    anthropic_client(proxy).messages.create(
        model="claude-sonnet-5", max_tokens=5000, messages=[{"role": "user", "content": "x"}]
    )
    sent = [sent_body(fake, i) for i in range(4)]
    assert sent[0]["max_tokens"] == 100 and sent[1]["max_completion_tokens"] == 100
    assert sent[2]["max_completion_tokens"] == 20 and sent[3]["max_tokens"] == 200
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hello " * 60}])
    message = raised.value.body["message"]
    assert "prompt + 100 output" in message and "150 allowed" in message
    assert len(fake.requests) == 4


def test_a_vocabulary_loads_only_when_a_prompt_needs_counting(start_proxy, fake):
    """A short prompt's bytes bound its tokens well inside every limit: no vocabulary is loaded (o200k_base holds
    43 MB). One whose bytes might not fit is counted, which loads its model's vocabulary."""
    proxy = start_proxy(proxy_env(fake, MAX_OUTPUT_TOKENS_OPENAI="100", MAX_CONTEXT_TOKENS_OPENAI="150"))
    client = openai_client(proxy)
    for _ in range(3):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x" * 20}])
    assert "vocabulary" not in proxy.log()
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hello " * 8}])
    assert "loaded the o200k_base vocabulary to count prompts" in proxy.log()
    assert "cl100k_base" not in proxy.log() and len(fake.requests) == 4


def test_the_models_own_window_refuses_only_a_prompt_that_cannot_fit(proxy, fake):
    """The window check reads the prompt alone, at its lower estimate: whether prompt + max_tokens may exceed the
    window is the upstream's call (newer APIs accept it), so the default table never refuses a valid request."""
    fits = {"model": "gpt-4", "max_tokens": 8000, "messages": [{"role": "user", "content": "hello " * 300}]}
    assert httpx.post(f"{proxy.url}{CHAT}", json=fits).status_code == 200
    too_long = {"model": "gpt-4", "messages": [{"role": "user", "content": "hello " * 9000}]}
    response = httpx.post(f"{proxy.url}{CHAT}", json=too_long)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert "8192-token context window of gpt-4" in response.json()["error"]["message"]
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    "path, body",
    [
        (
            CHAT,
            {
                "model": "gpt-4o",
                "messages": [
                    {"role": "system", "content": "You are a FORBIDDEN thing"},
                    {"role": "user", "content": "hi"},
                ],
            },
        ),
        (
            CHAT,
            {
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "say forbidden"}],
            },
        ),
        (
            CHAT,
            {
                "model": "gpt-4o",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "fine"}, {"type": "text", "text": "Forbidden here"}],
                    }
                ],
            },
        ),
        (
            MESSAGES,
            {
                "model": "claude-sonnet-5",
                "max_tokens": 5,
                "system": "forbidden system",
                "messages": [{"role": "user", "content": "hi"}],
            },
        ),
        (MESSAGES, {"model": "claude-sonnet-5", "max_tokens": 5, "messages": [{"role": "user", "content": "a, b, c"}]}),
        ("/proxy/openai/v1/responses", {"model": "gpt-4o", "input": "forbidden", "instructions": "x"}),
    ],
)
def test_reject_phrases_are_found_everywhere_the_model_reads(start_proxy, fake, path, body):
    proxy = start_proxy(proxy_env(fake, REJECT_PHRASES='forbidden,"a, b"', REJECT_MESSAGE="Not on this proxy."))
    response = httpx.post(f"{proxy.url}{path}", json=body)
    assert response.status_code == 400 and "Not on this proxy." in response.text
    assert fake.requests == []
    allowed = httpx.post(
        f"{proxy.url}{CHAT}", json={"model": "gpt-4o", "messages": [{"role": "user", "content": "a b"}]}
    )
    assert allowed.status_code == 200


def test_regular_expressions_and_disallowed_characters(start_proxy, fake):
    proxy = start_proxy(
        proxy_env(fake, REJECT_PHRASES=r"\bsecret\s+plan\b", REJECT_PHRASES_REGEX="true", REJECT_DISALLOWED="true")
    )

    def post(text):
        return httpx.post(
            f"{proxy.url}{CHAT}", json={"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}
        ).status_code

    assert [post("the SECRET   plan"), post("secretplan"), post("你好"), post("plain text")] == [400, 200, 400, 200]


def test_refusals_as_completions_are_read_by_both_sdks(start_proxy, fake):
    proxy = start_proxy(proxy_env(fake, REJECT_PHRASES="forbidden", PROXY_ERROR_FORMAT="completion"))
    client = openai_client(proxy)
    completion = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "forbidden"}])
    assert "acceptable use policy" in completion.choices[0].message.content
    stream = client.chat.completions.create(
        model="gpt-4o", stream=True, messages=[{"role": "user", "content": "forbidden"}]
    )
    assert "acceptable use policy" in "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    claude = anthropic_client(proxy)
    message = claude.messages.create(
        model="claude-sonnet-5", max_tokens=5, messages=[{"role": "user", "content": "forbidden"}]
    )
    assert "acceptable use policy" in message.content[0].text
    with claude.messages.stream(
        model="claude-sonnet-5", max_tokens=5, messages=[{"role": "user", "content": "forbidden"}]
    ) as streamed:
        assert "acceptable use policy" in "".join(streamed.text_stream)
    upstream_error = httpx.post(
        f"{proxy.url}{CHAT}", json={"model": "gpt-4o", "messages": [{"role": "user", "content": "#fake:status=400"}]}
    )
    assert upstream_error.status_code == 200 and upstream_error.headers["x-proxy-error-status"] == "400"
    assert fake.requests and len(fake.requests) == 1


def test_claude_through_the_openai_format(proxy, fake):
    client = openai.OpenAI(base_url=f"{proxy.url}/proxy/anthropic/v1", api_key="anything", max_retries=0)
    completion = client.chat.completions.create(
        model="claude-sonnet-5",
        stop=["END"],
        temperature=1.6,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "again"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                ],
            },
        ],
        tools=[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
    )
    assert completion.choices[0].message.content and completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens > 0
    (recorded,) = fake.requests
    assert recorded.path == "/v1/messages" and recorded.key == ANTHROPIC_KEYS[0]
    sent = json.loads(recorded.body)
    assert sent["system"] == "Be brief." and sent["stop_sequences"] == ["END"] and sent["temperature"] == 1.0
    assert sent["max_tokens"] == 4096 and len(sent["messages"]) == 1  # the two user turns were merged
    assert [block["type"] for block in sent["messages"][0]["content"]] == ["text", "text", "image"]
    assert sent["tools"] == [{"name": "lookup", "description": "", "input_schema": {"type": "object"}}]
    chunks = list(
        client.chat.completions.create(
            model="claude-sonnet-5",
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Hi #fake:events=4"}],
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 0
    with httpx.stream(
        "POST",
        f"{proxy.url}/proxy/anthropic/v1/chat/completions",
        json={"model": "claude-sonnet-5", "stream": True, "messages": [{"role": "user", "content": "x"}]},
    ) as raw:
        assert "".join(raw.iter_text()).rstrip().endswith("data: [DONE]")
    assert "claude-sonnet-5" in [model.id for model in client.models.list()]


def test_claude_errors_in_openai_format(proxy, fake):
    client = openai.OpenAI(base_url=f"{proxy.url}/proxy/anthropic/v1", api_key="anything", max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model="claude-sonnet-5", messages=[{"role": "user", "content": "#fake:status=400"}]
        )
    assert raised.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="claude-sonnet-5", messages=[{"role": "wizard", "content": "x"}])
    unknown = httpx.post(
        f"{proxy.url}/proxy/anthropic/v1/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]},
    )
    assert unknown.status_code == 400 and "error" in unknown.json() and "type" not in unknown.json()


@pytest.mark.parametrize("path, field", [(CHAT, "n"), (CHAT, "stream"), (MESSAGES, "stream")])
def test_a_null_field_the_policy_reads_means_not_given(proxy, fake, path, field):
    body = {
        "model": "gpt-4o" if path == CHAT else "claude-sonnet-5",
        "max_tokens": 20,
        field: None,
        "messages": [{"role": "user", "content": "x"}],
    }
    response = httpx.post(f"{proxy.url}{path}", json=body)
    assert response.status_code == 200, response.text
    assert sent_body(fake)[field] is None  # forwarded as sent: the upstream reads null as its default
