"""The proof of work's pure logic: difficulty levels, leading zero bits, challenges and their checks."""

import hashlib
import itertools

import pytest

from llmproxy.config import ConfigError
from llmproxy.web.proofofwork import (
    LEVELS,
    MAX_BITS,
    MIN_BITS,
    ProofRefused,
    check_solution,
    difficulty_bits,
    digest,
    leading_zero_bits,
    new_challenge,
)
from llmproxy.web.signing import Signer

NOW = 1_700_000_000.0


def solve(challenge: str, bits: int, fewer: bool = False, form: str = "{}") -> str:
    """The first nonce of the `form` with at least `bits` leading zero bits, or (`fewer`) with some but fewer."""
    for nonce in map(form.format, itertools.count()):
        zeros = leading_zero_bits(digest(challenge, nonce))
        if (0 < zeros < bits) if fewer else zeros >= bits:
            return nonce


@pytest.mark.parametrize(
    "data, bits",
    [
        (b"\x00\x00\x00\x00", 32),
        (b"\x80", 0),
        (b"\x01\xff", 7),
        (b"\x00\x01", 15),
        (b"\x00\x00\x0f" + b"\xff" * 29, 20),
        (b"\x00" * 32, 256),
    ],
)
def test_leading_zero_bits(data, bits):
    assert leading_zero_bits(data) == bits


def test_levels_grow_and_stay_in_range():
    bits = [difficulty_bits(level) for level in ("low", "medium", "high", "extreme")]
    assert bits == sorted(set(bits)) and bits[0] >= MIN_BITS and bits[-1] <= MAX_BITS
    assert difficulty_bits(" Medium ") == LEVELS["medium"]


@pytest.mark.parametrize("level, bits", [("8", 8), ("20", 20), ("32", 32)])
def test_a_number_of_bits_is_a_level(level, bits):
    assert difficulty_bits(level) == bits


@pytest.mark.parametrize("level", ["7", "33", "-1", "", "hard", "12.5", "0x10"])
def test_other_levels_are_refused_with_one_sentence(level):
    with pytest.raises(ConfigError) as refused:
        difficulty_bits(level)
    assert str(refused.value) == (
        "POW_DIFFICULTY_LEVEL must be low, medium, high, extreme or a number of leading zero bits from 8 to 32, "
        f"not {level!r}."
    )


def test_a_challenge_names_its_difficulty_and_expiry_and_is_new_each_time():
    signer = Signer("admin-key", "pow")
    challenge, expires_at = new_challenge(signer, 12, 1800, now=NOW)
    assert expires_at == NOW + 1800
    challenge_id, bits = signer.verify(challenge, now=NOW).split(":")
    assert bits == "12" and len(challenge_id) >= 16
    assert new_challenge(signer, 12, 1800, now=NOW)[0] != challenge


def test_a_solution_is_checked_by_one_hash_of_challenge_colon_nonce():
    signer = Signer("admin-key", "pow")
    challenge, _ = new_challenge(signer, 12, 1800, now=NOW)
    nonce = solve(challenge, 12)
    assert leading_zero_bits(hashlib.sha256(f"{challenge}:{nonce}".encode()).digest()) >= 12
    assert check_solution(signer, challenge, nonce, now=NOW + 1799) == signer.verify(challenge, NOW).split(":")[0]


def refusal(signer: Signer, challenge: str, nonce: str, now: float = NOW) -> str:
    with pytest.raises(ProofRefused) as refused:
        check_solution(signer, challenge, nonce, now=now)
    return refused.value.code


def test_an_expired_challenge_is_told_apart_from_a_forged_one():
    signer = Signer("admin-key", "pow")
    challenge, _ = new_challenge(signer, 8, 60, now=NOW)
    nonce = solve(challenge, 8)
    assert refusal(signer, challenge, nonce, now=NOW + 61) == "challenge_expired"
    assert refusal(Signer("another-key", "pow"), challenge, nonce) == "invalid_challenge"
    assert refusal(Signer("admin-key", "admin session"), challenge, nonce) == "invalid_challenge"


def test_a_challenge_whose_difficulty_was_changed_is_forged():
    signer = Signer("admin-key", "pow")
    challenge, _ = new_challenge(signer, 16, 60, now=NOW)
    payload, _, signed = challenge.partition(".")
    easier = f"{payload.rpartition(':')[0]}:1.{signed}"
    assert refusal(signer, easier, solve(easier, 1)) == "invalid_challenge"


@pytest.mark.parametrize(
    "payload", ["nodifficulty", "id:", ":12", "id:twelve"], ids=["no colon", "no bits", "no id", "bits not a number"]
)
def test_a_signed_value_that_is_no_challenge_is_refused(payload):
    signer = Signer("admin-key", "pow")
    value = signer.sign(payload, 60, now=NOW)
    assert refusal(signer, value, "0") == "invalid_challenge"


def test_a_nonce_short_of_the_difficulty_does_not_solve():
    signer = Signer("admin-key", "pow")
    challenge, _ = new_challenge(signer, 12, 60, now=NOW)
    assert refusal(signer, challenge, solve(challenge, 12, fewer=True)) == "challenge_unsolved"
    assert refusal(signer, challenge, "") == "challenge_unsolved"


@pytest.mark.parametrize("form", [" {}", "{}\n", "{:033d}", "\uff11{}", "a-{}"])
def test_a_nonce_that_is_no_plain_word_does_not_solve_even_with_the_zero_bits(form):
    signer = Signer("admin-key", "pow")
    challenge, _ = new_challenge(signer, 8, 60, now=NOW)
    assert refusal(signer, challenge, solve(challenge, 8, form=form)) == "challenge_unsolved"
