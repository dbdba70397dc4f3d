"""Unit tests of the key pool, the queue's turn order, usage metering, reservations and quota schedules."""

import time

import pytest

from llmproxy.api.usage import StreamMeter, Usage
from llmproxy.pool.keys import (
    ACTIVE,
    REVOKED,
    KeyAffinity,
    KeyPool,
    Limits,
    Verdict,
    classify,
    parse_duration,
    read_limits,
    retry_after,
)
from llmproxy.pool.queue import FamilyQueue, Waiter, WaitQueue
from llmproxy.quota import DEFAULT_OUTPUT_RESERVATION, output_reservation, prompt_estimate
from llmproxy.services import BUILT_IN, pool_keys
from llmproxy.store.storage import Storage


@pytest.fixture
def storage(tmp_path):
    """The store the pool keeps key health and rests in: a SQLite file of the test's own."""
    storage = Storage()
    storage.open(tmp_path / "proxy.sqlite3")
    yield storage
    storage.close()


def make_pool(storage: Storage, *secrets: str) -> KeyPool:
    return KeyPool(pool_keys(BUILT_IN, {"openai_key": list(secrets)}), storage, lambda service: ["gpt4o", "gpt4"])


def answer_with_two_of_ten_left(pool: KeyPool) -> None:
    """The next gpt4o key answers 200 with 2 of its 10 requests a minute left."""
    headers = {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "60s",
    }
    pool.release(pool.choose("openai", "gpt4o"), "gpt4o", 200, headers, b"")


@pytest.mark.parametrize(
    "status, body, verdict",
    [
        (200, b"", Verdict.SUCCESS),
        (429, b'{"error": {"type": "requests", "code": "rate_limit_exceeded"}}', Verdict.RATE_LIMITED),
        (429, b'{"error": {"type": "insufficient_quota", "code": "insufficient_quota"}}', Verdict.OVER_QUOTA),
        (429, b'{"error": {"type": "billing_not_active"}}', Verdict.OVER_QUOTA),
        (
            400,
            (
                b'{"type": "error", "error": {"type": "invalid_request_error", "message": '
                b'"Your credit balance is too low to access the Anthropic API."}}'
            ),
            Verdict.OVER_QUOTA,
        ),
        (401, b'{"error": {"code": "invalid_api_key"}}', Verdict.REVOKED),
        (403, b'{"type": "error", "error": {"type": "permission_error"}}', Verdict.FAMILY_FORBIDDEN),
        (403, b'{"error": {"code": "unsupported_country_region_territory"}}', Verdict.CLIENT_ERROR),
        (402, b'{"type": "error", "error": {"type": "billing_error", "message": "x"}}', Verdict.OVER_QUOTA),
        (401, b'{"type": "error", "error": {"type": "authentication_error"}}', Verdict.REVOKED),
        # Both APIs echo the request in their messages: marker words there mean nothing.
        (
            400,
            (
                b'{"error": {"message": "Unrecognized request argument supplied: insufficient_quota billing '
                b'invalid_api_key billing_not_active access_terminated", "type": "invalid_request_error", '
                b'"code": null}}'
            ),
            Verdict.CLIENT_ERROR,
        ),
        (
            400,
            (
                b'{"type": "error", "error": {"type": "invalid_request_error", "message": "billing: Extra inputs are '
                b'not permitted; insufficient_quota: invalid_api_key"}}'
            ),
            Verdict.CLIENT_ERROR,
        ),
        (
            404,
            b'{"error": {"message": "The model `billing` does not exist", "code": "model_not_found"}}',
            Verdict.CLIENT_ERROR,
        ),
        (529, b'{"type": "error", "error": {"type": "overloaded_error"}}', Verdict.RATE_LIMITED),
        (500, b"not json", Verdict.SERVER_ERROR),
        (400, b'{"error": {"message": "max_tokens is too large"}}', Verdict.CLIENT_ERROR),
    ],
)
def test_classify(status, body, verdict):
    assert classify(status, body) is verdict


