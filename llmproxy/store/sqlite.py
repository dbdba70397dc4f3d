"""The embedded store: one SQLite file (WAL) for a single instance."""

import contextlib
import json
import secrets
import sqlite3
import time
from collections import deque
from pathlib import Path

from llmproxy.store.base import (
    EXPIRED_REASON,
    IP_LIMIT_REASON,
    JSON_COLUMNS,
    SPENT_FIGURES,
    USAGE_FIGURES,
    USER_COLUMNS,
    KeyHealth,
    changes_users,
    import_records,
    spent_amounts,
    token_hash,
    validate_fields,
)
from llmproxy.usage_days import DAY_PREFIX

USES_WRITTEN_EVERY = 1.0  # seconds between two writes of the affinity uses noted in memory
_AFTER_DAILY_COUNTERS = "day;"  # the first name after every daily counter's (DAY_PREFIX "day:"): ";" follows ":"


def _window_name(identity: str, bucket: str) -> str:
    return f"{bucket}\0{identity}" if bucket else identity


class SQLiteStore:
    """The embedded store: a single SQLite file in write-ahead-log mode, plus in-memory windows.

    Rate-limit windows, in-flight counts and key rests live in memory: they are about the last minutes, one
    process serves them all, and losing them in a restart costs nothing.
    """

    def __init__(self, path: Path):
        self.users_version = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)  # autocommit: each statement is its own transaction
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL keeps committed work across a process crash
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS key_health (key_id TEXT PRIMARY KEY, state TEXT NOT NULL,
                reason TEXT NOT NULL, changed_at REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS users (id TEXT PRIMARY KEY, token_hash TEXT UNIQUE NOT NULL,
                nickname TEXT, type TEXT NOT NULL, created_at REAL NOT NULL, last_used_at REAL,
                ips TEXT NOT NULL DEFAULT '[]', max_ips INTEGER, token_limits TEXT NOT NULL DEFAULT '{}',
                rate_limit INTEGER, expires_at REAL, admin_note TEXT, prompt_count INTEGER NOT NULL DEFAULT 0,
                disabled_at REAL, disabled_reason TEXT);
            CREATE TABLE IF NOT EXISTS usage (user_id TEXT NOT NULL, family TEXT NOT NULL,
                used INTEGER NOT NULL DEFAULT 0, reserved INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY (user_id, family));
            CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS affinity (space TEXT NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL,
                used_at REAL NOT NULL, PRIMARY KEY (space, name));
            CREATE INDEX IF NOT EXISTS affinity_by_use ON affinity (space, used_at);
            """
        )
        present = {column for _, column, *_ in self.db.execute("PRAGMA table_info(usage)")}
        for column in USAGE_FIGURES:
            if column not in present:  # a store written before costs were recorded
                self.db.execute(f"ALTER TABLE usage ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
        # Reservations belong to requests in flight; after a restart none is.
        self.db.execute("UPDATE usage SET reserved = 0, reserved_nanousd = 0")
        self._windows: dict[str, deque] = {}
        self._in_flight: dict[str, int] = {}
        self._rests: dict[tuple[str, str], float] = {}
        self._waits: dict[str, deque] = {}
        self._affinity_sizes: dict[str, int] = {}
        self._uses: dict[tuple[str, str], float] = {}  # affinity hits not yet written: (space, name) -> time
        self._uses_written = 0.0  # when they were last written (monotonic)

    # -- keys ----------------------------------------------------------------------------------------------

    def key_health(self) -> dict[str, KeyHealth]:
        """Every key that is not active, by key id."""
        rows = self.db.execute("SELECT key_id, state, reason, changed_at FROM key_health")
        return {key_id: KeyHealth(state, reason, changed_at) for key_id, state, reason, changed_at in rows}

    def set_key_health(self, key_id: str, state: str | None, reason: str = "") -> None:
        """Records a key as revoked or over quota; `state=None` makes it active again."""
        if state is None:
            self.db.execute("DELETE FROM key_health WHERE key_id = ?", (key_id,))
        else:
            self.db.execute(
                "INSERT INTO key_health (key_id, state, reason, changed_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (key_id) DO UPDATE SET state = excluded.state, reason = excluded.reason,"
                " changed_at = excluded.changed_at",
                (key_id, state, reason, time.time()),
            )

    def set_key_rest(self, key_id: str, family: str, until: float) -> None:
        """Records that a key rests for a family until `until` (time.time()); shared by every instance."""
        self._rests[(key_id, family)] = until

    def key_rests(self) -> dict[tuple[str, str], float]:
        """Every rest that has not ended yet: (key id, family) -> until."""
        now = time.time()
        for ended in [k for k, until in self._rests.items() if until <= now]:
            del self._rests[ended]
        return dict(self._rests)

    def key_states(self) -> tuple[dict[str, KeyHealth], dict[tuple[str, str], float]]:
        """key_health() and key_rests() together."""
        return self.key_health(), self.key_rests()

    # -- users ---------------------------------------------------------------------------------------------

    def _user_columns(self, where: str, value: str) -> dict | None:
        row = self.db.execute(f"SELECT {', '.join(USER_COLUMNS)} FROM users WHERE {where} = ?", (value,)).fetchone()
        if row is None:
            return None
        user = dict(zip(USER_COLUMNS, row, strict=True))
        for column in JSON_COLUMNS:
            user[column] = json.loads(user[column])
        return user

    def _user(self, where: str, value: str) -> dict | None:
        if (user := self._user_columns(where, value)) is None:
            return None
        user["usage"] = {
            family: dict(zip(USAGE_FIGURES, figures, strict=True))
            for family, *figures in self.db.execute(
                f"SELECT family, {', '.join(USAGE_FIGURES)} FROM usage WHERE user_id = ?", (user["id"],)
            )
        }
        return user

    def create_user(self, fields: dict) -> tuple[str, dict]:
        """A new user with a fresh 256-bit token; returns (token, user). The token is not kept."""
        fields = validate_fields(dict(fields))
        token = secrets.token_urlsafe(32)
        hashed = token_hash(token)
        self._insert_user({"id": hashed[:16], "token_hash": hashed, "created_at": time.time(), **fields})
        return token, self.get_user(hashed[:16])

    def _insert_user(self, record: dict) -> None:
        record = {"type": "normal", "ips": [], "token_limits": {}, "prompt_count": 0, **record}
        for column in JSON_COLUMNS:
            record[column] = json.dumps(record[column])
        columns = [column for column in USER_COLUMNS if column in record]
        self.db.execute(
            f"INSERT INTO users ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            f" ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in columns if c != 'id')}",
            [record[column] for column in columns],
        )

    def get_user(self, user_id: str) -> dict | None:
        return self._user("id", user_id)

    def user_by_token(self, token: str) -> dict | None:
        return self._user("token_hash", token_hash(token))

    def list_users(self) -> list[dict]:
        return [self.get_user(user_id) for (user_id,) in self.db.execute("SELECT id FROM users")]

    @changes_users
    def update_user(self, user_id: str, fields: dict) -> dict | None:
        """Sets editable fields; returns the user, or None if there is none with that id."""
        fields = validate_fields(dict(fields))
        if fields:
            values = [json.dumps(v) if k in JSON_COLUMNS else v for k, v in fields.items()]
            self.db.execute(
                f"UPDATE users SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?", [*values, user_id]
            )
        return self.get_user(user_id)

    @changes_users
    def set_disabled(self, user_id: str, reason: str | None) -> dict | None:
        """Disables a user with a reason, or (reason None) enables it again."""
        self.db.execute(
            "UPDATE users SET disabled_at = ?, disabled_reason = ? WHERE id = ?",
            (time.time() if reason is not None else None, reason, user_id),
        )
        return self.get_user(user_id)

    @changes_users
    def delete_user(self, user_id: str) -> bool:
        deleted = self.db.execute("DELETE FROM users WHERE id = ?", (user_id,)).rowcount
        self.db.execute("DELETE FROM usage WHERE user_id = ?", (user_id,))
        return bool(deleted)

    def export_users(self) -> list[dict]:
        """Every user with its token hash (never the token), usage included, for import elsewhere."""
        return self.list_users()

    @changes_users
    def import_users(self, users: list[dict]) -> int:
        """Creates or replaces users from an export; returns how many."""
        records = import_records(users)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for user, record in records:
                self._insert_user(record)
                for family, figures in (user.get("usage") or {}).items():
                    kept = ("used", *SPENT_FIGURES)
                    self.db.execute(
                        f"INSERT INTO usage (user_id, family, {', '.join(kept)}) VALUES (?, ?{', ?' * len(kept)})"
                        f" ON CONFLICT (user_id, family) DO UPDATE SET"
                        f" {', '.join(f'{name} = excluded.{name}' for name in kept)}",
                        (record["id"], family, *(int(figures.get(name, 0)) for name in kept)),
                    )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return len(records)

    def admit(self, token: str, ip: str, max_ips: int, auto_ban: bool) -> tuple[dict | None, str]:
        """The user `token` names, after its visit from `ip`, and the visit: "ok", "limited" or "banned" (see
        Store.admit)."""
        with self._transaction():
            user, visit, now = self._user_columns("token_hash", token_hash(token)), "ok", time.time()
            if user is None or user["disabled_at"] is not None or user["type"] == "special":
                return user, visit
            if user["type"] == "temporary" and user["expires_at"] and user["expires_at"] <= now:
                user["disabled_at"], user["disabled_reason"] = now, EXPIRED_REASON
            else:
                limit = user["max_ips"] if user["max_ips"] is not None else max_ips
                if ip not in user["ips"]:
                    if limit and len(user["ips"]) >= limit:
                        visit = "banned" if auto_ban else "limited"
                    if visit != "limited":
                        user["ips"].append(ip)
                user["last_used_at"] = now
                if visit == "banned":
                    user["disabled_at"], user["disabled_reason"] = now, IP_LIMIT_REASON
            self.db.execute(
                "UPDATE users SET ips = ?, last_used_at = ?, disabled_at = ?, disabled_reason = ? WHERE id = ?",
                [json.dumps(user["ips"]), *(user[c] for c in ("last_used_at", "disabled_at", "disabled_reason", "id"))],
            )
        return user, visit

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
        """Sets `tokens` and `cost` (nano-dollars) aside for a request if, with them, the family's used + reserved
        tokens stay within `limit`, its cost within `cost_limit`, and the user's cost over every family within
        `total_cost_limit` (None: no limit)."""
        self.db.execute("INSERT OR IGNORE INTO usage (user_id, family) VALUES (?, ?)", (user_id, family))
        return bool(
            self.db.execute(
                "UPDATE usage SET reserved = reserved + :tokens, reserved_nanousd = reserved_nanousd + :cost"
                " WHERE user_id = :user AND family = :family"
                " AND (:limit IS NULL OR used + reserved + :tokens <= :limit)"
                " AND (:cost_limit IS NULL OR cost_nanousd + reserved_nanousd + :cost <= :cost_limit)"
                " AND (:total_limit IS NULL OR :cost + (SELECT SUM(cost_nanousd + reserved_nanousd) FROM usage"
                " WHERE user_id = :user) <= :total_limit)",
                {
                    "tokens": tokens,
                    "cost": cost,
                    "user": user_id,
                    "family": family,
                    "limit": limit,
                    "cost_limit": cost_limit,
                    "total_limit": total_cost_limit,
                },
            ).rowcount
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
    ) -> None:
        """Replaces a reservation (`reserved` tokens, `reserved_cost` nano-dollars) by what the request really used:
        `used` tokens and its SPENT_FIGURES in `spent` (0 and nothing for a failed request), and adds `counters`, in
        one transaction (with the affinity uses noted in memory, once a second)."""
        amounts = spent_amounts(spent)
        with self._transaction():
            self.db.execute(  # a user without limits reserved nothing, and may have no row for the family yet
                "INSERT OR IGNORE INTO usage (user_id, family)"
                " SELECT ?, ? WHERE EXISTS (SELECT 1 FROM users WHERE id = ?)",
                (user_id, family, user_id),
            )
            self.db.execute(
                f"UPDATE usage SET reserved = MAX(0, reserved - ?), reserved_nanousd = MAX(0, reserved_nanousd - ?),"
                f" used = used + ?, {', '.join(f'{name} = {name} + ?' for name in SPENT_FIGURES)}"
                " WHERE user_id = ? AND family = ?",
                (reserved, reserved_cost, used, *amounts, user_id, family),
            )
            if used:
                self.db.execute("UPDATE users SET prompt_count = prompt_count + 1 WHERE id = ?", (user_id,))
            self._add_counters(counters or {})
            if self._uses_due():
                self._write_uses()

    def reset_usage(self, user_id: str | None = None) -> None:
        """Starts a new quota period for one user or for all."""
        zeroed = ", ".join(f"{name} = 0" for name in ("used", *SPENT_FIGURES))
        if user_id is None:
            self.db.execute(f"UPDATE usage SET {zeroed}")
        else:
            self.db.execute(f"UPDATE usage SET {zeroed} WHERE user_id = ?", (user_id,))

    def add_to_counters(self, **amounts: int) -> None:
        """The counters in one statement, so one synced transaction; the affinity uses noted in memory go with them
        once a second (with every request's counters they doubled its cost)."""
        if not self._uses_due():
            return self._add_counters(amounts)
        with self._transaction():
            self._add_counters(amounts)
            self._write_uses()

    def _add_counters(self, amounts: dict[str, int]) -> None:
        if amounts:
            self.db.execute(
                "INSERT INTO counters (name, value) VALUES " + ", ".join(["(?, ?)"] * len(amounts)) + " ON CONFLICT"
                " (name) DO UPDATE SET value = value + excluded.value",
                [part for pair in amounts.items() for part in pair],
            )

    def counters(self) -> dict[str, int]:
        """Every counter but the daily ones: the two ranges of the primary key around them (with `OR`, SQLite
        would scan the whole table, daily counters and all)."""
        return dict(
            self.db.execute(
                "SELECT name, value FROM counters WHERE name < ?"
                " UNION ALL SELECT name, value FROM counters WHERE name >= ?",
                (DAY_PREFIX, _AFTER_DAILY_COUNTERS),
            )
        )

    def daily_counters(self, first_day: str) -> dict[str, int]:
        """Every daily counter of `first_day` (an ISO date) or later, by its full name: a range of the primary key."""
        return dict(
            self.db.execute(
                "SELECT name, value FROM counters WHERE name >= ? AND name < ?",
                (DAY_PREFIX + first_day, _AFTER_DAILY_COUNTERS),
            )
        )

    # -- windows (memory) ----------------------------------------------------------------------------------

    def hit_rate_window(
        self, identity: str, limit: int, window: float, bucket: str = ""
    ) -> tuple[bool, int, float, str]:
        """Counts a request in `identity`'s sliding window if it has room: (allowed, remaining, reset at, the hit's
        name for `refund_rate_window`). A `bucket` is a window of its own (token counts); only requests of the
        default bucket make an identity active."""
        now = time.time()
        hits = self._windows.setdefault(_window_name(identity, bucket), deque())
        while hits and hits[0] <= now - window:
            hits.popleft()
        allowed = len(hits) < limit
        if allowed:
            hits.append(now)
        reset_at = hits[0] + window if hits else now
        return allowed, max(0, limit - len(hits)), reset_at, repr(now)

    def refund_rate_window(self, identity: str, hit: str, bucket: str = "") -> None:
        """Takes back a counted request: the proxy itself refused it after the count, so it costs nothing."""
        hits = self._windows.get(_window_name(identity, bucket), deque())
        if float(hit) in hits:
            hits.remove(float(hit))

    def active_identities(self, window: float) -> int:
        """Identities with a counted request in the last `window` seconds."""
        cutoff = time.time() - window
        for name in [name for name, hits in self._windows.items() if not hits or hits[-1] <= cutoff]:
            del self._windows[name]
        return sum("\0" not in name for name in self._windows)

    def record_wait(self, family: str, seconds: float) -> None:
        """Notes how long a request of the family waited for a key, for the estimated wait."""
        self._waits.setdefault(family, deque()).append((time.time(), seconds))

    def recent_waits(self, family: str, window: float) -> list[float]:
        """The waits of the family's requests dispatched in the last `window` seconds."""
        waits = self._waits.get(family, deque())
        while waits and waits[0][0] < time.time() - window:
            waits.popleft()
        return [seconds for _, seconds in waits]

    def enter(self, identity: str, limit: int) -> bool:
        """Counts a request in flight for `identity` unless it already has `limit` (0: no limit)."""
        if limit and self._in_flight.get(identity, 0) >= limit:
            return False
        self._in_flight[identity] = self._in_flight.get(identity, 0) + 1
        return True

    def leave(self, identity: str) -> None:
        if (count := self._in_flight.get(identity, 0) - 1) > 0:
            self._in_flight[identity] = count
        else:
            self._in_flight.pop(identity, None)

    def close(self) -> None:
        with self._transaction():
            self._write_uses()
        self.db.close()

    @contextlib.contextmanager
    def _transaction(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    # -- affinity: which key holds a conversation's cache or a response's state ----------------------------

    def affinity(self, space: str, name: str, ttl: float) -> str | None:
        """What `name` is bound to in `space`, or None when it is unknown or was not used for `ttl` seconds;
        a hit counts as a use."""
        now = time.time()
        row = self.db.execute("SELECT value, used_at FROM affinity WHERE space = ? AND name = ?", (space, name))
        value, used_at = row.fetchone() or (None, 0.0)
        if value is None or max(used_at, self._uses.get((space, name), 0.0)) <= now - ttl:
            return None
        # Noted in memory, and written with a request's counters once a second (or with the next binding): a write
        # here was a second synced transaction per request. A crash loses the last second's uses, so a name may
        # be forgotten that much earlier.
        self._uses[(space, name)] = now
        return value

    def _uses_due(self) -> bool:
        return bool(self._uses) and time.monotonic() - self._uses_written >= USES_WRITTEN_EVERY

    def _write_uses(self) -> None:
        """Writes the affinity uses noted in memory; inside a transaction."""
        if self._uses:
            self.db.executemany(
                "UPDATE affinity SET used_at = max(used_at, ?) WHERE space = ? AND name = ?",
                [(used_at, space, name) for (space, name), used_at in self._uses.items()],
            )
            self._uses.clear()
            self._uses_written = time.monotonic()

    def bind_affinity(self, space: str, name: str, value: str, expected: str | None, ttl: float, capacity: int) -> str:
        """Binds `name` to `value` if it is bound to `expected` now (None: to nothing), and returns what it is
        bound to afterwards. Names unused for `ttl` seconds are forgotten, and beyond `capacity` names in the
        space the least recently used."""
        now = time.time()
        if space not in self._affinity_sizes:  # counted once; afterwards followed, as one process owns the file
            (self._affinity_sizes[space],) = self.db.execute(
                "SELECT COUNT(*) FROM affinity WHERE space = ?", (space,)
            ).fetchone()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self._write_uses()  # the least recently used names are found by what the file says
            size = self._affinity_sizes[space]
            size -= self.db.execute(
                "DELETE FROM affinity WHERE space = ? AND used_at <= ?", (space, now - ttl)
            ).rowcount
            row = self.db.execute("SELECT value FROM affinity WHERE space = ? AND name = ?", (space, name)).fetchone()
            current = value if (row[0] if row else None) == expected else row[0]
            self.db.execute(
                "INSERT INTO affinity (space, name, value, used_at) VALUES (?, ?, ?, ?) ON CONFLICT (space, name)"
                " DO UPDATE SET value = excluded.value, used_at = excluded.used_at",
                (space, name, current, now),
            )
            size += row is None
            if size > capacity:
                size -= self.db.execute(
                    "DELETE FROM affinity WHERE rowid IN (SELECT rowid FROM affinity WHERE space = ?"
                    " ORDER BY used_at LIMIT ?)",
                    (space, size - capacity),
                ).rowcount
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self._affinity_sizes[space] = size
        return current
