"""Unit tests of usage priced the way the providers price it: the readers of every usage shape, buffered and
streamed, the price table, USD quotas and their refusals, and which tools the provider runs itself.

The payloads are shaped like the APIs' own answers (November 2025), with cache and reasoning figures the fake
upstream does not produce; each expected cost is worked out by hand in its comment.
"""

import json
from decimal import Decimal

import pytest

from llmproxy.api.usage import StreamMeter, Usage, read_answer
from llmproxy.config import ConfigError
from llmproxy.policy import server_tools
from llmproxy.pricing import DEFAULT_PRICES, Price, format_usd, parse_cost_quotas, parse_prices, price_of
from llmproxy.quota import over_quota_message
from llmproxy.store import USAGE_FIGURES

PRICES = parse_prices(DEFAULT_PRICES)


def sse(*events: tuple[str | None, dict | str]) -> bytes:
    """An SSE stream: (event name or None, data) per event."""
    lines = []
    for name, data in events:
        text = data if isinstance(data, str) else json.dumps(data)
        lines.append((f"event: {name}\n" if name else "") + f"data: {text}\n\n")
    return "".join(lines).encode()


def metered(api: str, stream: bytes, chunk: int = 50, drop_usage_chunk: bool = False) -> Usage:
    """The meter's reading of `stream` fed in small pieces, as the network hands it over."""
    meter = StreamMeter(api, drop_usage_chunk=drop_usage_chunk)
    for start in range(0, len(stream), chunk):
        meter.feed(stream[start : start + chunk])
    meter.feed(b"")
    return meter.finish(prompt_estimate=999_999)


def cost(api: str, model: str, family: str, usage: Usage) -> int:
    return price_of(PRICES, api, model, family).cost(usage)


# -- OpenAI ----------------------------------------------------------------------------------------------

CHAT_USAGE = {
    "prompt_tokens": 2006,
    "completion_tokens": 300,
    "total_tokens": 2306,
    "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
CHAT_READ = Usage(input=86, output=300, cache_read=1920)


def test_a_chat_answer_splits_cached_tokens_out_of_the_prompt():
    answer = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-2024-08-06",
        "usage": CHAT_USAGE,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
    }
    usage, text = read_answer(json.dumps(answer).encode())
    assert (usage, text) == (CHAT_READ, "Hello") and usage.total == 2306
    # gpt-4o: 86 × $2.50 + 1,920 × $1.25 + 300 × $10 = $5,615 per million = $0.005615
    assert cost("openai", "gpt-4o", "gpt4o", usage) == 5_615_000


def test_a_streamed_chat_is_read_from_its_usage_chunk():
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o"}
    stream = sse(
        (None, base | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": None}),
        (None, base | {"choices": [{"index": 0, "delta": {"content": "Hello"}}], "usage": None}),
        (None, base | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None}),
        (None, base | {"choices": [], "usage": CHAT_USAGE}),
        (None, "[DONE]"),
    )
    assert metered("openai", stream, drop_usage_chunk=True) == CHAT_READ


def test_reasoning_tokens_are_part_of_the_output():
    usage, _ = read_answer(
        json.dumps(
            {
                "usage": {
                    "prompt_tokens": 1000,
                    "completion_tokens": 1500,
                    "prompt_tokens_details": {"cached_tokens": 0},
                    "completion_tokens_details": {"reasoning_tokens": 1024},
                }
            }
        ).encode()
    )
    assert usage == Usage(input=1000, output=1500, reasoning=1024) and usage.total == 2500
    # o4-mini: 1,000 × $1.10 + 1,500 × $4.40 = $7,700 per million
    assert cost("openai", "o4-mini", "o", usage) == 7_700_000


