"""One contract for both state stores: every test runs against SQLiteStore and against RedisStore.

The Redis runs use a real `redis-server` on a free loopback port, started once for the session; each test gets
its own key prefix. The tests at the end cover what only a shared store has: several instances on one
server, leases that run out, and an unreachable server.
"""

import inspect
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from llmproxy.store import base, open_store
from llmproxy.store import redis as redis_backend
from llmproxy.store import sqlite as sqlite_backend
from llmproxy.store.base import USAGE_FIGURES, KeyHealth, Store, StoreUnavailable, UserError, token_hash
from llmproxy.store.redis import IN_FLIGHT_SECONDS, LEASE_SECONDS, RedisStore
from llmproxy.store.sqlite import SQLiteStore
from llmproxy.usage_days import day_counter
from tests.harness import RedisServer

USER_KEYS = {
    "id",
    "token_hash",
    "nickname",
    "type",
    "created_at",
    "last_used_at",
    "ips",
    "max_ips",
    "token_limits",
    "rate_limit",
    "expires_at",
    "admin_note",
    "prompt_count",
    "disabled_at",
    "disabled_reason",
    "usage",
}


@pytest.fixture(scope="session")
def redis_url():
    server = RedisServer().start()
    yield server.url
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"test-{secrets.token_hex(4)}:"


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path, prefix) -> Iterator[Store]:
    """Each backend in turn, used only through the Store protocol."""
    if request.param == "sqlite":
        opened = SQLiteStore(tmp_path / "proxy.sqlite3")
    else:
        opened = RedisStore(request.getfixturevalue("redis_url"), prefix)
    yield opened
    opened.close()


@pytest.fixture
def redis_store(redis_url, prefix):
    opened = RedisStore(redis_url, prefix)
    yield opened
    opened.close()


@pytest.fixture
def shared(redis_url, prefix):
    """A second instance on the server and prefix of `redis_store`."""
    other = RedisStore(redis_url, prefix)
    yield other
    other.close()


def columns(user: dict) -> dict:
    """A user as `admit` returns it: without its usage."""
    return {k: v for k, v in user.items() if k != "usage"}


def figures(**given: int) -> dict:
    """A family's usage figures: those given, and 0 for the rest."""
    return {**dict.fromkeys(USAGE_FIGURES, 0), **given}


class Clock:
    """Stands in for the `time` module of the store modules, to jump ahead without waiting."""

    def __init__(self, offset: float = 0):
        self.offset = offset

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """Both stores' clock, moved on by the test (`clock.offset += seconds`) instead of slept through."""
    moved = Clock()
    for module in (base, sqlite_backend, redis_backend):
        monkeypatch.setattr(module, "time", moved)
    return moved


# -- the protocol ------------------------------------------------------------------------------------------

PROTOCOL_OPERATIONS = {name for name, member in vars(Store).items() if callable(member) and not name.startswith("_")}


def parameters(function) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("backend", [SQLiteStore, RedisStore])
def test_each_backend_has_exactly_the_operations_of_the_protocol(backend):
    public = {name for name, member in vars(backend).items() if callable(member) and not name.startswith("_")}
    assert public == PROTOCOL_OPERATIONS  # an operation only one backend has would escape the contract
    for name in PROTOCOL_OPERATIONS:
        assert parameters(getattr(backend, name)) == parameters(getattr(Store, name)), name


def test_open_store_opens_sqlite_at_a_path_and_redis_at_a_url(tmp_path, redis_url):
    for target, backend in ((tmp_path / "proxy.sqlite3", SQLiteStore), (redis_url, RedisStore)):
        opened = open_store(target)
        try:
            assert type(opened) is backend
        finally:
            opened.close()


# -- keys --------------------------------------------------------------------------------------------------


def test_key_health(store):
    assert store.key_health() == {}
    store.set_key_health("k1", "revoked", "401 from upstream")
    store.set_key_health("k2", "over_quota")
    health = store.key_health()
    assert set(health) == {"k1", "k2"} and isinstance(health["k1"], KeyHealth)
    assert (health["k1"].state, health["k1"].reason) == ("revoked", "401 from upstream")
    assert health["k2"].reason == "" and abs(health["k2"].changed_at - time.time()) < 5
    store.set_key_health("k1", "over_quota", "billing")
    store.set_key_health("k2", None)
    assert {k: (h.state, h.reason) for k, h in store.key_health().items()} == {"k1": ("over_quota", "billing")}


