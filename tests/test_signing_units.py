"""Signed values of the web pages (llmproxy/web/signing.py): what verifies and what does not."""

import hmac

import pytest

from llmproxy.web.signing import Signer

NOW = 1_800_000_000


def test_a_value_verifies_for_its_purpose_until_it_expires():
    sessions = Signer("admin-key", "session")
    signed = sessions.sign("abc_-:~9", 60, now=NOW)
    assert sessions.verify(signed, now=NOW + 60) == "abc_-:~9"
    assert sessions.verify(signed, now=NOW + 61) is None
    assert Signer("admin-key", "csrf").verify(signed, now=NOW) is None  # another purpose
    assert Signer("other-key", "session").verify(signed, now=NOW) is None  # another secret


@pytest.mark.parametrize("tamper", [lambda v: "x" + v, lambda v: v[:-1] + "0", lambda v: v.replace(".", "9.", 1)])
def test_a_changed_value_does_not_verify(tamper):
    sessions = Signer("admin-key", "session")
    assert sessions.verify(tamper(sessions.sign("payload", 60, now=NOW)), now=NOW) is None


def test_a_longer_life_written_into_the_value_does_not_verify():
    sessions = Signer("admin-key", "session")
    payload, expires, mac = sessions.sign("payload", 60, now=NOW).split(".")
    assert sessions.verify(f"{payload}.{int(expires) + 3600}.{mac}", now=NOW) is None


@pytest.mark.parametrize("payload", ["", "a.b", "a b", "é"])
def test_payloads_are_url_safe_text_without_dots(payload):
    with pytest.raises(ValueError):
        Signer("admin-key", "session").sign(payload, 60)


def test_without_a_secret_nothing_is_signed_or_accepted():
    """An empty ADMIN_KEY must not make a key everyone can compute."""
    unkeyed = Signer("", "session")
    with pytest.raises(ValueError):
        unkeyed.sign("payload", 60)
    mac = hmac.new(b"", b"llmproxy:session", "sha256")  # what a key derived from "" would compute
    mac.update(f"payload.{NOW + 60}".encode())
    assert unkeyed.verify(f"payload.{NOW + 60}.{mac.hexdigest()}", now=NOW) is None
