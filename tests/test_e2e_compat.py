"""What today's clients send passes as they send it; the proxy checks only what its own policy reads.

The request shapes here are those Claude Code, Codex CLI and the SDKs send today (see tests/fixtures/clients for
whole recorded requests, replayed in tests/test_e2e_clients.py), plus shapes no API has yet: the upstream, not
the proxy, decides what a valid request is.
"""

import copy
import json
import socket

import anthropic
import httpx
import pytest

from tests.conftest import proxy_env
from tests.test_e2e_sdk import anthropic_client, openai_client

pytestmark = pytest.mark.e2e

MESSAGES = "/proxy/anthropic/v1/messages?beta=true"
CHAT = "/proxy/openai/v1/chat/completions"
RESPONSES = "/proxy/openai/v1/responses"
CLAUDE_CODE_HEADERS = {
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,"
    "context-1m-2025-08-07",
    "anthropic-dangerous-direct-browser-access": "true",
    "x-api-key": "sk-ant-client-placeholder",
}
# Claude Code's request shape: a `system` role inside `messages`, thinking, context management, output config,
# cache_control on blocks, a tool turn with thinking and redacted thinking, server-tool blocks; and a future field,
# role and block type.
CLAUDE_CODE_BODY = {
    "model": "claude-opus-5-5",
    "max_tokens": 32000,
    "stream": True,
    "system": [{"type": "text", "text": "You are a Claude agent.", "cache_control": {"type": "ephemeral"}}],
    "messages": [
        {
            "role": "user",
            "content": [{"type": "text", "text": "list the files", "cache_control": {"type": "ephemeral"}}],
        },
        {"role": "system", "content": [{"type": "text", "text": "# Environment\nPlatform: linux"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "", "signature": "EqQBCkYIBxgCKkD" + "x" * 300},
                {"type": "redacted_thinking", "data": "EmwKAhgBEgy" + "y" * 300},
                {"type": "server_tool_use", "id": "srvtoolu_01A", "name": "web_search", "input": {"query": "q"}},
                {
                    "type": "web_search_tool_result",
                    "tool_use_id": "srvtoolu_01A",
                    "content": [
                        {
                            "type": "web_search_result",
                            "url": "https://example.com/",
                            "title": "Example",
                            "encrypted_content": "Eo8B" + "z" * 200,
                            "page_age": None,
                        }
                    ],
                },
                {"type": "tool_use", "id": "toolu_01B", "name": "Bash", "input": {"command": "ls"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01B", "content": [{"type": "text", "text": "a.txt"}]},
                {"type": "future_block", "payload": {"text": "a block type no API has yet"}},
            ],
        },
        {"role": "critic", "content": "a role no API has yet"},
    ],
    "tools": [
        {
            "name": "Bash",
            "description": "Run a shell command",
            "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
        },
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
    ],
    "metadata": {"user_id": json.dumps({"device_id": "d1", "session_id": "s1"})},
    "thinking": {"type": "adaptive", "display": "omitted"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "output_config": {"effort": "medium"},
    "future_field": {"anything": [1, 2.5, None, True]},
}
# Codex CLI's Responses request shape.
CODEX_BODY = {
    "model": "gpt-6.2-sol",
    "stream": True,
    "store": False,
    "instructions": "You are Codex.",
    "input": [
        {
            "type": "additional_tools",
            "role": "developer",
            "tools": [
                {
                    "type": "namespace",
                    "name": "functions",
                    "tools": [
                        {
                            "type": "custom",
                            "name": "exec",
                            "description": "Run JavaScript",
                            "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"},
                        }
                    ],
                }
            ],
        },
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "say hi"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAAB" + "q" * 400},
        {"type": "custom_tool_call", "call_id": "call_1", "name": "exec", "input": "text('hi')"},
        {"type": "custom_tool_call_output", "call_id": "call_1", "output": "hi"},
        {"type": "configuration_update", "reasoning": {"effort": "low"}},
    ],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "reasoning": {"effort": "low", "context": "all_turns"},
    "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "01a242ba-7cd9-7982-baae-1c7817013cbd",
    "service_tier": "priority",
    "text": {"verbosity": "low"},
    "client_metadata": {"turn_id": "t1"},
}


def received(fake, index: int = -1) -> tuple[dict, dict]:
    """The body and headers the fake upstream received."""
    request = fake.requests[index]
    return json.loads(request.body), {name.lower(): value for name, value in request.headers}


def test_claude_codes_request_reaches_the_upstream_unchanged(proxy, fake):
    with httpx.stream("POST", f"{proxy.url}{MESSAGES}", json=CLAUDE_CODE_BODY, headers=CLAUDE_CODE_HEADERS) as answer:
        assert answer.status_code == 200
        events = answer.read().decode()
    assert "event: message_stop" in events
    body, headers = received(fake)
    assert body == CLAUDE_CODE_BODY
    assert headers["anthropic-beta"] == CLAUDE_CODE_HEADERS["anthropic-beta"]
    assert headers["anthropic-dangerous-direct-browser-access"] == "true"
    assert fake.requests[-1].path == "/v1/messages"


def test_codex_request_reaches_the_upstream_unchanged(proxy, fake):
    response = httpx.post(f"{proxy.url}{RESPONSES}", json=CODEX_BODY, headers={"authorization": "Bearer placeholder"})
    assert response.status_code == 200 and "response.completed" in response.text
    assert received(fake)[0] == CODEX_BODY


def test_unknown_chat_roles_and_fields_reach_the_upstream_unchanged(proxy, fake):
    body = {
        "model": "gpt-5.4",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "critic", "content": [{"type": "future_part", "x": 1}]},
        ],
        "reasoning_effort": "minimal",
        "verbosity": "low",
        "prediction": {"type": "content", "content": "x"},
        "future_field": {"a": [1, 2]},
    }
    assert httpx.post(f"{proxy.url}{CHAT}", json=body).status_code == 200
    assert received(fake)[0] == body