def test_key_rests_end_by_themselves(store, clock):
    now = time.time()
    store.set_key_rest("k1", "gpt4o", now + 60)
    store.set_key_rest("k1", "gpt4", now + 5)
    store.set_key_rest("k2", "gpt4o", now - 1)
    assert store.key_rests() == {("k1", "gpt4o"): pytest.approx(now + 60), ("k1", "gpt4"): pytest.approx(now + 5)}
    store.set_key_rest("k1", "gpt4o", now + 30)  # a new rest replaces the old one
    clock.offset += 10
    assert store.key_rests() == {("k1", "gpt4o"): pytest.approx(now + 30)}


def test_key_states_are_health_and_rests_together(store):
    assert store.key_states() == ({}, {})
    store.set_key_health("k1", "revoked", "401 from upstream")
    store.set_key_rest("k2", "gpt4o", time.time() + 60)
    store.set_key_rest("k3", "gpt4o", time.time() - 1)
    assert store.key_states() == (store.key_health(), store.key_rests())
    assert set(store.key_states()[0]) == {"k1"} and set(store.key_states()[1]) == {("k2", "gpt4o")}


# -- users -------------------------------------------------------------------------------------------------


def test_create_and_read_users(store):
    token, user = store.create_user({"nickname": "ann", "max_ips": 2, "token_limits": {"gpt4o": 100}, "expires_at": 5})
    assert set(user) == USER_KEYS
    assert user == {
        "id": user["token_hash"][:16],
        "token_hash": token_hash(token),
        "nickname": "ann",
        "type": "normal",
        "created_at": pytest.approx(time.time(), abs=5),
        "last_used_at": None,
        "ips": [],
        "max_ips": 2,
        "token_limits": {"gpt4o": 100},
        "rate_limit": None,
        "expires_at": 5.0,
        "admin_note": None,
        "prompt_count": 0,
        "disabled_at": None,
        "disabled_reason": None,
        "usage": {},
    }
    assert type(user["expires_at"]) is float and type(user["created_at"]) is float
    assert store.get_user(user["id"]) == user and store.user_by_token(token) == user
    assert store.get_user("nobody") is None and store.user_by_token("not-a-token") is None
    _, other = store.create_user({"type": "special", "nickname": ""})
    assert other["nickname"] == "" and other["type"] == "special"
    assert sorted(u["id"] for u in store.list_users()) == sorted([user["id"], other["id"]])
    with pytest.raises(UserError):
        store.create_user({"type": "admin"})
    with pytest.raises(UserError):
        store.create_user({"prompt_count": 3})


def test_update_user_sets_editable_fields_only(store):
    _, user = store.create_user({"nickname": "ann", "admin_note": "x"})
    updated = store.update_user(user["id"], {"nickname": None, "rate_limit": 7, "token_limits": {"claude": 5}})
    assert (updated["nickname"], updated["rate_limit"], updated["token_limits"], updated["admin_note"]) == (
        None,
        7,
        {"claude": 5},
        "x",
    )
    assert store.get_user(user["id"]) == updated
    for fields in (
        {"prompt_count": 0},
        {"token_hash": "0" * 64},
        {"ips": []},
        {"disabled_at": None},
        {"max_ips": True},
        {"rate_limit": "7"},
        {"token_limits": {"gpt4o": -1}},
    ):
        with pytest.raises(UserError):
            store.update_user(user["id"], fields)
    assert store.update_user(user["id"], {}) == updated
    assert store.update_user("nobody", {"nickname": "ghost"}) is None
    assert store.get_user("nobody") is None and len(store.list_users()) == 1


def test_set_disabled_and_delete(store):
    token, user = store.create_user({})
    disabled = store.set_disabled(user["id"], "Abuse.")
    assert disabled["disabled_reason"] == "Abuse." and abs(disabled["disabled_at"] - time.time()) < 5
    enabled = store.set_disabled(user["id"], None)
    assert (enabled["disabled_at"], enabled["disabled_reason"]) == (None, None)
    assert store.set_disabled("nobody", "x") is None
    store.reserve(user["id"], "gpt4o", 10, None)
    assert store.delete_user(user["id"]) is True
    assert store.get_user(user["id"]) is None and store.user_by_token(token) is None and store.list_users() == []
    assert store.delete_user(user["id"]) is False


