"""The owner's /admin pages end to end: the real proxy, forms posted by Chromium (Playwright) and by httpx."""

import hmac
import html
import json
import re
import time
from datetime import UTC, datetime

import httpx
import pytest
from playwright.sync_api import expect

from tests.browser import DESKTOP, PHONE, check_layout, chromium, new_page
from tests.conftest import CANARY, OPENAI_KEYS, proxy_env
from tests.harness import wait_until
from tests.test_e2e_users import ADMIN_KEY, CHAT, MESSAGES, Admin, chat, message

XSS = "<img src=x onerror=\"document.title='owned'\">"


@pytest.fixture
def admin_proxy(start_proxy, fake, tmp_path):
    proxy = start_proxy(
        proxy_env(
            fake,
            GATEKEEPER="user_token",
            ADMIN_KEY=ADMIN_KEY,
            DATA_DIR=str(tmp_path / "data"),
            SHOW_TOKEN_COSTS="true",
            TRUSTED_PROXIES="1",
        ),
        args=["--set", "flow_detail=4"],
    )
    return proxy


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


def log_in(page, proxy, key: str = ADMIN_KEY) -> None:
    """Logs in through the form, returning once the proxy answered (with the right key: the users' page is there)."""
    page.goto(f"{proxy.url}/admin")
    page.fill("#admin_key", key)
    with page.expect_response(lambda response: response.request.method == "POST"):
        page.click("text=Log in")
    if key == ADMIN_KEY:
        page.wait_for_url("**/admin/manage/users")


def logged_in_client(proxy) -> tuple[httpx.Client, str]:
    """An httpx client holding a session, and the CSRF token of its forms."""
    client = httpx.Client(base_url=proxy.url)
    form = client.get("/admin/login")
    csrf = re.search(r'name="_csrf" value="([^"]+)"', form.text)[1]
    assert client.post("/admin/login", data={"_csrf": csrf, "admin_key": ADMIN_KEY}).status_code == 303
    users = client.get("/admin/manage/users")
    return client, re.search(r'name="_csrf" value="([^"]+)"', users.text)[1]


def test_the_owner_logs_in_creates_a_user_finds_it_and_disables_it(admin_proxy, browser, fake, tmp_path):
    page = new_page(browser)
    log_in(page, admin_proxy)
    assert page.url.endswith("/admin/manage/users")
    page.fill("#nickname", XSS)
    page.select_option("#type", "normal")
    page.fill("#token_limits", "gpt4o=100000, claude-sonnet=500")
    page.fill("#admin_note", f"note {XSS}")
    page.click("text=Create user")
    token = page.inner_text("#token")
    assert re.fullmatch(r"[A-Za-z0-9_\-]{20,}", token)
    page.click("#copy")
    expect(page.locator("#copied")).not_to_be_empty()  # copied, or selected where there is no clipboard
    assert (
        httpx.post(
            f"{admin_proxy.url}/proxy/openai/v1/chat/completions",
            json=chat(),
            headers={"authorization": f"Bearer {token}"},
        ).status_code
        == 200
    )
    page.click("text=All users")
    page.fill("#q", "onerror")
    page.press("#q", "Enter")
    page.wait_for_url("**q=onerror*")
    rows = page.locator("#users tr")
    expect(rows).to_have_count(2)  # the header and the one user found
    assert XSS in rows.nth(1).inner_text() and "gpt4o: " in rows.nth(1).inner_text()
    page.fill("#q", "nobody-has-this-name")
    page.press("#q", "Enter")
    expect(page.locator("#users tr")).to_have_count(1)
    page.goto(f"{admin_proxy.url}/admin/manage/users")
    page.click(f"text={XSS}")
    expect(page.locator("h1")).to_have_text(XSS)
    assert f"note {XSS}" in page.inner_text("body")
    assert page.input_value("#token_limits") == "claude-sonnet=500, gpt4o=100000"
    page.fill("#reason", "Shared the token on a forum")
    page.click("text=Disable")
    assert "User disabled." in page.inner_text("[role=status]")
    assert "Shared the token on a forum" in page.inner_text("#state")
    assert page.title() != "owned"
    refused = httpx.post(
        f"{admin_proxy.url}/proxy/openai/v1/chat/completions", json=chat(), headers={"authorization": f"Bearer {token}"}
    )
    assert refused.status_code == 403 and "Shared the token on a forum" in refused.text
    own_page = new_page(browser, PHONE)  # the user, on their phone, looks their token up
    own_page.goto(f"{admin_proxy.url}/user")
    own_page.fill("#token", token)
    own_page.press("#token", "Enter")
    expect(own_page.locator("body")).to_contain_text("Shared the token on a forum")
    assert own_page.title() != "owned" and XSS in own_page.inner_text("h1")
    page.click("text=Enable again")
    expect(page.locator("#state")).to_have_text("active")
    page.select_option("#type", "special")
    page.fill("#token_limits", "")
    page.click("text=Save")
    expect(page.locator("[role=status]")).to_have_text("Saved.")
    user = Admin(admin_proxy).client.get("/users").json()["users"][0]
    assert user["type"] == "special" and user["token_limits"] == {} and user["nickname"] == XSS
    assert user["usage"]["gpt4o"]["used"] > 0
    page.click("text=Reset usage")
    expect(page.locator("[role=status]")).to_have_text("Usage reset: a new quota period for this user.")
    assert Admin(admin_proxy).user(user["id"])["usage"]["gpt4o"]["used"] == 0
    assert page.script_errors == [] and page.title() != "owned"


