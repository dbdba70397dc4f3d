import secrets

import pytest

from tests.fakeupstream import start_in_thread, stop_in_thread
from tests.harness import ProxyProcess

# A marker that is part of every configured key: it must never show up anywhere a client or a log reader looks.
CANARY = secrets.token_hex(8)
OPENAI_KEYS = [f"sk-canary-{CANARY}-openai-one", f"sk-canary-{CANARY}-openai-two"]
# Not shaped like any known key, so only the literal list of configured secrets can catch it.
ANTHROPIC_KEYS = [f"antcanary{CANARY}"]


@pytest.fixture(scope="session")
def fake():
    upstream = start_in_thread()
    yield upstream
    stop_in_thread(upstream)


@pytest.fixture(autouse=True)
def _fresh_fake_records(request):
    if "fake" in request.fixturenames:
        request.getfixturevalue("fake").reset()


def proxy_env(fake, **overrides) -> dict[str, str]:
    return {
        "OPENAI_KEY": ",".join(OPENAI_KEYS),
        "ANTHROPIC_KEY": ",".join(ANTHROPIC_KEYS),
        "OPENAI_UPSTREAM_URL": fake.url,
        "ANTHROPIC_UPSTREAM_URL": fake.url,
        "CHECK_KEYS": "false",  # tests of the key checker turn it on; elsewhere it would add upstream calls
        "MODEL_RATE_LIMIT": "0",  # tests of the rate limit set one; elsewhere 4 a minute would stop the suite
        **overrides,
    }


@pytest.fixture(scope="session")
def proxy(fake):
    """The proxy as deployed, at the most verbose logging the README allows, against the fake upstream."""
    process = ProxyProcess(
        proxy_env(fake, UPSTREAM_IDLE_TIMEOUT="2"),
        args=["--set", "flow_detail=4", "--set", "termlog_verbosity=debug"],
    )
    with process:
        yield process


@pytest.fixture
def start_proxy():
    """Starts extra proxies with their own settings; all are stopped after the test."""
    started = []

    def start(env: dict[str, str], args: list[str] = ()) -> ProxyProcess:
        process = ProxyProcess(env, args=list(args)).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
