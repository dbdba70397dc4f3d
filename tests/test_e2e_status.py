"""The status page and its JSON, PAGE_BODY templates, prompt logging, metrics and the per-request log line."""

import base64
import json
import re
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmproxy.web.pages import format_wait
from tests.browser import DESKTOP, PHONE, check_layout, chromium, new_page
from tests.conftest import CANARY, proxy_env
from tests.harness import wait_until
from tests.test_e2e_sdk import anthropic_client, openai_client
from tests.test_e2e_users import ADMIN_KEY, Admin

pytestmark = pytest.mark.e2e

CHAT = "/proxy/openai/v1/chat/completions"
ALL_TAGS = (
    "{JSON} {headerHtml} {uptime} {title} {endpoints:openai} {endpoints:anthropic} {proompts} {proomptersNow} "
    "{openaiKeys} {anthropicKeys} {status} {build} {tookens} {user:data} {user:aliases} {config:page_body} "
    + " ".join(
        f"{{{family}:{field}}}"
        for family in ("turbo", "gpt4", "gpt432k", "gpt4o", "gpt5", "claude-sonnet", "anthropic")
        for field in ("activeKeys", "overQuotaKeys", "revokedKeys", "proomptersInQueue", "estimatedQueueTime")
    )
    + " "
    + " ".join(
        f"{{config:{name}}}"
        for name in (
            "gatekeeper",
            "modelRateLimit",
            "maxContextTokensOpenAI",
            "maxContextTokensAnthropic",
            "maxOutputTokensOpenAI",
            "maxOutputTokensAnthropic",
            "rejectDisallowed",
            "rejectMessage",
            "promptLogging",
            "queueMode",
            "turboOnly",
        )
    )
)


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "no wait"),
        (2, "no wait"),
        (3, "3sec"),
        (59.4, "59sec"),
        (90, "1min, 30sec"),
        (150, "2min, 30sec"),
        (3600, "60min, 0sec"),
    ],
)
def test_wait_times_read_like_the_original_without_its_rounding_bug(seconds, text):
    assert format_wait(seconds) == text


