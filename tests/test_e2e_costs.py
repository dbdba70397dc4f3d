"""Usage priced the way the providers price it, end to end: every usage shape of both APIs, streamed and not, as
/admin/users shows it; USD quotas under concurrency; server tools refused on request; costs on the status page,
in PAGE_BODY tags, in the metrics and on /user/usage.

Each expected cost is worked out here from the usage the client itself received and the default prices of the
fake's models (gpt-4o, gpt-5.4 priced as gpt-5, claude-sonnet-5 as Sonnet).
"""

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmproxy.pricing import format_usd
from tests.conftest import OPENAI_KEYS, proxy_env
from tests.harness import ProxyProcess, wait_until
from tests.test_e2e_users import ADMIN_KEY, Admin

pytestmark = pytest.mark.e2e

CHAT = "/proxy/openai/v1/chat/completions"
RESPONSES = "/proxy/openai/v1/responses"
MESSAGES = "/proxy/anthropic/v1/messages"
# USD per million tokens: input, output, cache read, cache write 5m, cache write 1h (config.yaml's model_prices).
GPT_4O = ("2.5", "10", "1.25", "0", "0")
GPT_5 = ("1.25", "10", "0.125", "0", "0")
SONNET = ("3", "15", "0.3", "3.75", "6")
WEB_SEARCH = 10_000_000  # nano-dollars: $10 per 1,000


def expected(
    price: tuple,
    input: int,
    output: int,
    cache_read: int = 0,
    cache_write_5m: int = 0,
    cache_write_1h: int = 0,
    reasoning: int = 0,
    web_searches: int = 0,
) -> dict:
    """A family's figures after one request, as /admin/users shows them."""
    tokens = (input, output, cache_read, cache_write_5m, cache_write_1h)
    nanodollars = (
        int(sum(n * Decimal(p) for n, p in zip(tokens, price, strict=True)) * 1000) + web_searches * WEB_SEARCH
    )
    return {
        "used": sum(tokens),
        "reserved": 0,
        "reserved_usd": 0.0,
        "cost_usd": nanodollars / 1e9,
        "input": input,
        "output": output,
        "cache_read": cache_read,
        "cache_write_5m": cache_write_5m,
        "cache_write_1h": cache_write_1h,
        "reasoning": reasoning,
        "web_searches": web_searches,
    }


@pytest.fixture(scope="module")
def users_proxy(fake, tmp_path_factory):
    env = proxy_env(
        fake, GATEKEEPER="user_token", ADMIN_KEY=ADMIN_KEY, DATA_DIR=str(tmp_path_factory.mktemp("costs") / "data")
    )
    with ProxyProcess(env) as proxy:
        yield proxy


def openai_for(proxy, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/proxy/openai/v1", api_key=token, max_retries=0)


def anthropic_for(proxy, token: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{proxy.url}/proxy/anthropic", api_key=token, max_retries=0)


def cached(details) -> int:
    return (details.cached_tokens or 0) if details else 0


def chat_buffered(proxy, token):
    usage = (
        openai_for(proxy, token)
        .chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "price this"}])
        .usage
    )
    read = cached(usage.prompt_tokens_details)
    return "gpt4o", expected(GPT_4O, usage.prompt_tokens - read, usage.completion_tokens, read)


