"""The users' pages under /user, end to end: own usage by token in a real browser, and temporary tokens by proof of
work, solved by the page's own script."""

import hashlib
import itertools
import time

import httpx
import pytest
from playwright.sync_api import expect

from llmproxy.identity import identity_digest
from llmproxy.web.proofofwork import digest, leading_zero_bits
from llmproxy.web.signing import Signer
from tests.browser import DESKTOP, PHONE, check_layout, chromium, new_page
from tests.conftest import proxy_env
from tests.harness import ProxyProcess
from tests.test_e2e_users import ADMIN_KEY, CHAT, Admin, chat
from tests.test_startup import said

pytestmark = pytest.mark.e2e

BITS = 10  # a challenge the tests solve in a few milliseconds


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.fixture
def user_pages(start_proxy, fake, tmp_path):
    """A proxy with user tokens and the proof of work on; the log at flow_detail=4 shows every body it keeps."""

    def start(**settings) -> tuple[ProxyProcess, Admin]:
        env = proxy_env(
            fake,
            GATEKEEPER="user_token",
            ADMIN_KEY=ADMIN_KEY,
            DATA_DIR=str(tmp_path / "data"),
            CAPTCHA_MODE="proof_of_work",
            POW_DIFFICULTY_LEVEL=str(BITS),
            **settings,
        )
        proxy = start_proxy(env, ["--set", "flow_detail=4"])
        return proxy, Admin(proxy)

    return start


def look_up(page, proxy: ProxyProcess, token: str) -> None:
    page.goto(f"{proxy.url}/user")
    page.fill("#token", token)
    with page.expect_navigation():
        page.click("text=Show my usage")


def solve(challenge: str, bits: int) -> str:
    return next(str(n) for n in itertools.count() if leading_zero_bits(digest(challenge, str(n))) >= bits)


def lookup_from(proxy: ProxyProcess, address: str, token: str) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=address)) as client:
        return client.post(f"{proxy.url}/user/lookup", data={"token": token})


def solved_challenge(proxy: ProxyProcess, address: str = "127.0.0.1") -> dict:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=address)) as client:
        issued = client.post(f"{proxy.url}/user/captcha/challenge")
    assert issued.status_code == 200, issued.text
    challenge = issued.json()["challenge"]
    return {"challenge": challenge, "nonce": solve(challenge, issued.json()["difficulty"])}


def verify_from(proxy: ProxyProcess, address: str, solution: dict) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=address)) as client:
        return client.post(f"{proxy.url}/user/captcha/verify", json=solution)


def test_lookup_shows_the_users_own_usage_and_nothing_of_anothers(user_pages, browser, tmp_path):
    proxy, admin = user_pages(
        TOKEN_QUOTAS="gpt4o=100000", SHOW_TOKEN_COSTS="true", COST_QUOTAS="total=5", QUOTA_REFRESH_PERIOD="daily"
    )
    token, _ = admin.create(nickname="Alice")
    other_token, other = admin.create(nickname="Bob the other", admin_note="Bob's secret note")
    for used in (token, token, other_token):
        assert httpx.post(f"{proxy.url}{CHAT}", json=chat(), headers={"authorization": f"Bearer {used}"}).is_success
    own = httpx.get(f"{proxy.url}/user/usage", headers={"authorization": f"Bearer {token}"}).json()
    used = own["usage"]["gpt4o"]["used"]
    assert used > 0

    for name, viewport in (("phone", PHONE), ("desktop", DESKTOP)):
        page = new_page(browser, viewport)
        page.goto(f"{proxy.url}/user")
        assert page.locator("#token").get_attribute("type") == "password"
        assert page.locator("a[href='/user/captcha']").count() > 0  # the proof of work is on: the form links to it
        check_layout(page, tmp_path / f"user-form-{name}.png")
        look_up(page, proxy, token)
        assert page.url == f"{proxy.url}/user/lookup"  # posted: the token is in no address
        text = page.locator("body").inner_text()
        assert page.locator("h1").inner_text() == "Alice" and "Active" in text
        row = page.locator("table.cards tr", has_text="gpt4o").inner_text()
        assert f"{used:,}" in row and f"{100000 - used:,}" in row and "100,000" in row
        assert "Quotas start afresh" in text and "$5.00" in text  # the refresh and the cost quota
        assert page.locator("tr", has_text="Prompts").locator("td").inner_text() == "2"
        assert "Bob" not in text and other["id"] not in page.content()
        check_layout(page, tmp_path / f"user-usage-{name}.png")
    # The form's token left the flow before the log printed it: the log has it once, from the admin API's answer.
    assert proxy.log().count(token) == 1 and "(removed)" in proxy.log()


