"""Unit tests of settings read through libraries: QUOTA_REFRESH_PERIOD schedules (cronsim) and .env files
(python-dotenv), and of the refresh task outliving a failed refresh."""

import asyncio
import sqlite3
import time
from datetime import datetime, timedelta

import pytest
from mitmproxy.test import taddons

from addons.modelfamilies import ModelFamilies
from addons.quotakeeper import QuotaKeeper
from llmproxy.config import ConfigError, ConfigSources, read_dotenv
from llmproxy.quota import next_refresh
from llmproxy.services import BUILT_IN
from llmproxy.store.storage import Storage


@pytest.mark.parametrize(
    "period, after, expected",
    [
        ("hourly", datetime(2026, 11, 28, 14, 7), datetime(2026, 11, 28, 15, 0)),
        ("daily", datetime(2026, 11, 28, 14, 7), datetime(2026, 11, 29, 0, 0)),
        ("0 * * * *", datetime(2026, 11, 28, 14, 0), datetime(2026, 11, 28, 15, 0)),  # strictly after
        # Day of month and day of week both restricted: either one is enough, as in cron.
        ("0 0 1 * MON", datetime(2026, 11, 28, 14, 7), datetime(2026, 11, 30, 0, 0)),  # Saturday -> Monday
        ("0 0 1 * MON", datetime(2026, 11, 30, 0, 0), datetime(2026, 12, 1, 0, 0)),  # Monday -> the 1st, a Tuesday
        ("0 0 1,15 * 5", datetime(2026, 12, 1, 0, 0), datetime(2026, 12, 4, 0, 0)),  # the next Friday first
        # A day of month starting with * restricts nothing by itself, so the day of week alone decides (Vixie cron).
        ("0 0 */2 * MON", datetime(2026, 11, 28, 14, 7), datetime(2026, 12, 7, 0, 0)),
        ("*/15 9-17 * * 1-5", datetime(2026, 11, 27, 17, 50), datetime(2026, 11, 30, 9, 0)),  # Friday -> Monday
        ("5,35 * 1 * *", datetime(2026, 11, 30, 23, 50), datetime(2026, 12, 1, 0, 5)),
        ("0 0 * * 7", datetime(2026, 11, 28, 14, 7), datetime(2026, 11, 29, 0, 0)),  # 7 is Sunday, like 0
        ("0 0 29 2 *", datetime(2026, 3, 1, 0, 0), datetime(2028, 2, 29, 0, 0)),
        ("30 4 1 jan,jul *", datetime(2026, 11, 28, 14, 7), datetime(2027, 1, 1, 4, 30)),
    ],
)
def test_next_refresh_is_the_next_time_the_period_names(period, after, expected):
    assert next_refresh(period, after) == expected


@pytest.mark.parametrize(
    "period, reason",
    [
        ("weekly", "a cron expression has 5 fields, this one 1"),
        ("99 * * * *", "bad minute"),
        ("0 * * * * *", "a cron expression has 5 fields, this one 6"),
        ("0 * * *", "a cron expression has 5 fields, this one 4"),
        ("5-1 * * * *", "bad minute"),
        ("*/0 * * * *", "bad minute"),
        ("0 0 1 * FUNDAY", "bad day-of-week"),
        ("0 0 31 2 *", "bad day-of-month"),
        ("0 0 */40 2 MON#5", "it names no time in the next 50 years"),  # February 1st is never a fifth Monday
    ],
)
def test_a_bad_period_is_refused_with_its_reason(period, reason):
    with pytest.raises(ValueError) as refused:
        next_refresh(period, datetime(2026, 11, 28, 14, 7))
    assert str(refused.value) == reason


class SteppingClock:
    """A wall clock that moves on a minute at each look, so that an every-minute schedule is always due."""

    def __init__(self, start: datetime):
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now


