"""Start-up: a bad setting stops the proxy with one sentence naming it, never a traceback."""

import re
import time
from datetime import datetime, timedelta

import httpx
import pytest

from tests.harness import ProxyProcess, free_port

pytestmark = pytest.mark.e2e

# mitmproxy's own lines around a failed start: its note that it loads the script, and why it exits.
_MITMPROXY_LINES = re.compile(r"(\[[\d:.]+\] Loading script .*|Errors? logged during startup, exiting\.\.\.)")


def said(output: str) -> list[str]:
    """What the proxy itself printed."""
    return [line for line in output.strip().splitlines() if not _MITMPROXY_LINES.fullmatch(line)]


@pytest.mark.parametrize(
    "env, args, sentence",
    [
        ({"UPSTREAM_TIMEOUT": "soon"}, [], "UPSTREAM_TIMEOUT must be a whole number"),
        ({"PORT": "http"}, [], "PORT must be a whole number"),
        ({"MAX_REQUEST_BODY": "lots"}, [], "MAX_REQUEST_BODY must be a size"),
        ({"STREAM_RECORD_LIMIT": "lots"}, [], "STREAM_RECORD_LIMIT must be a size such as 256k"),
        ({"OPENAI_UPSTREAM_URL": "ftp://example"}, [], "OPENAI_UPSTREAM_URL must be an http:// or https:// URL"),
        ({"PROXY_CONFIG": "/nonexistent.yaml"}, [], "Cannot read the configuration file /nonexistent.yaml"),
        ({}, ["--set", "stream_large_bodies=1"], "stream_large_bodies cannot be used"),
        ({}, ["--set", "validate_inbound_headers=false"], "validate_inbound_headers must stay on"),
        ({}, ["--mode", "upstream:http://127.0.0.1:3128"], "--mode upstream:http://127.0.0.1:3128 is not accepted"),
        ({}, ["--set", "upstream_timeout=-1"], "UPSTREAM_TIMEOUT must be a positive number"),
        ({"GATEKEEPER": "user_token"}, [], "GATEKEEPER=user_token needs an ADMIN_KEY"),
        ({"GATEKEEPER": "proxy_key", "PROXY_KEY": "   "}, [], "GATEKEEPER=proxy_key needs a PROXY_KEY"),
        ({"GATEKEEPER": "everyone"}, [], "GATEKEEPER must be one of none, proxy_key, user_token"),
        ({"QUEUE_MODE": "random"}, [], "QUEUE_MODE must be one of fair, fifo, none"),
        ({"QUOTA_REFRESH_PERIOD": "weekly"}, [], "QUOTA_REFRESH_PERIOD must be hourly, daily or a cron expression"),
        ({"QUOTA_REFRESH_PERIOD": "99 * * * *"}, [], "not '99 * * * *': bad minute."),
        ({"QUOTA_REFRESH_PERIOD": "0 * * * * *"}, [], "a cron expression has 5 fields, this one 6."),
        ({"QUOTA_REFRESH_PERIOD": "0 * * *"}, [], "a cron expression has 5 fields, this one 4."),
        ({"QUOTA_REFRESH_PERIOD": "5-1 * * * *"}, [], "not '5-1 * * * *': bad minute."),
        ({"QUOTA_REFRESH_PERIOD": "*/0 * * * *"}, [], "not '*/0 * * * *': bad minute."),
        ({"QUOTA_REFRESH_PERIOD": "0 0 1 * FUNDAY"}, [], "not '0 0 1 * FUNDAY': bad day-of-week."),
        ({"TOKEN_QUOTA_GPT9": "100"}, [], "TOKEN_QUOTA_GPT9 names no model family"),
        ({"ALLOWED_MODEL_FAMILIES": "gpt4o,gpt99"}, [], "ALLOWED_MODEL_FAMILIES names an unknown family: 'gpt99'"),
        ({"REJECT_PHRASES": "(a+)+b", "REJECT_PHRASES_REGEX": "true"}, [], "could take exponential time"),
        ({"PROXY_ERROR_FORMAT": "html"}, [], "PROXY_ERROR_FORMAT must be one of error, completion"),
        ({"STORE": "redis", "REDIS_URL": "redis://127.0.0.1:1/0"}, [], "unreachable"),
        ({"STORE": "memcached"}, [], "STORE must be one of sqlite, redis"),
    ],
)
def test_bad_setting_stops_start_up_with_one_sentence(env, args, sentence):
    process = ProxyProcess(env, args=args)
    assert process.run_to_exit() != 0
    output = process.log()
    assert sentence in output
    assert "Traceback" not in output
    assert len(said(output)) == 1, output