RESPONSE_USAGE = {
    "input_tokens": 5000,
    "input_tokens_details": {"cached_tokens": 4096},
    "output_tokens": 800,
    "output_tokens_details": {"reasoning_tokens": 512},
    "total_tokens": 5800,
}
RESPONSE_OUTPUT = [
    {"type": "reasoning", "id": "rs_1", "summary": []},
    {"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {"type": "search", "query": "a"}},
    {"type": "web_search_call", "id": "ws_2", "status": "completed", "action": {"type": "search", "query": "b"}},
    {"type": "message", "id": "msg_1", "role": "assistant", "content": [{"type": "output_text", "text": "Found."}]},
]
RESPONSE_READ = Usage(input=904, output=800, cache_read=4096, reasoning=512, web_searches=2)


def test_a_responses_answer_counts_its_web_searches():
    answer = {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "model": "gpt-5",
        "output": RESPONSE_OUTPUT,
        "usage": RESPONSE_USAGE,
    }
    usage, text = read_answer(json.dumps(answer).encode())
    assert (usage, text) == (RESPONSE_READ, "Found.") and usage.total == 5800
    # gpt-5: 904 × $1.25 + 4,096 × $0.125 + 800 × $10 = $9,642 per million, + 2 searches × $10 / 1,000
    assert cost("openai", "gpt-5", "gpt5", usage) == 9_642_000 + 20_000_000


@pytest.mark.parametrize("ending", ["completed", "incomplete", "failed"])
def test_a_responses_stream_is_read_from_whichever_event_ends_it(ending):
    response = {
        "id": "resp_1",
        "object": "response",
        "model": "gpt-5",
        "status": "in_progress",
        "output": [],
        "usage": None,
    }
    stream = sse(
        ("response.created", {"type": "response.created", "response": response}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Found."}),
        (
            f"response.{ending}",
            {
                "type": f"response.{ending}",
                "response": response | {"status": ending, "output": RESPONSE_OUTPUT, "usage": RESPONSE_USAGE},
            },
        ),
    )
    assert metered("openai", stream) == RESPONSE_READ


# -- Anthropic -------------------------------------------------------------------------------------------

MESSAGE_USAGE = {
    "input_tokens": 50,
    "cache_creation_input_tokens": 3000,
    "cache_read_input_tokens": 10000,
    "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
    "output_tokens": 400,
    "server_tool_use": {"web_search_requests": 3},
    "service_tier": "standard",
}
MESSAGE_READ = Usage(input=50, output=400, cache_read=10000, cache_write_5m=1000, cache_write_1h=2000, web_searches=3)


def test_a_claude_answer_splits_cache_reads_and_writes_by_lifetime():
    answer = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}},
            {"type": "text", "text": "Found."},
        ],
        "stop_reason": "end_turn",
        "usage": MESSAGE_USAGE,
    }
    usage, text = read_answer(json.dumps(answer).encode())
    assert (usage, text) == (MESSAGE_READ, "Found.") and usage.total == 13_450
    # Sonnet: 50 × $3 + 400 × $15 + 10,000 × $0.30 + 1,000 × $3.75 + 2,000 × $6 = $24,900 per million,
    # + 3 searches × $10 / 1,000
    assert cost("anthropic", "claude-sonnet-4-5", "claude-sonnet", usage) == 24_900_000 + 30_000_000


def test_cache_writes_without_their_split_are_five_minute_writes():
    usage, _ = read_answer(
        json.dumps(
            {
                "usage": {
                    "input_tokens": 10,
                    "cache_creation_input_tokens": 500,
                    "cache_read_input_tokens": 0,
                    "output_tokens": 20,
                }
            }
        ).encode()
    )
    assert usage == Usage(input=10, output=20, cache_write_5m=500)
    # Haiku 4.5: 10 × $1 + 20 × $5 + 500 × $1.25 = $735 per million
    assert cost("anthropic", "claude-haiku-4-5", "claude-haiku", usage) == 735_000


def claude_stream(final_usage: dict, cut_short: bool = False) -> bytes:
    start = {k: v for k, v in MESSAGE_USAGE.items() if k != "server_tool_use"} | {"output_tokens": 1}
    events = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "usage": start},
            },
        ),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Found it."}},
        ),
    ]
    if not cut_short:
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": final_usage}),
            ("message_stop", {"type": "message_stop"}),
        ]
    return sse(*events)


def test_a_claude_stream_merges_message_start_with_the_final_figures():
    # Current API versions repeat the input and cache figures in message_delta; older ones send the output only.
    repeated = {
        k: MESSAGE_USAGE[k]
        for k in (
            "input_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
            "output_tokens",
            "server_tool_use",
        )
    }
    assert metered("anthropic", claude_stream(repeated)) == MESSAGE_READ
    assert metered("anthropic", claude_stream({"output_tokens": 400})) == Usage(
        input=50, output=400, cache_read=10000, cache_write_5m=1000, cache_write_1h=2000
    )


def test_a_claude_stream_cut_short_keeps_the_prompt_figures_and_estimates_the_output():
    assert metered("anthropic", claude_stream({}, cut_short=True)) == Usage(
        input=50, output=3, cache_read=10000, cache_write_5m=1000, cache_write_1h=2000, estimated=True
    )  # 9 chars


def test_usage_counts_are_the_stores_spent_figures():
    assert set(MESSAGE_READ.counts()) | {"used", "reserved", "reserved_nanousd", "cost_nanousd"} == set(USAGE_FIGURES)