async def eventually(condition, timeout: float = 5) -> None:
    """Waits without blocking the event loop until `condition()` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_the_refresh_task_outlives_a_failed_refresh(tmp_path, caplog):
    storage = Storage()
    keeper = QuotaKeeper(storage, ModelFamilies(BUILT_IN), {})
    keeper.clock = SteppingClock(datetime(2026, 11, 28, 14, 0))
    with taddons.context(keeper) as tctx:
        storage.open(tmp_path / "proxy.sqlite3")
        store = storage.store
        _, user = store.create_user({})
        store.reserve(user["id"], "gpt4o", 10, None)
        store.settle(user["id"], "gpt4o", 10, 10)
        store.db.execute("PRAGMA busy_timeout = 10")  # a locked database fails the refresh at once, not after 5 s
        other_writer = sqlite3.connect(tmp_path / "proxy.sqlite3", isolation_level=None)
        other_writer.execute("BEGIN IMMEDIATE")  # holds the write lock: the refresh fails with "database is locked"
        tctx.configure(keeper, quota_refresh_period="* * * * *")
        keeper.running()
        try:
            await eventually(lambda: "database is locked" in caplog.text)
            assert store.get_user(user["id"])["usage"]["gpt4o"]["used"] == 10
            other_writer.execute("ROLLBACK")
            await eventually(lambda: store.get_user(user["id"])["usage"]["gpt4o"]["used"] == 0)
        finally:
            keeper.done()
            other_writer.close()
            storage.close()


def test_dotenv_comments_quotes_export_and_empty_values(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text(
        "# keys of the production account\n"
        "OPENAI_KEY=sk-a,sk-b # prod\n"
        "SERVER_TITLE='Team proxy' # shown on /\n"
        'export PROXY_KEY="pass #word" # a # inside quotes is part of the value\n'
        "ADMIN_KEY=\n"
        "ANTHROPIC_KEY=''\n"
        "REJECT_MESSAGE=no#comment\n"
    )
    (tmp_path / "config.yaml").write_text("")
    monkeypatch.chdir(tmp_path)
    sources = ConfigSources({"PROXY_CONFIG": str(tmp_path / "config.yaml")})
    assert sources.secrets(["openai_key", "anthropic_key"]) == {
        "openai_key": ["sk-a", "sk-b"],
        "anthropic_key": [],
        "proxy_key": "pass #word",
        "admin_key": "",
    }
    assert sources.value("server_title", str, "") == "Team proxy"
    assert sources.value("reject_message", str, "") == "no#comment"  # a comment starts after a space


def test_dotenv_values_are_literal_and_the_environment_wins(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("PROXY_KEY=pa$$w${HOME}rd\nSERVER_TITLE=from .env\n")
    (tmp_path / "config.yaml").write_text("server_title: from config.yaml\n")
    monkeypatch.chdir(tmp_path)
    sources = ConfigSources(
        {"PROXY_CONFIG": str(tmp_path / "config.yaml"), "HOME": "/root", "SERVER_TITLE": "from the environment"}
    )
    assert sources.secrets([])["proxy_key"] == "pa$$w${HOME}rd"  # no interpolation: a password is taken as written
    assert sources.value("server_title", str, "") == "from the environment"


@pytest.mark.parametrize(
    "text, line",
    [
        ("OPENAI_KEY=sk-a\nnot a setting\n", 2),
        ("# a comment\nOPENAI_KEY\n", 2),  # a name without = is no setting
        ('SERVER_TITLE="unclosed\nOPENAI_KEY=sk-a\n', 1),  # would swallow the lines after it
    ],
)
def test_a_malformed_dotenv_line_is_named(tmp_path, text, line):
    path = tmp_path / ".env"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        read_dotenv(path)
    assert str(refused.value) == f"{path}: line {line} is not of the form NAME=value."


def test_a_dotenv_file_saved_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / ".env"
    path.write_text("OPENAI_KEY=sk-a\n", encoding="utf-8-sig")  # as Windows Notepad saves it
    assert read_dotenv(path) == {"OPENAI_KEY": "sk-a"}


def test_a_dotenv_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / ".env"
    path.write_bytes("SERVER_TITLE=Café\n".encode("latin-1"))
    with pytest.raises(ConfigError) as refused:
        read_dotenv(path)
    assert str(refused.value) == f"{path} is not UTF-8 text."