def chat_streamed(proxy, token):
    chunks = list(
        openai_for(proxy, token).chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "price this #fake:events=4"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    read = cached(usage.prompt_tokens_details)
    return "gpt4o", expected(GPT_4O, usage.prompt_tokens - read, usage.completion_tokens, read)


def responses_usage(response) -> tuple[str, dict]:
    usage, searches = response.usage, sum(item.type == "web_search_call" for item in response.output)
    read = cached(usage.input_tokens_details)
    return "gpt5", expected(
        GPT_5,
        usage.input_tokens - read,
        usage.output_tokens,
        read,
        reasoning=usage.output_tokens_details.reasoning_tokens,
        web_searches=searches,
    )


def responses_buffered(proxy, token):
    return responses_usage(
        openai_for(proxy, token).responses.create(model="gpt-5.4", input="price this", reasoning={"effort": "low"})
    )


def responses_streamed(proxy, token):
    events = list(
        openai_for(proxy, token).responses.create(
            model="gpt-5.4", input="price this", reasoning={"effort": "low"}, stream=True
        )
    )
    assert events[-1].type == "response.completed"
    return responses_usage(events[-1].response)


def claude_usage(usage) -> tuple[str, dict]:
    split = usage.cache_creation
    one_hour = split.ephemeral_1h_input_tokens if split else 0
    searches = usage.server_tool_use.web_search_requests if usage.server_tool_use else 0
    writes, reads = usage.cache_creation_input_tokens or 0, usage.cache_read_input_tokens or 0
    return "claude-sonnet", expected(
        SONNET, usage.input_tokens, usage.output_tokens, reads, writes - one_hour, one_hour, web_searches=searches
    )


def claude_buffered(proxy, token):
    answer = anthropic_for(proxy, token).messages.create(
        model="claude-sonnet-5", max_tokens=200, messages=[{"role": "user", "content": "look up #fake:server_tool=1"}]
    )
    assert answer.usage.server_tool_use.web_search_requests == 1
    return claude_usage(answer.usage)


def claude_streamed(proxy, token):
    with anthropic_for(proxy, token).messages.stream(
        model="claude-sonnet-5",
        max_tokens=4096,
        thinking={"type": "enabled", "budget_tokens": 2048},
        messages=[{"role": "user", "content": "look up #fake:server_tool=1"}],
    ) as stream:
        final = stream.get_final_message()
    assert final.usage.server_tool_use.web_search_requests == 1
    return claude_usage(final.usage)


def claude_in_chat_format(proxy, token):
    client = openai.OpenAI(base_url=f"{proxy.url}/proxy/anthropic/v1", api_key=token, max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="claude-sonnet-5",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    return "claude-sonnet", expected(SONNET, usage.prompt_tokens, usage.completion_tokens)


@pytest.mark.parametrize(
    "shape",
    [
        chat_buffered,
        chat_streamed,
        responses_buffered,
        responses_streamed,
        claude_buffered,
        claude_streamed,
        claude_in_chat_format,
    ],
)
def test_each_usage_shape_is_recorded_and_priced_exactly(users_proxy, shape):
    admin = Admin(users_proxy)
    token, user = admin.create(nickname=shape.__name__)
    family, figures = shape(users_proxy, token)
    shown = admin.user(user["id"])
    assert shown["usage"] == {family: figures} and shown["cost_usd"] == figures["cost_usd"] > 0
    listed = {u["id"]: u for u in admin.get("/users").json()["users"]}[user["id"]]
    assert listed["usage"] == shown["usage"] and listed["cost_usd"] == shown["cost_usd"]
    own = httpx.get(f"{users_proxy.url}/user/usage", headers={"authorization": f"Bearer {token}"}).json()
    assert own["costUsd"] == figures["cost_usd"] and own["costLimitUsd"] is None
    assert own["usage"][family] == {**figures, "limit": None, "cost_limit_usd": None}


def test_the_user_list_sums_everyones_cost(users_proxy):
    listed = Admin(users_proxy).get("/users?sort=cost_usd").json()
    costs = [user["cost_usd"] for user in listed["users"]]
    assert costs == sorted(costs, reverse=True)
    assert listed["cost_usd"] == pytest.approx(sum(costs), abs=1e-9)


@pytest.fixture
def user_proxy(start_proxy, fake, tmp_path):
    def start(**settings) -> tuple[ProxyProcess, Admin]:
        proxy = start_proxy(
            proxy_env(fake, GATEKEEPER="user_token", ADMIN_KEY=ADMIN_KEY, DATA_DIR=str(tmp_path / "data"), **settings)
        )
        return proxy, Admin(proxy)

    return start


def test_fifty_parallel_requests_against_a_usd_quota_for_five(user_proxy, fake):
    # Each request reserves its worst case: its prompt's upper estimate (8 tokens: OpenAI's chat formula) at
    # gpt-4o's input price and 100 output tokens, 8 × $2.50 + 100 × $10 per million = $0.00102; the quota holds
    # five of them.
    proxy, admin = user_proxy(COST_QUOTAS="gpt4o=0.0051")
    token, user = admin.create()
    body = {"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": "x"}]}

    def send(_):
        return httpx.post(f"{proxy.url}{CHAT}", json=body, headers={"authorization": f"Bearer {token}"}, timeout=30)

    for key in OPENAI_KEYS:
        fake.set_key_behaviour(key, "slow", delay_ms=3000)  # all fifty are in flight at once
    with ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(send, range(50)))
    statuses = [response.status_code for response in responses]
    assert 1 <= statuses.count(200) <= 5 and statuses.count(429) == 50 - statuses.count(200)
    refused = next(response for response in responses if response.status_code == 429).json()["error"]
    assert refused["code"] == "quota_exceeded" and "could cost up to $0.00102," in refused["message"]
    usage = admin.user(user["id"])["usage"]["gpt4o"]
    assert usage["reserved"] == 0 and usage["reserved_usd"] == 0 and 0 < usage["cost_usd"] <= 0.0051
    billed = [response.json()["usage"] for response in responses if response.status_code == 200]
    assert usage["cost_usd"] == sum(u["prompt_tokens"] * 2500 + u["completion_tokens"] * 10_000 for u in billed) / 1e9


