"""The proxy under mitmweb: every flow annotated, nothing secret shown or saved, memory bounded."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from mitmproxy import io

from tests.conftest import CANARY, proxy_env
from tests.harness import ProxyProcess, free_port, wait_until

pytestmark = pytest.mark.e2e

CHAT = "/proxy/openai/v1/chat/completions"
MESSAGES = "/proxy/anthropic/v1/messages"
PROXY_KEY = f"pk-{CANARY}-client-secret"  # a client's token is as secret as the owner's keys


@pytest.fixture
def mitmweb(fake):
    web_port = free_port()
    process = ProxyProcess(
        proxy_env(fake, GATEKEEPER="proxy_key", PROXY_KEY=PROXY_KEY, PORT=str(free_port())),
        args=["--set", f"web_port={web_port}", "--set", "web_open_browser=false", "--set", "web_keep_flows=40"],
        ui="web",
    ).start()
    token = process.wait_for_log(r"\?token=([0-9a-f]+)").group(1)  # mitmweb may print it after the listener
    api = httpx.Client(base_url=f"http://127.0.0.1:{web_port}", headers={"authorization": f"Bearer {token}"})
    # mitmweb's API wants its XSRF cookie echoed in a header on every change; any value the two share will do.
    api.cookies.set("_mitmproxy_xsrf", "test-xsrf")
    api.headers["x-xsrftoken"] = "test-xsrf"
    yield process, api
    process.stop()


def test_flows_are_annotated_and_hold_no_secret(mitmweb, fake):
    proxy, api = mitmweb
    auth = {"authorization": f"Bearer {PROXY_KEY}"}
    with httpx.Client(base_url=proxy.url, timeout=15) as client:
        ok = client.post(CHAT, headers=auth, json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
        assert ok.status_code == 200
        with client.stream(
            "POST",
            CHAT,
            headers=auth,
            json={"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "#fake:events=3"}]},
        ) as stream:
            "".join(stream.iter_text())
        client.post(
            CHAT,
            headers=auth,
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "#fake:status=400 #fake:echo_key=1"}]},
        )
        client.post(CHAT, headers={"authorization": "Bearer wrong"}, json={"model": "gpt-4o", "messages": []})
        client.get("/proxy/openai/v1/organization/api_keys", headers=auth)
    flows = api.get("/flows").json()
    chats = [f for f in flows if f["request"]["path"].startswith("/v1/chat/completions")]
    assert len(chats) == 3  # shown with the real API's path, not the pipe's
    assert chats[0]["request"]["host"] == "127.0.0.1" and "pipe" not in str(flows)
    comments = [f["comment"] for f in flows]
    assert any(c.startswith("served") and "keys oai-" in c and "gpt4o" in c and "client " in c for c in comments)
    assert any(c.startswith("unauthorized") for c in comments) and any(c.startswith("blocked path") for c in comments)
    assert {f["marked"] for f in flows} >= {"✅", "⛔"}  # mitmweb shows the emoji of the marker shortcodes
    for url in ("/flows", "/flows/dump", "/options", "/events", "/state"):
        body = api.get(url).content
        assert CANARY.encode() not in body, url
    for flow in chats:
        content = api.get(f"/flows/{flow['id']}/request/content.data").content
        assert CANARY.encode() not in content


def test_the_flow_list_stays_bounded(mitmweb):
    proxy, api = mitmweb
    with httpx.Client(base_url=proxy.url) as client:
        for _ in range(2000):
            client.get("/health")
    assert len(api.get("/flows").json()) <= 41


def test_flow_files_written_with_w_hold_no_secret(fake, tmp_path):
    dump = tmp_path / "flows.mitm"
    with ProxyProcess(proxy_env(fake, GATEKEEPER="proxy_key", PROXY_KEY=PROXY_KEY), args=["-w", str(dump)]) as proxy:
        auth = {"authorization": f"Bearer {PROXY_KEY}", "cookie": f"session={PROXY_KEY}"}
        for content in ("hi", "#fake:status=400 #fake:echo_key=1"):
            httpx.post(
                f"{proxy.url}{CHAT}",
                headers=auth,
                json={"model": "gpt-4o", "messages": [{"role": "user", "content": content}]},
            )
    data = dump.read_bytes()
    assert b"chat/completions" in data and CANARY.encode() not in data
    with dump.open("rb") as file:
        summaries = [flow.metadata["llmproxy"] for flow in io.FlowReader(file).stream()]
    assert [summary["decision"] for summary in summaries] == ["served", "upstream_error"]  # a summary, as JSON
    assert summaries[0]["keys"][0].startswith("oai-") and summaries[0]["usage"]["input"] > 0


def test_mitmwebs_status_bar_names_the_real_listener(mitmweb):
    proxy, api = mitmweb
    options = api.get("/options").json()
    # The status bar shows listen_host:listen_port (it showed *:8080 while the proxy listened elsewhere).
    assert options["listen_port"]["value"] == proxy.port and options["listen_host"]["value"] == "127.0.0.1"
    (server,) = api.get("/state").json()["servers"].values()
    assert server["listen_addrs"][0][1] == proxy.port
    # The status bar names the proxy, not the listener's stand-in target or the pipe.
    assert server["description"].startswith("llm-proxy (OpenAI under /proxy/openai")


def test_intercept_pauses_before_the_policy_and_the_edit_is_what_is_sent(mitmweb, fake):
    proxy, api = mitmweb
    assert api.put("/options", json={"intercept": "~u /v1/messages & ~q"}).status_code == 200
    body = {"model": "claude-sonnet-5", "max_tokens": 20, "messages": [{"role": "user", "content": "original"}]}
    auth = {"authorization": f"Bearer {PROXY_KEY}"}
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(httpx.post, f"{proxy.url}{MESSAGES}", json=body, headers=auth, timeout=30)
        flow = wait_until(lambda: next((f for f in api.get("/flows").json() if f["intercepted"]), None))
        assert fake.requests == []  # paused before the upstream call, not after it
        edited = {**body, "messages": [{"role": "user", "content": "edited in mitmweb"}]}
        headers = [*flow["request"]["headers"], ["authorization", "Bearer sk-typed-into-the-editor"]]
        update = {"request": {"content": json.dumps(edited), "headers": headers}}
        assert api.put(f"/flows/{flow['id']}", json=update).status_code == 200
        assert api.post(f"/flows/{flow['id']}/resume").status_code == 200
        assert answer.result().status_code == 200
    (sent,) = fake.requests
    assert json.loads(sent.body)["messages"][0]["content"] == "edited in mitmweb"  # the edit is what went upstream
    assert "authorization" not in {name.lower() for name, _ in sent.headers}  # an edited header is filtered too
    assert sent.key != "sk-typed-into-the-editor"
    # A changed target is refused: the route was decided before the pause.
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(httpx.post, f"{proxy.url}{MESSAGES}", json=body, headers=auth, timeout=30)
        flow = wait_until(lambda: next((f for f in api.get("/flows").json() if f["intercepted"]), None))
        api.put(f"/flows/{flow['id']}", json={"request": {"path": "/v1/files"}})
        api.post(f"/flows/{flow['id']}/resume")
        assert answer.result().status_code == 400 and answer.result().json()["type"] == "error"
    assert len(fake.requests) == 1


def test_a_streamed_answer_is_shown_as_the_client_received_it(mitmweb):
    proxy, api = mitmweb
    auth = {"authorization": f"Bearer {PROXY_KEY}"}
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "#fake:events=4"}]}
    with httpx.stream("POST", f"{proxy.url}{CHAT}", headers=auth, json=body, timeout=15) as stream:
        received = b"".join(stream.iter_raw())
    flow = wait_until(lambda: next((f for f in api.get("/flows").json() if f.get("comment")), None))
    shown = api.get(f"/flows/{flow['id']}/response/content.data")
    assert shown.status_code == 200 and shown.content == received and b"data: [DONE]" in shown.content
    assert CANARY.encode() not in api.get("/flows/dump").content


def finished(api: httpx.Client, count: int) -> list[dict]:
    """mitmweb's flows once `count` of them carry the proxy's comment (it is written when a flow ends)."""
    return wait_until(
        lambda: (flows := api.get("/flows").json()) and sum(bool(f["comment"]) for f in flows) >= count and flows
    )


def replayed(api: httpx.Client, flow: dict) -> dict:
    """The flow after mitmweb's replay of it (in place, as the same flow) has ended and been annotated anew."""
    before = next(f["comment"] for f in api.get("/flows").json() if f["id"] == flow["id"])
    assert api.post(f"/flows/{flow['id']}/replay").status_code == 200

    def annotated_again():
        now = next(f for f in api.get("/flows").json() if f["id"] == flow["id"])
        return now if now["comment"].startswith("replay") and now["comment"] != before else None

    return wait_until(annotated_again)


