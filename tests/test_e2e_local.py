"""`./run.sh local`: apps with a hard-coded API URL, through the proxy as HTTPS_PROXY with its CA trusted."""

import httpx
import openai
import pytest

from tests.conftest import OPENAI_KEYS, proxy_env
from tests.harness import ProxyProcess

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
