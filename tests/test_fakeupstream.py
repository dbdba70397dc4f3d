"""Checks of the fake upstream itself, with the official SDKs pointed straight at it (no proxy)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import anthropic
import httpx
import openai
import pytest

from tests import fakeupstream
from tests.fakeupstream import BUDGET_TOO_BIG, BUDGET_TOO_SMALL, REPLY, THINKING, start_in_thread, stop_in_thread

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
        model="m", messages=user("go #fake:events=5"), stream=True, stream_options={"include_usage": True}
    )
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
    message = client.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=user("hi"), system="be brief")
    assert message.content[0].text == REPLY and message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 3 and message.model == "claude-haiku-4-5"
    with client.messages.stream(model="m", max_tokens=50, messages=user("#fake:events=6")) as stream:
        assert stream.get_final_text() == REPLY
    events = [e.type for e in client.messages.create(model="m", max_tokens=5, messages=user("x"), stream=True)]
    assert events == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert client.messages.count_tokens(model="m", messages=user("one two three")).input_tokens == 3
    assert next(iter(client.models.list())).id == "claude-sonnet-4-5"
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
    assert (
        control.post(
            "/v1/messages", headers=headers, json=body | {"messages": user("#fake:error=permission")}
        ).status_code
        == 403
    )  # a directive beats the override
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
    with pytest.raises(httpx.RemoteProtocolError), client.stream("POST", "/v1/chat/completions", json=body) as response:
        lines.extend(line for line in response.iter_lines() if line)
    assert len(lines) == 3 and "[DONE]" not in lines[-1]


BASH_INPUT = {"command": "echo fake-tool-ran", "description": "Print a marker"}


def test_anthropic_tool_use_until_a_tool_result_arrives(fake):
    client = ant(fake)
    asked = user("list files #fake:tool=Bash")
    message = client.messages.create(model="m", max_tokens=50, messages=asked)
    [block] = message.content
    assert (block.type, block.name, block.input, message.stop_reason) == ("tool_use", "Bash", BASH_INPUT, "tool_use")
    assert block.id.startswith("toolu_01")
    with client.messages.stream(model="m", max_tokens=50, messages=asked) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert final.content[0].input == BASH_INPUT and final.stop_reason == "tool_use"
    assert sum(e.type == "content_block_delta" and e.delta.type == "input_json_delta" for e in events) >= 2
    result = {"type": "tool_result", "tool_use_id": block.id, "content": "ok"}
    answered = [*asked, {"role": "assistant", "content": [block.model_dump()]}, {"role": "user", "content": [result]}]
    done = client.messages.create(model="m", max_tokens=50, messages=answered)
    assert done.content[0].text == REPLY and done.stop_reason == "end_turn"
    unknown = client.messages.create(model="m", max_tokens=50, messages=user("#fake:tool=mcp__x__y"))
    assert unknown.content[0].input == {}


def test_chat_tool_calls_until_a_tool_message_arrives(fake):
    client = oai(fake)
    asked = user("weather? #fake:tool=get_weather")
    completion = client.chat.completions.create(model="m", messages=asked)
    [call] = completion.choices[0].message.tool_calls
    assert completion.choices[0].finish_reason == "tool_calls" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = list(client.chat.completions.create(model="m", messages=asked, stream=True))
    pieces = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices[0].delta.tool_calls]
    assert len(pieces) >= 3 and pieces[0].function.name == "get_weather" and pieces[0].id.startswith("call_")
    assert {p.id for p in pieces[1:]} == {None} and {p.index for p in pieces} == {0}
    assert json.loads("".join(p.function.arguments for p in pieces)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    answered = [
        *asked,
        completion.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    done = client.chat.completions.create(model="m", messages=answered)
    assert done.choices[0].message.content == REPLY and done.choices[0].finish_reason == "stop"


def test_responses_function_custom_and_namespaced_tool_calls(fake):
    client = oai(fake)
    weather = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
    response = client.responses.create(model="m", input="weather? #fake:tool=get_weather", tools=[weather])
    [item] = response.output
    assert (item.type, item.name, item.status, item.namespace) == ("function_call", "get_weather", "completed", None)
    assert item.id.startswith("fc_") and item.call_id.startswith("call_")
    assert json.loads(item.arguments) == {"city": "Paris"}
    with client.responses.stream(model="m", input="#fake:tool=get_weather", tools=[weather]) as stream:
        events = list(stream)
    names = [e.type for e in events]
    assert names[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert names[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert set(names[3:-3]) == {"response.function_call_arguments.delta"} and len(names[3:-3]) >= 2
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert json.loads("".join(e.delta for e in events[3:-3])) == {"city": "Paris"}

    # A custom (freeform) tool, defined in an additional_tools input item inside a namespace, as Codex does.
    code = {
        "type": "namespace",
        "name": "code_mode",
        "description": "d",
        "tools": [{"type": "custom", "name": "exec", "description": "Run JavaScript"}],
    }
    items = [{"type": "additional_tools", "tools": [code]}, {"role": "user", "content": "run #fake:tool=exec"}]
    [item] = client.responses.create(model="m", input=items).output
    assert (item.type, item.name, item.namespace, item.input) == (
        "custom_tool_call",
        "exec",
        "code_mode",
        'text("fake-tool-ran")',
    )
    assert item.id.startswith("ctc_") and item.status == "completed"
    events = list(client.responses.create(model="m", input=items, stream=True))
    deltas = [e.delta for e in events if e.type == "response.custom_tool_call_input.delta"]
    assert len(deltas) >= 2 and "".join(deltas) == 'text("fake-tool-ran")'
    assert [e.input for e in events if e.type == "response.custom_tool_call_input.done"] == ['text("fake-tool-ran")']
    assert events[-2].item.type == "custom_tool_call" and events[-1].type == "response.completed"

    # Once a call's output follows the last user item, the answer is text again.
    answered = [
        *items,
        item.model_dump(exclude_none=True),
        {"type": "custom_tool_call_output", "call_id": item.call_id, "output": "fake-tool-ran"},
    ]
    assert client.responses.create(model="m", input=answered).output_text == REPLY
    again = [*answered, {"role": "user", "content": "and again"}]
    assert client.responses.create(model="m", input=again).output[0].type == "custom_tool_call"


def test_anthropic_thinking_blocks_and_their_validation(fake):
    client = ant(fake)
    thinking = {"type": "enabled", "budget_tokens": 1024}
    message = client.messages.create(model="m", max_tokens=2048, thinking=thinking, messages=user("hi"))
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == THINKING and len(message.content[0].signature) > 100
    with client.messages.stream(
        model="m", max_tokens=2048, thinking=thinking, messages=user("hi #fake:redacted_thinking=1")
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "redacted_thinking", "text"]
    assert final.content[0].thinking == THINKING and len(final.content[0].signature) > 100
    assert len(final.content[1].data) > 100 and final.content[2].text == REPLY
    assert sum(e.type == "content_block_delta" and e.delta.type == "thinking_delta" for e in events) >= 2
    assert sum(e.type == "content_block_delta" and e.delta.type == "signature_delta" for e in events) == 1
    assert [e.index for e in events if e.type == "content_block_start"] == [0, 1, 2]

    omitted = {"type": "adaptive", "display": "omitted"}
    with client.messages.stream(model="m", max_tokens=50, thinking=omitted, messages=user("hi")) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert final.content[0].thinking == "" and len(final.content[0].signature) > 100
    assert not any(e.type == "content_block_delta" and e.delta.type == "thinking_delta" for e in events)
    assert [
        b.type
        for b in client.messages.create(
            model="m", max_tokens=50, thinking={"type": "disabled"}, messages=user("hi")
        ).content
    ] == ["text"]

    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(
            model="m", max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 1000}, messages=user("hi")
        )
    assert err.value.body["error"] == {"type": "invalid_request_error", "message": BUDGET_TOO_SMALL}
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model="m", max_tokens=1024, thinking=thinking, messages=user("hi"))
    assert err.value.body["error"]["message"] == BUDGET_TOO_BIG and err.value.body["type"] == "error"


def test_anthropic_server_tool_and_thinking_before_a_tool_use(fake):
    client = ant(fake)
    message = client.messages.create(model="m", max_tokens=50, messages=user("news? #fake:server_tool=1"))
    use, result, text = message.content
    assert (use.type, use.name, use.input) == ("server_tool_use", "web_search", {"query": "fake"})
    assert use.id.startswith("srvtoolu_01") and result.tool_use_id == use.id
    assert result.type == "web_search_tool_result" and result.content[0].url == "https://example.com/"
    assert text.text == REPLY and message.usage.server_tool_use.web_search_requests == 1
    with client.messages.stream(model="m", max_tokens=50, messages=user("#fake:server_tool=1")) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["server_tool_use", "web_search_tool_result", "text"]
    assert final.content[0].input == {"query": "fake"} and final.usage.server_tool_use.web_search_requests == 1
    with client.messages.stream(
        model="m",
        max_tokens=4096,
        thinking={"type": "enabled", "budget_tokens": 2048},
        messages=user("#fake:tool=get_weather"),
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "tool_use"] and final.stop_reason == "tool_use"
    assert final.content[1].input == {"city": "Paris"}


def test_anthropic_usage_as_the_api_reports_it(fake):
    client = httpx.Client(base_url=fake.url, headers={"x-api-key": "k", "anthropic-version": "2023-06-01"})
    body = {"model": "m", "max_tokens": 50, "messages": user("one two three")}
    usage = client.post("/v1/messages", json=body).json()["usage"]
    assert usage == {
        "input_tokens": 3,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 5,
        "service_tier": "standard",
    }
    with client.stream("POST", "/v1/messages", json=body | {"stream": True}) as response:
        data = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    assert data[0]["message"]["usage"] == usage | {"output_tokens": 1}
    assert data[-2]["usage"] == {
        "input_tokens": 3,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 5,
    }
    with ant(fake).messages.stream(model="m", max_tokens=50, messages=user("one two three")) as stream:
        final = stream.get_final_message()
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.service_tier) == (3, 5, "standard")
    assert final.usage.cache_creation.ephemeral_1h_input_tokens == 0


def test_responses_reasoning_and_endings(fake):
    client = oai(fake)
    response = client.responses.create(
        model="m", input="hi", reasoning={"effort": "low"}, include=["reasoning.encrypted_content"]
    )
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_") and reasoning.summary == []
    assert len(reasoning.encrypted_content) > 100 and message.content[0].text == REPLY
    assert 0 < response.usage.output_tokens_details.reasoning_tokens < response.usage.output_tokens
    plain = client.responses.create(model="m", input="hi", reasoning={"effort": "low"})
    assert plain.output[0].encrypted_content is None and plain.output_text == REPLY
    events = list(client.responses.create(model="m", input="hi", reasoning={}, stream=True))
    assert [e.type for e in events[2:4]] == ["response.output_item.added", "response.output_item.done"]
    assert events[4].output_index == 1 and events[-1].response.output[0].type == "reasoning"

    events = list(client.responses.create(model="m", input="long #fake:end=incomplete", stream=True))
    last = events[-1]
    assert last.type == "response.incomplete" and last.response.status == "incomplete"
    assert last.response.incomplete_details.reason == "max_output_tokens" and last.response.usage.output_tokens > 0
    assert not any(e.type == "response.completed" for e in events)
    assert client.responses.create(model="m", input="#fake:end=incomplete").status == "incomplete"

    events = list(client.responses.create(model="m", input="x #fake:end=failed", stream=True))
    last = events[-1]
    assert last.type == "response.failed" and last.response.status == "failed"
    assert last.response.error.code == "server_error" and last.response.usage.total_tokens > 0
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_compaction_and_input_token_routes(fake):
    client = oai(fake)
    compacted = client.responses.compact(model="gpt-5.1-codex", input=[{"role": "user", "content": "a b c"}])
    assert compacted.object == "response.compaction" and compacted.id.startswith("resp_")
    [item] = compacted.output
    assert item.type == "compaction" and item.id.startswith("cmp_") and len(item.encrypted_content) > 100
    assert compacted.usage.input_tokens == 3 and compacted.usage.total_tokens > 3
    counted = client.responses.input_tokens.count(model="m", input="one two three four")
    assert (counted.object, counted.input_tokens) == ("response.input_tokens", 4)
    raw = httpx.Client(base_url=fake.url)
    assert raw.post("/v1/responses/compact", json={"model": "m"}).status_code == 401
    assert raw.post("/v1/responses/input_tokens", headers={"x-api-key": "k"}, json={}).status_code == 401
    assert [r.path for r in fake.requests] == ["/v1/responses/compact", "/v1/responses/input_tokens"] * 2


def test_websocket_upgrade_is_recorded_and_unknown(fake):
    headers = {
        "Authorization": "Bearer sk-x",
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    response = httpx.get(fake.url + "/v1/responses", headers=headers)
    assert response.status_code == 404 and response.json()["error"]["type"] == "invalid_request_error"
    [recorded] = fake.wait_for_requests(1)
    assert (recorded.method, recorded.path) == ("GET", "/v1/responses")
    assert ("Upgrade", "websocket") in recorded.headers


def test_unknown_shapes_are_answered_not_refused(fake):
    client = httpx.Client(
        base_url=fake.url, headers={"x-api-key": "k", "anthropic-version": "2023-06-01", "Authorization": "Bearer sk-x"}
    )
    nested: object = "deep"
    for _ in range(500):
        nested = [nested]
    odd_messages = {
        "model": "m",
        "max_tokens": 50,
        "future_field": {"x": 1},
        "thinking": "yes",
        "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "system", "content": "sys"},
            {
                "role": "user",
                "content": [{"type": "hologram", "blob": 1}, {"type": "text", "text": "hi"}, nested, None, 7],
            },
        ],
    }
    answered = client.post("/v1/messages", json=odd_messages)
    assert answered.status_code == 200 and answered.json()["usage"]["input_tokens"] == 5
    assert client.post("/v1/messages/count_tokens", json=odd_messages | {"messages": "not a list"}).status_code == 200
    odd_chat = {
        "model": "m",
        "messages": [{"role": "developer", "content": [{"type": "input_audio"}]}, "x"],
        "stream_options": "yes",
        "stream": True,
        "tools": "none",
        "verbosity": "low",
    }
    assert client.post("/v1/chat/completions", json=odd_chat).status_code == 200
    odd_responses = {
        "model": "m",
        "input": [{"type": "local_shell_call"}, 3, {"role": "critic", "content": "x"}],
        "tools": [{"type": "namespace"}, "web_search", {"type": "custom"}],
        "reasoning": None,
        "include": "everything",
        "prompt_cache_key": "k",
        "text": {"verbosity": "low"},
    }
    assert client.post("/v1/responses", json=odd_responses).json()["output"][0]["type"] == "message"
    # Not defined as a custom tool (the namespace is malformed): a function call, its string input wrapped.
    [call] = client.post(
        "/v1/responses", json=odd_responses | {"tools": [{"type": "namespace", "tools": 5}], "input": "#fake:tool=exec"}
    ).json()["output"]
    assert (call["type"], call["name"]) == ("function_call", "exec")
    assert json.loads(call["arguments"]) == {"input": 'text("fake-tool-ran")'}


def test_command_line():
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakeupstream", "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline().strip()
        assert line.startswith("fake upstream listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}).json()["object"] == "list"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0


def test_strict_fields_refuse_unknown_fields_echoing_their_names(fake):
    fake.strict_fields = True
    chat = httpx.post(
        f"{fake.url}/v1/chat/completions",
        headers={"authorization": "Bearer sk-x"},
        json={"model": "gpt-4o", "messages": [], "billing": 1},
    )
    assert chat.status_code == 400
    assert chat.json()["error"]["message"] == "Unrecognized request argument supplied: billing"
    messages = httpx.post(
        f"{fake.url}/v1/messages",
        headers={"x-api-key": "k", "anthropic-version": "2023-06-01"},
        json={"model": "claude-x", "max_tokens": 5, "messages": [], "insufficient_quota": 1},
    )
    assert messages.json()["error"]["message"] == "insufficient_quota: Extra inputs are not permitted"
    fake.reset()
    assert (
        httpx.post(
            f"{fake.url}/v1/chat/completions",
            headers={"authorization": "Bearer sk-x"},
            json={"model": "gpt-4o", "messages": [], "future": 1},
        ).status_code
        == 200
    )


# -- each key's organisation: its prompt cache and its request budget ---------------------------------------------

LONG = " ".join(f"w{n}" for n in range(2000))  # 15 whole blocks of 128 words, and 80 words that are never cached


def test_each_key_has_its_own_prompt_cache(fake):
    first = oai(fake, "sk-a").chat.completions.create(model="gpt-4o", messages=user(LONG)).usage
    assert (first.prompt_tokens, first.prompt_tokens_details.cached_tokens) == (2000, 0)
    turn = [*user(LONG), {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more " * 300}]
    again = oai(fake, "sk-a").chat.completions.create(model="gpt-4o", messages=turn).usage
    assert (again.prompt_tokens, again.prompt_tokens_details.cached_tokens) == (2301, 1920)  # what turn 1 wrote
    assert (
        oai(fake, "sk-b")
        .chat.completions.create(model="gpt-4o", messages=turn)
        .usage.prompt_tokens_details.cached_tokens
        == 0
    )  # another key: another organisation, another cache
    assert (
        oai(fake, "sk-a")
        .chat.completions.create(model="gpt-4o-mini", messages=turn)
        .usage.prompt_tokens_details.cached_tokens
        == 0
    )  # another model
    assert (
        oai(fake, "sk-a").responses.create(model="gpt-4o", input=turn).usage.input_tokens_details.cached_tokens == 2176
    )  # all 17 blocks of the turn, written by the second request
    assert (
        oai(fake, "sk-a")
        .chat.completions.create(model="gpt-4o", messages=user("w0 w1"))
        .usage.prompt_tokens_details.cached_tokens
        == 0
    )  # under 1,024 words nothing is cached


def test_claude_caches_with_cache_control_and_reports_reads_and_writes(fake):
    system = [{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}]

    def usage(key="sk-ant-a", **fields):
        usage = (
            ant(fake, key)
            .messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=user("go"), **fields)
            .usage
        )
        return usage.input_tokens, usage.cache_creation_input_tokens, usage.cache_read_input_tokens

    assert usage(system=system) == (81, 1920, 0)
    assert usage(system=system) == (81, 0, 1920)
    assert usage("sk-ant-b", system=system) == (81, 1920, 0)
    assert usage(system=LONG) == (2001, 0, 0)  # no cache_control: Anthropic caches nothing


def test_a_cached_prefix_lives_five_minutes_after_its_last_use(monkeypatch):
    accounts, clock = fakeupstream.KeyAccounts(), [time.monotonic()]
    monkeypatch.setattr(fakeupstream, "time", SimpleNamespace(monotonic=lambda: clock[0], time=time.time))

    def read_after(seconds: float) -> int:
        clock[0] += seconds
        call = fakeupstream.Call(
            SimpleNamespace(path="/v1/chat/completions"),
            "openai",
            "sk-a",
            {"model": "m", "messages": user(LONG)},
            fakeupstream.Behaviour(),
        )
        accounts.use_cache(call, b"")
        return call.cache_read

    assert [read_after(0), read_after(299), read_after(299), read_after(301)] == [0, 1920, 1920, 0]


def test_a_key_budget_is_a_rate_limit_with_honest_headers(fake):
    fake.set_key_behaviour("sk-budget", "ok", budget=2, budget_seconds=30)
    answers = [
        httpx.post(
            f"{fake.url}/v1/chat/completions",
            headers={"authorization": "Bearer sk-budget"},
            json={"model": "gpt-4o", "messages": user("hi")},
        )
        for _ in range(3)
    ]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["1", "0", "0"]
    assert {a.headers["x-ratelimit-limit-requests"] for a in answers} == {"2"}
    assert 28 <= float(answers[0].headers["x-ratelimit-reset-requests"].removesuffix("s")) <= 30
    assert 28 <= int(answers[2].headers["retry-after"]) <= 30
    claude = httpx.post(
        f"{fake.url}/v1/messages",
        json={"model": "claude-x", "max_tokens": 5, "messages": user("hi")},
        headers={"x-api-key": "sk-budget", "anthropic-version": "2023-06-01"},
    )
    assert claude.status_code == 429 and claude.headers["anthropic-ratelimit-requests-remaining"] == "0"


def test_usage_response_id_and_header_directives_take_any_json_value(fake):
    client = httpx.Client(base_url=fake.url, headers={"authorization": "Bearer sk-x"})
    prompt = (
        'hi #fake:usage={"completion_tokens": NaN, "prompt_tokens_details": [1]} #fake:usage={"x": -1} '
        '#fake:headers={"retry-after": "-5\\n", "x-ratelimit-remaining-requests": 1e400, "x-request-id": null, '
        '"bad name": 1, "content-type": "text/plain"}'
    )
    answer = client.post("/v1/chat/completions", json={"model": "m", "messages": user(prompt)})
    assert '"completion_tokens": NaN' in answer.text and '"prompt_tokens_details": [1], "x": -1' in answer.text
    assert answer.json()["usage"]["prompt_tokens"] > 0  # the other figures stay as they were
    assert (
        answer.headers["retry-after"] == "-5\\u000a"
        and answer.headers["x-ratelimit-remaining-requests"] == "Infinity"
        and "x-request-id" not in answer.headers
        and answer.headers["content-type"] == "application/json; charset=utf-8"
    )
    events = client.post(
        "/v1/messages",
        headers={"x-api-key": "k", "anthropic-version": "2023-06-01"},
        json={"model": "m", "max_tokens": 5, "stream": True, "messages": user('#fake:usage={"output_tokens": 1e30}')},
    ).text
    assert events.count('"output_tokens":1e+30') == 2  # message_start and message_delta
    body = {"model": "m", "stream": True, "input": 'hi #fake:usage="abc" #fake:response_id=[1]'}
    data = [
        json.loads(line[5:])
        for line in client.post("/v1/responses", json=body).text.splitlines()
        if line.startswith("data:")
    ]
    assert data[0]["response"]["usage"] is None and data[-1]["response"]["usage"] == "abc"  # null stays null
    assert [event["response"]["id"] for event in data if "response" in event] == [[1]] * 3  # created .. completed
    fake.set_key_behaviour("sk-odd", "rate_limit", headers={"retry-after": 10**30}, usage={"prompt_tokens": -1})
    limited = client.post("/v1/chat/completions", headers={"authorization": "Bearer sk-odd"}, json={"model": "m"})
    assert limited.status_code == 429 and limited.headers["retry-after"] == str(10**30)
    fake.set_key_behaviour("sk-odd", "ok", usage={"prompt_tokens": -1})
    answer = client.post(
        "/v1/completions",
        headers={"authorization": "Bearer sk-odd"},
        json={"model": "m", "prompt": '#fake:usage={"prompt_tokens": "abc"}'},
    )
    assert answer.json()["usage"]["prompt_tokens"] == "abc"  # the prompt's directive comes after the key's