def test_a_replay_is_a_new_request_from_the_same_client_through_the_whole_policy(mitmweb, fake):
    proxy, api = mitmweb
    auth = {"authorization": f"Bearer {PROXY_KEY}"}
    ask = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=proxy.url, timeout=15) as client:
        assert client.post(CHAT, headers=auth, json=ask).status_code == 200
        streamed = {**ask, "stream": True, "messages": [{"role": "user", "content": "#fake:events=3"}]}
        with client.stream("POST", CHAT, headers=auth, json=streamed) as stream:
            "".join(stream.iter_text())
        assert client.post(CHAT, headers={"authorization": "Bearer wrong"}, json=ask).status_code == 401
        assert client.get("/proxy/openai/v1/organization/api_keys", headers=auth).status_code == 404
    buffered, stream, unauthorized, blocked = finished(api, 4)
    assert len(fake.requests) == 2
    # Forwarded flows show the upstream exchange: its URL and, in the Connection tab, its address.
    assert buffered["request"]["path"] == "/v1/chat/completions"
    assert buffered["server_conn"]["address"] == ["127.0.0.1", int(fake.url.rsplit(":", 1)[1])]
    # A refused one shows the request as the client sent it, and no server: nothing was sent anywhere.
    assert blocked["request"]["path"] == "/proxy/openai/v1/organization/api_keys"
    assert blocked["request"]["port"] == proxy.port and not blocked["server_conn"]["address"]

    again = replayed(api, buffered)
    assert again["comment"].startswith("replay · served") and "keys oai-" in again["comment"]
    assert again["response"]["status_code"] == 200 and again["marked"] == "✅"
    assert replayed(api, stream)["comment"].startswith("replay · served")
    assert len(fake.requests) == 4 and all(r.path == "/v1/chat/completions" for r in fake.requests)
    assert replayed(api, unauthorized)["comment"].startswith("replay · unauthorized")  # gated again
    assert replayed(api, blocked)["response"]["status_code"] == 404  # the allowlist again
    # An edited replay is checked as it is now: a changed path is another route, here none.
    api.put(f"/flows/{buffered['id']}", json={"request": {"path": "/v1/files"}})
    assert replayed(api, buffered)["comment"].startswith("replay · blocked path")
    assert len(fake.requests) == 4
    for url in ("/flows", "/flows/dump", "/events"):
        assert CANARY.encode() not in api.get(url).content, url


