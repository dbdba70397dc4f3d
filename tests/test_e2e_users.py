"""Gatekeeper modes, users and the admin API, rate limits and token quotas, end to end."""

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import openai
import pytest

from llmproxy.api.usage import CHARACTERS_PER_TOKEN
from tests.conftest import OPENAI_KEYS, proxy_env
from tests.harness import ProxyProcess, RedisServer, wait_until

pytestmark = pytest.mark.e2e

CHAT = "/proxy/openai/v1/chat/completions"
MESSAGES = "/proxy/anthropic/v1/messages"
ADMIN_KEY = "admin-secret-for-tests"


def chat(content: str = "x", stream: bool = False, **extra) -> dict:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": content}], "stream": stream, **extra}


def message(content: str = "x", stream: bool = False) -> dict:
    return {
        "model": "claude-sonnet-5",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
    }


def post_from(proxy, address: str, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=20) as client:
        return client.post(f"{proxy.url}{path}", json=body, headers=headers or {})


class Admin:
    """The admin API as an operator would call it."""

    def __init__(self, proxy, key: str = ADMIN_KEY):
        self.client = httpx.Client(base_url=f"{proxy.url}/admin", headers={"authorization": f"Bearer {key}"})

    def create(self, **fields) -> tuple[str, dict]:
        response = self.client.post("/users", json=fields)
        assert response.status_code == 201, response.text
        return response.json()["token"], response.json()["user"]

    def user(self, user_id: str) -> dict:
        return self.client.get(f"/users/{user_id}").json()

    def __getattr__(self, name):
        return getattr(self.client, name)


@pytest.fixture
def user_proxy(start_proxy, fake, tmp_path):
    def start(**settings) -> tuple[ProxyProcess, Admin]:
        env = proxy_env(fake, GATEKEEPER="user_token", ADMIN_KEY=ADMIN_KEY, DATA_DIR=str(tmp_path / "data"), **settings)
        proxy = start_proxy(env)
        return proxy, Admin(proxy)

    return start


def test_open_proxy_is_rate_limited_per_address_and_spoofing_does_not_help(start_proxy, fake):
    proxy = start_proxy(proxy_env(fake, MODEL_RATE_LIMIT="2"))
    responses = [post_from(proxy, "127.0.0.1", CHAT, chat(), {"x-forwarded-for": f"203.0.113.{n}"}) for n in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    limited = responses[-1]
    assert limited.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.headers["retry-after"]) <= 60  # seconds, not milliseconds
    assert limited.headers["x-ratelimit-limit"] == "2" and limited.headers["x-ratelimit-remaining"] == "0"
    assert int(limited.headers["x-ratelimit-reset"]) > time.time()
    assert responses[0].headers["x-ratelimit-remaining"] == "1"
    assert post_from(proxy, "127.0.0.7", CHAT, chat()).status_code == 200  # another address has its own window
    # Refused before reaching upstream: costs nothing.
    for body in ({"model": "no-such-model", "messages": []}, {"model": 5}):
        assert post_from(proxy, "127.0.0.8", CHAT, body).status_code == 400
    assert [post_from(proxy, "127.0.0.8", CHAT, chat()).status_code for _ in range(2)] == [200, 200]


def test_trusted_proxy_hops_take_the_address_from_x_forwarded_for(start_proxy, fake):
    proxy = start_proxy(proxy_env(fake, MODEL_RATE_LIMIT="1", TRUSTED_PROXIES="1"))
    statuses = [
        post_from(proxy, "127.0.0.1", CHAT, chat(), {"x-forwarded-for": f"10.9.9.9, 198.51.100.{n}"}).status_code
        for n in (1, 2, 2)
    ]
    assert statuses == [200, 200, 429]  # the right-most address is the client; the spoofable left part is ignored


