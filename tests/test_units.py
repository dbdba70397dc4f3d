"""Unit tests of the pure parts: route table, settings, header filters, scrubbing, fail-closed hooks."""

import asyncio
import json
import logging
import socket
from collections.abc import Sequence

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import exceptions, http
from mitmproxy.proxy import mode_specs
from mitmproxy.test import taddons, tflow, tutils
from multidict import CIMultiDict

from addons.affinity import Affinity
from addons.dispatcher import Dispatcher
from addons.failclosed import FailClosed
from addons.flownotes import FlowNotes
from addons.flowstate import flow_state
from addons.modelfamilies import ModelFamilies
from addons.promptlog import PromptLog
from addons.quotakeeper import QuotaKeeper
from addons.requestpolicy import RequestPolicy
from addons.router import Router
from addons.wiring import build_addons
from llmproxy import config, scrub
from llmproxy.api import ANTHROPIC, DEFAULT_ANTHROPIC_VERSION, headers, routes
from llmproxy.api.errors import api_of_request
from llmproxy.config import ConfigError, ConfigSources
from llmproxy.policy import cap_output
from llmproxy.pool.keys import KeyPool
from llmproxy.pool.queue import WaitQueue
from llmproxy.services import BUILT_IN, pool_keys
from llmproxy.store.storage import Storage
from llmproxy.upstream.pipe import Pipe, bind_pipe_socket

ROUTES = routes.RouteTable(BUILT_IN)


@pytest.mark.parametrize(
    "method, target, route",
    [
        (b"POST", b"/proxy/openai/v1/chat/completions", "openai.chat_completions"),
        (b"POST", b"/proxy/openai/chat/completions", "openai.chat_completions"),
        (b"POST", b"/proxy/openai/v1/responses", "openai.responses"),
        (b"POST", b"/proxy/anthropic/v1/messages?beta=true", "anthropic.messages"),
        (b"POST", b"/proxy/anthropic/messages/count_tokens", "anthropic.count_tokens"),
        (b"GET", b"/proxy/anthropic/v1/models?limit=20", "anthropic.models"),
        (b"GET", b"/", "status_page"),
    ],
)
def test_routes_match_exactly(method, target, route):
    assert ROUTES.lookup(method, target).route.name == route


@pytest.mark.parametrize(
    "target",
    [b"/proxy/openai/v1/chat/completions?x=%2e", b"/proxy/openai/v1/chat/completions?a=b#c", b"/status/", b"//"],
)
def test_routes_refuse_near_misses(target):
    assert ROUTES.lookup(b"POST", target).route is None


def test_upstream_paths_come_from_the_table():
    assert {route.upstream_path for route in ROUTES.by_name.values() if route.kind == routes.FORWARD} == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/responses/compact",
        "/v1/responses/input_tokens",
        "/v1/embeddings",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/complete",
        "/chat/completions",  # Azure's, under each deployment
        "/completions",
        "/embeddings",
        "/v1beta/openai/chat/completions",  # Gemini's OpenAI-compatible endpoint
        "",  # Gemini's native calls: their service rebuilds the path from checked parts (its own tests)
    }


def test_settings_precedence_and_types(tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text("upstream_timeout: 30\nopenai_models: [a, b]\nopenai_key: sk-from-file\n")
    (tmp_path / ".env").write_text("# comment\nexport UPSTREAM_TIMEOUT=40\nSERVER_TITLE='From dotenv'\n")
    monkeypatch.chdir(tmp_path)
    sources = ConfigSources(
        {"PROXY_CONFIG": str(tmp_path / "config.yaml"), "UPSTREAM_TIMEOUT": "50", "ANTHROPIC_KEY": 'k1, "k,2", k1'}
    )
    values = sources.options(
        {"upstream_timeout": int, "openai_models": Sequence[str], "server_title": str}, ["openai_key", "anthropic_key"]
    )
    assert values == {"upstream_timeout": 50, "openai_models": ["a", "b"], "server_title": "From dotenv"}
    assert sources.secrets(["openai_key", "anthropic_key"]) == {
        "openai_key": ["sk-from-file"],
        "anthropic_key": ["k1", "k,2"],
        "proxy_key": "",
        "admin_key": "",
    }


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"UPSTREAM_TIMEOUT": "soon"}, "UPSTREAM_TIMEOUT must be a whole number"),
        ({"PORT": "70000"}, "PORT must be between"),
        ({"PROXY_CONFIG": "/nonexistent/config.yaml"}, "Cannot read the configuration file"),
    ],
)
def test_bad_settings_are_one_sentence(environ, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match=message):
        sources = ConfigSources({"PROXY_CONFIG": str(tmp_path / "empty.yaml"), **environ})
        sources.listen_address()
        sources.options({"upstream_timeout": int}, [])