def test_exports_work_and_hold_no_secret(mitmweb, fake, tmp_path):
    proxy, api = mitmweb
    auth = {"authorization": f"Bearer {PROXY_KEY}", "cookie": f"session={PROXY_KEY}"}
    ask = {"model": "gpt-4o", "messages": [{"role": "user", "content": "#fake:echo_key=1 hi"}]}
    assert httpx.post(proxy.url + CHAT, headers=auth, json=ask, timeout=15).status_code == 200
    (flow,) = finished(api, 1)
    for export in ("curl", "httpie", "raw"):
        text = api.post("/commands/export", json={"arguments": [export, f"@{flow['id']}"]}).json()["value"]
        assert "/v1/chat/completions" in text and CANARY not in text, export
    har = tmp_path / "flows.har"
    assert api.post("/commands/save.har", json={"arguments": ["@all", str(har)]}).status_code == 200
    saved = wait_until(lambda: har.exists() and har.read_text())
    assert json.loads(saved)["log"]["entries"][0]["request"]["url"].endswith("/v1/chat/completions")
    assert CANARY not in saved and CANARY not in api.get("/flows/dump").text


def test_a_refused_option_change_at_run_time_keeps_the_policy(mitmweb, fake):
    proxy, api = mitmweb
    for change, sentence in (
        ({"upstream_timeout": -1}, "UPSTREAM_TIMEOUT must be a positive number"),
        ({"connection_strategy": "eager"}, "connection_strategy must stay 'lazy'"),
        ({"mode": ["socks5"]}, "--mode socks5 is not accepted"),
        ({"gatekeeper": "everyone"}, "GATEKEEPER must be one of"),
    ):
        refused = api.put("/options", json=change)
        assert refused.status_code == 400 and sentence in refused.text, change
    # Refused before mitmproxy's proxyserver acted on it: the listener never changed, not even for a moment.
    assert "SOCKS" not in proxy.log() and "stopped" not in proxy.log()
    options = api.get("/options").json()
    assert options["upstream_timeout"]["value"] == 600 and options["gatekeeper"]["value"] == "proxy_key"
    ask = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(proxy.url + CHAT, json=ask, timeout=15).status_code == 401  # still gated
    answer = httpx.post(proxy.url + CHAT, json=ask, headers={"authorization": f"Bearer {PROXY_KEY}"}, timeout=15)
    assert answer.status_code == 200 and len(fake.requests) == 1