def test_what_the_upstream_refuses_comes_back_as_the_upstream_said_it(proxy, fake):
    """The fake, like the real API, refuses a thinking budget that does not fit under max_tokens."""
    body = {
        "model": "claude-sonnet-5",
        "max_tokens": 2000,
        "thinking": {"type": "enabled", "budget_tokens": 4000},
        "messages": [{"role": "user", "content": "hi"}],
    }
    with pytest.raises(anthropic.BadRequestError) as refused:
        anthropic_client(proxy).messages.create(**body)
    assert refused.value.status_code == 400
    assert "`max_tokens` must be greater than `thinking.budget_tokens`" in refused.value.body["error"]["message"]
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    "cap, sent_thinking",
    [
        ("8000", {"type": "enabled", "budget_tokens": 7999}),  # lowered under the lowered max_tokens
        ("1000", {"type": "disabled"}),  # no budget of at least 1024 fits: thinking is turned off
    ],
)
def test_a_lowered_max_tokens_lowers_the_thinking_budget_with_it(start_proxy, fake, cap, sent_thinking):
    proxy = start_proxy(proxy_env(fake, MAX_OUTPUT_TOKENS_ANTHROPIC=cap))
    message = anthropic_client(proxy).messages.create(
        model="claude-sonnet-5",
        max_tokens=20000,
        thinking={"type": "enabled", "budget_tokens": 16000},
        messages=[{"role": "user", "content": "hi"}],
    )
    assert message.content
    body, _ = received(fake)
    assert body["max_tokens"] == int(cap) and body["thinking"] == sent_thinking