def test_proxy_key_mode(start_proxy, fake):
    proxy = start_proxy(proxy_env(fake, GATEKEEPER="proxy_key", PROXY_KEY="12345"))  # numeric, as the original broke
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Bearer"}, {"x-api-key": ""}):
        response = httpx.post(f"{proxy.url}{CHAT}", json=chat(), headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_proxy_key"
    assert httpx.post(f"{proxy.url}{MESSAGES}", json=message()).json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{proxy.url}/proxy/openai/v1/models").status_code == 401
    assert fake.requests == []
    client = openai.OpenAI(base_url=f"{proxy.url}/proxy/openai/v1", api_key="12345", max_retries=0)
    assert client.chat.completions.create(**chat()).choices
    claude = anthropic.Anthropic(base_url=f"{proxy.url}/proxy/anthropic", api_key="12345", max_retries=0)
    assert claude.messages.create(**message()).content
    assert "12345" not in json.dumps([r.headers for r in fake.requests])


def test_user_tokens_and_their_lifecycle(user_proxy, fake):
    proxy, admin = user_proxy()
    token, user = admin.create(nickname="Friend")
    assert len(token) >= 32 and "token" not in user and "token_hash" not in user
    client = openai.OpenAI(base_url=f"{proxy.url}/proxy/openai/v1", api_key=token, max_retries=0)
    assert client.chat.completions.create(**chat()).choices
    claude = anthropic.Anthropic(base_url=f"{proxy.url}/proxy/anthropic", api_key=token, max_retries=0)
    assert claude.messages.create(**message()).content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"{proxy.url}/proxy/openai/v1", api_key=token + "x", max_retries=0
        ).chat.completions.create(**chat())
    assert admin.post(f"/users/{user['id']}/disable", json={"reason": "Shared it on a forum."}).status_code == 200
    with pytest.raises(openai.PermissionDeniedError) as raised:
        client.chat.completions.create(**chat())
    assert "Shared it on a forum." in raised.value.message
    assert admin.post(f"/users/{user['id']}/enable").status_code == 200
    assert client.chat.completions.create(**chat()).choices
    details = admin.user(user["id"])
    assert details["prompt_count"] == 3 and details["ips"] == ["127.0.0.1"] and details["last_used_at"]
    own = httpx.get(f"{proxy.url}/user/usage", headers={"authorization": f"Bearer {token}"}).json()
    assert own["nickname"] == "Friend" and own["usage"]["gpt4o"]["used"] > 0
    assert admin.delete(f"/users/{user['id']}").status_code == 204
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(**chat())
    assert token not in proxy.log()


