"""The shared store: the Store protocol kept in one Redis server for several proxy instances.

Why Redis: instances behind one load balancer must agree on users, quotas, rate windows, requests in flight
and key health, and Redis gives them one place with atomic scripts. Everything SQLiteStore keeps in memory
lives here too. Every check-and-update is one Lua script or one MULTI block; Python never reads, decides,
then writes. Keys, all under `prefix`:

    key_health            hash     key id -> JSON [state, reason, changed_at]
    key_rests             zset     JSON [key id, family], score = resting until
    users                 set      every user id
    user:{id}             hash     the user's columns; ips and token_limits as JSON; NULL = field absent
    token:{token hash}    string   user id
    usage:{id}            hash     "{family}:used" -> tokens, "{family}:{spent figure}" -> amount
    leases:{id}           zset     "{tokens}:{nano-dollars}:{nonce}:{family}", score = expiry: reservations in flight
    counters              hash     name -> value
    daily_counters        hash     name -> value, of the counters named "day:..." (llmproxy/usage_days.py)
    window:{identity}     zset     one member per counted request, score = time (expires after the window)
    active                zset     identity -> time of its last counted request
    in_flight:{identity}  zset     one member per request in flight, score = expiry
    affinity:{space}      hash     name -> value (a conversation's or a response's key id)
    affinity_used:{space} zset     name, score = time of its last use (the LRU order and the TTL)

Leases: SQLiteStore zeroes reservations at start-up, which would cancel other instances' live requests.
Here each reservation is a member of the user's lease set that expires LEASE_SECONDS after it was made, so a
crashed instance's reservations stop counting by themselves; the reserved figure of a family is the sum of
its live leases (there is no "{family}:reserved" field to drift). `settle` gets the reserved amounts back and
removes the newest live lease of those amounts and family; if the lease already ran out, there is nothing
left to release. In-flight counts use the same idea with IN_FLIGHT_SECONDS. Times are the instances'
`time.time()`, as in SQLiteStore: their clocks must be synchronised (NTP).
"""

import asyncio
import collections
import contextlib
import functools
import json
import logging
import re
import secrets
import threading
import time
from urllib.parse import urlsplit

import redis

from llmproxy.store.base import (
    EXPIRED_REASON,
    IP_LIMIT_REASON,
    JSON_COLUMNS,
    SPENT_FIGURES,
    USAGE_FIGURES,
    USER_COLUMNS,
    KeyHealth,
    StoreUnavailable,
    changes_users,
    import_records,
    spent_amounts,
    token_hash,
    validate_fields,
)
from llmproxy.usage_days import DAY_PREFIX

LEASE_SECONDS = 15 * 60
IN_FLIGHT_SECONDS = 10 * 60
_FLOAT_COLUMNS = ("created_at", "last_used_at", "expires_at", "disabled_at")
# A lease as the scripts write it; one that does not match (a lease of an older version) counts for nothing.
_LEASE = re.compile(r"(?P<tokens>\d+):(?P<cost>\d+):[0-9a-f]+:(?P<family>.*)", re.DOTALL)
_INT_COLUMNS = ("max_ips", "rate_limit", "prompt_count")