@pytest.mark.parametrize(
    "text, seconds", [("120ms", 0.12), ("6m0s", 360), ("1h2m3.5s", 3723.5), ("2", 2), ("1.5", 1.5), ("soon", None)]
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_read_limits_takes_the_scarcer_resource_of_either_api():
    now = 1_000_000.0
    openai_headers = {
        "x-ratelimit-limit-requests": "100",
        "x-ratelimit-remaining-requests": "50",
        "x-ratelimit-reset-requests": "30s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "100",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    limits = read_limits(openai_headers, now)
    assert limits.fraction_left == pytest.approx(0.1) and limits.until == pytest.approx(now + 360)
    anthropic_headers = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": "1970-01-12T13:47:00Z",
    }
    limits = read_limits(anthropic_headers, now)
    assert limits.fraction_left == 0 and limits.until == pytest.approx(1_000_020.0)
    assert read_limits({}, now) is None


def test_retry_after_prefers_the_explicit_header():
    assert retry_after({"retry-after": "7", "x-ratelimit-reset-requests": "60s"}, 0) == 7
    assert retry_after({"retry-after-ms": "1500"}, 0) == 1.5
    assert (
        retry_after(
            {
                "x-ratelimit-limit-requests": "1",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "20s",
            },
            0,
        )
        == 20
    )
    assert retry_after({}, 0) == 10


class ConfirmationsAsked:
    """Stands in for the key checker: records which suspicions the pool asked it to confirm."""

    def __init__(self):
        self.asked = []

    def confirm(self, key, verdict, family, model):
        self.asked.append((key.id, verdict, family, model))


async def test_choice_follows_headroom_then_least_recent_use(storage):
    pool, checker = make_pool(storage, "sk-a", "sk-b", "sk-c"), ConfirmationsAsked()
    pool.on_suspicion(checker.confirm)
    a, b, c = pool.keys["openai"]
    now = time.time()
    answer_with_two_of_ten_left(pool)
    assert a.headroom("gpt4o", now) == pytest.approx(0.2)
    assert [pool.choose("openai", "gpt4o") for _ in range(2)] == [b, c]  # fresh keys first, oldest use first
    pool.release(c, "gpt4o", 429, {"retry-after": "30"}, b'{"error": {"type": "requests"}}')
    pool.release(b, "gpt4o", 401, {}, b"{}", "gpt-4o")
    assert b.suspected == REVOKED and b.state == a.state == ACTIVE  # suspected until the checker confirms
    assert checker.asked == [(b.id, Verdict.REVOKED, "gpt4o", "gpt-4o")]
    assert pool.choose("openai", "gpt4o") is a  # c rests, b is suspect
    assert pool.choose("openai", "gpt4") is c  # the rest is per family: c serves gpt4, used before a
    assert pool.choose("openai", "gpt4o", exclude=[a]) is None
    a.cooldown_until["gpt4o"] = time.time() + 5
    assert 4 < pool.seconds_until_free("openai", "gpt4o") <= 5  # a comes back before c


async def test_fair_turns_and_positions():
    queue = FamilyQueue()
    now = time.time()
    a1, a2, a3, b1 = (Waiter(identity, now) for identity in ("a", "a", "a", "b"))
    for waiter in (a1, a2, a3, b1):
        queue.add(waiter, fair=True)
    assert [queue.position(w) for w in (a1, b1, a2, a3)] == [1, 2, 3, 4]
    assert queue.count("a") == 3

    def serve_next() -> Waiter:
        waiter = queue.in_turn()[0]
        queue.take(waiter)
        return waiter

    assert [serve_next() for _ in range(4)] == [a1, b1, a2, a3]
    for waiter in (a1, a2, a3, b1):
        queue.add(waiter, fair=False)
    assert [serve_next() for _ in range(4)] == [a1, a2, a3, b1]


def test_stream_meter_reads_usage_and_drops_only_the_chunk_it_added():
    events = [
        b'data: {"choices": [{"delta": {"content": "Hello"}}]}\n\n',
        b'data: {"choices": [{"delta": {"content": " world"}, "finish_reason": "stop"}]}\n\n',
        b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}\n\n',
        b"data: [DONE]\n\n",
    ]
    stream = b"".join(events)
    meter = StreamMeter("openai", drop_usage_chunk=True)
    passed = b"".join(meter.feed(stream[i : i + 7]) for i in range(0, len(stream), 7))
    assert passed == events[0] + events[1] + events[3]
    assert meter.finish(prompt_estimate=100) == Usage(7, 2)
    untouched = StreamMeter("openai", drop_usage_chunk=False)
    assert untouched.feed(stream) == stream


