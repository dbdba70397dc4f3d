"""Key pool, transparent retries, the key checker and the fair wait queue, end to end."""

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from llmproxy.services.base import USER_AGENT as KEY_CHECK_AGENT
from tests.conftest import proxy_env
from tests.harness import wait_until
from tests.test_e2e_sdk import anthropic_client, openai_client

pytestmark = pytest.mark.e2e

CHAT = "/proxy/openai/v1/chat/completions"


def chat(content: str, stream: bool = False, model: str = "gpt-4o") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream}


def pool_env(fake, openai_keys: list[str], **overrides) -> dict[str, str]:
    return proxy_env(fake, OPENAI_KEY=",".join(openai_keys), **overrides)


def by_clients(fake) -> list:
    """The requests the fake got from clients through the proxy, without the key checker's own."""
    return [recorded for recorded in fake.requests if ("user-agent", KEY_CHECK_AGENT) not in recorded.headers]


def keys_used(fake) -> list[str]:
    return [recorded.key for recorded in by_clients(fake) if recorded.path == "/v1/chat/completions"]


def test_rate_limited_key_is_skipped_without_the_client_noticing(start_proxy, fake):
    proxy = start_proxy(pool_env(fake, ["sk-first-429", "sk-second"]))
    completion = openai_client(proxy).chat.completions.create(**chat("Hello"))
    assert completion.choices[0].message.content
    assert keys_used(fake) == ["sk-first-429", "sk-second"]
    for _ in range(3):  # the rate-limited key rests for its retry-after (1 s); the other one serves
        openai_client(proxy).chat.completions.create(**chat("Hello"))
    assert keys_used(fake)[2:] == ["sk-second"] * 3


def test_streamed_request_moves_to_another_key_before_the_first_byte(start_proxy, fake):
    proxy = start_proxy(pool_env(fake, ["sk-first-429", "sk-second"]))
    stream = openai_client(proxy).chat.completions.create(**chat("Hi #fake:events=4", stream=True))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text
    assert keys_used(fake) == ["sk-first-429", "sk-second"]


def test_revoked_key_is_never_used_again_also_after_a_restart(start_proxy, fake, tmp_path):
    env = pool_env(fake, ["sk-dead-401", "sk-alive"], DATA_DIR=str(tmp_path / "data"))
    proxy = start_proxy(env)
    for _ in range(3):
        openai_client(proxy).chat.completions.create(**chat("Hello"))
    assert keys_used(fake) == ["sk-dead-401", "sk-alive", "sk-alive", "sk-alive"]
    wait_until(lambda: httpx.get(f"{proxy.url}/status").json()["openai"]["keys"]["revoked"] == 1)  # probe confirmed
    proxy.stop()
    fake.reset()
    restarted = start_proxy(env)
    for _ in range(2):
        openai_client(restarted).chat.completions.create(**chat("Hello"))
    assert keys_used(fake) == ["sk-alive", "sk-alive"]
    assert httpx.get(f"{restarted.url}/status").json()["openai"]["keys"]["revoked"] == 1