# -- prices ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "api, model, family, figures",
    [
        ("anthropic", "claude-opus-4-5-20251101", "claude-opus", (5, 25, "0.5", "6.25", 10)),
        ("anthropic", "claude-opus-4-1-20250805", "claude-opus", (15, 75, "1.5", "18.75", 30)),
        ("anthropic", "claude-opus-4-20250514", "claude-opus", (15, 75, "1.5", "18.75", 30)),
        ("anthropic", "claude-sonnet-4-5", "claude-sonnet", (3, 15, "0.3", "3.75", 6)),
        ("anthropic", "claude-3-7-sonnet-latest", "claude-sonnet", (3, 15, "0.3", "3.75", 6)),
        ("anthropic", "Claude-Haiku-4-5", "claude-haiku", (1, 5, "0.1", "1.25", 2)),
        ("anthropic", "claude-3-5-haiku-latest", "claude-haiku", ("0.8", 4, "0.08", 1, "1.6")),
        ("anthropic", "claude-instant-1.2", "claude", (15, 75, "1.5", "18.75", 30)),  # the service's fallback
        ("openai", "gpt-4o-2024-08-06", "gpt4o", ("2.5", 10, "1.25", 0, 0)),
        ("openai", "gpt-4o-mini", "gpt4o", ("0.15", "0.6", "0.075", 0, 0)),
        ("openai", "gpt-4.1", "gpt4.1", (2, 8, "0.5", 0, 0)),
        ("openai", "gpt-4.1-nano", "gpt4.1", ("0.1", "0.4", "0.025", 0, 0)),
        ("openai", "gpt-5.1", "gpt5", ("1.25", 10, "0.125", 0, 0)),
        ("openai", "gpt-5-mini", "gpt5", ("0.25", 2, "0.025", 0, 0)),
        ("openai", "o3", "o", (2, 8, "0.5", 0, 0)),
        ("openai", "o4-mini", "o", ("1.1", "4.4", "0.275", 0, 0)),
        ("openai", "gpt-6-astra", "gpt6", ("2.5", 10, "1.25", 0, 0)),  # the service's fallback
    ],
)
def test_the_default_table_prices_models_by_their_first_matching_entry(api, model, family, figures):
    price = price_of(PRICES, api, model, family)
    given = (price.input, price.output, price.cache_read, price.cache_write_5m, price.cache_write_1h)
    assert given == tuple(Decimal(str(figure)) for figure in figures) and price.web_search == 10


def test_price_entries_may_leave_out_trailing_figures_and_name_families_or_services():
    table = parse_prices(["gpt-4o*=2.5/10", "claude-haiku=1/5/0.1/1.25/2/25", "openai=1/2/0.5", "anthropic=3/15"])
    assert price_of(table, "openai", "GPT-4o-mini", "gpt4o") == Price(
        *map(Decimal, ("2.5", "10", "2.5", "2.5", "2.5", "10"))
    )
    assert price_of(table, "anthropic", "claude-haiku-4-5", "claude-haiku").web_search == 25
    assert price_of(table, "openai", "o3", "o").cache_read == Decimal("0.5")
    assert price_of(table, "anthropic", "claude-sonnet-4-5", "claude-sonnet").input == 3


@pytest.mark.parametrize(
    "entries, message",
    [
        (["gpt-4o*=2.5", "openai=1/2", "anthropic=1/2"], "MODEL_PRICES entries look like"),
        (["gpt-4o*=2.5/ten", "openai=1/2", "anthropic=1/2"], "not 'gpt-4o*=2.5/ten'"),
        (["gpt-4o*=2.5/-10", "openai=1/2", "anthropic=1/2"], "MODEL_PRICES entries look like"),
        (["=2.5/10", "openai=1/2", "anthropic=1/2"], "MODEL_PRICES entries look like"),
        (["x=1/2/3/4/5/6/7", "openai=1/2", "anthropic=1/2"], "MODEL_PRICES entries look like"),
        (["x=nan/2", "openai=1/2", "anthropic=1/2"], "MODEL_PRICES entries look like"),
        (["openai=1/2"], "add anthropic="),
    ],
)
def test_a_bad_price_table_stops_start_up_with_one_sentence(entries, message):
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        parse_prices(entries)


def test_the_worst_case_prices_the_prompt_at_the_dearest_input_side_price():
    sonnet = price_of(PRICES, "anthropic", "claude-sonnet-4-5", "claude-sonnet")
    assert sonnet.worst_case(prompt=1000, output=100) == (1000 * 6 + 100 * 15) * 1000  # a 1-hour cache write
    gpt4o = price_of(PRICES, "openai", "gpt-4o", "gpt4o")
    assert gpt4o.worst_case(prompt=6, output=100) == 1_015_000
    assert gpt4o.worst_case(6, 100) >= gpt4o.cost(Usage(input=6, output=100))


