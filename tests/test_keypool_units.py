"""Unit tests of the key pool's reading of upstream answers, its choice of key, and the queue's turn order."""

import asyncio
import time

import pytest
from mitmproxy.test import taddons

from addons.keypool import ACTIVE, REVOKED, KeyPool, Verdict, classify, parse_duration, read_limits, retry_after
from addons.waitqueue import FamilyQueue, Waiter, WaitQueue


@pytest.mark.parametrize(
    "status, body, verdict",
    [
        (200, b"", Verdict.SUCCESS),
        (429, b'{"error": {"type": "requests", "code": "rate_limit_exceeded"}}', Verdict.RATE_LIMITED),
        (429, b'{"error": {"type": "insufficient_quota", "code": "insufficient_quota"}}', Verdict.OVER_QUOTA),
        (429, b'{"error": {"type": "billing_not_active"}}', Verdict.OVER_QUOTA),
        (400, b'{"type": "error", "error": {"type": "invalid_request_error", "message": '
              b'"Your credit balance is too low to access the Anthropic API."}}', Verdict.OVER_QUOTA),
        (401, b'{"error": {"code": "invalid_api_key"}}', Verdict.REVOKED),
        (403, b'{"type": "error", "error": {"type": "permission_error"}}', Verdict.REVOKED),
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
    openai_headers = {"x-ratelimit-limit-requests": "100", "x-ratelimit-remaining-requests": "50",
                      "x-ratelimit-reset-requests": "30s", "x-ratelimit-limit-tokens": "1000",
                      "x-ratelimit-remaining-tokens": "100", "x-ratelimit-reset-tokens": "6m0s"}  # fmt: skip
    limits = read_limits(openai_headers, now)
    assert limits.fraction_left == pytest.approx(0.1) and limits.until == pytest.approx(now + 360)
    anthropic_headers = {"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "0",
                         "anthropic-ratelimit-requests-reset": "1970-01-12T13:47:00Z"}  # fmt: skip
    limits = read_limits(anthropic_headers, now)
    assert limits.fraction_left == 0 and limits.until == pytest.approx(1_000_020.0)
    assert read_limits({}, now) is None


def test_retry_after_prefers_the_explicit_header():
    assert retry_after({"retry-after": "7", "x-ratelimit-reset-requests": "60s"}, 0) == 7
    assert retry_after({"retry-after-ms": "1500"}, 0) == 1.5
    assert retry_after({"x-ratelimit-limit-requests": "1", "x-ratelimit-remaining-requests": "0",
                        "x-ratelimit-reset-requests": "20s"}, 0) == 20  # fmt: skip
    assert retry_after({}, 0) == 10


async def test_choice_follows_headroom_then_least_recent_use():
    pool = KeyPool({"openai_key": ["sk-a", "sk-b", "sk-c"]})
    with taddons.context(pool):
        a, b, c = pool.keys["openai"]
        now = time.time()
        pool.release(pool.choose("openai", "gpt4o"), "gpt4o", 200, {
            "x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "2",
            "x-ratelimit-reset-requests": "60s"}, b"")  # fmt: skip
        assert a.headroom("gpt4o", now) == pytest.approx(0.2)
        assert [pool.choose("openai", "gpt4o") for _ in range(2)] == [b, c]  # fresh keys first, oldest use first
        pool.release(c, "gpt4o", 429, {"retry-after": "30"}, b'{"error": {"type": "requests"}}')
        pool.release(b, "gpt4o", 401, {}, b"{}")
        assert b.state == REVOKED and a.state == ACTIVE
        assert pool.choose("openai", "gpt4o") is a  # c rests, b is retired
        assert pool.choose("openai", "gpt4") is c  # the rest is per family: c serves gpt4, used before a
        assert pool.choose("openai", "gpt4o", exclude=[a]) is None
        a.cooldown_until["gpt4o"] = time.time() + 5
        assert 4 < pool.seconds_until_free("openai", "gpt4o") <= 5  # a comes back before c


async def test_fair_turns_and_positions():
    with taddons.context(WaitQueue()) as tctx:
        tctx.options.queue_mode = "fair"
        queue = FamilyQueue()
        now = time.time()
        a1, a2, a3, b1 = (Waiter(identity, now) for identity in ("a", "a", "a", "b"))
        for waiter in (a1, a2, a3, b1):
            queue.add(waiter)
        assert [queue.position(w) for w in (a1, b1, a2, a3)] == [1, 2, 3, 4]
        assert queue.count("a") == 3
        assert [queue.pop_next() for _ in range(4)] == [a1, b1, a2, a3]
        tctx.options.queue_mode = "fifo"
        for waiter in (a1, a2, a3, b1):
            queue.add(waiter)
        assert [queue.pop_next() for _ in range(4)] == [a1, a2, a3, b1]