def test_every_page_fits_a_phone_and_a_desktop(admin_proxy, browser, tmp_path):
    token, user = Admin(admin_proxy).create(nickname=XSS, admin_note=XSS, token_limits={"gpt4o": 5000})
    httpx.post(
        f"{admin_proxy.url}/proxy/openai/v1/chat/completions", json=chat(), headers={"authorization": f"Bearer {token}"}
    )
    for name, viewport in (("phone", PHONE), ("desktop", DESKTOP)):
        page = new_page(browser, viewport)
        page.goto(f"{admin_proxy.url}/admin/login")
        check_layout(page, tmp_path / f"login-{name}.png")
        log_in(page, admin_proxy)
        for path in ("users", f"users/{user['id']}", "keys", "usage"):
            page.goto(f"{admin_proxy.url}/admin/manage/{path}")
            assert page.title() != "owned"
            check_layout(page, tmp_path / f"{path.replace('/', '-')}-{name}.png")


def test_failed_logins_lock_the_address_out_of_the_form_and_the_api_alike(admin_proxy):
    client = httpx.Client(base_url=admin_proxy.url)
    for _ in range(5):
        form = client.get("/admin/login")
        csrf = re.search(r'name="_csrf" value="([^"]+)"', form.text)[1]
        wrong = client.post("/admin/login", data={"_csrf": csrf, "admin_key": "guess"})
        assert (
            wrong.status_code == 401
            and "Wrong admin key." in wrong.text
            and "llmproxy_admin" not in wrong.headers.get("set-cookie", "")
        )
    locked = client.post("/admin/login", data={"_csrf": csrf, "admin_key": ADMIN_KEY})
    assert locked.status_code == 429 and 1 <= int(locked.headers["retry-after"]) <= 300
    assert Admin(admin_proxy).client.get("/users").status_code == 429  # the API counts the same failures
    other = httpx.Client(base_url=admin_proxy.url, headers={"x-forwarded-for": "198.51.100.7"})
    assert other.get("/admin/login").status_code == 200  # another address may still try
    assert ADMIN_KEY not in admin_proxy.log() and "guess" not in admin_proxy.log()


def test_a_form_without_its_csrf_token_changes_nothing(admin_proxy):
    client, csrf = logged_in_client(admin_proxy)
    _, user = Admin(admin_proxy).create(nickname="kept")
    for token in ("", "forged", csrf.replace(".", "x.", 1)):
        refused = client.post(f"/admin/manage/users/{user['id']}/disable", data={"_csrf": token, "reason": "no"})
        assert refused.status_code == 403 and "did not come from this site" in refused.text
    another_session, _ = logged_in_client(admin_proxy)  # a token of another session is no token of this one
    assert (
        another_session.post(
            f"/admin/manage/users/{user['id']}/delete", data={"_csrf": csrf, "confirm": "yes"}
        ).status_code
        == 403
    )
    login = httpx.post(f"{admin_proxy.url}/admin/login", data={"admin_key": ADMIN_KEY})
    assert (
        login.status_code == 403
        and "set-cookie" in login.headers
        and "llmproxy_admin" not in login.headers["set-cookie"]
    )
    assert Admin(admin_proxy).user(user["id"])["disabled_at"] is None
    done = client.post(f"/admin/manage/users/{user['id']}/disable", data={"_csrf": csrf, "reason": "yes"})
    assert done.status_code == 303 and Admin(admin_proxy).user(user["id"])["disabled_reason"] == "yes"


def test_without_a_session_every_page_leads_to_the_login(admin_proxy):
    for method, path in (
        ("GET", "/admin/manage/users"),
        ("GET", "/admin/manage/export"),
        ("POST", "/admin/manage/keys/recheck"),
    ):
        response = httpx.request(
            method, f"{admin_proxy.url}{path}", cookies={"llmproxy_admin": "forged.99999999999.00"}
        )
        assert response.status_code == 303 and response.headers["location"] == "/admin/login"


