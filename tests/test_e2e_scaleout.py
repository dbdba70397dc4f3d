"""Several proxy instances sharing one Redis: every promise holds across them."""

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from redis import Redis

from tests.conftest import OPENAI_KEYS, proxy_env
from tests.harness import ProxyProcess, RedisServer, wait_until
from tests.test_e2e_adminpages import logged_in_client
from tests.test_e2e_keypool import by_clients
from tests.test_e2e_userpages import solved_challenge, verify_from
from tests.test_e2e_users import ADMIN_KEY, Admin

pytestmark = pytest.mark.e2e

CHAT = "/proxy/openai/v1/chat/completions"
BODY = {"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": "x"}]}


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def instances(start_proxy, fake, redis_server):
    def start(count: int = 3, **settings) -> list[ProxyProcess]:
        env = proxy_env(
            fake, STORE="redis", REDIS_URL=redis_server.url, GATEKEEPER="user_token", ADMIN_KEY=ADMIN_KEY, **settings
        )
        return [start_proxy(env) for _ in range(count)]

    return start


def test_a_user_created_on_one_instance_works_on_the_others(instances):
    a, b, c = instances()
    token, user = Admin(a).create(nickname="Everywhere")
    for proxy in (b, c):
        response = httpx.post(f"{proxy.url}{CHAT}", json=BODY, headers={"authorization": f"Bearer {token}"})
        assert response.status_code == 200
    assert Admin(c).user(user["id"])["prompt_count"] == 2
    assert Admin(b).get("/users").json()["count"] == 1


def test_the_rate_limit_is_one_limit_across_instances(instances):
    proxies = instances(MODEL_RATE_LIMIT="4")
    token, _ = Admin(proxies[0]).create()
    auth = {"authorization": f"Bearer {token}"}
    targets = itertools.islice(itertools.cycle(proxies), 12)
    with ThreadPoolExecutor(12) as pool:
        statuses = list(
            pool.map(lambda p: httpx.post(f"{p.url}{CHAT}", json=BODY, headers=auth, timeout=20).status_code, targets)
        )
    assert sorted(statuses) == [200] * 4 + [429] * 8


def fifty_in_flight_at_once(proxies, fake, token: str) -> None:
    """Fifty requests of one user spread over the instances, all in flight at once: at most five may pass."""
    for key in OPENAI_KEYS:
        fake.set_key_behaviour(key, "slow", delay_ms=3000)
    auth = {"authorization": f"Bearer {token}"}
    targets = itertools.islice(itertools.cycle(proxies), 50)
    with ThreadPoolExecutor(50) as pool:
        statuses = list(
            pool.map(lambda p: httpx.post(f"{p.url}{CHAT}", json=BODY, headers=auth, timeout=30).status_code, targets)
        )
    assert 1 <= statuses.count(200) <= 5 and statuses.count(429) == 50 - statuses.count(200)


def test_fifty_parallel_requests_over_three_instances_against_a_quota_for_five(instances, fake):
    proxies = instances()
    token, user = Admin(proxies[0]).create(token_limits={"gpt4o": 5 * 106})  # 6 prompt + 100 output reserved each
    fifty_in_flight_at_once(proxies, fake, token)
    usage = Admin(proxies[1]).user(user["id"])["usage"]["gpt4o"]
    assert usage["reserved"] == 0 and 0 < usage["used"] <= 5 * 106


def test_a_key_retired_on_one_instance_is_never_used_by_another(instances, fake):
    a, b = instances(2, OPENAI_KEY="sk-dead-401,sk-alive")
    token, _ = Admin(a).create()
    auth = {"authorization": f"Bearer {token}"}
    assert httpx.post(f"{a.url}{CHAT}", json=BODY, headers=auth).status_code == 200
    assert [r.key for r in by_clients(fake)] == ["sk-dead-401", "sk-alive"]
    wait_until(lambda: httpx.get(f"{a.url}/status").json()["openai"]["keys"]["revoked"] == 1)  # the probe confirmed
    fake.requests.clear()
    for _ in range(4):
        assert httpx.post(f"{b.url}{CHAT}", json=BODY, headers=auth).status_code == 200
    assert {r.key for r in fake.requests} == {"sk-alive"}
    assert httpx.get(f"{b.url}/status").json()["openai"]["keys"]["revoked"] == 1


def test_a_rest_learned_by_one_instance_is_respected_by_another(instances, fake):
    fake.set_key_behaviour("sk-only", "rate_limit_for", seconds=3)
    a, b = instances(2, OPENAI_KEY="sk-only", MAX_QUEUED_PER_IDENTITY="5")
    token, _ = Admin(a).create()
    auth = {"authorization": f"Bearer {token}"}
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, f"{a.url}{CHAT}", json=BODY, headers=auth, timeout=20)
        while not fake.requests:
            time.sleep(0.05)
        second = pool.submit(httpx.post, f"{b.url}{CHAT}", json=BODY, headers=auth, timeout=20)
        assert first.result().status_code == second.result().status_code == 200
    assert len(fake.requests) == 3  # one 429 on A; B waited for the rest A learned instead of trying the key
    assert time.monotonic() - started >= 2.5