def test_unknown_setting_in_the_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("upstream_timout: 5\n")
    with pytest.raises(ConfigError, match="upstream_timout"):
        ConfigSources({"PROXY_CONFIG": str(tmp_path / "c.yaml")}).options({"upstream_timeout": int}, [])


@pytest.mark.parametrize(
    "make, change, sentence",
    [
        (
            lambda: Router(BUILT_IN, routes.RouteTable(BUILT_IN)),
            {"max_request_body": "lots"},
            "MAX_REQUEST_BODY must be a size such as 4m",
        ),
        (FlowNotes, {"stream_record_limit": "1.5m"}, "STREAM_RECORD_LIMIT must be a size"),
        (PromptLog, {"prompt_log_max_bytes": "big"}, "PROMPT_LOG_MAX_BYTES must be a size"),
        (
            lambda: ModelFamilies(BUILT_IN),
            {"openai_model_families": ["gpt5"]},
            "OPENAI_MODEL_FAMILIES entries look like",
        ),
        (RequestPolicy, {"reject_phrases": ["(a+)+"], "reject_phrases_regex": True}, "exponential time"),
        (
            lambda: QuotaKeeper(Storage(), ModelFamilies(BUILT_IN), {}),
            {"model_prices": ["openai=1/2"]},
            "add anthropic=",
        ),
    ],
)
def test_a_setting_the_plain_readers_refuse_is_refused_and_the_previous_value_stays(make, change, sentence):
    """llmproxy/ raises ConfigError; mitmproxy rolls an option back only on OptionsError, and would keep the value."""
    addon = make()
    with taddons.context(addon) as tctx:
        before = {name: getattr(tctx.options, name) for name in change}
        with pytest.raises(exceptions.OptionsError, match=sentence):
            tctx.configure(addon, **change)
        assert {name: getattr(tctx.options, name) for name in change} == before


def test_config_yaml_documents_every_option_with_its_default(tmp_path):
    """config.yaml is the documentation of the defaults; it must not drift from the code."""
    documented = yaml.safe_load(config.DEFAULT_CONFIG.read_text())
    with taddons.context() as tctx:
        builtin = set(tctx.options.keys())
        for addon in build_addons(ConfigSources({}), FailClosed()):
            tctx.master.addons.add(addon)
        ours = {name: option.default for name, option in tctx.options.items() if name not in builtin}
    for name, default in ours.items():
        assert name in documented, f"config.yaml does not document {name}"
        assert documented[name] == (list(default) if isinstance(default, (list, tuple)) else default), name
    key_settings = {service.key_setting for service in BUILT_IN}
    assert set(documented) == set(ours) | key_settings | set(config.SECRET_VALUES) | set(config.LISTEN_SETTINGS) | {
        config.SERVICES
    }


def test_request_headers_allowlist():
    client_headers = http.Headers(
        [
            (b"Authorization", b"Bearer client"),
            (b"Content-Type", b"application/json"),
            (b"X-Forwarded-For", b"1.2.3.4"),
            (b"Connection", b"keep-alive, User-Agent"),
            (b"User-Agent", b"listed-in-connection"),
            (b"X-Stainless-Lang", b"python"),
            (b"Anthropic-Beta", b"bad\x01value"),
            (b"Accept-Encoding", b"gzip"),
        ]
    )
    result = http.Headers(headers.upstream_request_headers(client_headers.items(multi=True), ANTHROPIC))
    assert dict(result.items()) == {
        "content-type": "application/json",
        "x-stainless-lang": "python",
        "accept-encoding": "identity",
        "anthropic-version": DEFAULT_ANTHROPIC_VERSION,
    }


def test_response_headers_allowlist():
    upstream = CIMultiDict(
        [
            ("Content-Type", "application/json"),
            ("openai-organization", "org-x"),
            ("Set-Cookie", "a=b"),
            ("x-ratelimit-remaining-requests", "9"),
            ("Transfer-Encoding", "chunked"),
            ("Retry-After", "2"),
        ]
    )
    assert headers.client_response_headers(upstream) == [
        (b"content-type", b"application/json"),
        (b"x-ratelimit-remaining-requests", b"9"),
        (b"retry-after", b"2"),
    ]