def test_status_json_per_family_while_keys_rest_and_requests_wait(start_proxy, fake):
    fake.set_key_behaviour("sk-rests", "rate_limit_for", seconds=4)
    proxy = start_proxy(
        proxy_env(
            fake,
            OPENAI_KEY="sk-rests,sk-dead-401",
            MAX_QUEUED_PER_IDENTITY="3",
            GATEKEEPER="proxy_key",
            PROXY_KEY="pk",
            MODEL_RATE_LIMIT="9",
        )
    )
    auth = {"authorization": "Bearer pk"}

    def status_while_queued() -> dict | None:
        status = httpx.get(f"{proxy.url}/status").json()
        return status if status["families"]["gpt4o"]["proomptersInQueue"] == 1 else None

    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.12"), timeout=20) as client:
        waiting = threading.Thread(
            target=client.post,
            args=(f"{proxy.url}{CHAT}",),
            kwargs={"json": {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, "headers": auth},
        )
        waiting.start()
        status = wait_until(status_while_queued)
        waiting.join()
    gpt4o = status["families"]["gpt4o"]
    assert gpt4o["activeKeys"] == 1 and gpt4o["estimatedQueueTime"] != "no wait"
    assert status["openai"]["keys"] == {"total": 2, "active": 1, "revoked": 1, "overQuota": 0}
    assert status["config"]["gatekeeper"] == "proxy_key" and status["config"]["modelRateLimit"] == "9"
    assert status["openaiKeys"] == 2 and status["proomptersNow"] == 1
    text = json.dumps(status)
    assert "127.0.0.12" not in text and "pk" not in text.split('"gatekeeper"')[0] and CANARY not in text
    final = httpx.get(f"{proxy.url}/status").json()
    assert final["proompts"] >= 1 and final["tookens"] > 0


def test_page_body_fills_every_tag_and_escapes_values(start_proxy, fake, tmp_path):
    template = f"<html><body><h1>Custom</h1>{ALL_TAGS} {{unknown:tag}} {{uptime}} ünïcode</body></html>"
    proxy = start_proxy(
        proxy_env(
            fake,
            PAGE_BODY=base64.b64encode(template.encode()).decode(),
            GATEKEEPER="user_token",
            ADMIN_KEY=ADMIN_KEY,
            DATA_DIR=str(tmp_path / "d"),
            SERVER_TITLE="Tom & Jerry's",
        )
    )
    Admin(proxy).create(nickname="<script>alert('x')</script>")
    # The page's figures are cached for 1.5 s: the new user shows once they are gathered again.
    page = wait_until(lambda: "alert(" in (text := httpx.get(f"{proxy.url}/").text) and text)
    assert "{unknown:tag}" in page and "ünïcode" in page and "<h1>Custom</h1>" in page
    import html

    shown_template = html.escape(template)  # {config:page_body}: the template itself, as text
    assert shown_template in page
    remaining = [tag for tag in ALL_TAGS.split() if tag in page.replace(shown_template, "")]
    assert remaining == []
    assert "<script>alert" not in page and "&lt;script&gt;alert" in page
    assert "Tom &amp; Jerry&#x27;s" in page
    assert f"{proxy.url}/proxy/openai/v1" in page
    assert page.count("no wait") >= 7  # every family's estimatedQueueTime
    assert CANARY not in page


def test_settings_and_family_names_are_escaped_and_page_body_is_not_a_jinja_template(start_proxy, fake):
    hostile = "<script>alert(1)</script> & co"
    shown = "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co"
    family = "<script>fam()</script>&x"  # the one OpenAI family, so the family table shows it
    proxy = start_proxy(
        proxy_env(fake, SERVER_TITLE=hostile, BUILD_INFO=hostile, OPENAI_MODEL_FAMILIES=f"{family}=gpt-*")
    )
    page = httpx.get(f"{proxy.url}/").text
    assert f"<title>{shown}</title>" in page and f"<h1>{shown}</h1>" in page and f"build {shown}" in page
    assert "<th>&lt;script&gt;fam()&lt;/script&gt;&amp;x</th>" in page
    assert "<script>" not in page
    status = httpx.get(f"{proxy.url}/status").json()
    assert status["title"] == hostile and family in status["families"]

    # The owner's PAGE_BODY is their HTML, not a Jinja2 template; only its {tag} values are escaped.
    template = "<main>{{ 7*7 }} {% if true %}yes{% endif %} {#c#} <b>{title}</b> <i>{config:rejectMessage}</i></main>"
    owned = start_proxy(
        proxy_env(
            fake,
            SERVER_TITLE=hostile,
            REJECT_MESSAGE="No <b>bold</b> & no 'quotes'",
            PAGE_BODY=base64.b64encode(f"{template}{{headerHtml}}".encode()).decode(),
        )
    )
    page = httpx.get(f"{owned.url}/").text
    assert page.startswith(
        "<main>{{ 7*7 }} {% if true %}yes{% endif %} {#c#} "
        f"<b>{shown}</b> <i>No &lt;b&gt;bold&lt;/b&gt; &amp; no &#x27;quotes&#x27;</i></main>"
    )
    assert f"<h1>{shown}</h1>" in page and "<script>" not in page


def test_prompt_logging_records_streamed_and_buffered_answers(start_proxy, fake, tmp_path):
    data = tmp_path / "data"
    proxy = start_proxy(proxy_env(fake, PROMPT_LOGGING="true", DATA_DIR=str(data)))
    openai_client(proxy).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "first"}])
    stream = openai_client(proxy).chat.completions.create(
        model="gpt-4o", stream=True, messages=[{"role": "user", "content": "second #fake:events=4"}]
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    with anthropic_client(proxy).messages.stream(
        model="claude-sonnet-5", max_tokens=20, messages=[{"role": "user", "content": "third"}]
    ) as s:
        claude_text = "".join(s.text_stream)
    entries = [json.loads(line) for line in (data / "prompt-log.jsonl").read_text().splitlines()]
    assert [e["prompt"]["messages"][0]["content"] for e in entries] == ["first", "second #fake:events=4", "third"]
    assert entries[1]["completion"] == streamed and entries[2]["completion"] == claude_text
    assert entries[0]["completion"] and all(e["inputTokens"] > 0 and e["outputTokens"] > 0 for e in entries)
    assert entries[2]["family"] == "claude-sonnet" and len(entries[0]["user"]) == 16
    assert CANARY not in (data / "prompt-log.jsonl").read_text()
    assert "Prompts and answers are logged" in httpx.get(f"{proxy.url}/").text
    assert httpx.get(f"{proxy.url}/status").json()["config"]["promptLogging"] == "true"


def test_no_prompt_log_when_off_and_sqlite_when_asked(start_proxy, fake, tmp_path):
    off = start_proxy(proxy_env(fake, DATA_DIR=str(tmp_path / "off")))
    openai_client(off).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert not list((tmp_path / "off").glob("prompt-log*"))
    on = start_proxy(
        proxy_env(fake, DATA_DIR=str(tmp_path / "on"), PROMPT_LOGGING="true", PROMPT_LOGGING_BACKEND="sqlite")
    )
    openai_client(on).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    import sqlite3

    rows = sqlite3.connect(tmp_path / "on" / "prompt-log.sqlite3").execute("SELECT model, completion FROM prompt_log")
    assert [row[0] for row in rows] == ["gpt-4o"]


def test_metrics_after_a_known_mix_of_traffic(start_proxy, fake):
    proxy = start_proxy(proxy_env(fake, MODEL_RATE_LIMIT="2", METRICS_NEED_ADMIN_KEY="true", ADMIN_KEY=ADMIN_KEY))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
    statuses = [httpx.post(f"{proxy.url}{CHAT}", json=body).status_code for _ in range(3)]
    httpx.get(f"{proxy.url}/proxy/openai/v1/files")
    assert statuses == [200, 200, 429]
    assert httpx.get(f"{proxy.url}/metrics").status_code == 401
    text = httpx.get(f"{proxy.url}/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    requests = {labels: value for (name, labels), value in samples.items() if name == "llmproxy_requests_total"}
    assert requests[(("family", "gpt4o"), ("route", "openai.chat_completions"), ("status", "200"))] == 2
    assert requests[(("family", "gpt4o"), ("route", "openai.chat_completions"), ("status", "429"))] == 1
    assert requests[(("family", ""), ("route", "none"), ("status", "404"))] == 1
    assert samples[("llmproxy_tokens_total", (("direction", "out"), ("family", "gpt4o")))] > 0
    assert samples[("llmproxy_keys", (("service", "openai"), ("state", "active")))] == 2
    assert samples[("llmproxy_upstream_seconds_count", (("route", "openai.chat_completions"),))] == 2
    assert CANARY not in text
    lines = [
        json.loads(line.split("] ", 1)[-1]) for line in proxy.log().splitlines() if '"route": "openai.chat' in line
    ]
    assert len(lines) == 3 and lines[0]["usage"]["output"] > 0 and lines[2]["decision"] == "rate_limited"


def test_a_browser_shows_the_page_as_text(start_proxy, fake, tmp_path):
    proxy = start_proxy(
        proxy_env(
            fake,
            GATEKEEPER="user_token",
            ADMIN_KEY=ADMIN_KEY,
            DATA_DIR=str(tmp_path / "d"),
            PAGE_BODY=base64.b64encode(b"<p id=users>{user:aliases}</p>{headerHtml}").decode(),
        )
    )
    Admin(proxy).create(nickname="<script>document.title='owned'</script>")
    wait_until(lambda: "document.title" in httpx.get(f"{proxy.url}/").text)  # the page's cached figures name the user
    with chromium() as browser:
        page = new_page(browser, PHONE)
        page.goto(f"{proxy.url}/")
        assert page.inner_text("#users") == "[\"<script>document.title='owned'</script>\"]"  # text, not run
        assert page.title() != "owned" and "OpenAI" in page.inner_text("body")


def test_the_default_page_fits_a_phone_and_a_desktop(proxy, tmp_path):
    with chromium() as browser:
        for name, viewport in (("phone", PHONE), ("desktop", DESKTOP)):
            page = new_page(browser, viewport)
            page.goto(f"{proxy.url}/")
            assert "OpenAI" in page.inner_text("body")
            check_layout(page, tmp_path / f"status-{name}.png")


def test_service_figures_count_keys_and_family_figures_count_the_keys_of_each_family(start_proxy, fake):
    # What /v1/models lists for a key decides its families; the -401 and -quota keys are retired by the check.
    fake.set_key_behaviour(
        "sk-ant-four-families", models=["claude-opus-4-1", "claude-sonnet-4-5", "claude-haiku-4-5", "claude-2.1"]
    )
    fake.set_key_behaviour("sk-ant-two-families", models=["claude-sonnet-4-5", "claude-haiku-4-5"])
    fake.set_key_behaviour("sk-three-families", models=["gpt-4o", "gpt-4.1-mini", "gpt-5"])
    fake.set_key_behaviour("sk-one-family", models=["gpt-4o"])
    service_tags = [
        "anthropicKeys",
        "openaiKeys",
        "anthropic:activeKeys",
        "anthropic:revokedKeys",
        "anthropic:overQuotaKeys",
    ]
    family_figures = {  # family: (activeKeys, revokedKeys, overQuotaKeys); a retired key's families are unknown
        "claude-opus": (1, 0, 0),
        "claude-sonnet": (2, 0, 0),
        "claude-haiku": (2, 0, 0),
        "claude": (1, 0, 0),
        "gpt4o": (2, 0, 0),
        "gpt4.1": (1, 0, 0),
        "gpt5": (1, 0, 0),
    }
    family_tags = [
        f"{family}:{field}" for family in family_figures for field in ("activeKeys", "revokedKeys", "overQuotaKeys")
    ]
    template = "".join(f"<i data-tag='{tag}'>{{{tag}}}</i>" for tag in service_tags + family_tags) + "{headerHtml}"
    proxy = start_proxy(
        proxy_env(
            fake,
            CHECK_KEYS="true",
            PAGE_BODY=base64.b64encode(template.encode()).decode(),
            ANTHROPIC_KEY="sk-ant-four-families,sk-ant-two-families,sk-ant-dead-401,sk-ant-broke-quota",
            OPENAI_KEY="sk-three-families,sk-one-family,sk-dead-401",
        )
    )
    expected_families = {
        family: {"activeKeys": active, "revokedKeys": revoked, "overQuotaKeys": over_quota}
        for family, (active, revoked, over_quota) in family_figures.items()
    }

    def checked() -> dict | None:
        status = httpx.get(f"{proxy.url}/status").json()
        figures = {
            family: {field: facts[field] for field in ("activeKeys", "revokedKeys", "overQuotaKeys")}
            for family, facts in status["families"].items()
        }
        return status if figures == expected_families else None

    status = wait_until(checked)
    assert status["anthropic"]["keys"] == {"total": 4, "active": 2, "revoked": 1, "overQuota": 1}
    assert status["openai"]["keys"] == {"total": 3, "active": 2, "revoked": 1, "overQuota": 0}
    assert status["anthropicKeys"] == 4 and status["openaiKeys"] == 3
    page = httpx.get(f"{proxy.url}/").text
    shown = dict(re.findall(r"<i data-tag='([^']+)'>([^<]*)</i>", page))
    assert {tag: shown[tag] for tag in service_tags} == {
        "anthropicKeys": "4",
        "openaiKeys": "3",
        "anthropic:activeKeys": "2",
        "anthropic:revokedKeys": "1",
        "anthropic:overQuotaKeys": "1",
    }
    assert {tag: shown[tag] for tag in family_tags} == {
        f"{family}:{field}": str(count)
        for family, figures in expected_families.items()
        for field, count in figures.items()
    }
    assert "2 active, 1 revoked, 1 over quota" in page and "2 active, 1 revoked, 0 over quota" in page