def test_session_cookie_flags_and_logout(admin_proxy):
    # Behind a TLS proxy (TRUSTED_PROXIES=1 and X-Forwarded-Proto: https) the cookies are Secure; httpx talks
    # plain http to the proxy, so it would not send them back: the test does.
    client = httpx.Client(base_url=admin_proxy.url, headers={"x-forwarded-proto": "https"})
    form = client.get("/admin/login")
    assert "; Secure" in form.headers["set-cookie"]
    csrf = re.search(r'name="_csrf" value="([^"]+)"', form.text)[1]
    client.cookies.set("llmproxy_login", client.cookies["llmproxy_login"])  # for any path, Secure or not
    login = client.post("/admin/login", data={"_csrf": csrf, "admin_key": ADMIN_KEY})
    session = login.headers["set-cookie"]
    client.cookies.set("llmproxy_admin", login.cookies["llmproxy_admin"])
    client.headers.pop("x-forwarded-proto")
    assert session.startswith("llmproxy_admin=") and "HttpOnly" in session and "SameSite=Strict" in session
    assert "Secure" in session and "Path=/admin" in session  # TRUSTED_PROXIES says the browser came over TLS
    page = client.get("/admin/manage/users")
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "access-control-allow-credentials" not in page.headers
    csrf = re.search(r'name="_csrf" value="([^"]+)"', page.text)[1]
    out = client.post("/admin/logout", data={"_csrf": csrf})
    assert out.status_code == 303 and "Max-Age=0" in out.headers["set-cookie"]
    kept = httpx.get(
        f"{admin_proxy.url}/admin/manage/users", cookies={"llmproxy_admin": client.cookies["llmproxy_admin"]}
    )
    assert kept.status_code == 303  # a copy of the cookie kept from before the logout is no session
    # The key typed into the form is not in the flow mitmproxy printed (flow_detail=4 prints bodies).
    assert ADMIN_KEY not in admin_proxy.log() and "admin_key: (removed)" in admin_proxy.log()


def test_keys_page_names_keys_by_hash_and_rechecks(admin_proxy, fake):
    client, csrf = logged_in_client(admin_proxy)
    page = client.get("/admin/manage/keys")
    api_keys = Admin(admin_proxy).client.get("/keys").json()["keys"]
    assert len(api_keys) == 3 and all(key["id"] in page.text for key in api_keys)
    assert CANARY not in page.text
    recheck = client.post("/admin/manage/keys/recheck", data={"_csrf": csrf})
    assert recheck.status_code == 303
    assert "being checked again" in client.get(recheck.headers["location"]).text


def test_export_then_import_restores_users_and_bad_imports_say_why(admin_proxy):
    client, csrf = logged_in_client(admin_proxy)
    token, user = Admin(admin_proxy).create(nickname="exported", token_limits={"gpt4o": 7})
    exported = client.get("/admin/manage/export")
    assert exported.headers["content-disposition"] == 'attachment; filename="users.json"' and token not in exported.text
    assert (
        client.post(f"/admin/manage/users/{user['id']}/delete", data={"_csrf": csrf, "confirm": "yes"}).status_code
        == 303
    )
    assert Admin(admin_proxy).client.get(f"/users/{user['id']}").status_code == 404
    files = {"users": ("users.json", exported.content, "application/json")}
    assert client.post("/admin/manage/import", data={"_csrf": csrf}, files=files).status_code == 303
    assert Admin(admin_proxy).user(user["id"])["token_limits"] == {"gpt4o": 7}
    bad = client.post(
        "/admin/manage/import", data={"_csrf": csrf}, files={"users": ("x.json", b"{nope", "application/json")}
    )
    assert bad.status_code == 400 and "not JSON" in bad.text
    wrong = json.dumps({"users": [{"nickname": "no hash"}]}).encode()
    refused = client.post(
        "/admin/manage/import", data={"_csrf": csrf}, files={"users": ("x.json", wrong, "application/json")}
    )
    assert refused.status_code == 400 and "token_hash" in refused.text


def test_bad_form_values_are_shown_back_and_nothing_is_created(admin_proxy):
    client, csrf = logged_in_client(admin_proxy)
    for fields, said in (
        ({"token_limits": "gpt4o=lots"}, "family=tokens"),
        ({"max_ips": "-1"}, "whole number"),
        ({"expires_in_hours": "nan"}, "hours from now"),
        ({"type": "admin"}, "'type' must be one of"),
    ):
        refused = client.post("/admin/manage/users", data={"_csrf": csrf, "nickname": "x", **fields})
        assert refused.status_code == 400 and said in html.unescape(refused.text)
    assert Admin(admin_proxy).client.get("/users").json()["count"] == 0


