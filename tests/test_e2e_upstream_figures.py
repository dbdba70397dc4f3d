"""Odd figures in what the upstream says (issue 16), end to end against the fake.

Usage figures that are negative, huge, fractional or no number at all, rate-limit and retry-after headers of the
same kinds, and odd response ids: the client gets the upstream's answer as it came, the user gains no quota from
them, the oddity is logged naming the field, and the pool keeps serving. One proxy serves the whole module; the
last tests check the same rules where the figures are read.
"""

import inspect
import json
import math
import re
from dataclasses import dataclass

import httpx
import pytest
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from addons.apierrors import fail_closed
from addons.flowstate import flow_state
from llmproxy.api.usage import StreamMeter, read_answer
from llmproxy.pool.keys import DEFAULT_COOLDOWN, read_limits, retry_after
from tests.conftest import ANTHROPIC_KEYS, CANARY, OPENAI_KEYS, proxy_env
from tests.harness import ProxyProcess, wait_until
from tests.test_e2e_users import ADMIN_KEY, Admin

MAX_TOKENS = 50  # every request's output allowance, which the proxy reserves
# Far above what one of these short requests can honestly use (a few prompt tokens and MAX_TOKENS), far below every
# odd figure: a settled usage above it took an odd figure for a count.
SANE_USE = 1_000
ODD_VALUES = {
    "negative": -1,
    "huge": 10**30,
    "2**63": 2**63,
    "text": "abc",
    "object": {},
    "list": [1],
    "infinity": math.inf,
    "nan": math.nan,
}
QUEUE_TIMEOUT = 5  # seconds; a pool stuck on an odd figure fails fast instead of after the default five minutes


@dataclass(frozen=True)
class Endpoint:
    path: str
    model: str
    family: str
    figures: dict[str, str]  # a usage figure (dotted when nested) -> what it counts: prompt, output or detail
    ends: str  # what the last event of a complete stream contains

    def body(self, text: str, stream: bool) -> dict:
        if self.path.endswith("/responses"):
            return {"model": self.model, "input": text, "max_output_tokens": MAX_TOKENS, "stream": stream}
        if self.path.endswith("/completions") and "chat" not in self.path:
            # A stream without include_usage: the proxy asks for the usage chunk and takes it out again.
            return {"model": self.model, "prompt": text, "max_tokens": MAX_TOKENS, "stream": stream}
        body = {
            "model": self.model,
            "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": text}],
            "stream": stream,
        }
        return body | ({"stream_options": {"include_usage": True}} if stream and "openai" in self.path else {})


ENDPOINTS = {
    "chat": Endpoint(
        "/proxy/openai/v1/chat/completions",
        "gpt-4o",
        "gpt4o",
        {
            "prompt_tokens": "prompt",
            "completion_tokens": "output",
            "prompt_tokens_details.cached_tokens": "prompt",
            "completion_tokens_details.reasoning_tokens": "detail",
        },
        "[DONE]",
    ),
    "completions": Endpoint(
        "/proxy/openai/v1/completions",
        "gpt-3.5-turbo-instruct",
        "turbo",
        {"prompt_tokens": "prompt", "completion_tokens": "output"},
        "[DONE]",
    ),
    "responses": Endpoint(
        "/proxy/openai/v1/responses",
        "gpt-4o",
        "gpt4o",
        {
            "input_tokens": "prompt",
            "output_tokens": "output",
            "input_tokens_details.cached_tokens": "prompt",
            "output_tokens_details.reasoning_tokens": "detail",
        },
        "response.completed",
    ),
    # The fake's answers search the web once, so that a search count has a true value to compare with.
    "messages": Endpoint(
        "/proxy/anthropic/v1/messages",
        "claude-sonnet-4-5",
        "claude-sonnet",
        {
            "input_tokens": "prompt",
            "output_tokens": "output",
            "cache_read_input_tokens": "prompt",
            "cache_creation_input_tokens": "prompt",
            "cache_creation.ephemeral_1h_input_tokens": "prompt",
            "server_tool_use.web_search_requests": "detail",
        },
        "message_stop",
    ),
}
# The whole usage object replaced: both the prompt and the output count as reserved.
WHOLE_USAGE = {"text": "abc", "list": [1], "number": 5}