# KEYS: usage, leases. ARGV: family, tokens, token limit, now, lease seconds, nonce, cost, cost limit, total cost limit
# (costs in nano-dollars; a limit "" = none). 1 if reserved.
_RESERVE = """
local family, cost_field = ARGV[1], ':cost_nanousd'
redis.call('HSETNX', KEYS[1], family .. ':used', 0)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[4])
if ARGV[3] ~= '' or ARGV[8] ~= '' or ARGV[9] ~= '' then
  local tokens = tonumber(redis.call('HGET', KEYS[1], family .. ':used')) + tonumber(ARGV[2])
  local cost, total = tonumber(ARGV[7]), tonumber(ARGV[7])
  local figures = redis.call('HGETALL', KEYS[1])
  for i = 1, #figures, 2 do
    if string.sub(figures[i], -#cost_field) == cost_field then
      total = total + tonumber(figures[i + 1])
      if figures[i] == family .. cost_field then cost = cost + tonumber(figures[i + 1]) end
    end
  end
  for _, lease in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    local leased_tokens, leased_cost, leased = string.match(lease, '^(%d+):(%d+):%x+:(.*)$')
    if leased then
      total = total + tonumber(leased_cost)
      if leased == family then tokens, cost = tokens + tonumber(leased_tokens), cost + tonumber(leased_cost) end
    end
  end
  if (ARGV[3] ~= '' and tokens > tonumber(ARGV[3])) or (ARGV[8] ~= '' and cost > tonumber(ARGV[8]))
      or (ARGV[9] ~= '' and total > tonumber(ARGV[9])) then return 0 end
end
local lease = ARGV[2] .. ':' .. ARGV[7] .. ':' .. ARGV[6] .. ':' .. family
redis.call('ZADD', KEYS[2], tonumber(ARGV[4]) + tonumber(ARGV[5]), lease)
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 1
"""
# KEYS: usage, leases, user, counters, daily counters. ARGV: family, reserved tokens, reserved cost, now, the figures
# to add ("used" and SPENT_FIGURES) and the counters to add, each a JSON object of decimal strings (two arguments rather
# than thirty: packing each cost the proxy a microsecond, and a Lua number would print large amounts in exponent form),
# and the prefix of the names of daily counters, which go to their own hash.
_SETTLE = """
local family, figures, counters = ARGV[1], cjson.decode(ARGV[5]), cjson.decode(ARGV[6])
if ARGV[2] ~= '0' or ARGV[3] ~= '0' then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[4])
  for _, lease in ipairs(redis.call('ZREVRANGE', KEYS[2], 0, -1)) do
    local tokens, cost, leased = string.match(lease, '^(%d+):(%d+):%x+:(.*)$')
    if tokens == ARGV[2] and cost == ARGV[3] and leased == family then redis.call('ZREM', KEYS[2], lease) break end
  end
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  for name, amount in pairs(figures) do
    if amount ~= '0' then redis.call('HINCRBY', KEYS[1], family .. ':' .. name, amount) end
  end
  if figures.used ~= '0' then redis.call('HINCRBY', KEYS[3], 'prompt_count', 1) end
end
for name, amount in pairs(counters) do
  redis.call('HINCRBY', string.sub(name, 1, #ARGV[7]) == ARGV[7] and KEYS[5] or KEYS[4], name, amount)
end
"""
# KEYS: token. ARGV: the users' key prefix, ip, max_ips (0 = no limit), auto_ban ("1"/""), now, the reasons for
# disabling an expired user and one over the address limit. {the user's hash as field, value, ..., the visit};
# false: nobody's token. The user's key is known only from the token's value, so it is built here (one server).
_ADMIT = """
local id = redis.call('GET', KEYS[1])
if not id then return false end
local user = ARGV[1] .. id
local kind, expires, disabled, max_ips =
  unpack(redis.call('HMGET', user, 'type', 'expires_at', 'disabled_at', 'max_ips'))
if not kind then return false end
local visit, now = 'ok', ARGV[5]
if not disabled and kind ~= 'special' then
  if kind == 'temporary' and expires and tonumber(expires) ~= 0 and tonumber(expires) <= tonumber(now) then
    redis.call('HSET', user, 'disabled_at', now, 'disabled_reason', ARGV[6])
  else
    local ips, known = cjson.decode(redis.call('HGET', user, 'ips') or '[]'), false
    for _, seen in ipairs(ips) do if seen == ARGV[2] then known = true end end
    if not known then
      local limit = tonumber(max_ips or ARGV[3])
      if limit > 0 and #ips >= limit then visit = (ARGV[4] == '1') and 'banned' or 'limited' end
      if visit ~= 'limited' then
        table.insert(ips, ARGV[2])
        redis.call('HSET', user, 'ips', cjson.encode(ips))
      end
    end
    redis.call('HSET', user, 'last_used_at', now)
    if visit == 'banned' then redis.call('HSET', user, 'disabled_at', now, 'disabled_reason', ARGV[7]) end
  end
end
return {redis.call('HGETALL', user), visit}
"""
# KEYS: user. ARGV: number of pairs, field, value, ..., then fields to clear. 0 if there is no such user.
_PATCH_USER = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local pairs_count = tonumber(ARGV[1])
for i = 2, pairs_count * 2, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
for i = pairs_count * 2 + 2, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end
return 1
"""
# KEYS: usage hashes. Every "{family}:used" field back to 0.
_RESET_USAGE = """
for _, key in ipairs(KEYS) do
  for _, field in ipairs(redis.call('HKEYS', key)) do redis.call('HSET', key, field, 0) end