def test_usage_page_charts_and_tables_the_days_tokens_per_family(admin_proxy):
    token, _ = Admin(admin_proxy).create(nickname="user")
    headers = {"authorization": f"Bearer {token}"}
    for _ in range(2):
        assert httpx.post(f"{admin_proxy.url}{CHAT}", json=chat("hello there"), headers=headers).status_code == 200
    assert httpx.post(f"{admin_proxy.url}{MESSAGES}", json=message("hi"), headers=headers).status_code == 200
    client, _ = logged_in_client(admin_proxy)
    status = wait_until(lambda: (s := httpx.get(f"{admin_proxy.url}/status").json())["proompts"] == 3 and s)
    page = client.get("/admin/manage/usage").text
    today = datetime.now(UTC).date().isoformat()
    totals = dict(
        re.findall(
            r"<tr><th>([^<]+)</th><td data-label=\"Prompts\" class=\"number\">[\d,]+</td>\s*"
            r"<td data-label=\"Tokens\" class=\"number\">([\d,]+)</td>",
            page.split('id="days"')[0],
        )
    )
    expected = {family: figures["tokens"] for family, figures in status["families"].items() if figures["tokens"]}
    assert {family: int(tokens.replace(",", "")) for family, tokens in totals.items()} == expected
    assert len(expected) == 2
    for family, tokens in expected.items():
        assert f"<title>{today} {family}: {tokens:,} tokens</title>" in page  # a bar of the tokens chart


def test_keys_page_says_why_a_key_retired_and_when_each_was_checked(start_proxy, fake, tmp_path):
    fake.set_key_behaviour(OPENAI_KEYS[0], "invalid_key")
    proxy = start_proxy(
        proxy_env(fake, GATEKEEPER="user_token", ADMIN_KEY=ADMIN_KEY, DATA_DIR=str(tmp_path / "d"), CHECK_KEYS="true")
    )
    admin = Admin(proxy)
    wait_until(lambda: "Finished" in admin.client.get("/keys").json()["status"])
    keys = {key["id"]: key for key in admin.client.get("/keys").json()["keys"]}
    (dead,) = [key for key in keys.values() if key["state"] == "revoked"]
    client, _ = logged_in_client(proxy)
    page = html.unescape(client.get("/admin/manage/keys").text)
    row = re.search(rf"<code>{dead['id']}</code>.*?</tr>", page, re.S)[0]
    assert f"revoked: {dead['reason']}" in row and "401" in dead["reason"]
    assert page.count('data-label="Last check">') == len(keys)
    assert 'data-label="Last check">never' not in page  # every key was checked, at a time the page shows
    assert CANARY not in page and OPENAI_KEYS[0] not in page


def test_without_an_admin_key_the_pages_are_off_and_no_cookie_opens_them(start_proxy, fake):
    proxy = start_proxy(proxy_env(fake))
    key = hmac.new(b"", b"llmproxy:admin session", "sha256")  # what a session key derived from "" would be
    key.update(f"forged.{int(time.time()) + 3600}".encode())
    forged = f"forged.{int(time.time()) + 3600}.{key.hexdigest()}"
    for path in ("/admin", "/admin/login", "/admin/manage/users"):
        page = httpx.get(f"{proxy.url}{path}", cookies={"llmproxy_admin": forged})
        assert page.status_code == 404 and "has no ADMIN_KEY" in page.text and "Users" not in page.text
    assert httpx.post(f"{proxy.url}/admin/login", data={"admin_key": ""}).status_code == 404


def test_in_the_browser_a_form_without_its_csrf_token_changes_nothing_and_five_wrong_keys_lock_the_login(
    admin_proxy, browser, tmp_path
):
    page = new_page(browser, PHONE)
    log_in(page, admin_proxy)
    page.fill("#nickname", "made on a phone")
    page.click("text=Create user")
    expect(page.locator("#token")).to_be_visible()
    check_layout(page, tmp_path / "created-phone.png")
    page.click("text=The user")
    expect(page.locator("h1")).to_have_text("made on a phone")
    page.evaluate("document.querySelectorAll('input[name=_csrf]').forEach(field => field.remove())")
    page.fill("#reason", "no token, no change")
    page.click("text=Disable")
    expect(page.locator("h1")).to_have_text("Form refused")
    assert Admin(admin_proxy).client.get("/users").json()["users"][0]["disabled_at"] is None
    page.script_errors.clear()  # the 403 answer itself is logged as a failed resource

    stranger = new_page(browser, PHONE)
    for _ in range(5):
        log_in(stranger, admin_proxy, "a guess")
        expect(stranger.locator("[role=alert]")).to_have_text("Wrong admin key.")
    stranger.goto(f"{admin_proxy.url}/admin")  # no form to try the right key in, for five minutes
    expect(stranger.locator("h1")).to_have_text("Too many failed logins")
    assert stranger.locator("#admin_key").count() == 0
    stranger.script_errors.clear()
    check_layout(stranger, tmp_path / "locked-phone.png")