def test_stream_meter_estimates_a_stream_cut_short():
    meter = StreamMeter("anthropic", drop_usage_chunk=False)
    meter.feed(
        b'event: message_start\ndata: {"type": "message_start", "message": {"usage": {"input_tokens": 12}}}\n\n'
        b'event: content_block_delta\ndata: {"type": "content_block_delta", "delta": {"text": "12345678"}}\n\n'
    )
    assert meter.finish(prompt_estimate=100) == Usage(12, 2, estimated=True)


def test_reservations_are_an_upper_bound():
    body = {"messages": [{"role": "user", "content": "a" * 300}], "max_tokens": 50}
    assert prompt_estimate(body) >= 300 // 4 and output_reservation(body) == 50
    assert output_reservation({"max_output_tokens": 7}) == 7
    assert output_reservation({}) == DEFAULT_OUTPUT_RESERVATION


async def test_a_conversation_keeps_its_key_while_it_has_headroom(storage):
    pool = make_pool(storage, "sk-a", "sk-b", "sk-c")
    a, b, c = pool.keys["openai"]
    keep_b = KeyAffinity(b.id, min_headroom=0.1)
    assert [pool.choose("openai", "gpt4o", affinity=keep_b) for _ in range(3)] == [b, b, b]
    assert pool.choose("openai", "gpt4o") is a  # a new conversation: the least recently used
    pool.release(
        b,
        "gpt4o",
        200,
        {
            "x-ratelimit-limit-requests": "100",
            "x-ratelimit-remaining-requests": "5",
            "x-ratelimit-reset-requests": "60s",
        },
        b"",
    )
    assert pool.choose("openai", "gpt4o", affinity=keep_b) is c  # below 10 % left: the key with the most
    for key in (a, c):
        key.limits["gpt4o"] = Limits(0.02, time.time() + 60)
    assert pool.choose("openai", "gpt4o", affinity=keep_b) is b  # every key is low: it stays
    b.cooldown_until["gpt4o"] = time.time() + 30
    assert pool.choose("openai", "gpt4o", affinity=keep_b) in (a, c)  # its key rests: it moves
    pinned = KeyAffinity(b.id, pinned=True)
    assert pool.choose("openai", "gpt4o", affinity=pinned) is None  # pinned: that key or none
    assert 29 < pool.seconds_until_free("openai", "gpt4o", pinned) <= 30
    assert pool.seconds_until_free("openai", "gpt4o", KeyAffinity("oai-gone", pinned=True)) is None


async def test_a_waiter_pinned_to_a_resting_key_lets_the_others_pass(storage):
    pool = make_pool(storage, "sk-a", "sk-b")
    queue = WaitQueue(pool, storage)
    a, b = pool.keys["openai"]
    a.cooldown_until["gpt4o"] = b.cooldown_until["gpt4o"] = time.time() + 30
    family_queue = queue.queue("openai", "gpt4o")
    now = time.time()
    pinned, unpinned = Waiter("x", now, KeyAffinity(a.id, pinned=True)), Waiter("y", now)
    family_queue.add(pinned, fair=True)
    assert not family_queue.holds_back(None) and not family_queue.holds_back(KeyAffinity(b.id, pinned=True))
    assert family_queue.holds_back(KeyAffinity(a.id, pinned=True))
    family_queue.add(unpinned, fair=True)
    assert family_queue.holds_back(KeyAffinity(b.id, pinned=True))  # an unpinned waiter may take any key
    b.cooldown_until["gpt4o"] = 0
    queue._pump("openai", "gpt4o")
    assert unpinned.granted.result() is b and not pinned.granted.done()
    assert family_queue.in_turn() == [pinned]


async def test_requests_sent_since_the_figures_came_count_against_the_headroom(storage):
    pool = make_pool(storage, "sk-a", "sk-b")
    a, b = pool.keys["openai"]
    answer_with_two_of_ten_left(pool)
    b.limits["gpt4o"] = Limits(0.1, time.time() + 60, (10, 1))
    stay_on_a = KeyAffinity(a.id)
    assert [pool.choose("openai", "gpt4o", affinity=stay_on_a) for _ in range(2)] == [a, a]
    assert a.headroom("gpt4o", time.time()) == 0 and not a.is_free("gpt4o", time.time())
    assert pool.choose("openai", "gpt4o", affinity=stay_on_a) is b  # a's two requests left are spoken for
    assert pool.choose("openai", "gpt4o") is None
