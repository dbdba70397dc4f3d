"""Property-based tests where bytes become meaning: request bodies, token headers and upstream answers.

The invariants: what reaches the fake upstream is exactly what the proxy checked, or nothing; no input makes the
proxy answer 500; no upstream answer turns a success into a failure. Examples are derandomised (the same every
run, so the suite stays deterministic) and bounded in number, so this file runs in about half a minute.
"""

import json

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llmproxy.api.body import MAX_NESTING
from tests.conftest import proxy_env
from tests.harness import ProxyProcess, wait_until
from tests.test_e2e_routes import raw_request
from tests.test_e2e_upstream_figures import ENDPOINTS
from tests.test_e2e_users import ADMIN_KEY, Admin

pytestmark = pytest.mark.e2e

CHAT = "/proxy/openai/v1/chat/completions"
MESSAGES = "/proxy/anthropic/v1/messages"

# One shared proxy per test function; the fake is reset inside each example, since fixtures run once per test.
EXAMPLES = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

INT64 = (-(2**63), 2**63 - 1)
# Plain JSON every parser reads alike: 64-bit integers, finite doubles, text without lone surrogates.
plain_json = st.recursive(
    st.none() | st.booleans() | st.integers(*INT64) | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
# Raw JSON fragments two parsers could read differently, each with the words of the proxy's refusal.
AMBIGUOUS = [
    (b'"\\ud800"', "surrogate"),
    (b'"a\\udc00"', "surrogate"),
    (b'"\\ude00\\ud83d"', "surrogate"),
    (b"NaN", "NaN"),
    (b"Infinity", "Infinity"),
    (b"-Infinity", "Infinity"),
    (b"1e400", "range"),
    (b"-2e308", "range"),
    (b"9223372036854775808", "range"),
    (b"-9223372036854775809", "range"),
    (b"1" * 4301, "range"),
    (b'{"a": 1, "a": 2}', "twice"),
]
# Raw fragments every parser reads alike, which a naive check might refuse.
UNAMBIGUOUS = [b'"\\ud83d\\ude00"', b'"\\u0000"', b"-0", b"1E5", b"1e-400", b"9223372036854775807", b'"[{"']
# Encodings Python's json would guess; only UTF-8 without a byte-order mark is what the upstream reads.
OTHER_ENCODINGS = ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]


@st.composite
def bodies(draw) -> tuple[bytes, str | None]:
    """A chat body holding generated JSON and maybe one raw fragment; with the refusal's words, or None."""
    value = json.dumps(draw(plain_json), ensure_ascii=draw(st.booleans())).encode()
    kind = draw(st.sampled_from(["plain", "ambiguous", "unambiguous", "deep"]))
    refusal = None
    if kind == "ambiguous":
        probe, refusal = draw(st.sampled_from(AMBIGUOUS))
    elif kind == "unambiguous":
        probe = draw(st.sampled_from(UNAMBIGUOUS))
    elif kind == "deep":
        levels = draw(st.integers(1, MAX_NESTING + 8))
        probe = b"[" * levels + b"]" * levels
        # The body and `metadata` are the first two levels.
        refusal = f"deeper than {MAX_NESTING}" if levels + 2 > MAX_NESTING else None
    else:
        probe = b"null"
    raw = (
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "metadata": {"value": %s, '
        b'"probe": %s}}' % (value, probe)
    )
    if encoding := draw(st.sampled_from([None] * 4 + OTHER_ENCODINGS)):
        raw = raw.decode().encode(encoding)
        refusal = "byte-order mark" if encoding == "utf-8-sig" else "UTF-8"
    return raw, refusal


@EXAMPLES
@given(body=bodies())
def test_a_body_reaches_the_upstream_byte_for_byte_or_not_at_all(proxy, fake, body):
    raw, refusal = body
    fake.reset()
    response = httpx.post(f"{proxy.url}{CHAT}", content=raw, headers={"content-type": "application/json"})
    if refusal is None:
        assert response.status_code == 200, response.text
        assert [request.body for request in fake.requests] == [raw]
    else:
        assert response.status_code == 400 and refusal in response.json()["error"]["message"]
        assert fake.requests == []


@EXAMPLES
@given(value=plain_json, field=st.sampled_from(["max_tokens", "stream", "n", "model", "messages", "temperature"]))
@example(value=None, field="n")  # once a 500; the generated examples reach it only in a whole-suite run
def test_any_value_in_a_field_the_policy_reads_is_served_or_refused_never_a_500(proxy, fake, value, field):
    fake.reset()
    body = {"model": "claude-sonnet-5", "max_tokens": 50, "messages": [{"role": "user", "content": "x"}]}
    body[field] = value
    response = httpx.post(f"{proxy.url}{MESSAGES}", json=body)
    assert response.status_code < 500, response.text
    if "x-proxy-error" in response.headers:  # the proxy's own refusal: nothing went upstream
        assert response.json()["type"] == "error" and fake.requests == []
    else:  # the upstream's answer, whatever it was, to exactly what the proxy checked
        (recorded,) = fake.requests
        assert json.loads(recorded.body) == body


PROXY_KEY = "proxy-key-for-property-tests"
BODIES = {
    b"/proxy/openai/v1/chat/completions": b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}',
    b"/proxy/anthropic/v1/messages": b'{"model": "claude-sonnet-5", "max_tokens": 5, '
    b'"messages": [{"role": "user", "content": "x"}]}',
}