def test_scrub_removes_configured_and_key_shaped_secrets():
    scrub.register(["plainsecretvalue"])
    text = scrub.text("key plainsecretvalue, sk-proj-abc123def456, org-ABCDEFGHIJKLMNOP and sk-ant-api03-xyz789")
    assert "plainsecretvalue" not in text and "sk-" not in text and "org-" not in text
    other_services = (
        "Google AIzaSyA1234567890abcdefghijklmnopqrstuv, AWS AKIAABCDEFGHIJKLMNOP, token ya29.a0AfH6SMBx-y_z, "
        "key -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY-----."
    )
    assert scrub.text(other_services) == "Google [redacted], AWS [redacted], token [redacted], key [redacted]."


async def test_a_failing_hook_answers_500_and_sends_nothing(caplog, tmp_path):
    """A request-phase hook that raises (the dispatcher's, through the pool it asks for a key) ends the flow with a
    JSON 500 at once: nothing reaches the upstream, and the exception's text only the log, scrubbed."""
    secret = "sk-secret-in-message"

    class ExplodingPool(KeyPool):
        def candidates(self, api, family, affinity=None):  # the first pool method a request's key choice calls
            raise RuntimeError(f"boom with {secret}")

    storage, families = Storage(), ModelFamilies(BUILT_IN)
    storage.open(tmp_path / "proxy.sqlite3")
    pool = ExplodingPool(pool_keys(BUILT_IN, {"openai_key": ["sk-x"]}), storage, families.all_families)
    affinity, quota = Affinity(storage), QuotaKeeper(storage, families, {"openai": ""})
    router = Router(BUILT_IN, routes.RouteTable(BUILT_IN))
    dispatcher = Dispatcher(BUILT_IN, None, pool, WaitQueue(pool, storage), affinity, quota)
    addons = router, affinity, dispatcher
    with socket.create_server(("127.0.0.1", 0)) as upstream, taddons.context(*addons) as tctx:
        upstream.setblocking(False)
        upstream_url = f"http://127.0.0.1:{upstream.getsockname()[1]}"
        tctx.configure(dispatcher, max_request_body="4m", openai_upstream_url=upstream_url)
        flow = tflow.tflow(req=tutils.treq(method=b"POST", path=b"/proxy/openai/v1/chat/completions", authority=b""))
        flow.client_conn.proxy_mode = mode_specs.ProxyMode.parse("reverse:http://127.0.0.1:1")
        router.requestheaders(flow)
        flow_state(flow).family = "gpt4o"  # as the families addon names it
        dispatcher.running()
        caplog.clear()  # from here on, what handling the request logs
        try:
            async with asyncio.timeout(2):  # the hook's own failure, not a timeout behind it
                await dispatcher.request(flow)
        finally:
            await dispatcher.done()
            storage.close()
        with pytest.raises(BlockingIOError):
            upstream.accept()  # no connection was ever made
    assert flow.response.status_code == 500 and not flow_state(flow).pipe_token
    assert json.loads(flow.response.content)["error"]["code"] == "proxy_internal_error"
    assert flow_state(flow).decision == "internal_error"
    assert "boom" not in flow.response.text and secret not in flow.response.text
    failures = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert len(failures) == 1 and "Dispatcher.request" in failures[0] and "RuntimeError: boom" in failures[0]
    assert secret not in caplog.text


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("cl100k_base", "hello world", [15339, 1917]),
        ("cl100k_base", "tiktoken is great!", [83, 1609, 5963, 374, 2294, 0]),  # tiktoken's README
        ("o200k_base", "hello world", [24912, 2375]),
    ],
)
def test_offline_encodings_give_the_official_tokens(name, text, expected):
    from llmproxy import tokens

    assert tokens.encoding(name).encode(text) == expected


def test_chat_prompt_count_follows_openais_formula():
    from llmproxy import tokens

    # 3 per message + role + content, + 3 priming: the OpenAI cookbook's counting for current models.
    body = {"messages": [{"role": "system", "content": "hello world"}, {"role": "user", "content": "hello world"}]}
    assert tokens.count_prompt("openai", "gpt-4o", tokens.model_input(body)).high == 3 + 1 + 2 + 3 + 1 + 2 + 3
    assert tokens.encoding_for("openai", "gpt-4-0613") == "cl100k_base"
    assert tokens.encoding_for("openai", "gpt-5.4-mini") == "o200k_base"
    assert tokens.encoding_for("anthropic", "claude-sonnet-4-5") == "cl100k_base"


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(st.text(max_size=200), max_size=5))
def test_the_byte_bound_of_a_prompt_is_never_below_its_count(texts):
    from llmproxy import tokens

    body = {"messages": [{"role": "user", "content": text} for text in texts]}
    found = tokens.model_input(body)
    bound, exact = tokens.bound_prompt("openai", found), tokens.count_prompt("openai", "gpt-4o", found)
    assert bound.low <= exact.low and bound.high >= exact.high
    assert tokens.bound_prompt("anthropic", found).high >= tokens.count_prompt("anthropic", "claude-x", found).low