def test_export_import_round_trip(store):
    ann_token, ann = store.create_user({"nickname": "ann", "token_limits": {"gpt4o": 100}})
    _, bob = store.create_user({"type": "temporary", "expires_at": 12.5})
    store.admit(ann_token, "10.0.0.1", 0, False)
    store.reserve(ann["id"], "gpt4o", 40, 100)
    store.settle(ann["id"], "gpt4o", 40, 30)
    store.set_disabled(bob["id"], "Paused.")
    exported = store.export_users()
    assert sorted(u["id"] for u in exported) == sorted([ann["id"], bob["id"]])
    for user in exported:
        store.delete_user(user["id"])
    assert store.import_users(exported) == 2
    assert sorted(store.export_users(), key=lambda u: u["id"]) == sorted(exported, key=lambda u: u["id"])
    assert store.get_user(ann["id"])["usage"] == {"gpt4o": figures(used=30, reserved=0)}
    assert store.import_users([{"token_hash": ann["token_hash"], "nickname": "anne"}]) == 1  # replaces
    assert store.get_user(ann["id"])["nickname"] == "anne"


def test_import_is_all_or_nothing(store):
    valid = {"token_hash": "a" * 64, "nickname": "fine"}
    for bad in ({"token_hash": "short"}, {"token_hash": "b" * 64, "prompt_count": 1, "type": "root"}, "text"):
        with pytest.raises(UserError):
            store.import_users([valid, bad])
    assert store.list_users() == []


def test_admit_limits_addresses_and_bans(store):
    token, user = store.create_user({})
    assert store.admit(token, "10.0.0.1", 2, False)[1] == "ok"
    assert store.admit(token, "10.0.0.1", 2, False)[1] == "ok"
    seen, visit = store.admit(token, "2001:db8::1", 2, False)
    assert visit == "ok" and seen == columns(store.get_user(user["id"]))
    assert store.admit(token, "10.0.0.3", 2, False)[1] == "limited"
    seen = store.get_user(user["id"])
    assert seen["ips"] == ["10.0.0.1", "2001:db8::1"] and seen["disabled_at"] is None
    assert abs(seen["last_used_at"] - time.time()) < 5
    assert store.admit(token, "10.0.0.1", 2, True)[1] == "ok"  # a known address is always fine
    banned, visit = store.admit(token, "10.0.0.3", 2, True)
    assert visit == "banned" and banned == columns(store.get_user(user["id"]))
    assert banned["disabled_reason"] == "IP address limit exceeded." and banned["disabled_at"] is not None
    assert banned["ips"] == ["10.0.0.1", "2001:db8::1", "10.0.0.3"]
    assert store.admit(token, "10.0.0.4", 2, True) == (banned, "ok")  # a disabled user's visit is not noted
    free_token, free = store.create_user({})
    assert all(store.admit(free_token, f"10.1.0.{i}", 0, True)[1] == "ok" for i in range(5))
    assert len(store.get_user(free["id"])["ips"]) == 5
    assert store.admit("not-a-token", "10.0.0.1", 2, True) == (None, "ok")


def test_admit_uses_the_users_own_address_limit_and_spares_special_users(store):
    token, user = store.create_user({"max_ips": 1})
    assert store.admit(token, "10.0.0.1", 0, False)[1] == "ok"
    assert store.admit(token, "10.0.0.2", 0, False)[1] == "limited"  # its own limit, not the proxy's "any"
    store.update_user(user["id"], {"max_ips": 0})
    assert store.admit(token, "10.0.0.2", 1, False)[1] == "ok"  # 0 of its own: no limit
    special_token, special = store.create_user({"type": "special"})
    assert store.admit(special_token, "10.0.0.9", 1, True) == (columns(special), "ok")  # no limit for them
    assert store.get_user(special["id"]) == special  # and nothing noted


def test_admit_disables_an_expired_temporary_user(store):
    expired_token, expired = store.create_user({"type": "temporary", "expires_at": time.time() - 1})
    user, visit = store.admit(expired_token, "10.0.0.1", 0, False)
    assert visit == "ok" and user["disabled_reason"] == "Temporary token expired." and user["disabled_at"]
    assert store.get_user(expired["id"])["ips"] == []  # a refused visit is not noted
    assert store.get_user(expired["id"])["disabled_reason"] == "Temporary token expired."
    for fields in ({"type": "temporary", "expires_at": time.time() + 600}, {"type": "temporary"}):
        token, _ = store.create_user(fields)
        user, visit = store.admit(token, "10.0.0.1", 0, False)
        assert (visit, user["disabled_at"], user["ips"]) == ("ok", None, ["10.0.0.1"])


