"""The proxy as a mitmproxy addon script: `mitmdump -s addons/proxy.py` as a mitmproxy user types it, with
mitmproxy's own options, beside the user's own scripts, and failing closed when the script breaks."""

import os
import re
import shutil
import textwrap

import httpx
import pytest

from tests.conftest import CANARY, OPENAI_KEYS, proxy_env
from tests.harness import ENTRY_SCRIPT, ProxyProcess, free_port, wait_until

pytestmark = pytest.mark.e2e

CHAT = "/proxy/openai/v1/chat/completions"
ASK = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
CLIENT_KEY = f"sk-client-{CANARY}"


def as_typed(process: ProxyProcess) -> ProxyProcess:
    """The proxy as mitmproxy users type the command: without the harness's `--set server=false` (so
    mitmproxy opens its own listener first) and without PYTHONPATH (the report was `ModuleNotFoundError: addons`)."""
    process.command.remove("server=false")
    process.command.remove("--set")
    process.env.pop("PYTHONPATH")
    return process


def test_mitmdump_s_as_a_user_types_it_serves_with_the_policy(fake, tmp_path):
    port = free_port()
    process = ProxyProcess(proxy_env(fake), args=["-p", str(port), "--mode", f"reverse:{fake.url}"])
    with as_typed(process):
        assert process.port == port
        with httpx.Client(base_url=process.url, timeout=15) as client:
            answer = client.post(CHAT, json=ASK, headers={"authorization": f"Bearer {CLIENT_KEY}"})
            assert answer.status_code == 200
            refused = client.post("/proxy/openai/v1/files", headers={"authorization": f"Bearer {CLIENT_KEY}"})
            assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
            unprefixed = client.get("/v1/models")
            assert unprefixed.status_code == 404
        (forwarded,) = fake.requests
        assert forwarded.path == "/v1/chat/completions" and forwarded.key in OPENAI_KEYS
        assert CLIENT_KEY not in str(forwarded.headers)
        assert not {"openai-organization", "set-cookie"} & {name.lower() for name in answer.headers}
    log = process.log()
    assert CANARY not in log
    # mitmproxy's start-up line names the proxy and its real listener, not an internal address.
    assert re.search(
        rf"llm-proxy \(OpenAI under /proxy/openai, Anthropic under /proxy/anthropic\) listening at .*:{port}", log
    )
    assert "127.0.0.1:1" not in log  # the listener's stand-in target: not in the start-up line, not in a flow


def test_the_listener_follows_port_and_mitmproxys_listen_options(fake):
    port = free_port()
    with ProxyProcess(proxy_env(fake, PORT=str(port))) as by_setting:
        assert by_setting.port == port
    port = free_port()
    with ProxyProcess(proxy_env(fake), args=["--mode", f"reverse:{fake.url}@127.0.0.1:{port}"]) as by_mode:
        assert by_mode.port == port
        assert httpx.post(by_mode.url + CHAT, json=ASK, timeout=15).status_code == 200
        assert fake.requests[-1].key in OPENAI_KEYS  # the mode's URL is the OpenAI upstream


@pytest.mark.parametrize("mode", ["socks5", "transparent", "reverse:tcp://127.0.0.1:9"])
def test_other_listener_modes_are_refused_with_one_sentence(fake, mode):
    process = ProxyProcess(proxy_env(fake), args=["--mode", mode])
    assert process.run_to_exit() != 0
    assert f"--mode {mode} is not accepted" in process.log() and "Traceback" not in process.log()


def test_a_malformed_set_value_stops_start_up_naming_it(fake):
    process = ProxyProcess(proxy_env(fake), args=["--set", "upstream_timeout=soon"])
    assert process.run_to_exit() != 0
    assert "Failed to parse option upstream_timeout: not an integer: soon" in process.log()
    assert "Traceback" not in process.log()


def test_a_users_own_script_sees_the_redacted_flow(fake, tmp_path):
    seen = tmp_path / "seen.txt"
    user_script = tmp_path / "mine.py"
    user_script.write_text(
        textwrap.dedent(
            f"""
            class Recorder:
                def response(self, flow):
                    with open({str(seen)!r}, "a") as out:
                        out.write(repr(flow.request.headers) + repr(flow.response.headers) + "\\n")

            addons = [Recorder()]
            """
        )
    )
    with ProxyProcess(proxy_env(fake), args=["-s", str(user_script)]) as process:
        answer = httpx.post(process.url + CHAT, json=ASK, headers={"authorization": f"Bearer {CLIENT_KEY}"})
        assert answer.status_code == 200
        recorded = wait_until(lambda: seen.exists() and seen.read_text())
    assert CLIENT_KEY not in recorded and CANARY not in recorded and "authorization" not in recorded.lower()


def under(ui: str) -> dict:
    """ProxyProcess arguments for mitmdump or mitmweb (on a free port of its own, no browser)."""
    web = ["--set", f"web_port={free_port()}", "--set", "web_open_browser=false"] if ui == "web" else []
    return {"ui": ui, "args": web}


@pytest.mark.parametrize("ui", ["dump", "web"])
def test_a_script_broken_at_load_never_listens(fake, tmp_path, ui):
    broken = tmp_path / "proxy.py"
    broken.write_text(ENTRY_SCRIPT.read_text() + "\nraise RuntimeError('a typo')\n")
    process = ProxyProcess(proxy_env(fake), script=broken, **under(ui))
    assert process.run_to_exit() != 0
    assert not re.search(r"llm-proxy .* listening at", process.log()) and not fake.requests


@pytest.mark.parametrize("ui", ["dump", "web"])
def test_a_reload_that_breaks_the_script_refuses_everything_until_one_works(fake, tmp_path, ui):
    script = tmp_path / "proxy.py"  # a copy, so that the test can edit it; PYTHONPATH finds the packages
    shutil.copy(ENTRY_SCRIPT, script)
    process = ProxyProcess(proxy_env(fake), script=script, **under(ui))
    with process, httpx.Client(base_url=process.url) as client:
        assert client.post(CHAT, json=ASK, timeout=15).status_code == 200
        script.write_text(ENTRY_SCRIPT.read_text() + "\nraise RuntimeError('a typo')\n")
        os.utime(script, (script.stat().st_atime, script.stat().st_mtime + 5))
        process.wait_for_log("a typo")
        refused = client.post(CHAT, json=ASK, headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=15)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "policy_not_loaded"
        assert client.post("/proxy/anthropic/v1/messages", json={}).json()["type"] == "error"
        assert len(fake.requests) == 1
        shutil.copy(ENTRY_SCRIPT, script)
        os.utime(script, (script.stat().st_atime, script.stat().st_mtime + 15))
        wait_until(lambda: client.post(CHAT, json=ASK, timeout=15).status_code == 200, timeout=15)
    assert len(fake.requests) == 2 and CANARY not in process.log()