def test_claude_code_thinking_streams_with_signatures_through_the_proxy(proxy, fake):
    with anthropic_client(proxy).messages.stream(
        model="claude-opus-5-5",
        max_tokens=4096,
        thinking={"type": "enabled", "budget_tokens": 2048},
        messages=[{"role": "user", "content": "hi #fake:redacted_thinking=1 #fake:tool=get_weather"}],
        tools=[{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
    ) as stream:
        final = stream.get_final_message()
    kinds = [block.type for block in final.content]
    assert kinds[:2] == ["thinking", "redacted_thinking"] and kinds[-1] == "tool_use"
    assert final.content[0].signature and final.content[-1].input == {"city": "Paris"}
    assert final.stop_reason == "tool_use"


@pytest.mark.parametrize(
    "path, body",
    [
        (
            MESSAGES,
            {
                **copy.deepcopy(CLAUDE_CODE_BODY),
                "tools": [{"name": "t", "description": "a FORBIDDEN tool", "input_schema": {"type": "object"}}],
            },
        ),
        (
            MESSAGES,
            {
                "model": "claude-sonnet-5",
                "max_tokens": 5,
                "tools": [
                    {
                        "name": "t",
                        "input_schema": {"type": "object", "properties": {"forbidden_argument": {"type": "string"}}},
                    }
                ],
                "messages": [{"role": "user", "content": "hi"}],
            },
        ),  # a schema's property name
        (
            MESSAGES,
            {
                "model": "claude-sonnet-5",
                "max_tokens": 5,
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "system", "content": "forbidden, mid-conversation"},
                ],
            },
        ),
        (
            MESSAGES,
            {
                "model": "claude-sonnet-5",
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "t",
                                "content": [{"type": "text", "text": "Forbidden"}],
                            }
                        ],
                    }
                ],
            },
        ),
        (
            MESSAGES,
            {
                "model": "claude-sonnet-5",
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "document",
                                "source": {"type": "text", "media_type": "text/plain", "data": "forbidden"},
                            }
                        ],
                    }
                ],
            },
        ),
        (
            MESSAGES,
            {
                "model": "claude-sonnet-5",
                "max_tokens": 5,
                "messages": [
                    {"role": "user", "content": [{"type": "future_block", "deep": {"deeper": ["forbidden"]}}]}
                ],
            },
        ),  # a shape no API has yet
        (RESPONSES, {"model": "gpt-5.4", "instructions": "forbidden", "input": "hi"}),
        (
            RESPONSES,
            {
                **copy.deepcopy(CODEX_BODY),
                "input": [{"type": "function_call_output", "call_id": "c", "output": "forbidden output"}],
            },
        ),
        (
            RESPONSES,
            {
                "model": "gpt-5.4",
                "input": "hi",
                "text": {"format": {"type": "json_schema", "name": "x", "schema": {"description": "forbidden"}}},
            },
        ),
        (
            CHAT,
            {
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [
                    {"type": "function", "function": {"name": "f", "description": "Forbidden", "parameters": {}}}
                ],
            },
        ),
    ],
)
def test_the_filter_reads_every_string_the_model_reads_in_any_shape(start_proxy, fake, path, body):
    proxy = start_proxy(proxy_env(fake, REJECT_PHRASES="forbidden"))
    response = httpx.post(f"{proxy.url}{path}", json=body)
    assert response.status_code == 400 and response.headers["x-proxy-error"] == "content_rejected"
    assert fake.requests == []


def test_the_filter_skips_ids_settings_and_opaque_data(start_proxy, fake):
    proxy = start_proxy(proxy_env(fake, REJECT_PHRASES="forbidden"))
    body = {
        "model": "claude-sonnet-5",
        "max_tokens": 5,
        "metadata": {"user_id": "forbidden-user"},
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi"},
                    {"type": "thinking", "thinking": "ok", "signature": "forbidden"},
                    {"type": "tool_result", "tool_use_id": "forbidden", "content": "fine"},
                ],
            }
        ],
    }
    assert httpx.post(f"{proxy.url}{MESSAGES}", json=body).status_code == 200