def test_temporary_user_expires(user_proxy, fake):
    proxy, admin = user_proxy()
    token, user = admin.create(type="temporary", expires_at=time.time() - 1)
    response = httpx.post(f"{proxy.url}{CHAT}", json=chat(), headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 403 and "Temporary token expired." in response.json()["error"]["message"]
    assert admin.user(user["id"])["disabled_reason"] == "Temporary token expired."


@pytest.mark.parametrize("auto_ban", [False, True])
def test_address_limit_per_user(user_proxy, fake, auto_ban):
    proxy, admin = user_proxy(MAX_IPS_PER_USER="1", MAX_IPS_AUTO_BAN=str(auto_ban).lower())
    token, user = admin.create()
    auth = {"authorization": f"Bearer {token}"}
    assert post_from(proxy, "127.0.0.1", CHAT, chat(), auth).status_code == 200
    second = post_from(proxy, "127.0.0.9", CHAT, chat(), auth)
    assert second.status_code == 403
    assert post_from(proxy, "127.0.0.1", CHAT, chat(), auth).status_code == (403 if auto_ban else 200)
    assert (admin.user(user["id"])["disabled_reason"] == "IP address limit exceeded.") is auto_ban


def test_admin_api_guards_itself(user_proxy, fake):
    proxy, admin = user_proxy()
    assert httpx.get(f"{proxy.url}/admin/users").status_code == 401
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.11")) as attacker:
        statuses = [
            attacker.get(f"{proxy.url}/admin/users", headers={"authorization": f"Bearer guess{n}"}).status_code
            for n in range(6)
        ]
        assert statuses == [401] * 5 + [429]
        locked = attacker.get(f"{proxy.url}/admin/users", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
    assert admin.get("/users").status_code == 200  # the lock-out is per address, not for everyone
    _, user = admin.create(nickname="<script>alert(1)</script>")
    for fields in (
        {"prompt_count": 99},
        {"token_hash": "0" * 64},
        {"id": "x"},
        {"type": "owner"},
        {"max_ips": "many"},
        {"token_limits": {"gpt4o": -1}},
    ):
        response = admin.patch(f"/users/{user['id']}", json=fields)
        assert response.status_code == 400, fields
    assert admin.patch(f"/users/{user['id']}", json={"max_ips": 3, "admin_note": "ok"}).json()["max_ips"] == 3
    assert admin.get("/users/0123456789abcdef").status_code == 404
    assert admin.put("/users").status_code == 405
    spec = admin.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.") and "/admin/users/{user_id}" in spec["paths"]
    keys = admin.get("/keys").json()["keys"]
    assert {key["id"][:4] for key in keys} == {"oai-", "ant-"} and "secret" not in json.dumps(keys)


def test_users_can_be_exported_and_imported_elsewhere(user_proxy, start_proxy, fake, tmp_path):
    proxy, admin = user_proxy()
    token, user = admin.create(nickname="Moving", token_limits={"gpt4o": 100000})
    httpx.post(f"{proxy.url}{CHAT}", json=chat(), headers={"authorization": f"Bearer {token}"})
    exported = admin.get("/users/export").json()
    assert token not in json.dumps(exported)
    other = start_proxy(proxy_env(fake, GATEKEEPER="user_token", ADMIN_KEY=ADMIN_KEY, DATA_DIR=str(tmp_path / "b")))
    assert Admin(other).post("/users/import", json=exported).json() == {"imported": 1}
    moved = Admin(other).user(user["id"])
    assert moved["nickname"] == "Moving" and moved["usage"]["gpt4o"]["used"] > 0
    assert (
        httpx.post(f"{other.url}{CHAT}", json=chat(), headers={"authorization": f"Bearer {token}"}).status_code == 200
    )


def test_fifty_parallel_requests_against_a_quota_for_five(user_proxy, fake):
    proxy, admin = user_proxy()
    # Each request reserves its prompt estimate (6 tokens) plus max_tokens (100); the quota holds five of them.
    token, user = admin.create(token_limits={"gpt4o": 5 * 105})
    auth = {"authorization": f"Bearer {token}"}
    body = {"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": "x"}]}

    def send(_):
        return httpx.post(f"{proxy.url}{CHAT}", json=body, headers=auth, timeout=30).status_code

    fake.set_key_behaviour(OPENAI_KEYS[0], "slow", delay_ms=3000)  # all fifty are in flight at once
    fake.set_key_behaviour(OPENAI_KEYS[1], "slow", delay_ms=3000)
    with ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(send, range(50)))
    assert statuses.count(200) <= 5 and statuses.count(200) >= 1
    assert statuses.count(429) == 50 - statuses.count(200)
    usage = admin.user(user["id"])["usage"]["gpt4o"]
    assert usage["reserved"] == 0 and 0 < usage["used"] <= 5 * 105


def test_streamed_usage_is_billed_with_or_without_the_client_asking(user_proxy, fake):
    proxy, admin = user_proxy()
    token, user = admin.create()
    client = openai.OpenAI(base_url=f"{proxy.url}/proxy/openai/v1", api_key=token, max_retries=0)
    chunks = list(client.chat.completions.create(**chat("#fake:events=4", stream=True)))
    assert all(chunk.choices for chunk in chunks)  # the usage chunk the proxy asked for was taken out again
    used = admin.user(user["id"])["usage"]["gpt4o"]["used"]
    assert used > 0
    asked = list(
        client.chat.completions.create(**chat("#fake:events=4", stream=True, stream_options={"include_usage": True}))
    )
    assert asked[-1].usage is not None and not asked[-1].choices
    assert admin.user(user["id"])["usage"]["gpt4o"]["used"] == used + asked[-1].usage.total_tokens
    claude = anthropic.Anthropic(base_url=f"{proxy.url}/proxy/anthropic", api_key=token, max_retries=0)
    with claude.messages.stream(
        model="claude-sonnet-5", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    ) as s:
        final = s.get_final_message()
    assert (
        admin.user(user["id"])["usage"]["claude-sonnet"]["used"] == final.usage.input_tokens + final.usage.output_tokens
    )