@pytest.mark.parametrize("pattern", [r"(a+)+$", r"(x*)*y", r"(a|aa)+", r"(\w+\s?)*$", r"(a)\1"])
def test_regex_phrases_that_could_backtrack_forever_are_refused(pattern):
    from llmproxy.policy import safe_pattern

    with pytest.raises(ConfigError, match="exponential time"):
        safe_pattern(pattern)
    assert safe_pattern(r"\bsecret\s+plan\b").search("a SECRET plan")


def test_claude_stream_becomes_openai_chunks_event_by_event():
    from llmproxy.api.translate import MessagesToChatStream, chat_to_messages

    translator = MessagesToChatStream(include_usage=True)
    events = [
        (
            b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","model":"claude-x",'
            b'"usage":{"input_tokens":5,"output_tokens":1}}}\n\n'
        ),
        b'event: ping\ndata: {"type":"ping"}\n\n',
        (
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
            b'"delta":{"type":"text_delta","text":"Hi"}}\n\n'
        ),
        (
            b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"max_tokens"},'
            b'"usage":{"output_tokens":3}}\n\n'
        ),
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    ]
    out = b"".join(translator.feed(event) for event in events).decode()
    chunks = [json.loads(line[6:]) for line in out.splitlines() if line.startswith("data: {")]
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}, {"content": "Hi"}]
    assert chunks[2]["choices"][0]["finish_reason"] == "length"
    assert chunks[3]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert out.endswith("data: [DONE]\n\n")
    request = chat_to_messages(
        {
            "model": "claude-x",
            "messages": [
                {"role": "assistant", "content": "earlier"},
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
                    ],
                },
                {"role": "tool", "tool_call_id": "t1", "content": "42"},
            ],
        }
    )
    roles = [turn["role"] for turn in request["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "user"]  # a user turn first, consecutive ones merged
    assert request["messages"][3]["content"] == [{"type": "tool_use", "id": "t1", "name": "f", "input": {"x": 1}}]
    assert request["messages"][4]["content"][0]["type"] == "tool_result"


def _png(width: int, height: int, padding: int = 0) -> str:
    """A base64 PNG header of the given size (the counter reads only the header), padded to look large."""
    import base64
    import struct

    header = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + struct.pack(">II", width, height) + b"\x08\x06\x00\x00\x00"
    return base64.b64encode(header + b"\x00" * padding).decode()


def test_images_count_by_the_providers_formulas_not_as_base64_text():
    from llmproxy import tokens

    big = _png(1000, 500, padding=3_000_000)  # 4 MB of base64: as text it would be about a million tokens
    claude = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t",
                        "content": [  # an image inside a tool result counts too
                            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": big}}
                        ],
                    }
                ],
            }
        ]
    }
    count = tokens.count_prompt("anthropic", "claude-sonnet-5", tokens.model_input(claude))
    assert count.low == 667 and 667 < count.high < 700  # 1000 x 500 / 750, plus a few framing tokens
    openai_image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_png(2048, 4096)}"}}
    assert tokens.image_tokens("openai", openai_image).low == 85 + 170 * 6  # 768 x 1536: 2 x 3 tiles
    low_detail = {"type": "input_image", "image_url": f"data:image/png;base64,{_png(4000, 4000)}", "detail": "low"}
    assert tokens.image_tokens("openai", low_detail) == tokens.Estimate(85, 85)
    linked = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    assert tokens.image_tokens("anthropic", linked) == tokens.Estimate(0, tokens.ANTHROPIC_IMAGE_MAX)


@pytest.mark.parametrize(
    "header, size",
    [
        (b"GIF89a\x40\x01\xf0\x00", (320, 240)),
        (b"\xff\xd8\xff\xe0\x00\x04\x00\x00\xff\xc0\x00\x11\x08\x01\xe0\x02\x80\x03", (640, 480)),
        (b"RIFF\x00\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x00\x00\x00\x00\x7f\x02\x00\xdf\x01\x00", (640, 480)),
    ],
)
def test_image_sizes_are_read_from_the_header(header, size):
    from llmproxy import tokens

    assert tokens.image_size(header) == size


