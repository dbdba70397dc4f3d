"""Affinity, end to end: a conversation stays on its key, moves only when it must, and a Responses follow-up goes
to the key that made the response; with one instance and with two sharing Redis."""

import hashlib
import json
import threading
import time
import uuid

import httpx
import pytest

from addons.affinity import BINDING_READ_TTL
from tests.conftest import proxy_env
from tests.harness import wait_until
from tests.test_e2e_scaleout import redis_server  # noqa: F401 (a fixture)
from tests.test_e2e_users import ADMIN_KEY, Admin

pytestmark = pytest.mark.e2e

KEYS = ["sk-affinity-one", "sk-affinity-two", "sk-affinity-three"]
CHAT = "/proxy/openai/v1/chat/completions"
RESPONSES = "/proxy/openai/v1/responses"
MESSAGES = "/proxy/anthropic/v1/messages"


def key_id(secret: str) -> str:
    return "oai-" + hashlib.sha256(secret.encode()).hexdigest()[:8]


def keys_for(fake, path: str, where=lambda body: True) -> list[str]:
    """The keys of the requests to `path` that the fake saw, in order, whose JSON body satisfies `where`."""
    return [r.key for r in fake.requests if r.path == path and where(json.loads(r.body))]


def in_conversation(marker: str):
    return lambda body: marker in json.dumps(body)


class Conversation:
    """A chat conversation that grows by one exchange per turn, as a chat client sends it."""

    def __init__(self, proxy, opening: str, url: str = ""):
        self.client = httpx.Client(base_url=url or proxy.url, timeout=30)
        self.messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": opening}]

    def turn(self, proxy=None) -> httpx.Response:
        url = f"{proxy.url}{CHAT}" if proxy else CHAT
        answer = self.client.post(url, json={"model": "gpt-4o", "messages": self.messages})
        assert answer.status_code == 200, answer.text
        reply = answer.json()["choices"][0]["message"]["content"]
        self.messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "go on"}]
        return answer


def test_a_conversation_stays_on_its_key_while_new_ones_spread(start_proxy, fake):
    proxy = start_proxy(proxy_env(fake, OPENAI_KEY=",".join(KEYS)))
    conversation = Conversation(proxy, "the long conversation")
    for n in range(4):
        conversation.turn()
        assert (
            httpx.post(
                f"{proxy.url}{CHAT}",
                json={"model": "gpt-4o", "messages": [{"role": "user", "content": f"a one-off question {n}"}]},
            ).status_code
            == 200
        )
    stays = keys_for(fake, "/v1/chat/completions", in_conversation("the long conversation"))
    one_offs = keys_for(fake, "/v1/chat/completions", in_conversation("one-off"))
    assert len(stays) == 4 and len(set(stays)) == 1
    assert set(one_offs) == set(KEYS) - set(stays)  # new conversations take the least recently used keys


def test_without_affinity_a_conversation_rotates_over_the_keys(start_proxy, fake):
    proxy = start_proxy(proxy_env(fake, OPENAI_KEY=",".join(KEYS), AFFINITY="false"))
    conversation = Conversation(proxy, "the long conversation")
    for _ in range(3):
        conversation.turn()
    assert keys_for(fake, "/v1/chat/completions") == KEYS