def test_over_quota_keys_retire_one_per_request_and_an_empty_pool_says_so(start_proxy, fake):
    proxy = start_proxy(proxy_env(fake, ANTHROPIC_KEY="sk-ant-a-quota,sk-ant-b-quota"))
    message = {"model": "claude-sonnet-5", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    first = httpx.post(f"{proxy.url}/proxy/anthropic/v1/messages", json=message)
    # One request makes at most one key suspect; the second key's identical answer goes back as the API gave it.
    assert first.status_code == 400 and "credit balance" in first.json()["error"]["message"]
    wait_until(lambda: httpx.get(f"{proxy.url}/status").json()["anthropic"]["keys"]["overQuota"] == 1)
    second = httpx.post(f"{proxy.url}/proxy/anthropic/v1/messages", json=message)
    assert second.status_code == 400  # the last key turned suspect: the client gets the API's own words
    wait_until(lambda: httpx.get(f"{proxy.url}/status").json()["anthropic"]["keys"]["overQuota"] == 2)
    fake.reset()
    response = httpx.post(f"{proxy.url}/proxy/anthropic/v1/messages", json=message)
    assert response.status_code == 503 and response.json()["error"]["type"] == "overloaded_error"
    assert fake.requests == []


def test_server_error_is_retried_once_on_another_key(start_proxy, fake):
    proxy = start_proxy(pool_env(fake, ["sk-broken-500", "sk-fine"]))
    assert openai_client(proxy).chat.completions.create(**chat("Hello")).choices
    assert keys_used(fake) == ["sk-broken-500", "sk-fine"]


def test_requests_wait_while_every_key_rests_and_streams_hear_heartbeats(start_proxy, fake):
    fake.set_key_behaviour("sk-only", "rate_limit_for", seconds=2)
    proxy = start_proxy(pool_env(fake, ["sk-only"], QUEUE_HEARTBEAT="1", MAX_QUEUED_PER_IDENTITY="5"))
    results = {}

    def buffered():
        results["buffered"] = httpx.post(f"{proxy.url}{CHAT}", json=chat("first"), timeout=20)

    thread = threading.Thread(target=buffered)
    started = time.monotonic()
    thread.start()
    wait_until(lambda: fake.requests)  # the first request met the 429; the key now rests for 2 s
    lines = []
    with httpx.stream("POST", f"{proxy.url}{CHAT}", json=chat("#fake:events=3", stream=True), timeout=20) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        for line in s.iter_lines():
            lines.append((time.monotonic() - started, line))
    thread.join()
    assert results["buffered"].status_code == 200
    assert time.monotonic() - started >= 1.5
    heartbeats = [line for _, line in lines if line.startswith(": queued, position")]
    assert len(heartbeats) >= 2  # one on joining, then one a second
    data = [line for _, line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and "Hello" in "".join(data)
    # The official SDK's stream parser is not confused by the comments.
    fake.set_key_behaviour("sk-only", "rate_limit_for", seconds=2)
    fake.requests.clear()
    stream = openai_client(proxy).chat.completions.create(**chat("#fake:events=3", stream=True))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def _post_from(proxy, address: str, content: str, results: list):
    """A request from another client address (the loopback range is all ours), recording its status."""
    transport = httpx.HTTPTransport(local_address=address)
    with httpx.Client(transport=transport, timeout=30) as client:
        results.append(client.post(f"{proxy.url}{CHAT}", json=chat(content)).status_code)


@pytest.mark.parametrize("mode", ["fair", "fifo"])
def test_one_identity_burst_does_not_hold_back_another(start_proxy, fake, mode):
    fake.set_key_behaviour("sk-only", "rate_limit_for", seconds=4)  # longer than the status page's 1.5 s cache
    proxy = start_proxy(pool_env(fake, ["sk-only"], QUEUE_MODE=mode, MAX_QUEUED_PER_IDENTITY="50"))
    results = []
    burst = [threading.Thread(target=_post_from, args=(proxy, "127.0.0.2", f"from A {n}", results)) for n in range(20)]
    burst[0].start()
    wait_until(lambda: fake.requests)  # A's first request met the 429: from now on the key rests for 4 s
    for thread in burst[1:]:
        thread.start()
    wait_until(lambda: httpx.get(f"{proxy.url}/status").json()["families"]["gpt4o"]["proomptersInQueue"] == 20)
    single = threading.Thread(target=_post_from, args=(proxy, "127.0.0.3", "from B", results))
    single.start()
    for thread in [*burst, single]:
        thread.join()
    assert results == [200] * 21
    senders = [json.loads(r.body)["messages"][0]["content"] for r in fake.requests]
    assert len(senders) == 22  # one rate-limited attempt, then every request once
    if mode == "fair":
        assert senders.index("from B") == 2  # after the rate-limited attempt and A's probe, it is B's turn
    else:
        assert senders[-1] == "from B"


def test_client_leaving_the_queue_frees_its_place(start_proxy, fake):
    fake.set_key_behaviour("sk-only", "rate_limit_for", seconds=5)
    proxy = start_proxy(pool_env(fake, ["sk-only"]))  # one waiting request per identity
    body = json.dumps(chat("leaves")).encode()
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(
            f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until(lambda: httpx.get(f"{proxy.url}/status").json()["families"]["gpt4o"]["proomptersInQueue"] == 1)
    wait_until(lambda: httpx.get(f"{proxy.url}/status").json()["families"]["gpt4o"]["proomptersInQueue"] == 0)
    response = httpx.post(f"{proxy.url}{CHAT}", json=chat("stays"), timeout=20)
    assert response.status_code == 200
    senders = [json.loads(r.body)["messages"][0]["content"] for r in fake.requests]
    assert senders == ["leaves", "stays"]  # the departed request never went upstream again


def test_waiting_too_long_gives_a_clear_error(start_proxy, fake):
    fake.set_key_behaviour("sk-only", "rate_limit_for", seconds=10)
    proxy = start_proxy(pool_env(fake, ["sk-only"], QUEUE_TIMEOUT="1", MAX_QUEUED_PER_IDENTITY="5"))
    response = httpx.post(f"{proxy.url}{CHAT}", json=chat("x"), timeout=10)
    assert response.status_code == 503 and response.json()["error"]["code"] == "queue_timeout"
    with httpx.stream("POST", f"{proxy.url}{CHAT}", json=chat("x", stream=True), timeout=10) as stream:
        text = "".join(stream.iter_text())
    assert ": queued, position 1" in text
    error = json.loads(text.strip().splitlines()[-1].removeprefix("data: "))
    assert error["error"]["code"] == "queue_timeout"


def test_queue_mode_none_refuses_at_once(start_proxy, fake):
    fake.set_key_behaviour("sk-only", "rate_limit_for", seconds=10)
    proxy = start_proxy(pool_env(fake, ["sk-only"], QUEUE_MODE="none"))
    response = httpx.post(f"{proxy.url}{CHAT}", json=chat("x"), timeout=10)
    assert response.status_code == 429 and response.json()["error"]["code"] == "no_key_free"
    assert int(response.headers["retry-after"]) >= 1


def test_too_many_waiting_requests_from_one_identity(start_proxy, fake):
    fake.set_key_behaviour("sk-only", "rate_limit_for", seconds=5)
    proxy = start_proxy(pool_env(fake, ["sk-only"]))
    first = threading.Thread(target=httpx.post, args=(f"{proxy.url}{CHAT}",), kwargs={"json": chat("a"), "timeout": 20})
    first.start()
    wait_until(lambda: httpx.get(f"{proxy.url}/status").json()["families"]["gpt4o"]["proomptersInQueue"] == 1)
    second = httpx.post(f"{proxy.url}{CHAT}", json=chat("b"), timeout=10)
    assert second.status_code == 429 and second.json()["error"]["code"] == "too_many_queued"
    first.join()


def test_key_checker_retires_dead_keys_learns_families_and_organisations(start_proxy, fake):
    fake.set_key_behaviour(
        "sk-multi-org", "ok", models=["gpt-4o", "gpt-4o-mini"], organizations=["org-default", "org-second"]
    )
    fake.set_key_behaviour("sk-ant-haiku", "ok", models=["claude-haiku-4-5"])
    proxy = start_proxy(
        proxy_env(fake, OPENAI_KEY="sk-dead-401,sk-multi-org", ANTHROPIC_KEY="sk-ant-haiku", CHECK_KEYS="true")
    )

    def settled():  # the organisation's own entry is checked in the round after the key that revealed it
        status = httpx.get(f"{proxy.url}/status").json()
        return status["openai"]["keys"] == {"total": 3, "active": 2, "revoked": 1, "overQuota": 0} and set(
            status["families"]
        ) == {"gpt4o", "claude-haiku"}

    wait_until(settled)
    fake.reset()
    for n in range(2):  # two conversations, so that each takes the least recently used entry
        openai_client(proxy).chat.completions.create(**chat(f"Hello {n}"))
    organizations = {dict(r.headers).get("openai-organization") for r in fake.requests}
    assert organizations == {None, "org-second"}  # the default org needs no header; the other one is named
    with pytest.raises(openai.APIStatusError) as raised:
        openai_client(proxy).chat.completions.create(**chat("Hello", model="gpt-5"))
    assert raised.value.status_code == 503  # no key serves the gpt5 family
    assert [m.id for m in anthropic_client(proxy).models.list()] == ["claude-haiku-5-5", "claude-haiku-4-5"]


def test_unknown_and_disallowed_models_are_refused(start_proxy, fake):
    proxy = start_proxy(proxy_env(fake, ALLOWED_MODEL_FAMILIES="gpt4o,claude"))
    unknown = httpx.post(f"{proxy.url}{CHAT}", json=chat("x", model="llama-3-70b"))
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "model_not_found"
    disallowed = httpx.post(f"{proxy.url}{CHAT}", json=chat("x", model="gpt-5"))
    assert disallowed.status_code == 403 and "gpt5" in disallowed.json()["error"]["message"]
    claude = httpx.post(
        f"{proxy.url}/proxy/anthropic/v1/messages",
        json={"model": "claude-opus-5", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
    )
    assert claude.status_code == 200  # `claude` stands for every Claude family, as in the original
    assert [m.id for m in openai_client(proxy).models.list()] == ["gpt-4o", "gpt-4o-mini"]
    missing = httpx.post(f"{proxy.url}{CHAT}", json={"messages": []})
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "model_missing"
    assert [r.path for r in fake.requests] == ["/v1/messages"]


def test_turbo_only(start_proxy, fake):
    proxy = start_proxy(proxy_env(fake, TURBO_ONLY="true"))
    assert httpx.post(f"{proxy.url}{CHAT}", json=chat("x", model="gpt-4o")).status_code == 403
    assert httpx.post(f"{proxy.url}{CHAT}", json=chat("x", model="gpt-3.5-turbo")).status_code == 200
