"""`./run.sh local`: apps with a hard-coded API URL, through the proxy as HTTPS_PROXY with its CA trusted."""

import httpx
import openai
import pytest

from tests.conftest import OPENAI_KEYS, proxy_env
from tests.harness import ProxyProcess, free_port, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
def local_proxy(fake):
    def start(**settings) -> ProxyProcess:
        return ProxyProcess(proxy_env(fake, **settings), ui="local").start()

    started = []
    yield lambda **settings: started.append(start(**settings)) or started[-1]
    for process in started:
        process.stop()


def test_the_openai_sdk_with_its_own_url_gets_the_pool_key(local_proxy, fake, monkeypatch):
    proxy = local_proxy()
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(proxy.workdir / "confdir" / "mitmproxy-ca-cert.pem"))
    client = openai.OpenAI(api_key="sk-placeholder-of-the-app", max_retries=0)  # https://api.openai.com/v1
    assert client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]).choices
    stream = client.chat.completions.create(
        model="gpt-4o", stream=True, messages=[{"role": "user", "content": "#fake:events=3"}]
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert [r.path for r in fake.requests] == ["/v1/chat/completions"] * 2
    assert all(r.key in OPENAI_KEYS for r in fake.requests)
    assert "sk-placeholder-of-the-app" not in str([r.headers for r in fake.requests])
    with pytest.raises(openai.NotFoundError):
        client.files.list()  # administrative paths stay closed in this mode too


def test_other_hosts_pass_untouched_or_are_blocked(local_proxy, fake):
    passing = local_proxy()
    with httpx.Client(proxy=passing.url) as client:
        response = client.get(f"{fake.url}/v1/models", headers={"authorization": "Bearer sk-other-app"})
    assert response.status_code == 200 and fake.requests[-1].key == "sk-other-app"
    blocking = local_proxy(LOCAL_OTHER_HOSTS="block")
    with httpx.Client(proxy=blocking.url) as client:
        assert client.get(f"{fake.url}/v1/models").status_code == 403


def test_a_replay_in_mitmweb_goes_through_the_policy_as_the_app_sent_it(fake, monkeypatch):
    web_port = free_port()
    args = ["--set", f"web_port={web_port}", "--set", "web_open_browser=false"]
    with ProxyProcess(proxy_env(fake), args=args, ui="local web") as proxy:
        token = proxy.wait_for_log(r"\?token=([0-9a-f]+)").group(1)
        api = httpx.Client(base_url=f"http://127.0.0.1:{web_port}", headers={"authorization": f"Bearer {token}"})
        api.cookies.set("_mitmproxy_xsrf", "test-xsrf")
        api.headers["x-xsrftoken"] = "test-xsrf"
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("SSL_CERT_FILE", str(proxy.workdir / "confdir" / "mitmproxy-ca-cert.pem"))
        client = openai.OpenAI(api_key="sk-placeholder-of-the-app", max_retries=0)
        assert client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]).choices
        flow = wait_until(lambda: next((f for f in api.get("/flows").json() if f["comment"]), None))
        assert flow["comment"].startswith("served")
        assert api.post(f"/flows/{flow['id']}/replay").status_code == 200
        again = wait_until(
            lambda: next((f for f in api.get("/flows").json() if f["comment"].startswith("replay")), None)
        )
        assert again["comment"].startswith("replay · served") and again["response"]["status_code"] == 200
    assert len(fake.requests) == 2 and all(r.key in OPENAI_KEYS for r in fake.requests)
    assert "sk-placeholder-of-the-app" not in str([r.headers for r in fake.requests])