# -- usage -------------------------------------------------------------------------------------------------


def test_reserve_and_settle(store):
    _, user = store.create_user({})
    uid = user["id"]
    assert store.reserve(uid, "gpt4o", 60, 100)
    assert not store.reserve(uid, "gpt4o", 41, 100)
    assert store.get_user(uid)["usage"] == {"gpt4o": figures(used=0, reserved=60)}
    assert store.reserve(uid, "gpt4o", 40, 100)
    store.settle(uid, "gpt4o", 60, 25)  # the request used less than it reserved
    assert store.get_user(uid)["usage"]["gpt4o"] == figures(used=25, reserved=40)
    store.settle(uid, "gpt4o", 40, 0)  # a failed request costs nothing and is not a prompt
    after = store.get_user(uid)
    assert after["usage"]["gpt4o"] == figures(used=25, reserved=0) and after["prompt_count"] == 1
    assert store.reserve(uid, "gpt4o", 75, 100) and not store.reserve(uid, "gpt4o", 1, 100)
    assert store.reserve(uid, "claude", 10**9, None)  # no limit
    assert not store.reserve(uid, "gemini", 1, 0)
    assert store.get_user(uid)["usage"]["gemini"] == figures(used=0, reserved=0)


def fifty_at_once(reserve, request) -> list[bool]:
    """Fifty calls of `reserve`: released together from fifty threads against Redis, one after another against
    SQLite (single-threaded by design)."""
    if request.node.callspec.params["store"] == "sqlite":
        return [reserve() for _ in range(50)]
    results, start = [], threading.Barrier(50)

    def run():
        start.wait()
        results.append(reserve())

    threads = [threading.Thread(target=run) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_concurrent_reservations_never_exceed_the_limit(store, request):
    _, user = store.create_user({})
    results = fifty_at_once(lambda: store.reserve(user["id"], "gpt4o", 1, 5), request)
    assert results.count(True) == 5 and len(results) == 50
    assert store.get_user(user["id"])["usage"]["gpt4o"] == figures(used=0, reserved=5)


def test_reset_usage(store):
    (_, ann), (_, bob) = store.create_user({}), store.create_user({})
    for user in (ann, bob):
        store.reserve(user["id"], "gpt4o", 10, None)
        store.settle(user["id"], "gpt4o", 10, 10)
        store.reserve(user["id"], "gpt4o", 5, None)
    store.reset_usage(ann["id"])
    assert store.get_user(ann["id"])["usage"]["gpt4o"] == figures(used=0, reserved=5)
    assert store.get_user(bob["id"])["usage"]["gpt4o"] == figures(used=10, reserved=5)
    store.reset_usage()
    assert store.get_user(bob["id"])["usage"]["gpt4o"] == figures(used=0, reserved=5)
    assert store.get_user(bob["id"])["prompt_count"] == 1


def test_counters(store):
    assert store.counters() == {}
    store.add_to_counters(prompts=1, tokens=120)
    store.add_to_counters(prompts=1, tokens=30, errors=0)
    assert store.counters() == {"prompts": 2, "tokens": 150, "errors": 0}


def test_settle_adds_to_the_counters_in_the_same_step(store):
    _, user = store.create_user({})
    store.add_to_counters(prompts=1, tokens=120)
    assert store.reserve(user["id"], "gpt4o", 60, 100)
    store.settle(user["id"], "gpt4o", 60, 25, counters={"prompts": 1, "tokens": 25, "tokens:gpt4o": 25})
    assert store.counters() == {"prompts": 2, "tokens": 145, "tokens:gpt4o": 25}
    assert store.get_user(user["id"])["usage"]["gpt4o"] == figures(used=25)
    store.settle(user["id"], "gpt4o", 0, 0)  # no counters: none change
    assert store.counters() == {"prompts": 2, "tokens": 145, "tokens:gpt4o": 25}


def test_daily_counters_are_kept_apart_from_the_others(store):
    _, user = store.create_user({})
    assert store.daily_counters("2000-01-01") == {}
    tokens_on = {day: day_counter(day, "tokens", "gpt4o") for day in ("2026-11-30", "2026-12-01", "2026-12-02")}
    prompts = day_counter("2026-12-02", "prompts", "ns:gpt4o")  # a family name may hold colons
    # Names that sort just before or after the daily ones ("day:" up to "day;") are ordinary counters.
    ordinary = {"day": 1, "days": 2, "day;": 3, "daz": 4, "tokens": 5}
    store.add_to_counters(**ordinary, **{tokens_on["2026-11-30"]: 7})
    store.settle(user["id"], "gpt4o", 0, 20, counters={"tokens": 20, tokens_on["2026-12-01"]: 20})
    store.settle(user["id"], "gpt4o", 0, 30, counters={tokens_on["2026-12-02"]: 30, prompts: 1})
    store.add_to_counters(**{tokens_on["2026-12-02"]: 5, prompts: 1})
    assert store.counters() == {**ordinary, "tokens": 25}
    assert store.daily_counters("2026-11-30") == {
        tokens_on["2026-11-30"]: 7,
        tokens_on["2026-12-01"]: 20,
        tokens_on["2026-12-02"]: 35,
        prompts: 2,
    }
    assert store.daily_counters("2026-12-02") == {tokens_on["2026-12-02"]: 35, prompts: 2}
    assert store.daily_counters("2026-12-03") == {}


def test_settle_without_a_reservation_bills_an_existing_user_only(store):
    """A user without limits reserves nothing (a round trip to a shared store saved); the settlement bills it."""
    _, user = store.create_user({})
    store.settle(user["id"], "claude-sonnet", 0, 40, spent={"input": 30, "output": 10, "cost_nanousd": 7})
    usage = store.get_user(user["id"])["usage"]["claude-sonnet"]
    assert usage == figures(used=40, input=30, output=10, cost_nanousd=7)
    assert store.get_user(user["id"])["prompt_count"] == 1
    large = 123_456_789_012_345_678  # nano-dollars; no figure passes through a floating-point number
    store.settle(user["id"], "claude-sonnet", 0, 0, spent={"cost_nanousd": large}, counters={"cost_nanousd": large})
    assert store.get_user(user["id"])["usage"]["claude-sonnet"]["cost_nanousd"] == 7 + large
    assert store.counters()["cost_nanousd"] == large
    store.delete_user(user["id"])
    store.settle(user["id"], "claude-sonnet", 0, 40, spent={"input": 40})
    assert store.get_user(user["id"]) is None and all(u["id"] != user["id"] for u in store.export_users())


# -- windows -----------------------------------------------------------------------------------------------


def test_rate_window_allows_exactly_the_limit(store, clock):
    first = time.time()
    results = [store.hit_rate_window("user:a", 3, 60) for _ in range(4)]
    assert [(allowed, remaining) for allowed, remaining, *_ in results] == [(True, 2), (True, 1), (True, 0), (False, 0)]
    assert all(first + 60 <= reset_at <= time.time() + 60 for _, _, reset_at, _ in results)
    assert store.hit_rate_window("user:b", 3, 60)[:2] == (True, 2)  # windows are per identity
    clock.offset += 61  # past the reset time of the window's first hit
    allowed, remaining, *_ = store.hit_rate_window("user:a", 3, 60)
    assert allowed and remaining == 2


def test_a_refunded_hit_frees_its_place_in_the_window(store):
    first = store.hit_rate_window("user:a", 2, 60)
    assert store.hit_rate_window("user:a", 2, 60)[:2] == (True, 0)
    store.refund_rate_window("user:a", first[3])
    assert store.hit_rate_window("user:a", 2, 60)[:2] == (True, 0)  # the refunded place was free again
    assert not store.hit_rate_window("user:a", 2, 60)[0]
    assert store.hit_rate_window("user:a", 1, 60, "count_tokens")[:2] == (True, 0)  # a bucket is a window of its own


def test_active_identities(store, clock):
    assert store.active_identities(60) == 0
    store.hit_rate_window("user:a", 5, 60)
    store.hit_rate_window("user:b", 1, 60)
    store.hit_rate_window("user:b", 1, 60)  # refused: not counted, still active from the first
    store.hit_rate_window("user:d", 1, 60, "count_tokens")  # token counts make no one active
    assert store.active_identities(60) == 2
    clock.offset += 30
    store.hit_rate_window("user:c", 5, 60)
    assert store.active_identities(20) == 1


def test_recent_waits(store, clock):
    store.record_wait("gpt4o", 2.5)
    store.record_wait("gpt4o", 4.0)
    store.record_wait("gpt4", 9.0)
    assert sorted(store.recent_waits("gpt4o", 300)) == [2.5, 4.0]
    clock.offset += 301
    assert store.recent_waits("gpt4o", 300) == [] and store.recent_waits("claude", 300) == []


def test_enter_and_leave(store):
    assert store.enter("user:a", 2) and store.enter("user:a", 2)
    assert not store.enter("user:a", 2)
    assert store.enter("user:b", 2)  # per identity
    store.leave("user:a")
    assert store.enter("user:a", 2) and not store.enter("user:a", 2)
    assert all(store.enter("user:c", 0) for _ in range(20))  # 0: no limit
    store.leave("user:nobody")
    assert store.enter("user:nobody", 1)


# -- Redis only: several instances, leases, outages --------------------------------------------------------


def test_instances_share_everything(redis_store, shared):
    _, user = redis_store.create_user({})
    assert shared.get_user(user["id"]) == user
    assert redis_store.reserve(user["id"], "gpt4o", 60, 100) and not shared.reserve(user["id"], "gpt4o", 60, 100)
    assert redis_store.hit_rate_window("user:a", 1, 60)[0] and not shared.hit_rate_window("user:a", 1, 60)[0]
    assert redis_store.enter("user:a", 1) and not shared.enter("user:a", 1)
    shared.leave("user:a")
    assert redis_store.enter("user:a", 1)
    redis_store.set_key_rest("k1", "gpt4o", time.time() + 60)
    redis_store.set_key_health("k2", "revoked", "401")
    assert set(shared.key_rests()) == {("k1", "gpt4o")} and set(shared.key_health()) == {"k2"}
    assert shared.active_identities(60) == 1


def test_reservations_of_a_crashed_instance_lapse(redis_store, shared, monkeypatch):
    _, user = redis_store.create_user({})
    assert shared.reserve(user["id"], "gpt4o", 80, 100)  # and then that instance dies without settling
    assert redis_store.reserve(user["id"], "gpt4o", 20, 100) and not redis_store.reserve(user["id"], "gpt4o", 1, 100)
    monkeypatch.setattr(redis_backend, "time", Clock(LEASE_SECONDS - 60))
    assert not redis_store.reserve(user["id"], "gpt4o", 1, 100)  # still within the lease
    monkeypatch.setattr(redis_backend, "time", Clock(LEASE_SECONDS + 1))
    assert redis_store.get_user(user["id"])["usage"]["gpt4o"] == figures(used=0, reserved=0)
    assert redis_store.reserve(user["id"], "gpt4o", 100, 100)
    redis_store.settle(user["id"], "gpt4o", 20, 20)  # the lapsed lease of 20 releases nothing
    assert redis_store.get_user(user["id"])["usage"]["gpt4o"] == figures(used=20, reserved=100)


def test_settle_releases_the_newest_lease_so_a_lost_one_lapses_first(redis_store, shared, monkeypatch):
    _, user = redis_store.create_user({})
    assert shared.reserve(user["id"], "gpt4o", 5, None)  # lost with its instance
    monkeypatch.setattr(redis_backend, "time", Clock(600))
    assert redis_store.reserve(user["id"], "gpt4o", 5, None)
    redis_store.settle(user["id"], "gpt4o", 5, 5)
    assert redis_store.get_user(user["id"])["usage"]["gpt4o"] == figures(used=5, reserved=5)
    monkeypatch.setattr(redis_backend, "time", Clock(LEASE_SECONDS + 1))
    assert redis_store.get_user(user["id"])["usage"]["gpt4o"] == figures(used=5, reserved=0)


def test_in_flight_slots_of_a_crashed_instance_lapse(redis_store, monkeypatch):
    assert redis_store.enter("user:a", 1) and not redis_store.enter("user:a", 1)
    monkeypatch.setattr(redis_backend, "time", Clock(IN_FLIGHT_SECONDS + 1))
    assert redis_store.enter("user:a", 1)


def test_an_export_moves_between_backends(tmp_path, redis_store):
    sqlite = SQLiteStore(tmp_path / "proxy.sqlite3")
    try:
        token, user = sqlite.create_user({"nickname": "ann", "max_ips": 3, "expires_at": 7, "admin_note": "vip"})
        sqlite.admit(token, "10.0.0.1", 3, False)
        sqlite.reserve(user["id"], "gpt4o", 10, None)
        sqlite.settle(user["id"], "gpt4o", 10, 9)
        assert redis_store.import_users(sqlite.export_users()) == 1
        assert redis_store.export_users() == sqlite.export_users()
        assert sqlite.import_users(redis_store.export_users()) == 1
        assert sqlite.export_users() == redis_store.export_users()
    finally:
        sqlite.close()


def test_a_wrong_url_fails_at_construction():
    port = RedisServer().port  # a free port nothing listens on
    with pytest.raises(StoreUnavailable) as caught:
        RedisStore(f"redis://127.0.0.1:{port}/0")
    assert str(caught.value) == f"Redis at redis://127.0.0.1:{port}/0 is unreachable (ConnectionError)."
    with pytest.raises(StoreUnavailable) as caught:
        RedisStore(f"redis://:hunter2@127.0.0.1:{port}/0")
    assert "hunter2" not in str(caught.value)
    with pytest.raises(StoreUnavailable, match="not a usable Redis URL"):
        RedisStore("http://127.0.0.1/")


def test_an_outage_raises_store_unavailable_and_the_store_recovers(prefix):
    server = RedisServer().start()
    opened = RedisStore(server.url, prefix)
    try:
        _, user = opened.create_user({})
        server.stop()
        for call in (opened.counters, lambda: opened.reserve(user["id"], "gpt4o", 1, 10)):
            with pytest.raises(StoreUnavailable) as caught:
                call()
            assert re.fullmatch(rf"Redis at {re.escape(server.url)} is unreachable \(\w+\)\.", str(caught.value))
            assert not isinstance(caught.value, redis.exceptions.RedisError)
        server.start()  # the same port, an empty server: nothing was saved
        assert opened.counters() == {}
        _, user = opened.create_user({})
        assert opened.reserve(user["id"], "gpt4o", 1, 10)  # scripts are loaded again
    finally:
        opened.close()
        server.stop()


# -- affinity: conversations and responses bound to keys -----------------------------------------------------


def test_affinity_binds_only_over_what_the_caller_saw(store):
    assert store.affinity("session", "s1", 3600) is None
    assert store.bind_affinity("session", "s1", "k1", None, 3600, 10) == "k1"
    assert store.bind_affinity("session", "s1", "k2", None, 3600, 10) == "k1"  # someone bound it first: theirs wins
    assert store.bind_affinity("session", "s1", "k2", "k3", 3600, 10) == "k1"
    assert store.bind_affinity("session", "s1", "k2", "k1", 3600, 10) == "k2"  # a move from what it was
    assert store.affinity("session", "s1", 3600) == "k2"
    assert store.affinity("response", "s1", 3600) is None  # spaces are apart


def test_affinity_forgets_after_the_ttl(store, clock):
    store.bind_affinity("session", "s1", "k1", None, 3600, 10)
    clock.offset += 3000
    assert store.affinity("session", "s1", 3600) == "k1"  # a use renews it
    clock.offset += 3000
    assert store.affinity("session", "s1", 3600) == "k1"
    clock.offset += 3601
    assert store.affinity("session", "s1", 3600) is None
    assert store.bind_affinity("session", "s1", "k2", None, 3600, 10) == "k2"  # a forgotten name binds afresh


def test_affinity_keeps_the_most_recently_used_within_its_capacity(store, clock):
    for name in ("a", "b", "c"):
        store.bind_affinity("session", name, "k1", None, 3600, 3)
        clock.offset += 1  # distinct times of use
    assert store.affinity("session", "a", 3600) == "k1"  # now the most recent
    clock.offset += 1
    store.bind_affinity("session", "d", "k2", None, 3600, 3)
    assert [store.affinity("session", name, 3600) for name in "abcd"] == ["k1", None, "k1", "k2"]
    store.bind_affinity("session", "a", "k3", "k1", 3600, 3)  # a move adds no name
    assert [store.affinity("session", name, 3600) for name in "abcd"] == ["k3", None, "k1", "k2"]


def test_instances_agree_on_affinity(redis_store, shared):
    assert redis_store.bind_affinity("session", "s1", "k1", None, 3600, 10) == "k1"
    assert shared.affinity("session", "s1", 3600) == "k1"
    assert shared.bind_affinity("session", "s1", "k2", None, 3600, 10) == "k1"


# -- costs: USD quotas and usage by kind -------------------------------------------------------------------

# A Claude request with cache reads, both kinds of cache writes and three web searches, as the quota keeper settles it.
SPENT = {
    "cost_nanousd": 54_900_000,
    "input": 50,
    "output": 400,
    "cache_read": 10_000,
    "cache_write_5m": 1_000,
    "cache_write_1h": 2_000,
    "reasoning": 0,
    "web_searches": 3,
}


def test_costs_are_reserved_settled_and_reset_with_the_tokens(store):
    _, user = store.create_user({})
    uid = user["id"]
    assert store.reserve(uid, "claude", 20_000, None, 60_000_000, 100_000_000)
    assert not store.reserve(uid, "claude", 1, None, 40_000_001, 100_000_000)  # over the family's USD quota
    assert store.get_user(uid)["usage"]["claude"] == figures(reserved=20_000, reserved_nanousd=60_000_000)
    store.settle(uid, "claude", 20_000, 13_450, 60_000_000, SPENT)
    assert store.get_user(uid)["usage"]["claude"] == figures(used=13_450, **SPENT)
    assert store.reserve(uid, "claude", 1, None, 45_100_000, 100_000_000)  # exactly what is left
    assert not store.reserve(uid, "claude", 1, None, 1, 100_000_000)
    store.settle(uid, "claude", 1, 0, 45_100_000)  # a failed request costs nothing and is not a prompt
    after = store.get_user(uid)
    assert after["usage"]["claude"] == figures(used=13_450, **SPENT) and after["prompt_count"] == 1
    store.reset_usage(uid)
    assert store.get_user(uid)["usage"]["claude"] == figures()
    with pytest.raises(ValueError):
        store.settle(uid, "claude", 0, 1, 0, {"dollars": 1})


def test_a_total_cost_quota_holds_over_every_family(store):
    _, user = store.create_user({})
    uid = user["id"]
    assert store.reserve(uid, "gpt4o", 10, None, 300, None, 1000)
    store.settle(uid, "gpt4o", 10, 10, 300, {"cost_nanousd": 200})
    assert store.reserve(uid, "claude", 10, None, 500, None, 1000)  # 200 spent + 500 held
    assert not store.reserve(uid, "o", 1, None, 301, None, 1000)
    assert not store.reserve(uid, "o", 1, None, 300, 299, 1000)  # the family's own quota holds too
    assert store.reserve(uid, "o", 1, None, 300, 300, 1000)
    assert not store.reserve(uid, "gpt4o", 1, None, 0, None, 999)
    assert store.reserve(uid, "gpt4o", 10, 20, 0)  # a token quota alone
    assert not store.reserve(uid, "gpt4o", 1, 20, 0)


def test_concurrent_cost_reservations_never_exceed_the_limit(store, request):
    _, user = store.create_user({})
    worst_case = 1_015_000  # 6 prompt tokens and 100 output tokens of gpt-4o

    def reserve():
        return store.reserve(user["id"], "gpt4o", 106, None, worst_case, None, 5 * worst_case)

    results = fifty_at_once(reserve, request)
    assert results.count(True) == 5 and len(results) == 50
    assert store.get_user(user["id"])["usage"]["gpt4o"] == figures(reserved=530, reserved_nanousd=5 * worst_case)


def test_an_export_carries_costs_and_usage_by_kind(store):
    _, user = store.create_user({})
    store.reserve(user["id"], "claude", 20_000, None, 60_000_000)
    store.settle(user["id"], "claude", 20_000, 13_450, 60_000_000, SPENT)
    exported = store.export_users()
    store.delete_user(user["id"])
    assert store.import_users(exported) == 1
    assert store.get_user(user["id"])["usage"] == {"claude": figures(used=13_450, **SPENT)}


def test_a_sqlite_store_of_an_earlier_version_gains_the_cost_columns(tmp_path):
    path = tmp_path / "proxy.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE usage (user_id TEXT NOT NULL, family TEXT NOT NULL, used INTEGER NOT NULL DEFAULT 0,"
            " reserved INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (user_id, family));"
            " INSERT INTO usage VALUES ('u1', 'gpt4o', 70, 5);"
        )
    db.close()
    opened = SQLiteStore(path)
    try:
        row = opened.db.execute(f"SELECT {', '.join(USAGE_FIGURES)} FROM usage").fetchone()
        assert dict(zip(USAGE_FIGURES, row, strict=True)) == figures(used=70)
    finally:
        opened.close()


def test_a_lease_of_an_earlier_version_counts_for_nothing(redis_store):
    _, user = redis_store.create_user({})
    assert redis_store.reserve(user["id"], "gpt4o", 10, None)
    redis_store.redis.zadd(redis_store._key("leases", user["id"]), {"50:0123456701234567:gpt4o": time.time() + 60})
    assert redis_store.get_user(user["id"])["usage"]["gpt4o"] == figures(reserved=10)
    assert redis_store.reserve(user["id"], "gpt4o", 90, 100)