def test_the_client_names_its_conversation(start_proxy, fake):
    proxy = start_proxy(
        proxy_env(fake, ANTHROPIC_KEY="ant-affinity-one,ant-affinity-two,ant-affinity-three", OPENAI_KEY=",".join(KEYS))
    )

    def claude(text: str, headers: dict | None = None, **fields) -> None:
        body = {"model": "claude-sonnet-5", "max_tokens": 5, "messages": [{"role": "user", "content": text}]}
        assert httpx.post(f"{proxy.url}{MESSAGES}", headers=headers, json=body | fields).status_code == 200

    session = {"x-claude-code-session-id": str(uuid.uuid4())}
    user_id = json.dumps({"device_id": "d1", "session_id": str(uuid.uuid4())})
    for n in range(3):  # each turn opens differently: only what the client says names the conversation
        claude(f"by header {n}", session)
        claude(f"by metadata {n}", metadata={"user_id": user_id})
        claude(f"a one-off question {n}")
        claude(f"another one-off question {n}")  # four requests a round on three keys: rotation would show
        response = httpx.post(
            f"{proxy.url}{RESPONSES}",
            json={"model": "gpt-4o", "input": f"by cache key {n}", "prompt_cache_key": "thread-1", "store": False},
        )
        assert response.status_code == 200
        httpx.post(f"{proxy.url}{RESPONSES}", json={"model": "gpt-4o", "input": f"a one-off question {n}"})
    for marker, path in (
        ("by header", "/v1/messages"),
        ("by metadata", "/v1/messages"),
        ("by cache key", "/v1/responses"),
    ):
        assert len(set(keys_for(fake, path, in_conversation(marker)))) == 1, marker
    by_header = keys_for(fake, "/v1/messages", in_conversation("by header"))
    assert by_header != keys_for(fake, "/v1/messages", in_conversation("by metadata"))  # two conversations
    recorded = [r for r in fake.requests if r.path == "/v1/messages"]
    assert not any(name.lower() == "x-claude-code-session-id" for r in recorded for name, _ in r.headers)


def test_a_conversation_moves_when_its_key_rests_and_stays_on_the_new_key(start_proxy, fake):
    proxy = start_proxy(proxy_env(fake, OPENAI_KEY=",".join(KEYS), ADMIN_KEY=ADMIN_KEY))
    conversation = Conversation(proxy, "the long conversation")
    conversation.turn()
    [first] = keys_for(fake, "/v1/chat/completions")
    fake.set_key_behaviour(first, "rate_limit_for", seconds=1)
    conversation.turn()
    moved = keys_for(fake, "/v1/chat/completions")[-1]
    assert keys_for(fake, "/v1/chat/completions") == [first, first, moved] and moved != first

    def rested(key_secret: str) -> bool:
        listed = {key["id"]: key for key in Admin(proxy).get("/keys").json()["keys"]}
        return not listed[key_id(key_secret)]["resting"]

    wait_until(lambda: rested(first))  # the old key is free again, and the third key was never used
    for _ in range(2):
        conversation.turn()
    assert keys_for(fake, "/v1/chat/completions")[3:] == [moved, moved]