def raw_exchange(port: int, request: bytes) -> tuple[bytes, bool]:
    """Sends one request and reads the answer; returns (its head, whether the proxy then closed the socket)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        received_bytes = b""
        while b"\r\n\r\n" not in received_bytes:
            received_bytes += sock.recv(65536)
        head, _, rest = received_bytes.partition(b"\r\n\r\n")
        length = int(
            next(line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length"))
        )
        while len(rest) < length:
            rest += sock.recv(65536)
        sock.settimeout(1)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
    return head.lower(), closed


@pytest.mark.parametrize(
    "request_line, body",
    [
        (b"POST /proxy/openai/v1/chat/completions HTTP/1.1", b'{"model": "gpt-4o", "messages": []}'),  # forwarded
        (b"GET /proxy/openai/v1/models HTTP/1.1", b""),  # answered by the proxy
        (b"GET /proxy/openai/v1/files HTTP/1.1", b""),  # 404
        (b"POST /proxy/openai/v1/chat/completions HTTP/1.1", b'{"messages": []}'),  # 400, no model
    ],
)
@pytest.mark.parametrize("connection", [b"close", b"keep-alive"])
def test_connection_close_is_answered_and_honoured_both_ways(proxy, fake, request_line, body, connection):
    """RFC 9112 §9.6: the answer to `Connection: close` says `close` and the socket closes; otherwise it stays."""
    request = (
        request_line
        + b"\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: "
        + connection
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    head, closed = raw_exchange(proxy.port, request)
    says_close = b"\r\nconnection: close" in head
    assert (says_close, closed) == ((True, True) if connection == b"close" else (False, False))


def test_a_streamed_request_refused_before_it_starts_gets_a_real_status(start_proxy, fake):
    proxy = start_proxy(proxy_env(fake, ANTHROPIC_KEY=""))
    with httpx.stream(
        "POST",
        f"{proxy.url}/proxy/anthropic/v1/messages",
        json={
            "model": "claude-sonnet-5",
            "max_tokens": 5,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
    ) as answer:
        assert answer.status_code == 503 and answer.headers["content-type"] == "application/json"
        assert json.loads(answer.read())["error"]["type"] == "overloaded_error"
    stream = httpx.post(f"{proxy.url}{CHAT}", json={"model": "gpt-4o", "stream": True, "messages": []})
    assert stream.status_code == 200  # the OpenAI keys still serve


def test_refusals_by_the_proxy_cost_no_rate_allowance(start_proxy, fake):
    proxy = start_proxy(proxy_env(fake, ANTHROPIC_KEY="", MODEL_RATE_LIMIT="2", COUNT_TOKENS_RATE_LIMIT="3"))
    claude = {"model": "claude-sonnet-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    refused = [httpx.post(f"{proxy.url}/proxy/anthropic/v1/messages", json=claude).status_code for _ in range(4)]
    assert refused == [503] * 4  # no key: refused by the proxy, not counted
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    counts = [
        httpx.post(
            f"{proxy.url}/proxy/openai/v1/responses/input_tokens", json={"model": "gpt-4o", "input": "hi"}
        ).status_code
        for _ in range(4)
    ]
    assert counts == [200, 200, 200, 429]  # token counts have a window of their own
    served = [httpx.post(f"{proxy.url}{CHAT}", json=chat) for _ in range(3)]
    assert [response.status_code for response in served] == [200, 200, 429]
    assert served[2].headers["retry-after"] and served[2].json()["error"]["code"] == "rate_limited"


def test_the_newest_sdks_stream_a_tool_turn(proxy, fake):
    stream = openai_client(proxy).chat.completions.create(
        model="gpt-4o",
        stream=True,
        messages=[{"role": "user", "content": "weather? #fake:tool=get_weather"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    )
    arguments = "".join(
        chunk.choices[0].delta.tool_calls[0].function.arguments or ""
        for chunk in stream
        if chunk.choices and chunk.choices[0].delta.tool_calls
    )
    assert json.loads(arguments) == {"city": "Paris"}