def nested(path: str, value) -> dict:
    """`{"a": {"b": value}}` for the path `a.b`."""
    for name in reversed(path.split(".")):
        value = {name: value}
    return value


def compact(value) -> str:
    """JSON as the fake writes it in SSE events (and as a directive carries it: one word)."""
    return json.dumps(value, separators=(",", ":"))


def as_written(value, stream: bool) -> str:
    """JSON as the fake writes it: compact in SSE events, with spaces in a JSON answer."""
    return compact(value) if stream else json.dumps(value)


@pytest.fixture(scope="module")
def proxy(fake, tmp_path_factory):
    env = proxy_env(
        fake,
        GATEKEEPER="user_token",
        ADMIN_KEY=ADMIN_KEY,
        QUEUE_TIMEOUT=str(QUEUE_TIMEOUT),
        DATA_DIR=str(tmp_path_factory.mktemp("data")),
    )
    with ProxyProcess(env) as process:
        yield process
    assert CANARY not in process.log()  # no key in any warning about an answer


@pytest.fixture(scope="module")
def admin(proxy):
    return Admin(proxy)


def post(proxy, token: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{proxy.url}{path}", json=body, headers={"authorization": f"Bearer {token}"}, timeout=30)


def logged_after(proxy, start: int, pattern: str) -> str:
    """The first line the proxy logged after `start` characters that matches `pattern` (a stream is settled as it
    ends, a moment after the client read its last byte)."""
    return wait_until(lambda: re.search(f".*{pattern}.*", proxy.log()[start:])).group(0)


def settled(admin, user_id: str, family: str) -> dict:
    """The user's figures for the family once no reservation is left."""
    return wait_until(lambda: (figures := admin.user(user_id)["usage"][family])["reserved"] == 0 and figures)


def minus(after: dict, before: dict) -> dict:
    return {name: after[name] - before[name] for name in after}


def prompt_of(figures: dict) -> int:
    return sum(figures[name] for name in ("input", "cache_read", "cache_write_5m", "cache_write_1h"))


def served_intact(response: httpx.Response, stream: bool, endpoint: Endpoint, sent: str | None) -> None:
    """The client got the fake's answer as the fake sent it: its status, its text, the odd figure as written, and
    for a stream every event up to the last."""
    assert response.status_code == 200, response.text
    assert ("Hello" if stream else "Hello from the fake upstream.") in response.text  # a stream has it in pieces
    if stream:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert endpoint.ends in response.text.strip().splitlines()[-1]
    if sent is not None:
        assert sent in response.text


def odd_cases():
    for endpoint_name, endpoint in ENDPOINTS.items():
        for stream in (False, True):
            mode = "stream" if stream else "json"
            for figure, counts in endpoint.figures.items():
                for value_name, value in ODD_VALUES.items():
                    yield pytest.param(
                        endpoint,
                        stream,
                        figure,
                        counts,
                        nested(figure, value),
                        id=f"{endpoint_name}-{mode}-{figure}-{value_name}",
                    )
            for value_name, value in WHOLE_USAGE.items():
                yield pytest.param(
                    endpoint, stream, "usage", "both", value, id=f"{endpoint_name}-{mode}-usage-{value_name}"
                )


@pytest.mark.parametrize("endpoint, stream, figure, counts, override", list(odd_cases()))
@pytest.mark.e2e
def test_an_odd_usage_figure_neither_fails_the_answer_nor_gives_quota(
    proxy, admin, endpoint, stream, figure, counts, override
):
    """The user is billed no less than the same request's true figures, and a prompt or output figure that is no
    count counts as much as the proxy reserved for it: an upstream's error never gives quota."""
    token, user = admin.create()
    log_start = len(proxy.log())
    odd = post(
        proxy, token, endpoint.path, endpoint.body(f"hi #fake:server_tool=1 #fake:usage={compact(override)}", stream)
    )
    dropped = stream and endpoint.path.endswith("/v1/completions")  # the usage chunk the proxy asked for itself
    figures_as_sent = as_written(override if isinstance(override, dict) else {"usage": override}, stream)[1:-1]
    served_intact(odd, stream, endpoint, None if dropped else figures_as_sent)
    after_odd = settled(admin, user["id"], endpoint.family)

    # The same request with true figures: what the odd answer would have cost had the upstream not erred.
    honest = post(proxy, token, endpoint.path, endpoint.body('hi #fake:server_tool=1 #fake:usage={"honest":0}', stream))
    served_intact(honest, stream, endpoint, None)
    true_figures = minus(settled(admin, user["id"], endpoint.family), after_odd)

    assert after_odd["reserved"] == 0 and after_odd["reserved_usd"] == 0  # settled, not left hanging
    counts_of = {name: value for name, value in after_odd.items() if name not in ("cost_usd", "reserved_usd")}
    assert all(isinstance(value, int) and 0 <= value <= SANE_USE for value in counts_of.values()), after_odd
    # Never a gain: at least what the true figures count, in tokens and in dollars.
    assert after_odd["used"] >= true_figures["used"] > 0
    assert after_odd["cost_usd"] >= true_figures["cost_usd"] > 0
    assert after_odd["web_searches"] >= true_figures["web_searches"]
    if counts in ("output", "both"):  # an odd output counts as the whole allowance the proxy reserved for it
        assert after_odd["output"] >= MAX_TOKENS
    if counts in ("prompt", "both"):
        assert prompt_of(after_odd) >= prompt_of(true_figures)
    logged_after(proxy, log_start, rf"usage figures that are no count \(.*{re.escape(figure)}")


@pytest.mark.e2e
def test_an_answer_without_usage_is_billed_as_estimated_like_a_stream(proxy, admin):
    """Anthropic's legacy text completions report no usage at all: the proxy estimates, as it does for a stream."""
    token, user = admin.create()
    body = {"model": "claude-2.1", "prompt": "\n\nHuman: hi\n\nAssistant:", "max_tokens_to_sample": MAX_TOKENS}
    answer = post(proxy, token, "/proxy/anthropic/v1/complete", body)
    assert answer.status_code == 200 and "usage" not in answer.json()
    figures = settled(admin, user["id"], "claude")
    assert figures["input"] > 0 and figures["output"] == -(-len(answer.json()["completion"]) // 4)


# -- rate-limit and retry-after headers ------------------------------------------------------------------------------

ODD_WAITS = {
    "negative": "-5",
    "nan": "NaN",
    "infinity": "Infinity",
    "overflow": "1e400",
    "huge": str(10**30),
    "hours": "99999999h",
    "text": "soon",
    "empty": "",
}
ODD_RESETS = {
    **ODD_WAITS,
    "year 9999": "9999-12-31T23:59:59Z",
    "year 0": "0000-01-01T00:00:00Z",
    "no date": "2025-13-45T99:99:99Z",
}
SERVICES = {  # the endpoint, the request count's remaining and reset headers, the token count's reset, the keys
    "openai": (
        ENDPOINTS["chat"],
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-reset-tokens",
        OPENAI_KEYS,
    ),
    "anthropic": (
        ENDPOINTS["messages"],
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-tokens-reset",
        ANTHROPIC_KEYS,
    ),
}


def rate_limit_cases(values: dict[str, str]):
    return [
        pytest.param(service, value, id=f"{service}-{name}") for service in SERVICES for name, value in values.items()
    ]


@pytest.mark.parametrize("service, reset", rate_limit_cases(ODD_RESETS))
@pytest.mark.e2e
def test_an_odd_reset_on_an_answer_does_not_take_its_key_out_of_service(proxy, admin, fake, service, reset):
    """Every key answers "none left, the window resets at <odd>": believed, the pool would have no key for ages."""
    endpoint, remaining, reset_header, tokens_reset, keys = SERVICES[service]
    token, _ = admin.create()
    log_start = len(proxy.log())
    for key in keys:
        fake.set_key_behaviour(key, "ok", headers={remaining: "0", reset_header: reset, tokens_reset: reset})

    def every_key_answered() -> bool:
        answer = post(proxy, token, endpoint.path, endpoint.body(f"hi {len(fake.requests)}", False))  # new each time
        served_intact(answer, False, endpoint, None)
        assert answer.headers[reset_header] == reset  # passed on to the client as the upstream sent it
        return {recorded.key for recorded in fake.requests} == set(keys)

    wait_until(every_key_answered)
    logged_after(proxy, log_start, rf"{re.escape(reset_header)}.*held no believable figure")
    # Within QUEUE_TIMEOUT, or the client gets a 503: the keys serve on.
    served_intact(post(proxy, token, endpoint.path, endpoint.body("and again", False)), False, endpoint, None)


@pytest.mark.parametrize("service, wait", rate_limit_cases(ODD_WAITS))
@pytest.mark.e2e
def test_an_odd_wait_on_a_429_rests_the_key_a_bounded_time(proxy, admin, fake, service, wait):
    """Each key answers its first request with a 429 whose retry-after and retry-after-ms are odd, and whose reset
    headers say 200 ms: the key rests by the reset (not forever, not not at all), then serves the request."""
    endpoint, _, reset_header, tokens_reset, keys = SERVICES[service]
    token, _ = admin.create()
    log_start = len(proxy.log())
    odd_headers = {"retry-after": wait, "retry-after-ms": wait, reset_header: "200ms", tokens_reset: "200ms"}
    for key in keys:
        fake.set_key_behaviour(key, "rate_limit_for", seconds=0.05, headers=odd_headers)
    answer = post(proxy, token, endpoint.path, endpoint.body("hi", False))
    served_intact(answer, False, endpoint, None)
    assert len(fake.requests) <= 2 * len(keys)  # a 429 and the answer a key: no hammering on a key that said wait
    resting = [rest for key in admin.get("/keys").json()["keys"] for rest in key["resting"].values()]
    assert all(0 <= rest <= 10 for rest in resting), resting  # DEFAULT_COOLDOWN at the most
    logged_after(proxy, log_start, r"retry-after, retry-after-ms held no believable figure")
    fake.reset()
    served_intact(post(proxy, token, endpoint.path, endpoint.body("hi", False)), False, endpoint, None)


# -- response ids --------------------------------------------------------------------------------------------------

ODD_IDS = {
    "number": 5,
    "list": [1],
    "object": {},
    "long": "resp_" + "x" * 5000,
    "space": "resp 1",
    "lone surrogate": "\ud800",
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("made", ODD_IDS.values(), ids=ODD_IDS.keys())
@pytest.mark.e2e
def test_an_odd_response_id_is_passed_on_and_not_remembered(proxy, admin, fake, made, stream):
    token, _ = admin.create()
    endpoint = ENDPOINTS["responses"]
    log_start = len(proxy.log())
    answer = post(proxy, token, endpoint.path, endpoint.body(f"hi #fake:response_id={compact(made)}", stream))
    served_intact(answer, stream, endpoint, as_written({"id": made}, stream)[1:-1])
    logged_after(proxy, log_start, r"response id is no id")
    if isinstance(made, str) and made.isascii():  # a follow-up naming it is no one's conversation: any key serves it
        body = endpoint.body("and then?", False) | {"previous_response_id": made}
        served_intact(post(proxy, token, endpoint.path, body), False, endpoint, None)


# -- what the proxy itself makes of an answer ------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("odd", ['"abc"', '{"output_tokens": -1}', '{"input_tokens": 1e30}', "[1]"])
def test_a_translated_answer_with_an_odd_usage_is_served_whole(proxy, admin, stream, odd):
    """The OpenAI-format Claude endpoint rewrites Claude's usage in OpenAI's shape: an odd figure reads as 0 there,
    as in billing, and the answer arrives whole."""
    token, user = admin.create()
    path = "/proxy/anthropic/v1/chat/completions"
    billed = []
    for usage in (odd, '{"honest": 0}'):
        answer = post(
            proxy,
            token,
            path,
            ENDPOINTS["chat"].body(f"hi #fake:usage={usage}", stream) | {"model": "claude-sonnet-4-5"},
        )
        assert answer.status_code == 200
        if stream:
            assert "Hello" in answer.text and answer.text.strip().splitlines()[-1] == "data: [DONE]"
        else:
            assert answer.json()["choices"][0]["message"]["content"] == "Hello from the fake upstream."
            assert answer.json()["usage"]["total_tokens"] >= 0
        billed.append(settled(admin, user["id"], "claude-sonnet")["used"] - sum(billed))
    assert billed[0] >= billed[1] > 0  # the odd answer costs at least what the honest one does


# -- the same rules, each at its own level -------------------------------------------------------------------------


ODD_EVENTS = [
    b"data: [1, 2]",
    b'data: {"choices": "abc"}',
    b'data: {"choices": [5, null], "usage": 7}',
    b'data: {"choices": [{"delta": "x", "message": 3}]}',
    b'data: {"delta": 5}',
    b'data: {"type": "response.created", "response": 5}',
    b'data: {"type": "response.completed", "response": {"usage": {"input_tokens": -1}}}',
    b'data: {"type": "response.created", "response": {"id": {}}}',
    b'data: {"type": "message_start", "message": "abc"}',
    b'data: {"type": "content_block_start"}',
    b'data: {"type": "content_block_delta", "delta": [1]}',
    b'data: {"type": "message_delta", "usage": [1]}',
    b"data: " + b"[" * 100_000 + b"]" * 100_000,
    b"data: \xff\xfe",
    b"data: NaN",
]


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_reading_a_stream_never_fails_whatever_its_events_hold(api):
    meter = StreamMeter(api, drop_usage_chunk=False)
    for event in ODD_EVENTS:
        assert meter.feed(event + b"\n\n") == event + b"\n\n"  # passed on untouched
    assert meter.finish(prompt_estimate=10).total >= 0


@pytest.mark.parametrize(
    "body",
    [event.removeprefix(b"data: ") for event in ODD_EVENTS]
    + [b'{"choices": "abc", "output": [1, {"content": 5}], "content": {"a": 1}, "completion": [], "usage": {}}'],
)
def test_reading_an_answer_never_fails_whatever_it_holds(body):
    usage, text = read_answer(body)
    assert isinstance(text, str) and (usage is None or usage.total >= 0)


@pytest.mark.parametrize("value", ODD_WAITS.values(), ids=ODD_WAITS.keys())
def test_an_odd_wait_is_passed_over_and_named(value):
    now, odd = 1_000_000.0, set()
    headers = {
        "retry-after": value,
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": value,
    }
    assert retry_after(headers, now, odd) == DEFAULT_COOLDOWN
    assert read_limits(headers, now).until == now and odd == {"retry-after", "x-ratelimit-reset-requests"}


class FailingAfterTheAnswer:
    """An addon whose hooks fail on purpose: what fail_closed makes of a failure once a flow has its answer."""

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        raise RuntimeError("failed on purpose")

    @fail_closed
    async def response(self, flow: http.HTTPFlow) -> None:
        raise RuntimeError("failed on purpose")


class FailingSynchronously:
    """The same with synchronous hooks, which fail_closed keeps synchronous."""

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        raise RuntimeError("failed on purpose")

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        raise RuntimeError("failed on purpose")


async def call(hook, flow: http.HTTPFlow) -> None:
    """Calls a hook as mitmproxy does: a coroutine is awaited."""
    if inspect.isawaitable(result := hook(flow)):
        await result


@pytest.mark.parametrize("failing", [FailingAfterTheAnswer, FailingSynchronously])
async def test_a_failure_after_the_answer_keeps_the_answer(failing):
    flow = tflow.tflow(resp=True)
    state = flow_state(flow)
    state.keys, state.decision = ["oai-1234abcd"], "served"
    answer = flow.response.copy()
    await call(failing().response, flow)
    await call(failing().request, flow)
    assert flow.response.get_state() == answer.get_state() and state.decision == "served"


@pytest.mark.parametrize("failing", [FailingAfterTheAnswer, FailingSynchronously])
@pytest.mark.parametrize(
    "keys, fate", [([], "it was not sent upstream"), (["oai-1234abcd"], "it may have reached the upstream API")]
)
async def test_a_failure_before_the_answer_says_whether_the_request_went_upstream(keys, fate, failing):
    flow = tflow.tflow(req=tutils.treq(path=b"/proxy/openai/v1/chat/completions"))
    flow_state(flow).keys = keys
    assert inspect.iscoroutinefunction(failing.request) == (failing is FailingAfterTheAnswer)
    await call(failing().request, flow)
    assert flow.response.status_code == 500 and fate in json.loads(flow.response.content)["error"]["message"]