def test_a_disabled_or_expired_users_page_says_so(user_pages, browser):
    proxy, admin = user_pages()
    token, user = admin.create(nickname="Shared")
    assert admin.post(f"/users/{user['id']}/disable", json={"reason": "Shared it on a forum."}).is_success
    temporary, _ = admin.create(type="temporary", expires_at=time.time() - 60)
    page = new_page(browser)
    look_up(page, proxy, token)
    assert "Disabled: Shared it on a forum." in page.locator("body").inner_text()
    look_up(page, proxy, temporary)
    state = page.locator("tr", has_text="State").inner_text()
    assert "Expired" in state and "Active" not in state
    assert page.locator("tr", has_text="Expired").count() == 2  # the state and when it expired


def test_a_nickname_with_markup_is_shown_as_text(user_pages, browser):
    proxy, admin = user_pages()
    nickname = "<img src=x onerror=alert(1)>"
    token, _ = admin.create(nickname=nickname)
    page = new_page(browser)
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    look_up(page, proxy, token)
    assert page.locator("h1").inner_text() == nickname
    assert page.locator("img").count() == 0 and dialogs == [] and page.script_errors == []


def test_wrong_tokens_get_401_and_are_limited_per_address(user_pages):
    proxy, admin = user_pages()
    token, _ = admin.create(nickname="Right")
    assert all(lookup_from(proxy, "127.0.0.2", token).status_code == 200 for _ in range(25))  # right ones cost nothing
    wrong = [lookup_from(proxy, "127.0.0.2", f"wrong-{n}") for n in range(21)]
    assert [r.status_code for r in wrong] == [401] * 20 + [429]
    assert "No user has that token" in wrong[0].text and '<input type="password"' in wrong[0].text
    assert 1 <= int(wrong[-1].headers["retry-after"]) <= 300 and "Too many wrong tokens" in wrong[-1].text
    assert lookup_from(proxy, "127.0.0.2", token).status_code == 429  # even the right one, until the window moves
    assert lookup_from(proxy, "127.0.0.3", "wrong").status_code == 401  # another address has its own window
    assert lookup_from(proxy, "127.0.0.3", token).status_code == 200
    assert lookup_from(proxy, "127.0.0.3", "").status_code == 400
    assert httpx.get(f"{proxy.url}/user/lookup").status_code == 303  # a lookup is a post; the form is at /user
    cross_site = httpx.post(f"{proxy.url}/user/lookup", data={"token": token}, headers={"sec-fetch-site": "cross-site"})
    assert cross_site.status_code == 403 and "Right" not in cross_site.text


def test_without_user_tokens_the_page_says_so(start_proxy, fake):
    proxy = start_proxy(proxy_env(fake))
    page = httpx.get(f"{proxy.url}/user")
    assert page.status_code == 200 and "This proxy does not use user tokens" in page.text
    assert "/user/captcha" not in page.text and 'type="password"' not in page.text
    assert 'href="/user' not in httpx.get(f"{proxy.url}/").text  # the status page offers no user pages
    assert httpx.post(f"{proxy.url}/user/lookup", data={"token": "x"}).status_code == 404
    assert httpx.get(f"{proxy.url}/user/captcha").status_code == 404
    refused = httpx.post(f"{proxy.url}/user/captcha/challenge")
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"