@pytest.fixture(scope="module")
def keyed_proxy(fake):
    with ProxyProcess(proxy_env(fake, GATEKEEPER="proxy_key", PROXY_KEY=PROXY_KEY)) as process:
        yield process


# Any byte but the line ends that frame a header: spaces, tabs, controls, and bytes that are not UTF-8.
header_bytes = st.binary(max_size=3).filter(lambda value: b"\r" not in value and b"\n" not in value)


@EXAMPLES
@given(
    before=header_bytes,
    after=header_bytes,
    inside=st.one_of(st.just(b""), header_bytes),
    header=st.sampled_from([b"authorization: Bearer ", b"x-api-key: "]),
    path=st.sampled_from(list(BODIES)),
)
def test_only_the_exact_token_opens_the_proxy_and_no_header_value_makes_a_500(
    keyed_proxy, fake, before, after, inside, header, path
):
    token = PROXY_KEY.encode()
    presented = before + token[:5] + inside + token[5:] + after
    fake.reset()
    status, _, content = raw_request(
        keyed_proxy, b"POST %s HTTP/1.1" % path, header + presented + b"\r\n", BODIES[path]
    )
    # HTTP's parser takes ASCII whitespace off both ends of a value (mitmproxy: space, tab, VT, FF, CR; the proxy
    # then spaces and tabs again): what remains must be the token exactly.
    if presented.strip() == token:
        assert status == 200, content
        assert len(fake.requests) == 1 and PROXY_KEY not in fake.requests[0].body.decode()
    else:
        assert status in (400, 401), content  # 400: a value mitmproxy's header checks refuse outright
        assert fake.requests == []


@pytest.fixture(scope="module")
def user_proxy(fake, tmp_path_factory):
    """Per-user tokens, so that what odd answers cost shows in a user's figures; a short queue timeout, so that a
    pool an odd header took out of service fails fast instead of waiting minutes."""
    env = proxy_env(
        fake,
        GATEKEEPER="user_token",
        ADMIN_KEY=ADMIN_KEY,
        QUEUE_TIMEOUT="5",
        DATA_DIR=str(tmp_path_factory.mktemp("data")),
    )
    with ProxyProcess(env) as process:
        yield process, Admin(process)


# Anything JSON can carry, NaN and infinities included, and integers of any size.
any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
USAGE_FIELDS = sorted(
    {name.split(".")[0] for endpoint in ENDPOINTS.values() for name in endpoint.figures}
    | {"total_tokens", "server_tool_use"}
)
LIMIT_HEADERS = [
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-reset-tokens",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-reset",
]
usage_overrides = any_json | st.dictionaries(st.sampled_from(USAGE_FIELDS), any_json, min_size=1)
header_values = (
    st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(
        ["9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "1e30", "-5", "NaN", "120ms", "7m12s", "Tue, 31 Dec 2999"]
    )
)


@EXAMPLES
@given(
    endpoint=st.sampled_from(list(ENDPOINTS.values())),
    stream=st.booleans(),
    usage=usage_overrides,
    headers=st.dictionaries(st.sampled_from(LIMIT_HEADERS), header_values, max_size=3),
)
def test_no_upstream_figure_turns_a_served_answer_into_a_failure(user_proxy, endpoint, stream, usage, headers):
    proxy, admin = user_proxy
    token, user = admin.create()
    prompt = f"hi #fake:usage={json.dumps(usage, separators=(',', ':'))} #fake:headers={json.dumps(headers)}"
    response = httpx.post(
        f"{proxy.url}{endpoint.path}",
        json=endpoint.body(prompt, stream),
        timeout=30,
        headers={"authorization": f"Bearer {token}"},
    )
    assert response.status_code == 200, response.text
    assert ("Hello" if stream else "Hello from the fake upstream.") in response.text
    if stream:
        assert endpoint.ends in response.text.strip().splitlines()[-1]
    # Settled within sane bounds: odd figures never give quota back, nor run a user's figures off every scale.
    figures = wait_until(lambda: (found := admin.user(user["id"])["usage"][endpoint.family])["reserved"] == 0 and found)
    assert all(value >= 0 for value in figures.values()) and 0 < figures["used"] <= 10**6
    # The pool keeps serving: whatever the headers said, no key rests beyond the queue's patience.
    honest = endpoint.body("hi", False)
    assert (
        httpx.post(
            f"{proxy.url}{endpoint.path}", json=honest, timeout=30, headers={"authorization": f"Bearer {token}"}
        ).status_code
        == 200
    )