end
"""
# KEYS: key_health, key_rests. ARGV: now. {every key health, every rest that has not ended with its end}.
_KEY_STATES = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
return {redis.call('HGETALL', KEYS[1]), redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')}
"""
# KEYS: window, active. ARGV: identity, limit, now, cutoff, window ms, nonce, '1' to mark the identity active.
# {allowed, count, oldest score}.
_HIT_WINDOW = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[4])
local count = redis.call('ZCARD', KEYS[1])
local allowed = count < tonumber(ARGV[2])
if allowed then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[6])
  if ARGV[7] == '1' then redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1]) end
  count = count + 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {allowed and 1 or 0, count, oldest[2] or false}
"""
# KEYS: in-flight set. ARGV: limit (0 = none), now, expiry, nonce. 1 if entered.
_ENTER = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if tonumber(ARGV[1]) > 0 and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIREAT', KEYS[1], math.ceil(tonumber(ARGV[3])))
return 1
"""
# KEYS: affinity, affinity_used. ARGV: name, now, cutoff. The value, refreshed as used; false when unknown or old.
_AFFINITY = """
local used = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not used or tonumber(used) <= tonumber(ARGV[3]) then return false end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return redis.call('HGET', KEYS[1], ARGV[1])
"""
# KEYS: affinity, affinity_used. ARGV: name, value, expected ('' = none), now, cutoff, capacity. The value after.
_BIND_AFFINITY = """
for _, old in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[5], 'LIMIT', 0, 100)) do
  redis.call('HDEL', KEYS[1], old)
  redis.call('ZREM', KEYS[2], old)
end
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
local used = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not used or tonumber(used) <= tonumber(ARGV[5]) then current = '' end
if current == ARGV[3] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  current = ARGV[2]
end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[6])
if excess > 0 then
  local oldest = redis.call('ZPOPMIN', KEYS[2], excess)
  for i = 1, #oldest, 2 do redis.call('HDEL', KEYS[1], oldest[i]) end
end
return current
"""


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl() if "@" in parts.netloc else url