def test_a_total_usd_quota_spans_every_family_and_refuses_in_each_apis_format(user_proxy, fake):
    proxy, admin = user_proxy(COST_QUOTAS="total=0.002")
    token, user = admin.create()
    client, claude = openai_for(proxy, token), anthropic_for(proxy, token)
    client.chat.completions.create(model="gpt-4o", max_tokens=100, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.RateLimitError) as refused:  # 200 × $15 per million alone is $0.003
        claude.messages.create(model="claude-sonnet-5", max_tokens=200, messages=[{"role": "user", "content": "x"}])
    assert "more than is left of your budget for all models" in refused.value.message
    assert refused.value.response.headers["x-proxy-error"] == "quota_exceeded"
    assert claude.messages.create(model="claude-sonnet-5", max_tokens=50, messages=[{"role": "user", "content": "x"}])
    spent = admin.user(user["id"])
    assert set(spent["usage"]) == {"gpt4o", "claude-sonnet"} and 0 < spent["cost_usd"] <= 0.002
    own = httpx.get(f"{proxy.url}/user/usage", headers={"authorization": f"Bearer {token}"}).json()
    assert own["costLimitUsd"] == 0.002 and own["costUsd"] == spent["cost_usd"]
    special, _ = admin.create(type="special")  # exempt from quotas, USD ones too
    assert anthropic_for(proxy, special).messages.create(
        model="claude-sonnet-5", max_tokens=1000, messages=[{"role": "user", "content": "x"}]
    )


def test_server_tools_are_refused_when_the_owner_says_so(start_proxy, fake):
    proxy = start_proxy(proxy_env(fake, ALLOW_SERVER_TOOLS="false"))
    search = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}
    refused = httpx.post(
        f"{proxy.url}{MESSAGES}",
        json={
            "model": "claude-sonnet-5",
            "max_tokens": 50,
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"name": "mine", "input_schema": {"type": "object"}}, search],
        },
    )
    assert refused.status_code == 400 and refused.headers["x-proxy-error"] == "server_tools_not_allowed"
    assert refused.json() == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": (
                "This proxy does not pass on tools the provider runs itself (web_search_20250305); "
                "send only tools your client runs."
            ),
        },
    }
    for path, body in (
        (RESPONSES, {"model": "gpt-5.4", "input": "x", "tools": [{"type": "web_search"}]}),
        (RESPONSES, {"model": "gpt-5.4", "input": [{"type": "additional_tools", "tools": [{"type": "file_search"}]}]}),
        (CHAT, {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "web_search_options": {}}),
    ):
        answer = httpx.post(f"{proxy.url}{path}", json=body)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "server_tools_not_allowed"
    assert fake.requests == []
    with pytest.raises(anthropic.BadRequestError, match="web_search_20250305"):
        anthropic.Anthropic(base_url=f"{proxy.url}/proxy/anthropic", api_key="x", max_retries=0).messages.create(
            model="claude-sonnet-5", max_tokens=50, messages=[{"role": "user", "content": "x"}], tools=[search]
        )
    client_run = [{"name": "mine", "input_schema": {"type": "object"}}, {"type": "bash_20250124", "name": "bash"}]
    assert (
        httpx.post(
            f"{proxy.url}{MESSAGES}",
            json={
                "model": "claude-sonnet-5",
                "max_tokens": 50,
                "tools": client_run,
                "messages": [{"role": "user", "content": "x"}],
            },
        ).status_code
        == 200
    )
    assert (
        httpx.post(
            f"{proxy.url}{RESPONSES}",
            json={
                "model": "gpt-5.4",
                "input": "x",
                "tools": [{"type": "function", "name": "f", "parameters": {}}, {"type": "custom", "name": "exec"}],
            },
        ).status_code
        == 200
    )
    counted = httpx.post(
        f"{proxy.url}/proxy/anthropic/v1/messages/count_tokens",
        json={"model": "claude-sonnet-5", "messages": [{"role": "user", "content": "x"}], "tools": [search]},
    )
    assert counted.status_code == 200  # a token count runs nothing