def create_response(proxy, text: str, stream: bool = False, client: httpx.Client | None = None) -> str:
    """A stored response's id, made through the proxy (buffered or streamed)."""
    body = {"model": "gpt-4o", "input": text, "stream": stream}
    answer = (client or httpx).post(f"{proxy.url}{RESPONSES}", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    if not stream:
        return answer.json()["id"]
    events = [json.loads(line.removeprefix("data: ")) for line in answer.text.splitlines() if line.startswith("data: ")]
    return next(event["response"]["id"] for event in events if event["type"] == "response.created")


def follow_up(proxy, previous: str, client: httpx.Client | None = None) -> httpx.Response:
    body = {"model": "gpt-4o", "input": "and then?", "previous_response_id": previous}
    return (client or httpx).post(f"{proxy.url}{RESPONSES}", json=body, timeout=30)


def follow_up_keys(fake, previous: str) -> list[str]:
    return keys_for(fake, "/v1/responses", lambda body: body.get("previous_response_id") == previous)


def test_a_follow_up_goes_to_the_key_that_made_the_response(start_proxy, fake):
    low, high = KEYS[:2]
    fake.set_key_behaviour(low, "ok", budget=10)  # after one request 90 % of its requests are left
    fake.set_key_behaviour(high, "ok", budget=1000)
    proxy = start_proxy(proxy_env(fake, OPENAI_KEY=f"{low},{high}"))
    made_on_low = create_response(proxy, "first")
    create_response(proxy, "an unrelated question")  # goes to the key with more headroom
    made_on_high = create_response(proxy, "second", stream=True)
    assert keys_for(fake, "/v1/responses") == [low, high, high]
    for _ in range(2):
        assert follow_up(proxy, made_on_low).status_code == 200
        assert follow_up(proxy, made_on_high).status_code == 200
    assert follow_up_keys(fake, made_on_low) == [low, low]  # although the other key has more headroom
    assert follow_up_keys(fake, made_on_high) == [high, high]  # the streamed response's id was read from its events
    assert follow_up(proxy, "resp_never_made_here").status_code == 200  # unknown: sent like any request


def test_a_follow_up_waits_while_its_key_rests(start_proxy, fake):
    proxy = start_proxy(proxy_env(fake, OPENAI_KEY=",".join(KEYS[:2]), MAX_QUEUED_PER_IDENTITY="5"))
    previous = create_response(proxy, "first")
    [maker] = keys_for(fake, "/v1/responses")
    fake.set_key_behaviour(maker, "rate_limit_for", seconds=2)
    result = {}
    waiting = threading.Thread(target=lambda: result.update(answer=follow_up(proxy, previous)))
    waiting.start()
    wait_until(lambda: follow_up_keys(fake, previous))  # its key answered 429 and now rests for 2 s
    assert create_response(proxy, "meanwhile") and waiting.is_alive()  # the other key serves others meanwhile
    waiting.join()
    assert result["answer"].status_code == 200
    assert follow_up_keys(fake, previous) == [maker, maker]
    other = next(key for key in KEYS[:2] if key != maker)
    assert keys_for(fake, "/v1/responses", lambda body: body["input"] == "meanwhile") == [other]


def test_a_follow_up_of_a_retired_key_or_of_someone_else_gets_a_clear_error(start_proxy, fake):
    proxy = start_proxy(proxy_env(fake, OPENAI_KEY=",".join(KEYS[:2])))
    previous = create_response(proxy, "first")
    [maker] = keys_for(fake, "/v1/responses")
    other_client = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    stranger = follow_up(proxy, previous, other_client)  # another identity (client address)
    assert stranger.status_code == 400 and stranger.json()["error"]["code"] == "previous_response_not_found"
    assert follow_up_keys(fake, previous) == []
    fake.set_key_behaviour(maker, "invalid_key")
    refused = follow_up(proxy, previous)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "previous_response_not_found" and "no longer uses" in error["message"]
    assert follow_up_keys(fake, previous) == [maker]  # never sent to a key that cannot know the response


def test_encrypted_content_waits_for_its_conversations_key(start_proxy, fake):
    proxy = start_proxy(proxy_env(fake, OPENAI_KEY=",".join(KEYS[:2]), MAX_QUEUED_PER_IDENTITY="5"))
    codex = {
        "model": "gpt-4o",
        "prompt_cache_key": "thread-7",
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "reasoning": {"effort": "low"},
    }
    first = httpx.post(f"{proxy.url}{RESPONSES}", json=codex | {"input": "first"}, timeout=30).json()
    [key] = keys_for(fake, "/v1/responses")
    fake.set_key_behaviour(key, "rate_limit_for", seconds=2)
    second = httpx.post(
        f"{proxy.url}{RESPONSES}",
        timeout=30,
        json=codex
        | {"input": [{"role": "user", "content": "first"}, *first["output"], {"role": "user", "content": "second"}]},
    )
    assert second.status_code == 200
    assert keys_for(fake, "/v1/responses") == [key, key, key]  # 429, a wait, then the same key: no other can read it


def test_two_instances_agree_on_a_conversations_key(start_proxy, fake, redis_server):  # noqa: F811
    env = proxy_env(fake, OPENAI_KEY=",".join(KEYS), STORE="redis", REDIS_URL=redis_server.url)
    a, b = start_proxy(env), start_proxy(env)
    Conversation(a, "a conversation that only A sees").turn(a)  # A's first key is now its most recently used
    conversation = Conversation(a, "the shared conversation")
    conversation.turn(a)  # on A's second key; B on its own would take its first
    conversation.turn(b)
    conversation.turn(a)
    keys = keys_for(fake, "/v1/chat/completions", in_conversation("the shared conversation"))
    assert len(keys) == 3 and len(set(keys)) == 1 and keys[0] != KEYS[0]
    fake.set_key_behaviour(keys[0], "rate_limit_for", seconds=30)
    conversation.turn(b)  # B moves it ...
    time.sleep(BINDING_READ_TTL)  # (A takes the binding it read as read for that long)
    conversation.turn(a)  # ... and A follows, although A learned of no rest itself
    moved = keys_for(fake, "/v1/chat/completions", in_conversation("the shared conversation"))[3:]
    assert moved[0] == keys[0] and moved[1] == moved[2] != keys[0]