def test_pdf_pages_and_opaque_blobs_have_stated_figures():
    import base64
    import zlib

    from llmproxy import tokens

    plain = b"%PDF-1.4\n2 0 obj << /Type /Pages /Kids [3 0 R 4 0 R] /Count 2 >> endobj"
    compressed = (
        b"%PDF-1.5\n5 0 obj << /Type /ObjStm /Filter /FlateDecode >>stream\n"
        + zlib.compress(b"<< /Count 12 /Type /Pages /Kids [] >>")
        + b"\nendstream"
    )
    assert (tokens.pdf_pages(plain), tokens.pdf_pages(compressed), tokens.pdf_pages(b"%PDF-1.7 ?")) == (2, 12, None)
    document = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": base64.b64encode(plain).decode()},
    }
    assert tokens.document_tokens(document) == tokens.Estimate(0, 2 * tokens.PDF_PAGE_TOKENS)
    unreadable = {"type": "input_file", "file_id": "file-abc"}
    assert tokens.document_tokens(unreadable).high == tokens.PDF_MAX_PAGES * tokens.PDF_PAGE_TOKENS
    reasoning = {
        "input": [
            {"type": "reasoning", "encrypted_content": "A" * 4000, "summary": []},
            {"type": "message", "role": "user", "content": "hi"},
        ]
    }
    found = tokens.model_input(reasoning)
    assert found.texts == ["hi"] and len(found.blobs) == 1
    count = tokens.count_prompt("openai", "gpt-5.4", found)
    assert count.low == 1 and count.high == 1 + 4 * 2 + 3 + 750  # 3,000 decoded bytes at 4 a token
    signed = {
        "messages": [{"role": "assistant", "content": [{"type": "thinking", "thinking": "", "signature": "S" * 900}]}]
    }
    assert tokens.model_input(signed).texts == [""] and tokens.model_input(signed).blobs == []  # the empty thinking


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"data": 5}',
        b'{"data": [5, null]}',
        b"\xff",
        b'{"data": [{"id": "x"}]' + b"}" * 3,
    ],
)
def test_the_key_checker_reads_any_answer_without_failing(body):
    from llmproxy.services.openai import _organization_ids

    openai = BUILT_IN[0]
    assert openai.model_ids(body) == [] and _organization_ids(body) == []
    assert openai.model_ids(b'{"data": [{"id": "gpt-4o"}]}') == ["gpt-4o"]
    assert _organization_ids(b'{"data": [{"id": "org-a", "is_default": true}, {"id": "org-b"}]}') == ["org-b"]


@pytest.mark.parametrize(
    "host, target, api",
    [
        ("api.anthropic.com", b"/v1/messages", "anthropic"),  # an app through the forward proxy
        ("api.openai.com", b"/v1/chat/completions", "openai"),
        ("127.0.0.1", b"/proxy/anthropic/v1/messages", "anthropic"),  # a client of the reverse proxy
        ("127.0.0.1", b"/proxy/openai/v1/files", "openai"),
    ],
)
def test_an_error_takes_the_format_of_the_api_the_request_names(host, target, api):
    assert api_of_request(host, target) == api


async def test_the_pipe_sends_each_write_at_once():
    """Nagle's algorithm on the pipe's connections held a streamed event back until mitmproxy's delayed ACK of the
    previous segment, 40 ms: every stream after the first on a kept-alive client connection began that late."""
    pipe = Pipe(bind_pipe_socket())
    await pipe.open()
    _, writer = await asyncio.open_connection("127.0.0.1", pipe.port)
    try:
        while not pipe._connections:
            await asyncio.sleep(0)
        (served,) = pipe._connections
        assert served.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        writer.close()
        await pipe.close()


@pytest.mark.parametrize(
    "body, cap, after, limit",
    [
        ({"contents": []}, 0, {"contents": []}, 0),  # no cap: the body stays as sent
        ({"contents": []}, 50, {"contents": [], "generationConfig": {"maxOutputTokens": 50}}, 50),
        ({"generationConfig": {"maxOutputTokens": 9}}, 50, {"generationConfig": {"maxOutputTokens": 9}}, 9),
        (
            {"generationConfig": {"maxOutputTokens": 99, "topK": 3}},
            50,
            {"generationConfig": {"maxOutputTokens": 50, "topK": 3}},
            50,
        ),
        ({"generationConfig": "odd"}, 50, {"generationConfig": "odd"}, 0),  # the upstream refuses it, not the cap
    ],
)
def test_geminis_output_cap_sits_in_its_generation_config(body, cap, after, limit):
    route = ROUTES.lookup(b"POST", b"/proxy/google-ai/v1beta/models/gemini-2.5-flash:generateContent").route
    assert cap_output(route, body, cap)[0] == limit and body == after