def test_losing_redis_fails_closed_and_recovers(instances, redis_server, fake):
    a, b = instances(2)
    token, _ = Admin(a).create(token_limits={"gpt4o": 100000})
    auth = {"authorization": f"Bearer {token}"}
    assert httpx.post(f"{a.url}{CHAT}", json=BODY, headers=auth).status_code == 200
    redis_server.stop()
    fake.requests.clear()
    for proxy in (a, b):
        response = httpx.post(f"{proxy.url}{CHAT}", json=BODY, headers=auth, timeout=10)
        assert response.status_code == 503 and response.json()["error"]["code"] == "store_unavailable"
        claude = httpx.post(
            f"{proxy.url}/proxy/anthropic/v1/messages",
            headers=auth,
            timeout=10,
            json={"model": "claude-sonnet-5", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
        )
        assert claude.status_code == 503 and claude.json()["type"] == "error"
        assert httpx.get(f"{proxy.url}/health").status_code == 503
    assert fake.requests == []  # nothing went upstream without its limits checked
    redis_server.start()  # the same port again: an empty Redis, as after a restart without persistence
    for proxy in (a, b):
        assert httpx.get(f"{proxy.url}/health").status_code == 200
    # The user lived only in Redis; an empty Redis knows no one, and says so rather than letting anyone in.
    assert httpx.post(f"{b.url}{CHAT}", json=BODY, headers=auth).status_code == 401
    token, _ = Admin(b).create()
    assert httpx.post(f"{a.url}{CHAT}", json=BODY, headers={"authorization": f"Bearer {token}"}).status_code == 200


def test_fifty_parallel_requests_over_three_instances_against_a_usd_quota_for_five(instances, fake):
    # Each request reserves 8 prompt tokens at gpt-4o's $2.50 and 100 output tokens at $10 per million: $0.00102.
    proxies = instances(COST_QUOTAS="total=0.0051")
    token, user = Admin(proxies[0]).create()
    fifty_in_flight_at_once(proxies, fake, token)
    shown = Admin(proxies[1]).user(user["id"])
    assert shown["usage"]["gpt4o"]["reserved_usd"] == 0 and 0 < shown["cost_usd"] <= 0.0051


def test_a_user_disabled_on_one_instance_is_refused_by_another_within_a_second(instances, fake):
    """Each instance takes a token's admission from an address as it was for up to a second (a round trip to Redis
    saved per request); a change made through another instance counts after that, one made here at once."""
    a, b = instances(2)
    admin_a, admin_b = Admin(a), Admin(b)
    token, user = admin_a.create()
    auth = {"authorization": f"Bearer {token}"}
    assert httpx.post(f"{b.url}{CHAT}", json=BODY, headers=auth).status_code == 200  # admitted on B
    assert admin_a.post(f"/users/{user['id']}/disable", json={"reason": "enough"}).status_code == 200
    started = time.monotonic()
    wait_until(lambda: httpx.post(f"{b.url}{CHAT}", json=BODY, headers=auth).status_code == 403, timeout=3)
    assert time.monotonic() - started < 1.5
    assert admin_a.post(f"/users/{user['id']}/enable").status_code == 200
    wait_until(lambda: httpx.post(f"{b.url}{CHAT}", json=BODY, headers=auth).status_code == 200, timeout=3)
    assert admin_b.post(f"/users/{user['id']}/disable", json={"reason": "again"}).status_code == 200
    assert httpx.post(f"{b.url}{CHAT}", json=BODY, headers=auth).status_code == 403  # through B itself: at once


def test_an_answer_goes_out_only_once_its_bill_is_in_redis(instances, fake, redis_server):
    """The bill is written by a thread of the store's own (the event loop never waits for Redis); the answer still
    waits for it, so that a completed request's usage survives a kill. Redis holding every write back shows it."""
    (proxy,) = instances(count=1)
    token, user = Admin(proxy).create(nickname="Billed")
    auth = {"authorization": f"Bearer {token}"}
    assert httpx.post(f"{proxy.url}{CHAT}", json=BODY, headers=auth).status_code == 200  # admits the token
    answers = []
    redis = Redis.from_url(redis_server.url)
    redis.execute_command("CLIENT", "PAUSE", "20000", "WRITE")  # reads go on; the bill cannot be written
    try:
        request = threading.Thread(
            target=lambda: answers.append(httpx.post(f"{proxy.url}{CHAT}", json=BODY, headers=auth, timeout=30))
        )
        request.start()
        wait_until(lambda: len(fake.requests) == 2)  # the upstream has answered the second request
        request.join(0.5)  # without the wait for the bill, the answer would be here within milliseconds
        assert request.is_alive() and answers == []
    finally:
        redis.execute_command("CLIENT", "UNPAUSE")
    request.join(10)
    assert answers[0].status_code == 200
    assert Admin(proxy).user(user["id"])["prompt_count"] == 2


def test_admin_sessions_and_proof_of_work_hold_across_instances(instances):
    a, b = instances(2, CAPTCHA_MODE="proof_of_work", POW_DIFFICULTY_LEVEL="10", POW_MAX_TOKENS_PER_IP="3")
    client, csrf = logged_in_client(a)
    session = client.cookies["llmproxy_admin"]
    assert httpx.get(f"{b.url}/admin/manage/users", cookies={"llmproxy_admin": session}).status_code == 200
    assert client.post("/admin/logout", data={"_csrf": csrf}).status_code == 303
    after = httpx.get(f"{b.url}/admin/manage/users", cookies={"llmproxy_admin": session})
    assert after.status_code == 303 and after.headers["location"] == "/admin/login"  # logged out on every instance

    solution = solved_challenge(a)
    assert verify_from(b, "127.0.0.1", solution).status_code == 200  # a challenge of one instance, redeemed on another
    replayed = verify_from(a, "127.0.0.1", solution)
    assert replayed.status_code == 400 and replayed.json()["error"]["code"] == "challenge_used"
    assert verify_from(b, "127.0.0.1", solved_challenge(b)).status_code == 200
    assert verify_from(a, "127.0.0.1", solved_challenge(a)).status_code == 200
    refused = httpx.post(f"{b.url}/user/captcha/challenge")  # three tokens for this address, on both instances
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