def test_server_tools_pass_by_default(proxy, fake):
    answer = httpx.post(
        f"{proxy.url}{MESSAGES}",
        json={
            "model": "claude-sonnet-5",
            "max_tokens": 50,
            "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            "messages": [{"role": "user", "content": "x #fake:server_tool=1"}],
        },
    )
    assert answer.status_code == 200 and json.loads(fake.requests[-1].body)["tools"][0]["type"] == "web_search_20250305"


def samples_of(proxy) -> dict:
    text = httpx.get(f"{proxy.url}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_show_token_costs_puts_costs_on_the_status_page_tags_and_metrics(start_proxy, fake):
    template = "<p>[{cost}] [{claude-sonnet:tokens}] [{claude-sonnet:cost}] [{anthropic:cost}] [{gpt4o:cost}]</p>"
    page_body = base64.b64encode(template.encode()).decode()
    shown = start_proxy(proxy_env(fake, SHOW_TOKEN_COSTS="true"))
    tagged = start_proxy(proxy_env(fake, SHOW_TOKEN_COSTS="true", PAGE_BODY=page_body))
    hidden = start_proxy(proxy_env(fake, PAGE_BODY=page_body))
    spent = {}
    for proxy in (shown, tagged, hidden):
        answer = anthropic_for(proxy, "x").messages.create(
            model="claude-sonnet-5", max_tokens=50, messages=[{"role": "user", "content": "x #fake:server_tool=1"}]
        )
        spent[proxy.url] = claude_usage(answer.usage)[1]
    figures = spent[shown.url]
    # The page's figures are cached for 1.5 s: wait until they include the request.
    status = wait_until(lambda: (answer := httpx.get(f"{shown.url}/status").json())["tookens"] and answer)
    assert status["costUsd"] == figures["cost_usd"] and status["tookens"] == figures["used"]
    assert status["families"]["claude-sonnet"]["tokens"] == figures["used"]
    assert status["families"]["claude-sonnet"]["costUsd"] == figures["cost_usd"]
    assert status["families"]["gpt4o"]["costUsd"] == 0
    money = format_usd(figures["cost_usd"])
    page = httpx.get(f"{shown.url}/").text
    assert f"{figures['used']} tokens served ({money})" in page and "Tokens (cost)" in page
    figures = spent[tagged.url]
    money = format_usd(figures["cost_usd"])
    tagged_page = f"<p>[{money}] [{figures['used']}] [{money}] [{money}] [$0.00]</p>"
    wait_until(lambda: httpx.get(f"{tagged.url}/").text == tagged_page)
    assert httpx.get(f"{hidden.url}/").text == "<p>[] [] [] [] []</p>"
    assert "costUsd" not in httpx.get(f"{hidden.url}/status").text
    samples = samples_of(hidden)  # the metrics count costs whether or not the page shows them
    figures = spent[hidden.url]
    assert samples[("llmproxy_cost_usd_total", (("family", "claude-sonnet"),))] == pytest.approx(figures["cost_usd"])
    assert samples[("llmproxy_web_searches_total", (("family", "claude-sonnet"),))] == 1
    for kind in ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h"):
        labels = (("family", "claude-sonnet"), ("kind", kind))
        assert samples[("llmproxy_tokens_by_kind_total", labels)] == figures[kind]