def test_unknown_setting_in_config_file_is_named(tmp_path):
    config = tmp_path / "proxy.yaml"
    config.write_text("model_rate_limt: 4\n")
    process = ProxyProcess({"PROXY_CONFIG": str(config)})
    assert process.run_to_exit() != 0
    assert "'model_rate_limt'" in process.log() and "Traceback" not in process.log()


def test_settings_from_a_dotenv_file_and_a_config_file(tmp_path):
    config = tmp_path / "proxy.yaml"
    config.write_text("server_title: From the file\n")
    with ProxyProcess({"PROXY_CONFIG": str(config)}) as proxy:
        assert httpx.get(f"{proxy.url}/status").json()["title"] == "From the file"
    process = ProxyProcess({"PROXY_CONFIG": str(config)})
    (process.workdir / ".env").write_text("SERVER_TITLE='From dotenv'\nOPENAI_KEY=sk-a,sk-b\n")
    with process as proxy:
        status = httpx.get(f"{proxy.url}/status").json()
        assert status["title"] == "From dotenv"
        assert status["openai"]["keys"]["total"] == 2


def test_a_malformed_dotenv_line_stops_start_up_with_one_sentence():
    process = ProxyProcess()
    (process.workdir / ".env").write_text("OPENAI_KEY=sk-a # prod\nSERVER_TITLE='unclosed\nADMIN_KEY=secret\n")
    assert process.run_to_exit() != 0
    output = process.log()
    assert f"{process.workdir / '.env'}: line 2 is not of the form NAME=value." in output
    assert "Traceback" not in output and "secret" not in output
    assert len(said(output)) == 1, output


def test_a_refresh_period_naming_a_day_and_a_weekday_refreshes_on_either():
    def next_monday_or_first(after: datetime) -> str:
        days = (after.date() + timedelta(days=n) for n in range(1, 8))
        return f"{next(day for day in days if day.weekday() == 0 or day.day == 1)} 00:00"

    started = datetime.now()
    with ProxyProcess({"QUOTA_REFRESH_PERIOD": "0 0 1 * MON"}) as proxy:
        logged = proxy.wait_for_log(r"quotas start afresh next at (\S+ \S+)").group(1)
    # Either side of a midnight the test may straddle.
    assert logged in {next_monday_or_first(started), next_monday_or_first(datetime.now())}


def test_starts_without_keys_says_what_to_set_and_answers_at_once():
    started = time.monotonic()
    with ProxyProcess() as proxy:
        assert httpx.get(f"{proxy.url}/health").text == "OK"
        print(f"start-up to first answer: {time.monotonic() - started:.2f} s")
        proxy.wait_for_log(r"No API key is configured: set OPENAI_KEY, ANTHROPIC_KEY or another service.s keys")


@pytest.mark.parametrize("option", [["--set", "listen_port={port}"], ["-p", "{port}"]])
def test_mitmproxys_own_listen_options_choose_the_port(option):
    port = free_port()
    with ProxyProcess({"PORT": "7860"}, args=[part.format(port=port) for part in option]) as proxy:
        assert proxy.port == port and httpx.get(f"{proxy.url}/health").text == "OK"


@pytest.mark.parametrize(
    "env, sentence",
    [
        ({"COST_QUOTAS": "gpt-4o=5"}, "COST_QUOTAS names no model family of this proxy: 'gpt-4o'."),
        ({"COST_QUOTAS": "total=five"}, "COST_QUOTAS entries look like family=usd or total=usd, not 'total=five'."),
        ({"MODEL_PRICES": "gpt-4o*=2.5"}, "MODEL_PRICES entries look like model-pattern=input/output"),
        ({"MODEL_PRICES": "gpt-4o*=2.5/10,openai=2.5/10"}, "MODEL_PRICES needs a fallback entry for each service"),
    ],
)
def test_bad_prices_and_usd_quotas_stop_start_up_with_one_sentence(env, sentence):
    process = ProxyProcess(env)
    assert process.run_to_exit() != 0
    output = process.log()
    assert sentence in output and "Traceback" not in output
    assert len(said(output)) == 1, output