def test_costs_round_up_to_a_whole_nano_dollar():
    price = parse_prices(["m=0.0001/0", "openai=1/2", "anthropic=1/2"])[0][1]
    assert price.cost(Usage(input=3)) == 1 and price.cost(Usage()) == 0


def test_cost_quotas_are_whole_nano_dollars_of_known_families():
    assert parse_cost_quotas(["gpt4o=0.25", " total = 5 "], ["gpt4o", "claude"]) == {
        "gpt4o": 250_000_000,
        "total": 5_000_000_000,
    }
    for entries, message in (
        (["gpt4o=lots"], "family=usd or total=usd"),
        (["gpt-4o=1"], "no model family"),
        (["gpt4o=-1"], "family=usd or total=usd"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_cost_quotas(entries, ["gpt4o"])


@pytest.mark.parametrize(
    "nanodollars, shown",
    [
        (0, "$0.00"),
        (1_015_000, "$0.001015"),
        (52_500, "$0.0000525"),  # not $5.25e-05
        (1, "$0.000000001"),
        (10_000_000, "$0.01"),
        (12_345_678_901, "$12.35"),
        (1_234_500_000_000, "$1,234.50"),
    ],
)
def test_amounts_read_as_dollars(nanodollars, shown):
    assert format_usd(nanodollars / 1e9) == shown


# -- quota refusals --------------------------------------------------------------------------------------


def user_with(**families: dict) -> dict:
    return {"usage": {family: {**dict.fromkeys(USAGE_FIGURES, 0), **figures} for family, figures in families.items()}}


def test_a_refusal_names_the_quota_the_request_does_not_fit():
    user = user_with(
        gpt4o={"used": 900, "reserved": 50, "cost_nanousd": 4_000_000_000},
        claude={"cost_nanousd": 1_000_000_000, "reserved_nanousd": 500_000_000},
    )
    assert over_quota_message(user, "gpt4o", 100, 10**6, 1000, None, None) == (
        "This request could use up to 100 tokens, more than is left of your gpt4o quota (50 of 1000)."
    )
    assert over_quota_message(user, "gpt4o", 10, 2 * 10**9, 1000, 5 * 10**9, None) == (
        "This request could cost up to $2.00, more than is left of your gpt4o budget ($1.00 of $5.00)."
    )
    assert over_quota_message(user, "gpt4o", 10, 10**9, None, 10 * 10**9, 6 * 10**9) == (
        "This request could cost up to $1.00, more than is left of your budget for all models ($0.50 of $6.00)."
    )


# -- tools the provider runs -----------------------------------------------------------------------------


def test_tools_the_client_runs_are_not_server_tools():
    assert (
        server_tools(
            {
                "tools": [
                    {"name": "get_weather", "input_schema": {"type": "object"}},
                    {"type": "custom", "name": "lookup"},
                    {"type": "bash_20250124", "name": "bash"},
                    {"type": "text_editor_20250728", "name": "text_editor"},
                    {"type": "computer_20250124", "name": "computer"},
                    {"type": "memory_20250818", "name": "memory"},
                    {"type": "function", "name": "f", "parameters": {}},
                    {"type": "local_shell"},
                    {"type": "apply_patch"},
                    {"type": "computer_use_preview", "display_width": 1024},
                ]
            }
        )
        == []
    )
    assert server_tools({"messages": [], "tools": "not a list"}) == []


def test_server_tools_of_both_apis_are_named():
    claude = {
        "tools": [
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
            {"type": "code_execution_20250825", "name": "code_execution"},
            {"type": "web_fetch_20250910", "name": "web_fetch"},
            {"name": "mine", "input_schema": {}},
        ],
        "mcp_servers": [{"type": "url", "url": "https://example.com/sse", "name": "x"}],
    }
    assert server_tools(claude) == [
        "web_search_20250305",
        "code_execution_20250825",
        "web_fetch_20250910",
        "mcp_servers",
    ]
    responses = {
        "tools": [
            {"type": "web_search"},
            {"type": "web_search_preview"},
            {"type": "file_search"},
            {"type": "code_interpreter", "container": {"type": "auto"}},
            {"type": "image_generation"},
            {"type": "mcp", "server_label": "x"},
            {"type": "web_search"},
        ]
    }
    assert server_tools(responses) == [
        "web_search",
        "web_search_preview",
        "file_search",
        "code_interpreter",
        "image_generation",
        "mcp",
    ]
    codex = {"input": [{"type": "additional_tools", "tools": [{"type": "web_search"}]}, {"role": "user"}]}
    assert server_tools(codex) == ["web_search"]
    assert server_tools({"messages": [], "web_search_options": {}}) == ["web_search_options"]  # search, defaults
    assert server_tools({"messages": [], "mcp_servers": [], "web_search_options": None}) == []