def test_the_pages_solver_agrees_with_hashlib(user_pages, browser):
    proxy, _ = user_pages()
    page = new_page(browser)
    page.goto(f"{proxy.url}/user/captcha")
    # Prefixes around the 55/64-byte boundaries, where the nonce's last block becomes two and whole blocks begin.
    for length in (0, 1, 45, 52, 53, 54, 55, 56, 63, 64, 65, 100, 117, 118, 119, 127, 128, 129, 300):
        prefix = ("abcdefghij" * 31)[:length]
        found = page.evaluate(f"searcher({prefix!r}, 12)(0, 1000000)")
        zeros = [leading_zero_bits(hashlib.sha256(f"{prefix}{n}".encode()).digest()) for n in range(found + 1)]
        assert zeros[-1] >= 12 and max(zeros[:-1], default=0) < 12, length


def test_proof_of_work_in_the_browser_gives_a_working_token(user_pages, browser, fake, tmp_path):
    proxy, admin = user_pages()
    for name, viewport in (("phone", PHONE), ("desktop", DESKTOP)):
        page = new_page(browser, viewport)
        page.goto(f"{proxy.url}/user/captcha")
        check_layout(page, tmp_path / f"user-captcha-{name}.png")
    page = new_page(browser, PHONE)
    page.goto(f"{proxy.url}/")  # a visitor finds the page from the status page
    page.click("text=Get a temporary token")
    with page.expect_request(lambda request: request.url.endswith("/user/captcha/verify")) as verify:
        page.click("#start")
    page.wait_for_selector("#result:not([hidden])")
    token = page.locator("#token").inner_text()
    check_layout(page, tmp_path / "user-captcha-solved-phone.png")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=proxy.url)
    page.click("#copy")
    expect(page.locator("#copied")).to_have_text("Copied.")
    assert page.evaluate("navigator.clipboard.readText()") == token
    page.evaluate("Object.defineProperty(navigator, 'clipboard', {value: undefined})")  # as on plain http
    page.click("#copy")
    expect(page.locator("#copied")).to_contain_text("Ctrl+C")
    assert page.evaluate("getSelection().toString()") == token

    answer = httpx.post(f"{proxy.url}{CHAT}", json=chat(), headers={"authorization": f"Bearer {token}"})
    assert answer.status_code == 200 and answer.json()["choices"] and len(fake.requests) == 1
    (user,) = admin.get("/users").json()["users"]
    assert user["type"] == "temporary" and user["max_ips"] == 2 and user["prompt_count"] == 1
    assert user["expires_at"] == pytest.approx(time.time() + 24 * 3600, abs=60)
    assert user["admin_note"] == f"proof of work from {identity_digest('127.0.0.1')}"

    replayed = httpx.post(f"{proxy.url}/user/captcha/verify", json=verify.value.post_data_json)
    assert replayed.status_code == 400 and replayed.json()["error"]["code"] == "challenge_used"
    assert len(admin.get("/users").json()["users"]) == 1
    look_up(page, proxy, token)
    assert "temporary" in page.locator("body").inner_text() and page.locator("tr", has_text="Expires").count() == 1


def test_expired_forged_and_unsolved_challenges_are_refused(user_pages):
    proxy, admin = user_pages()
    genuine = Signer(ADMIN_KEY, "pow")

    def refusal(challenge: str, nonce: str | None = None) -> str:
        solution = {"challenge": challenge, "nonce": solve(challenge, BITS) if nonce is None else nonce}
        answer = httpx.post(f"{proxy.url}/user/captcha/verify", json=solution)
        assert answer.status_code == 400, answer.text
        return answer.json()["error"]["code"]

    assert refusal(genuine.sign(f"expiredid:{BITS}", -5)) == "challenge_expired"
    assert refusal(Signer("another-admin-key", "pow").sign(f"forgedid:{BITS}", 600)) == "invalid_challenge"
    assert refusal(Signer(ADMIN_KEY, "admin session").sign(f"otherid:{BITS}", 600)) == "invalid_challenge"
    issued = solved_challenge(proxy)["challenge"]
    payload, _, signature = issued.partition(".")
    easier = f"{payload.rpartition(':')[0]}:1.{signature}"  # the difficulty is signed: it cannot be lowered
    assert refusal(easier) == "invalid_challenge"
    too_few = next(str(n) for n in itertools.count() if 0 < leading_zero_bits(digest(issued, str(n))) < BITS)
    assert refusal(issued, too_few) == "challenge_unsolved"
    assert refusal(issued, "not a number!") == "challenge_unsolved"
    for body in (b"{}", b"not json", b'{"challenge": 5, "nonce": "1"}'):
        answer = httpx.post(f"{proxy.url}/user/captcha/verify", content=body)
        assert answer.status_code == 400 and answer.json()["error"]["message"]
    assert admin.get("/users").json()["users"] == []
    assert verify_from(proxy, "127.0.0.1", {"challenge": issued, "nonce": solve(issued, BITS)}).status_code == 200


