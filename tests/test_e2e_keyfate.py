"""No user's request decides a key's fate: only the API's machine-readable error fields, confirmed by the checker.

The fake upstream refuses unknown fields as the real APIs do, echoing their names in the message
(`strict_fields`), so a request can make an upstream error text say `billing`, `insufficient_quota` or
`invalid_api_key`. The first version retired every key on such text (one request took the whole proxy down, also
after a restart).
"""

import itertools

import httpx
import pytest

from tests.conftest import ANTHROPIC_KEYS, OPENAI_KEYS, proxy_env
from tests.harness import wait_until

pytestmark = pytest.mark.e2e

ADMIN_KEY = "admin-key-for-key-fate"
SECOND_ANTHROPIC_KEY = "sk-ant-second-key-for-key-fate"
MARKER_WORDS = [
    "billing",
    "insufficient_quota",
    "billing_not_active",
    "invalid_api_key",
    "access_terminated",
    "account_deactivated",
    "credit_balance",
    "authentication_error",
    "permission_error",
]
CHAT = "/proxy/openai/v1/chat/completions"
MESSAGES = "/proxy/anthropic/v1/messages"


@pytest.fixture
def proxy_and_admin(start_proxy, fake, tmp_path):
    proxy = start_proxy(
        proxy_env(
            fake,
            ADMIN_KEY=ADMIN_KEY,
            DATA_DIR=str(tmp_path / "data"),
            ANTHROPIC_KEY=f"{ANTHROPIC_KEYS[0]},{SECOND_ANTHROPIC_KEY}",
        )
    )
    admin = httpx.Client(base_url=f"{proxy.url}/admin", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    yield proxy, admin
    admin.close()


def settled_keys(admin) -> list[dict]:
    """/admin/keys once no suspicion is left open (the checker's probes have answered)."""

    def settled():
        keys = admin.get("/keys").json()["keys"]
        return keys if not any(key["suspected"] or key["suspected_families"] for key in keys) else None

    return wait_until(settled)


def chat(content: str = "hi", **fields) -> dict:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": content}], **fields}


def message(content: str = "hi", **fields) -> dict:
    return {"model": "claude-sonnet-5", "max_tokens": 5, "messages": [{"role": "user", "content": content}], **fields}


HOSTILE = [
    *[(CHAT, chat(**{word: 1})) for word in MARKER_WORDS],  # "Unrecognized request argument supplied: <word>"
    *[(MESSAGES, message(**{word: 1})) for word in MARKER_WORDS],  # "<word>: Extra inputs are not permitted"
    (CHAT, chat("#fake:status=401")),  # an answer this request provokes from every key
    (MESSAGES, message("#fake:status=401")),
    (CHAT, chat("#fake:error=insufficient_quota")),
    (MESSAGES, message("#fake:error=credit_balance")),
    (CHAT, chat("#fake:error=permission")),  # OpenAI: 403 for the region, not the key
    (MESSAGES, message("#fake:error=permission")),  # Anthropic: 403 permission_error, about this request
]


@pytest.mark.parametrize("path, body", HOSTILE, ids=lambda value: str(value)[:60])
def test_no_request_can_retire_a_key(proxy_and_admin, fake, path, body):
    proxy, admin = proxy_and_admin
    fake.strict_fields = True
    for _ in range(2):
        refused = httpx.post(f"{proxy.url}{path}", json=body)
        assert refused.status_code >= 400
    keys = settled_keys(admin)
    assert [key["state"] for key in keys] == ["active"] * 4 and all(key["families"] is None for key in keys)
    # Every key still serves: new conversations (one would stay on its key) reach each of them in time. A key the
    # upstream just reported as out of requests for a moment (the 429 cases) is skipped until its window resets.
    fake.reset()
    conversations = itertools.count()

    def every_key_served() -> bool:
        n = next(conversations)
        assert httpx.post(f"{proxy.url}{CHAT}", json=chat(f"hi {n}")).status_code == 200
        assert httpx.post(f"{proxy.url}{MESSAGES}", json=message(f"hi {n}")).status_code == 200
        return {recorded.key for recorded in fake.requests} == {*OPENAI_KEYS, ANTHROPIC_KEYS[0], SECOND_ANTHROPIC_KEY}

    wait_until(every_key_served)


def test_a_request_that_fails_on_every_key_makes_at_most_one_suspect(proxy_and_admin, fake):
    proxy, admin = proxy_and_admin
    refused = httpx.post(f"{proxy.url}{CHAT}", json=chat("#fake:status=401"))
    assert refused.status_code == 401  # the upstream's own answer, after one other key was tried
    client_requests = [r for r in fake.requests if r.path == "/v1/chat/completions" and b"#fake" in r.body]
    assert len(client_requests) == 2
    assert [key["state"] for key in settled_keys(admin)] == ["active"] * 4


def test_a_dead_key_is_retired_once_the_checker_confirms_with_the_reason_shown(proxy_and_admin, fake):
    proxy, admin = proxy_and_admin
    fake.set_key_behaviour(OPENAI_KEYS[0], "invalid_key")
    for _ in range(3):
        assert httpx.post(f"{proxy.url}{CHAT}", json=chat()).status_code == 200  # the other key serves
    (dead,) = [key for key in settled_keys(admin) if key["state"] != "active"]
    assert dead["state"] == "revoked" and dead["service"] == "openai"
    assert "confirmed" in dead["reason"] and "401" in dead["reason"] and dead["retired_at"]
    assert OPENAI_KEYS[0] not in str(admin.get("/keys").json())


def test_a_key_over_quota_is_retired_as_over_quota(proxy_and_admin, fake):
    proxy, admin = proxy_and_admin
    fake.set_key_behaviour(SECOND_ANTHROPIC_KEY, "credit_balance")
    for n in range(3):  # three conversations, so that the keys take turns
        assert httpx.post(f"{proxy.url}{MESSAGES}", json=message(f"hi {n}")).status_code == 200
    states = sorted(key["state"] for key in settled_keys(admin) if key["service"] == "anthropic")
    assert states == ["active", "over_quota"]


def test_a_403_for_a_family_bars_the_key_from_that_family_only(proxy_and_admin, fake):
    proxy, admin = proxy_and_admin
    fake.set_key_behaviour(SECOND_ANTHROPIC_KEY, "permission")
    for n in range(3):  # three conversations, so that the keys take turns
        assert httpx.post(f"{proxy.url}{MESSAGES}", json=message(f"hi {n}")).status_code == 200
    anthropic_keys = [key for key in settled_keys(admin) if key["service"] == "anthropic"]
    assert [key["state"] for key in anthropic_keys] == ["active", "active"]
    barred = [key for key in anthropic_keys if key["families"] is not None]
    assert len(barred) == 1 and "claude-sonnet" not in barred[0]["families"] and "claude-opus" in barred[0]["families"]