def test_a_client_that_leaves_mid_stream_pays_for_what_it_got(user_proxy, fake):
    """A stream cut short carries no usage: the user pays the prompt's estimate and the output the proxy passed on, at
    CHARACTERS_PER_TOKEN characters a token (StreamMeter.finish), which is less than the whole answer costs."""
    proxy, admin = user_proxy()
    token, user = admin.create()
    auth = {"authorization": f"Bearer {token}"}
    event_characters = 100  # the answer's text in each of its 60 events
    directives = f"#fake:events=60 #fake:body_bytes={60 * event_characters}"
    received = ""  # the answer's text as the client read it, before leaving
    with httpx.stream(
        "POST",
        f"{proxy.url}{CHAT}",
        json=chat(f"{directives} #fake:interval_ms=50", stream=True),
        headers=auth,
        timeout=10,
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                received += "".join(choice["delta"].get("content") or "" for choice in json.loads(line[6:])["choices"])
            if len(received) >= 5 * event_characters:
                break  # leaving closes the connection: the rest of the answer is never read
    usage = wait_until(lambda: (figures := admin.user(user["id"])["usage"].get("gpt4o", {})).get("used") and figures)
    # The proxy passed on at least what the client read, and at most what the fake sent before the proxy hung up.
    (upstream,) = wait_until(lambda: [recorded for recorded in fake.requests if recorded.stream_ending])
    assert upstream.stream_ending == "cancelled"
    sent = upstream.content_events_sent * event_characters
    assert -(-len(received) // CHARACTERS_PER_TOKEN) <= usage["output"] <= -(-sent // CHARACTERS_PER_TOKEN)
    assert usage["used"] == usage["input"] + usage["output"] and usage["reserved"] == 0
    whole = httpx.post(f"{proxy.url}{CHAT}", json=chat(directives), headers=auth, timeout=10).json()["usage"]
    assert usage["used"] < whole["total_tokens"]  # the same answer read to its end, billed as the upstream reports it


def test_a_failed_request_costs_nothing(user_proxy, fake):
    proxy, admin = user_proxy()
    token, user = admin.create(token_limits={"gpt4o": 200})
    auth = {"authorization": f"Bearer {token}"}
    for _ in range(3):
        assert (
            httpx.post(f"{proxy.url}{CHAT}", json=chat("#fake:status=400", max_tokens=100), headers=auth).status_code
            == 400
        )
    usage = admin.user(user["id"])["usage"]["gpt4o"]
    assert usage["used"] == usage["reserved"] == usage["cost_usd"] == usage["reserved_usd"] == 0
    assert admin.user(user["id"])["prompt_count"] == 0


def test_special_users_and_per_user_rate_limits(user_proxy, fake):
    proxy, admin = user_proxy(MODEL_RATE_LIMIT="1", TOKEN_QUOTA_GPT4O="10")
    special, _ = admin.create(type="special")
    limited, _ = admin.create()
    roomy, _ = admin.create(rate_limit=5, token_limits={"gpt4o": 100000})

    def post(token):
        return httpx.post(
            f"{proxy.url}{CHAT}", json=chat(max_tokens=50), headers={"authorization": f"Bearer {token}"}
        ).status_code

    assert [post(special) for _ in range(3)] == [200, 200, 200]
    assert post(limited) == 429  # 10 tokens of gpt4o quota (TOKEN_QUOTA_GPT4O) cannot hold a 50-token answer
    assert [post(roomy) for _ in range(3)] == [200, 200, 200]


def test_in_flight_limit(user_proxy, fake):
    proxy, admin = user_proxy(MAX_CONCURRENT_PER_IDENTITY="1")
    token, _ = admin.create()
    auth = {"authorization": f"Bearer {token}"}
    slow = threading.Thread(
        target=httpx.post,
        args=(f"{proxy.url}{CHAT}",),
        kwargs={"json": chat("#fake:delay_ms=1500"), "headers": auth, "timeout": 10},
    )
    slow.start()
    wait_until(lambda: fake.requests)  # the slow request is upstream now, in flight for 1.5 s more
    second = httpx.post(f"{proxy.url}{CHAT}", json=chat(), headers=auth)
    assert second.status_code == 429 and second.json()["error"]["code"] == "too_many_in_flight"
    slow.join()
    assert httpx.post(f"{proxy.url}{CHAT}", json=chat(), headers=auth).status_code == 200


@pytest.fixture(params=["sqlite", "redis"])
def durable_store(request, tmp_path):
    """The settings of each store; Redis writes bills in the background, and sends an answer only once written."""
    if request.param == "sqlite":
        yield {"DATA_DIR": str(tmp_path / "data")}
        return
    server = RedisServer().start()
    yield {"STORE": "redis", "REDIS_URL": server.url}
    server.stop()


def test_restart_and_kill_lose_no_user_and_no_completed_usage(fake, durable_store):
    env = proxy_env(fake, GATEKEEPER="user_token", ADMIN_KEY=ADMIN_KEY, **durable_store)
    with ProxyProcess(env) as proxy:
        token, user = Admin(proxy).create(nickname="Durable")
    billed = []  # the usage of each answer the client got
    proxy = ProxyProcess(env).start()
    stop = threading.Event()
    errors = []

    def traffic():
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    response = client.post(
                        f"{proxy.url}{CHAT}", json=chat(), headers={"authorization": f"Bearer {token}"}
                    )
                except httpx.HTTPError:
                    return
                if response.status_code == 200:
                    billed.append(response.json()["usage"]["total_tokens"])
                else:
                    errors.append(response.status_code)

    thread = threading.Thread(target=traffic)
    thread.start()
    wait_until(lambda: len(billed) >= 10 or errors)  # killed in the middle of steady traffic
    os.kill(proxy.process.pid, signal.SIGKILL)
    stop.set()
    thread.join()
    proxy.process.wait()
    assert len(billed) >= 10 and errors == []
    with ProxyProcess(env) as restarted:
        details = Admin(restarted).user(user["id"])
    assert details["nickname"] == "Durable"
    used = details["usage"]["gpt4o"]["used"]
    assert sum(billed) <= used <= sum(billed) + 50  # at most the one request in flight at the kill was billed unseen


@pytest.mark.parametrize("ending", ["completed", "incomplete", "failed"])
def test_a_responses_stream_is_billed_from_whichever_event_ends_it(user_proxy, fake, ending):
    """Codex's streams end in response.completed, .incomplete (max_output_tokens) or .failed; each carries the
    usage the owner pays for, and that figure, not an estimate, is what the user is billed."""
    proxy, admin = user_proxy()
    token, user = admin.create(nickname="Codex user")
    client = openai.OpenAI(base_url=f"{proxy.url}/proxy/openai/v1", api_key=token, max_retries=0)
    directive = "" if ending == "completed" else f" #fake:end={ending}"
    stream = client.responses.create(
        model="gpt-5.4",
        input=f"say hi{directive}",
        stream=True,
        reasoning={"effort": "low"},
        include=["reasoning.encrypted_content"],
    )
    last = list(stream)[-1]
    assert last.type == f"response.{ending}"
    reported = last.response.usage.input_tokens + last.response.usage.output_tokens
    assert admin.user(user["id"])["usage"]["gpt5"]["used"] == reported


def test_a_claude_stream_is_billed_from_its_final_figures(user_proxy, fake):
    proxy, admin = user_proxy()
    token, user = admin.create(nickname="Claude Code user")
    claude = anthropic.Anthropic(base_url=f"{proxy.url}/proxy/anthropic", api_key=token, max_retries=0)
    with claude.messages.stream(
        model="claude-sonnet-5",
        max_tokens=4096,
        thinking={"type": "enabled", "budget_tokens": 2048},
        messages=[{"role": "user", "content": "hi"}],
    ) as stream:
        final = stream.get_final_message()
    reported = final.usage.input_tokens + final.usage.output_tokens
    assert admin.user(user["id"])["usage"]["claude-sonnet"]["used"] == reported
