"""Tokens are compared as the client sent them: a proxy key, a user token or the admin key with one more character
is another token, even when that character is invisible. Only the spaces and tabs HTTP allows around a header
value (RFC 9110 §5.6.3) are not part of it."""

import itertools
import json

import pytest

from tests.conftest import proxy_env
from tests.harness import ProxyProcess
from tests.test_e2e_routes import raw_request
from tests.test_e2e_users import ADMIN_KEY, Admin

pytestmark = pytest.mark.e2e

PROXY_KEY = "proxy-key-for-identity-tests"
CHAT_LINE = b"POST /proxy/openai/v1/chat/completions HTTP/1.1"
MESSAGES_LINE = b"POST /proxy/anthropic/v1/messages HTTP/1.1"
ADMIN_LINE = b"GET /admin/users HTTP/1.1"
CHAT_BODY = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}'
MESSAGE_BODY = b'{"model": "claude-sonnet-5", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}'

# Whitespace and control characters that are not HTTP's optional whitespace, sent as UTF-8. The first nine are
# what Python's str.strip() removes, which is how a token with one of them around it used to be accepted.
# Vertical tab, form feed and carriage return are missing: mitmproxy's HTTP/1 parser removes them from both ends
# of every header value before any addon sees it.
NOT_OPTIONAL_WHITESPACE = {
    "no-break space": "\u00a0",
    "em space": "\u2003",
    "ideographic space": "\u3000",
    "next line": "\u0085",
    "line separator": "\u2028",
    "paragraph separator": "\u2029",
    "ogham space mark": "\u1680",
    "unit separator": "\x1f",
    "file separator": "\x1c",
    "zero width no-break space": "\ufeff",
    "zero width space": "\u200b",
    "escape": "\x1b",
    "delete": "\x7f",
    "null": "\x00",
}
# Bytes that are not UTF-8 on their own: mitmproxy hands them to the addons as lone surrogates.
NOT_UTF8 = [b"\xa0", b"\x85", b"\xff"]


def header_line(header: str, token: bytes) -> bytes:
    """One token header as the clients send it: OpenAI SDKs as a Bearer credential, Anthropic SDKs as x-api-key."""
    return (b"Authorization: Bearer " if header == "authorization" else b"x-api-key: ") + token + b"\r\n"


def altered(token: str, character: str, where: str) -> bytes:
    """`token` with `character` before or after it, as UTF-8."""
    return (character + token if where == "leading" else token + character).encode()


def api_request(proxy, header: str, token: bytes) -> tuple[int, dict]:
    """A generation request presenting `token`: OpenAI's chat with Authorization, Anthropic's messages with
    x-api-key, so that both APIs' error formats are checked."""
    line, body = (CHAT_LINE, CHAT_BODY) if header == "authorization" else (MESSAGES_LINE, MESSAGE_BODY)
    status, _, content = raw_request(proxy, line, header_line(header, token), body)
    return status, json.loads(content)


def assert_refused(status: int, answer: dict, header: str, code: str) -> None:
    """401 in the format of the API the request was for."""
    assert status == 401, answer
    if header == "authorization":
        assert answer["error"]["code"] == code
    else:
        assert answer["type"] == "error" and answer["error"]["type"] == "authentication_error"


@pytest.fixture(scope="module")
def key_proxy(fake):
    with ProxyProcess(proxy_env(fake, GATEKEEPER="proxy_key", PROXY_KEY=PROXY_KEY)) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def user_proxy(fake, tmp_path_factory):
    """GATEKEEPER=user_token with one user; also serves the admin API and the metrics behind the admin key.
    Failed admin logins are limited per address, so every bad admin request comes from an address of its own."""
    env = proxy_env(
        fake,
        GATEKEEPER="user_token",
        ADMIN_KEY=ADMIN_KEY,
        TRUSTED_PROXIES="1",
        METRICS_NEED_ADMIN_KEY="true",
        DATA_DIR=str(tmp_path_factory.mktemp("identity")),
    )
    with ProxyProcess(env) as proxy:
        token, _ = Admin(proxy).create(nickname="identity")
        yield proxy, token


_addresses = (f"198.51.{n // 250}.{n % 250 + 1}" for n in itertools.count())


def admin_request(proxy, header: str, token: bytes, line: bytes = ADMIN_LINE) -> tuple[int, bytes]:
    forwarded = f"X-Forwarded-For: {next(_addresses)}\r\n".encode()
    status, _, content = raw_request(proxy, line, header_line(header, token) + forwarded, b"")
    return status, content


