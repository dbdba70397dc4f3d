"""Unit tests of the pure parts: route table, settings, header filters, scrubbing, fail-closed hooks."""

import json
from collections.abc import Sequence

import pytest
import yaml
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils
from multidict import CIMultiDict

from addons import apierrors, config, headers, routes, scrub
from addons.config import ConfigError, ConfigSources
from addons.dispatcher import Dispatcher
from addons.keypool import KeyPool
from addons.proxy import build_addons
from addons.router import Router


@pytest.mark.parametrize(
    "method, target, route",
    [
        (b"POST", b"/proxy/openai/v1/chat/completions", "openai.chat_completions"),
        (b"POST", b"/proxy/openai/chat/completions", "openai.chat_completions"),
        (b"POST", b"/proxy/openai/v1/responses", "openai.responses"),
        (b"POST", b"/proxy/anthropic/v1/messages?beta=true", "anthropic.messages"),
        (b"POST", b"/proxy/anthropic/messages/count_tokens", "anthropic.count_tokens"),
        (b"GET", b"/proxy/anthropic/v1/models?limit=20", "anthropic.models"),
        (b"GET", b"/", "status_page"),
    ],
)
def test_routes_match_exactly(method, target, route):
    assert routes.lookup(method, target).route.name == route


@pytest.mark.parametrize(
    "target",
    [b"/proxy/openai/v1/chat/completions?x=%2e", b"/proxy/openai/v1/chat/completions?a=b#c", b"/status/", b"//"],
)
def test_routes_refuse_near_misses(target):
    assert routes.lookup(b"POST", target).route is None


def test_upstream_paths_come_from_the_table():
    assert {route.upstream_path for route in routes.ROUTES_BY_NAME.values() if route.kind == routes.FORWARD} == {
        "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings",
        "/v1/messages", "/v1/messages/count_tokens", "/v1/complete",
    }  # fmt: skip


def test_settings_precedence_and_types(tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text("upstream_timeout: 30\nopenai_models: [a, b]\nopenai_key: sk-from-file\n")
    (tmp_path / ".env").write_text("# comment\nexport UPSTREAM_TIMEOUT=40\nSERVER_TITLE='From dotenv'\n")
    monkeypatch.chdir(tmp_path)
    sources = ConfigSources({"PROXY_CONFIG": str(tmp_path / "config.yaml"), "UPSTREAM_TIMEOUT": "50",
                             "ANTHROPIC_KEY": 'k1, "k,2", k1'})  # fmt: skip
    values = sources.options({"upstream_timeout": int, "openai_models": Sequence[str], "server_title": str})
    assert values == {"upstream_timeout": 50, "openai_models": ["a", "b"], "server_title": "From dotenv"}
    assert sources.secrets() == {"openai_key": ["sk-from-file"], "anthropic_key": ["k1", "k,2"],
                                 "proxy_key": "", "admin_key": ""}  # fmt: skip


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"UPSTREAM_TIMEOUT": "soon"}, "UPSTREAM_TIMEOUT must be a whole number"),
        ({"PORT": "70000"}, "PORT must be between"),
        ({"PROXY_CONFIG": "/nonexistent/config.yaml"}, "Cannot read the configuration file"),
    ],
)
def test_bad_settings_are_one_sentence(environ, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match=message):
        sources = ConfigSources({"PROXY_CONFIG": str(tmp_path / "empty.yaml"), **environ})
        sources.listen_address()
        sources.options({"upstream_timeout": int})


def test_unknown_setting_in_the_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("upstream_timout: 5\n")
    with pytest.raises(ConfigError, match="upstream_timout"):
        ConfigSources({"PROXY_CONFIG": str(tmp_path / "c.yaml")}).options({"upstream_timeout": int})


def test_config_yaml_documents_every_option_with_its_default(tmp_path):
    """config.yaml is the documentation of the defaults; it must not drift from the code."""
    import socket

    documented = yaml.safe_load(config.DEFAULT_CONFIG.read_text())
    with socket.socket() as pipe, taddons.context() as tctx:
        builtin = set(tctx.options.keys())
        for addon in build_addons({}, pipe):
            tctx.master.addons.add(addon)
        ours = {name: option.default for name, option in tctx.options.items() if name not in builtin}
    for name, default in ours.items():
        assert name in documented, f"config.yaml does not document {name}"
        assert documented[name] == (list(default) if isinstance(default, (list, tuple)) else default), name
    assert set(documented) == set(ours) | set(config.SECRET_SETTINGS) | set(config.LISTEN_SETTINGS)


def test_request_headers_allowlist():
    client_headers = http.Headers(
        [
            (b"Authorization", b"Bearer client"), (b"Content-Type", b"application/json"),
            (b"X-Forwarded-For", b"1.2.3.4"), (b"Connection", b"keep-alive, User-Agent"),
            (b"User-Agent", b"listed-in-connection"), (b"X-Stainless-Lang", b"python"),
            (b"Anthropic-Beta", b"bad\x01value"), (b"Accept-Encoding", b"gzip"),
        ]
    )  # fmt: skip
    result = headers.upstream_request_headers(client_headers, apierrors.ANTHROPIC)
    assert dict(result.items()) == {
        "content-type": "application/json", "x-stainless-lang": "python",
        "accept-encoding": "identity", "anthropic-version": headers.DEFAULT_ANTHROPIC_VERSION,
    }  # fmt: skip


def test_response_headers_allowlist():
    upstream = CIMultiDict(
        [("Content-Type", "application/json"), ("openai-organization", "org-x"), ("Set-Cookie", "a=b"),
         ("x-ratelimit-remaining-requests", "9"), ("Transfer-Encoding", "chunked"), ("Retry-After", "2")]
    )  # fmt: skip
    assert headers.client_response_headers(upstream) == [
        (b"content-type", b"application/json"), (b"x-ratelimit-remaining-requests", b"9"), (b"retry-after", b"2"),
    ]  # fmt: skip


def test_scrub_removes_configured_and_key_shaped_secrets():
    scrub.register(["plainsecretvalue"])
    text = scrub.text("key plainsecretvalue, sk-proj-abc123def456, org-ABCDEFGHIJKLMNOP and sk-ant-api03-xyz789")
    assert "plainsecretvalue" not in text and "sk-" not in text and "org-" not in text


async def test_a_failing_hook_answers_500_and_sends_nothing():
    class Exploding(KeyPool):
        name = "keypool"

        def choose(self, api):
            raise RuntimeError("boom with sk-secret-in-message")

    router, dispatcher = Router(), Dispatcher()
    with taddons.context(router, Exploding({"openai_key": ["sk-x"]}), dispatcher) as tctx:
        tctx.configure(router, max_request_body="4m")
        flow = tflow.tflow(req=tutils.treq(method=b"POST", path=b"/proxy/openai/v1/chat/completions", authority=b""))
        await router.requestheaders(flow)
        await dispatcher.request(flow)
    assert flow.response.status_code == 500
    assert json.loads(flow.response.content)["error"]["code"] == "proxy_internal_error"
    assert flow.metadata["llmproxy"]["decision"] == "internal_error"