def test_the_limits_per_address(user_pages):
    proxy, admin = user_pages(POW_MAX_TOKENS_PER_IP="2", POW_CHALLENGES_PER_HOUR="6")
    first, second, third = (solved_challenge(proxy, "127.0.0.4") for _ in range(3))
    assert verify_from(proxy, "127.0.0.4", {**first, "nonce": "x"}).status_code == 400  # refused: costs no token
    assert verify_from(proxy, "127.0.0.4", first).status_code == 200
    assert verify_from(proxy, "127.0.0.4", first).status_code == 400  # replayed: costs no token either
    assert verify_from(proxy, "127.0.0.4", second).status_code == 200
    limited = verify_from(proxy, "127.0.0.4", third)
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
    assert 24 * 3600 - 60 <= int(limited.headers["retry-after"]) <= 24 * 3600
    # Asking for a challenge is pointless now, so it is refused before any work.
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.4")) as client:
        assert client.post(f"{proxy.url}/user/captcha/challenge").status_code == 429
    assert verify_from(proxy, "127.0.0.5", third).status_code == 200  # another address may redeem it
    assert len(admin.get("/users").json()["users"]) == 3

    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.6")) as client:
        asked = [client.post(f"{proxy.url}/user/captcha/challenge") for _ in range(7)]
    assert [answer.status_code for answer in asked] == [200] * 6 + [429]
    assert 3500 <= int(asked[-1].headers["retry-after"]) <= 3600
    assert httpx.get(f"{proxy.url}/user/captcha/verify").status_code == 405


@pytest.mark.parametrize(
    "env, sentence",
    [
        ({"CAPTCHA_MODE": "proof_of_work"}, "CAPTCHA_MODE=proof_of_work needs GATEKEEPER=user_token"),
        ({"CAPTCHA_MODE": "hcaptcha"}, "CAPTCHA_MODE must be one of none, proof_of_work."),
        (
            {"GATEKEEPER": "user_token", "ADMIN_KEY": "k", "POW_DIFFICULTY_LEVEL": "insane"},
            "POW_DIFFICULTY_LEVEL must be low, medium, high, extreme or a number of leading zero bits from 8 to 32,"
            " not 'insane'.",
        ),
        ({"POW_DIFFICULTY_LEVEL": "40"}, "POW_DIFFICULTY_LEVEL must be low, medium, high, extreme"),
        ({"POW_CHALLENGE_TIMEOUT": "0"}, "POW_CHALLENGE_TIMEOUT must be from 1 to 1440 minutes."),
    ],
)
def test_bad_proof_of_work_settings_stop_start_up_with_one_sentence(env, sentence):
    process = ProxyProcess(env)
    assert process.run_to_exit() != 0
    output = process.log()
    assert sentence in output and "Traceback" not in output
    assert len(said(output)) == 1, output


def test_temporary_users_are_deleted_two_days_after_they_expired(user_pages):
    proxy, admin = user_pages()
    now = time.time()
    _, long_gone = admin.create(type="temporary", expires_at=now - 49 * 3600)
    _, just_expired = admin.create(type="temporary", expires_at=now - 3600)
    _, normal = admin.create(type="normal", expires_at=now - 49 * 3600)  # only temporary users are deleted
    proxy.stop()
    proxy, admin = user_pages()  # the same DATA_DIR: the purge runs at start, then every hour
    proxy.wait_for_log(rf"temporary user {long_gone['id']} deleted, 48 hours after it expired")
    assert admin.client.get(f"/users/{long_gone['id']}").status_code == 404
    assert {user["id"] for user in admin.get("/users").json()["users"]} == {just_expired["id"], normal["id"]}