HEADERS = ["authorization", "x-api-key"]
ALTERATIONS = [(name, where) for name in NOT_OPTIONAL_WHITESPACE for where in ("leading", "trailing")]
OPTIONAL_WHITESPACE = [b" ", b"\t", b" \t ", b"\t\t"]


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("name, where", ALTERATIONS)
def test_proxy_key_with_a_character_more_is_refused(key_proxy, fake, header, name, where):
    status, answer = api_request(key_proxy, header, altered(PROXY_KEY, NOT_OPTIONAL_WHITESPACE[name], where))
    assert_refused(status, answer, header, "invalid_proxy_key")
    assert fake.requests == []


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("name, where", ALTERATIONS)
def test_user_token_with_a_character_more_is_refused(user_proxy, fake, header, name, where):
    proxy, token = user_proxy
    status, answer = api_request(proxy, header, altered(token, NOT_OPTIONAL_WHITESPACE[name], where))
    assert_refused(status, answer, header, "invalid_user_token")
    assert fake.requests == []


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("name, where", ALTERATIONS)
def test_admin_key_with_a_character_more_is_refused(user_proxy, header, name, where):
    proxy, _ = user_proxy
    status, content = admin_request(proxy, header, altered(ADMIN_KEY, NOT_OPTIONAL_WHITESPACE[name], where))
    assert status == 401 and json.loads(content)["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("spaces", [b"", *OPTIONAL_WHITESPACE])
def test_the_exact_proxy_key_works_with_optional_whitespace_around_it(key_proxy, fake, header, spaces):
    status, answer = api_request(key_proxy, header, spaces + PROXY_KEY.encode() + spaces)
    assert status == 200, answer
    assert len(fake.requests) == 1 and PROXY_KEY not in json.dumps(fake.requests[0].headers)


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("spaces", [b"", *OPTIONAL_WHITESPACE])
def test_the_exact_user_token_works_with_optional_whitespace_around_it(user_proxy, fake, header, spaces):
    proxy, token = user_proxy
    status, answer = api_request(proxy, header, spaces + token.encode() + spaces)
    assert status == 200, answer
    assert len(fake.requests) == 1 and token not in json.dumps(fake.requests[0].headers)


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("spaces", [b"", *OPTIONAL_WHITESPACE])
def test_the_exact_admin_key_works_with_optional_whitespace_around_it(user_proxy, header, spaces):
    proxy, _ = user_proxy
    status, content = admin_request(proxy, header, spaces + ADMIN_KEY.encode() + spaces)
    assert status == 200 and json.loads(content)["count"] == 1


def test_a_bearer_credential_may_follow_several_spaces(key_proxy, fake):
    # RFC 9110 §11.4: `credentials = auth-scheme [ 1*SP token68 ]`; the scheme's case does not matter either.
    status, _, _ = raw_request(key_proxy, CHAT_LINE, f"Authorization: bearer   {PROXY_KEY}\r\n".encode(), CHAT_BODY)
    assert status == 200 and len(fake.requests) == 1


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("byte", NOT_UTF8)
@pytest.mark.parametrize("token", ["", PROXY_KEY])
def test_a_byte_that_is_not_utf8_gets_401_not_500_with_a_proxy_key(key_proxy, fake, header, byte, token):
    status, answer = api_request(key_proxy, header, token.encode() + byte)
    assert_refused(status, answer, header, "invalid_proxy_key")
    assert fake.requests == []


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("byte", NOT_UTF8)
@pytest.mark.parametrize("with_token", [False, True])
def test_a_byte_that_is_not_utf8_gets_401_not_500_with_user_tokens(user_proxy, fake, header, byte, with_token):
    proxy, token = user_proxy
    status, answer = api_request(proxy, header, (token.encode() if with_token else b"") + byte)
    assert_refused(status, answer, header, "invalid_user_token")
    assert fake.requests == []


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("byte", NOT_UTF8)
def test_a_byte_that_is_not_utf8_gets_401_not_500_from_the_admin_api_and_the_usage_page(user_proxy, header, byte):
    proxy, token = user_proxy
    status, content = admin_request(proxy, header, ADMIN_KEY.encode() + byte)
    assert status == 401 and json.loads(content)["error"]["code"] == "unauthorized"
    status, content = admin_request(proxy, header, token.encode() + byte, b"GET /user/usage HTTP/1.1")
    assert status == 401 and json.loads(content)["error"]["code"] == "invalid_user_token"


def test_the_usage_page_and_the_metrics_want_the_exact_token_too(user_proxy):
    proxy, token = user_proxy
    usage_line, metrics_line = b"GET /user/usage HTTP/1.1", b"GET /metrics HTTP/1.1"
    assert admin_request(proxy, "authorization", f"{token}\u00a0".encode(), usage_line)[0] == 401
    assert admin_request(proxy, "authorization", f" {token}\t".encode(), usage_line)[0] == 200
    assert admin_request(proxy, "x-api-key", f"{ADMIN_KEY}\u3000".encode(), metrics_line)[0] == 401
    assert admin_request(proxy, "x-api-key", f"\t{ADMIN_KEY} ".encode(), metrics_line)[0] == 200