def _unavailable(url: str, error: redis.exceptions.RedisError) -> StoreUnavailable:
    if isinstance(error, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return StoreUnavailable(f"Redis at {url} is unreachable ({type(error).__name__}).")
    return StoreUnavailable(f"Redis at {url} refused a command ({type(error).__name__}: {error}).")


def _guarded(cls):
    """Makes every public method of `cls` raise StoreUnavailable instead of a Redis error."""

    def guard(method):
        @functools.wraps(method)
        def guarded(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except redis.exceptions.RedisError as error:
                raise _unavailable(self.url, error) from error

        return guarded

    for name, member in list(vars(cls).items()):
        if callable(member) and not name.startswith("_"):
            setattr(cls, name, guard(member))
    return cls


def _encode(fields: dict) -> tuple[dict, list[str]]:
    """User fields as hash values to set, and the fields that are NULL (absent from the hash)."""
    values = {k: json.dumps(v) if k in JSON_COLUMNS else v for k, v in fields.items() if v is not None}
    return values, [k for k, v in fields.items() if v is None]


def _limit(limit: int | None) -> int | str:
    """A limit as the scripts take it: "" for none."""
    return "" if limit is None else int(limit)


def _decode_columns(raw: dict) -> dict:
    user = {}
    for column in USER_COLUMNS:
        value = raw.get(column)
        if value is not None and column in JSON_COLUMNS:
            value = json.loads(value)
        elif value is not None and column in _FLOAT_COLUMNS + _INT_COLUMNS:
            value = float(value) if column in _FLOAT_COLUMNS else int(value)
        user[column] = value
    return user


def _decode(raw: dict, usage: dict, leases: list[str]) -> dict:
    user = _decode_columns(raw)
    user["usage"] = {}
    for field, amount in usage.items():
        family, _, figure = field.rpartition(":")
        user["usage"].setdefault(family, dict.fromkeys(USAGE_FIGURES, 0))[figure] = int(amount)
    for lease in leases:
        if (held := _LEASE.fullmatch(lease)) and held["family"] in user["usage"]:
            user["usage"][held["family"]]["reserved"] += int(held["tokens"])
            user["usage"][held["family"]]["reserved_nanousd"] += int(held["cost"])
    return user


logger = logging.getLogger(__name__)


class _Settlements:
    """Settlements written by a thread of their own, each batch in one pipeline, so that the event loop never waits
    for Redis's reply: that wait (the reply slowed by a busy machine) cost user tokens on Redis a quarter of their
    throughput. A settlement made on an event loop gets an asyncio Future of that loop, done once it is written
    (or, logged here, could not be: then its lease lapses); the dispatcher sends a buffered answer only then, so a
    completed request's usage survives a kill as with SQLite. A batch's Futures are resolved in one call on their
    loop, not one wake-up each. Readers of what settlements change wait for the pending ones first (`drain`)."""

    def __init__(self, connect, script: str):
        self.redis = connect()  # a connection of its own: the store's is the event loop's
        self.script = self.redis.register_script(script)
        self._pending: list[tuple[list, list, str, asyncio.Future | None]] = []
        self._writing: collections.Counter[str] = collections.Counter()  # user id -> settlements not yet written
        self._condition = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="redis-settlements", daemon=True)
        self._thread.start()

    def put(self, user_id: str, keys: list, args: list) -> asyncio.Future | None:
        try:
            done = asyncio.get_running_loop().create_future()
        except RuntimeError:  # no event loop (a script, a test): `drain` is the way to wait
            done = None
        with self._condition:
            self._pending.append((keys, args, user_id, done))
            self._writing[user_id] += 1
            self._condition.notify_all()
        return done

    def drain(self, user_id: str | None = None, timeout: float = 5) -> None:
        """Waits until the pending settlements (of `user_id`, or all) are written."""
        with self._condition:
            self._condition.wait_for(lambda: not (self._writing[user_id] if user_id else +self._writing), timeout)

    def close(self) -> None:
        """Writes what is pending, then ends the thread."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join(5)
        self.redis.close()

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    for keys, args, _, _ in batch:
                        self.script(keys=keys, args=args, client=pipe)
                    pipe.execute()
            except redis.exceptions.RedisError as error:
                # The reservations' leases run out on their own: these requests count not at all rather than in part.
                logger.warning("%d settlements could not be written to Redis: %s", len(batch), type(error).__name__)
            with self._condition:
                for _, _, user_id, _ in batch:
                    self._writing[user_id] -= 1
                self._condition.notify_all()
            waiting = [done for _, _, _, done in batch if done is not None]
            if waiting:
                with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                    waiting[0].get_loop().call_soon_threadsafe(_resolve, waiting)


def _resolve(futures: list[asyncio.Future]) -> None:
    """Marks written settlements done, on their event loop."""
    for done in futures:
        if not done.done():  # a waiter that gave up cancelled it
            done.set_result(None)


@_guarded
class RedisStore:
    """The Store protocol on a Redis server shared by several instances."""

    def __init__(self, url: str, prefix: str = "llmproxy:"):
        self.url, self.prefix = _redacted(url), prefix
        self.users_version = 0
        try:
            # One connection, not one taken from a pool and given back at every command: that took a third of a
            # command's time, and the proxy calls from its one event loop (threads would wait on a lock).
            self.redis = self._connect(url)
            self.redis.ping()
        except ValueError as error:
            raise StoreUnavailable(f"{self.url} is not a usable Redis URL ({error}).") from None
        except redis.exceptions.RedisError as error:
            raise _unavailable(self.url, error) from None
        script = self.redis.register_script
        self._reserve, self._admit = script(_RESERVE), script(_ADMIT)
        self._settlements = _Settlements(functools.partial(self._connect, url), _SETTLE)
        self._key_states = script(_KEY_STATES)
        self._patch_user, self._reset_usage = script(_PATCH_USER), script(_RESET_USAGE)
        self._hit_window, self._enter = script(_HIT_WINDOW), script(_ENTER)
        self._affinity, self._bind_affinity = script(_AFFINITY), script(_BIND_AFFINITY)

    @staticmethod
    def _connect(url: str) -> redis.Redis:
        return redis.Redis.from_url(
            url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True, single_connection_client=True
        )

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- keys ----------------------------------------------------------------------------------------------

    def key_health(self) -> dict[str, KeyHealth]:
        """Every key that is not active, by key id."""
        return {
            key_id: KeyHealth(*json.loads(record))
            for key_id, record in self.redis.hgetall(self._key("key_health")).items()
        }

    def set_key_health(self, key_id: str, state: str | None, reason: str = "") -> None:
        """Records a key as revoked or over quota; `state=None` makes it active again."""
        if state is None:
            self.redis.hdel(self._key("key_health"), key_id)
        else:
            self.redis.hset(self._key("key_health"), key_id, json.dumps([state, reason, time.time()]))

    def set_key_rest(self, key_id: str, family: str, until: float) -> None:
        """Records that a key rests for a family until `until` (time.time()); shared by every instance."""
        self.redis.zadd(self._key("key_rests"), {json.dumps([key_id, family]): until})

    def key_rests(self) -> dict[tuple[str, str], float]:
        """Every rest that has not ended yet: (key id, family) -> until."""
        return self.key_states()[1]

    def key_states(self) -> tuple[dict[str, KeyHealth], dict[tuple[str, str], float]]:
        """key_health() and key_rests() in one script: one round trip where they were two."""
        health, rests = self._key_states(keys=[self._key("key_health"), self._key("key_rests")], args=[time.time()])
        return (
            {key_id: KeyHealth(*json.loads(record)) for key_id, record in zip(health[::2], health[1::2], strict=True)},
            {tuple(json.loads(member)): float(until) for member, until in zip(rests[::2], rests[1::2], strict=True)},
        )

    # -- users ---------------------------------------------------------------------------------------------

    def _users(self, user_ids: list[str]) -> list[dict | None]:
        """The users with these ids (None for a missing one), read in one snapshot."""
        self._settlements.drain()
        with self.redis.pipeline() as pipe:
            for user_id in user_ids:
                pipe.hgetall(self._key("user", user_id))
                pipe.hgetall(self._key("usage", user_id))
                pipe.zrangebyscore(self._key("leases", user_id), f"({time.time()}", "+inf")
            replies = pipe.execute()
        return [_decode(*replies[i : i + 3]) if replies[i] else None for i in range(0, len(replies), 3)]

    def _queue_insert(self, pipe, record: dict) -> None:
        """Queues the creation or replacement of a user, as SQLiteStore's upsert: absent fields stay."""
        values, nulls = _encode({"type": "normal", "ips": [], "token_limits": {}, "prompt_count": 0, **record})
        pipe.hset(self._key("user", record["id"]), mapping=values)
        if nulls:
            pipe.hdel(self._key("user", record["id"]), *nulls)
        pipe.set(self._key("token", record["token_hash"]), record["id"])
        pipe.sadd(self._key("users"), record["id"])

    def _patch(self, user_id: str, fields: dict) -> None:
        values, nulls = _encode(fields)
        pairs = [part for pair in values.items() for part in pair]
        self._patch_user(keys=[self._key("user", user_id)], args=[len(values), *pairs, *nulls])

    def create_user(self, fields: dict) -> tuple[str, dict]:
        """A new user with a fresh 256-bit token; returns (token, user). The token is not kept."""
        fields = validate_fields(dict(fields))
        token = secrets.token_urlsafe(32)
        hashed = token_hash(token)
        with self.redis.pipeline() as pipe:
            self._queue_insert(pipe, {"id": hashed[:16], "token_hash": hashed, "created_at": time.time(), **fields})
            pipe.execute()
        return token, self.get_user(hashed[:16])

    def get_user(self, user_id: str) -> dict | None:
        return self._users([user_id])[0]

    def user_by_token(self, token: str) -> dict | None:
        user_id = self.redis.get(self._key("token", token_hash(token)))
        return self.get_user(user_id) if user_id else None

    def list_users(self) -> list[dict]:
        users = [user for user in self._users(list(self.redis.smembers(self._key("users")))) if user]
        return sorted(users, key=lambda user: (user["created_at"], user["id"]))

    @changes_users
    def update_user(self, user_id: str, fields: dict) -> dict | None:
        """Sets editable fields; returns the user, or None if there is none with that id."""
        fields = validate_fields(dict(fields))
        if fields:
            self._patch(user_id, fields)
        return self.get_user(user_id)

    @changes_users
    def set_disabled(self, user_id: str, reason: str | None) -> dict | None:
        """Disables a user with a reason, or (reason None) enables it again."""
        self._patch(user_id, {"disabled_at": time.time() if reason is not None else None, "disabled_reason": reason})
        return self.get_user(user_id)

    @changes_users
    def delete_user(self, user_id: str) -> bool:
        user_key = self._key("user", user_id)

        def delete(pipe) -> bool:
            hashed = pipe.hget(user_key, "token_hash")
            pipe.multi()
            pipe.delete(user_key, self._key("usage", user_id), self._key("leases", user_id))
            pipe.srem(self._key("users"), user_id)
            if hashed:
                pipe.delete(self._key("token", hashed))
            return hashed is not None

        return self.redis.transaction(delete, user_key, value_from_callable=True)

    def export_users(self) -> list[dict]:
        """Every user with its token hash (never the token), usage included, for import elsewhere."""
        return self.list_users()

    @changes_users
    def import_users(self, users: list[dict]) -> int:
        """Creates or replaces users from an export, all or none; returns how many."""
        records = import_records(users)
        with self.redis.pipeline() as pipe:  # MULTI ... EXEC
            for user, record in records:
                self._queue_insert(pipe, record)
                for family, figures in (user.get("usage") or {}).items():
                    pipe.hset(
                        self._key("usage", record["id"]),
                        mapping={f"{family}:{name}": int(figures.get(name, 0)) for name in ("used", *SPENT_FIGURES)},
                    )
            pipe.execute()
        return len(records)

    def admit(self, token: str, ip: str, max_ips: int, auto_ban: bool) -> tuple[dict | None, str]:
        """The user `token` names, after its visit from `ip`, and the visit: "ok", "limited" or "banned" (see
        Store.admit). One script: the gatekeeper's one round trip."""
        admitted = self._admit(
            keys=[self._key("token", token_hash(token))],
            args=[
                self._key("user", ""),
                ip,
                max_ips or 0,
                "1" if auto_ban else "",
                time.time(),
                EXPIRED_REASON,
                IP_LIMIT_REASON,
            ],
        )
        if not admitted:
            return None, "ok"
        fields, visit = admitted
        return _decode_columns(dict(zip(fields[::2], fields[1::2], strict=True))), visit

    # -- usage ---------------------------------------------------------------------------------------------

    def reserve(
        self,
        user_id: str,
        family: str,
        tokens: int,
        limit: int | None,
        cost: int = 0,
        cost_limit: int | None = None,
        total_cost_limit: int | None = None,
    ) -> bool:
        """Sets `tokens` and `cost` (nano-dollars) aside for a request, under a lease, if, with them, the family's
        used + reserved tokens stay within `limit`, its cost within `cost_limit`, and the user's cost over every
        family within `total_cost_limit` (None: no limit)."""
        self._settlements.drain(user_id)  # the user's earlier requests are settled first
        return bool(
            self._reserve(
                keys=[self._key("usage", user_id), self._key("leases", user_id)],
                args=[
                    family,
                    int(tokens),
                    _limit(limit),
                    time.time(),
                    LEASE_SECONDS,
                    secrets.token_hex(8),
                    int(cost),
                    _limit(cost_limit),
                    _limit(total_cost_limit),
                ],
            )
        )

    def settle(
        self,
        user_id: str,
        family: str,
        reserved: int,
        used: int,
        reserved_cost: int = 0,
        spent: dict[str, int] | None = None,
        counters: dict[str, int] | None = None,
    ) -> asyncio.Future | None:
        """Replaces a reservation (`reserved` tokens, `reserved_cost` nano-dollars) by what the request really used:
        `used` tokens and its SPENT_FIGURES in `spent` (0 and nothing for a failed request), and adds `counters`, in
        one script, written in the background (`_Settlements`)."""
        figures = zip(("used", *SPENT_FIGURES), (int(used), *spent_amounts(spent)), strict=True)
        return self._settlements.put(
            user_id,
            keys=[
                self._key("usage", user_id),
                self._key("leases", user_id),
                self._key("user", user_id),
                self._key("counters"),
                self._key("daily_counters"),
            ],
            args=[
                family,
                int(reserved),
                int(reserved_cost),
                time.time(),
                json.dumps({name: str(amount) for name, amount in figures}),
                json.dumps({name: str(int(amount)) for name, amount in (counters or {}).items()}),
                DAY_PREFIX,
            ],
        )

    def reset_usage(self, user_id: str | None = None) -> None:
        """Starts a new quota period for one user or for all."""
        self._settlements.drain()
        user_ids = [user_id] if user_id is not None else self.redis.smembers(self._key("users"))
        if user_ids:
            self._reset_usage(keys=[self._key("usage", uid) for uid in user_ids])

    def add_to_counters(self, **amounts: int) -> None:
        with self.redis.pipeline() as pipe:
            for name, amount in amounts.items():
                pipe.hincrby(self._key("daily_counters" if name.startswith(DAY_PREFIX) else "counters"), name, amount)
            pipe.execute()

    def counters(self) -> dict[str, int]:
        """Every counter but the daily ones, which have a hash of their own."""
        self._settlements.drain()
        return {name: int(value) for name, value in self.redis.hgetall(self._key("counters")).items()}

    def daily_counters(self, first_day: str) -> dict[str, int]:
        """Every daily counter of `first_day` (an ISO date) or later, by its full name."""
        self._settlements.drain()
        since = DAY_PREFIX + first_day
        return {
            name: int(value) for name, value in self.redis.hgetall(self._key("daily_counters")).items() if name >= since
        }

    # -- windows -------------------------------------------------------------------------------------------

    def hit_rate_window(
        self, identity: str, limit: int, window: float, bucket: str = ""
    ) -> tuple[bool, int, float, str]:
        """Counts a request in `identity`'s sliding window if it has room: (allowed, remaining, reset at, the hit's
        name for `refund_rate_window`). A `bucket` is a window of its own (token counts); only requests of the
        default bucket make an identity active."""
        now, hit = time.time(), secrets.token_hex(8)
        allowed, count, oldest = self._hit_window(
            keys=[self._window_key(identity, bucket), self._key("active")],
            args=[identity, limit, now, now - window, max(1, int(window * 1000) + 1), hit, "0" if bucket else "1"],
        )
        return bool(allowed), max(0, limit - count), float(oldest) + window if oldest else now, hit

    def refund_rate_window(self, identity: str, hit: str, bucket: str = "") -> None:
        """Takes back a counted request: the proxy itself refused it after the count, so it costs nothing."""
        self.redis.zrem(self._window_key(identity, bucket), hit)

    def _window_key(self, identity: str, bucket: str) -> str:
        return self._key("window", bucket, identity) if bucket else self._key("window", identity)

    def active_identities(self, window: float) -> int:
        """Identities with a counted request in the last `window` seconds."""
        with self.redis.pipeline() as pipe:
            pipe.zremrangebyscore(self._key("active"), "-inf", time.time() - window)
            pipe.zcard(self._key("active"))
            return pipe.execute()[1]

    def record_wait(self, family: str, seconds: float) -> None:
        """Notes how long a request of the family waited, for every instance's estimated wait."""
        now = time.time()
        self.redis.zadd(self._key("waits", family), {f"{seconds:.3f}:{secrets.token_hex(4)}": now})

    def recent_waits(self, family: str, window: float) -> list[float]:
        """The waits of the family's requests dispatched in the last `window` seconds, on any instance."""
        with self.redis.pipeline() as pipe:
            pipe.zremrangebyscore(self._key("waits", family), "-inf", time.time() - window)
            pipe.zrange(self._key("waits", family), 0, -1)
            return [float(member.split(":")[0]) for member in pipe.execute()[1]]

    def enter(self, identity: str, limit: int) -> bool:
        """Counts a request in flight for `identity` unless it already has `limit` (0: no limit); the count
        lapses after IN_FLIGHT_SECONDS if `leave` never comes."""
        now = time.time()
        return bool(
            self._enter(
                keys=[self._key("in_flight", identity)],
                args=[limit or 0, now, now + IN_FLIGHT_SECONDS, secrets.token_hex(8)],
            )
        )

    def leave(self, identity: str) -> None:
        self.redis.zpopmax(self._key("in_flight", identity))

    def close(self) -> None:
        self._settlements.close()
        self.redis.close()

    # -- affinity: which key holds a conversation's cache or a response's state ----------------------------

    def affinity(self, space: str, name: str, ttl: float) -> str | None:
        """What `name` is bound to in `space`, or None when it is unknown or was not used for `ttl` seconds;
        a hit counts as a use."""
        now = time.time()
        return self._affinity(
            keys=[self._key("affinity", space), self._key("affinity_used", space)], args=[name, now, now - ttl]
        )

    def bind_affinity(self, space: str, name: str, value: str, expected: str | None, ttl: float, capacity: int) -> str:
        """Binds `name` to `value` if it is bound to `expected` now (None: to nothing), and returns what it is
        bound to afterwards. Names unused for `ttl` seconds are forgotten, and beyond `capacity` names in the
        space the least recently used."""
        now = time.time()
        return self._bind_affinity(
            keys=[self._key("affinity", space), self._key("affinity_used", space)],
            args=[name, value, expected or "", now, now - ttl, capacity],
        )
