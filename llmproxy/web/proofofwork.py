"""Proof of work for temporary user tokens (the original project's CAPTCHA_MODE=proof_of_work), SHA-256 based.

A challenge is `id:bits`, signed and expiring (llmproxy/web/signing.py): the proxy keeps nothing until it is
solved. A solution is a nonce such that SHA-256(challenge + ":" + nonce) starts with at least `bits` zero bits;
finding one takes 2**bits hashes on average, checking it one. The page's own solver (templates/user_captcha.html)
searches decimal nonces.
"""

import hashlib
import re
import secrets
import time

from llmproxy.config import ConfigError
from llmproxy.web.signing import Signer

# Leading zero bits per level, from the page's own solver in headless Chromium on one core of a 2-core server:
# about 2 million hashes a second, so medium (2**23 hashes on average) takes some 4 s there, less on a laptop,
# low 1 s, high 17 s, extreme a minute. Each level up is 4 times the work; a phone takes several times as long.
LEVELS = {"low": 21, "medium": 23, "high": 25, "extreme": 27}
MIN_BITS, MAX_BITS = 8, 32
_NONCE = re.compile(r"[0-9A-Za-z]{1,32}")


class ProofRefused(ValueError):
    """A solution the proxy does not accept; `code` names why for clients, the message says it to people."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def difficulty_bits(level: str) -> int:
    """The leading zero bits a POW_DIFFICULTY_LEVEL asks for: a level's name or a number from MIN_BITS to MAX_BITS."""
    text = level.strip().lower()
    if text in LEVELS:
        return LEVELS[text]
    if text.isdigit() and MIN_BITS <= int(text) <= MAX_BITS:
        return int(text)
    raise ConfigError(
        f"POW_DIFFICULTY_LEVEL must be {', '.join(LEVELS)} or a number of leading zero bits from {MIN_BITS} to "
        f"{MAX_BITS}, not {level!r}."
    )


def leading_zero_bits(digest: bytes) -> int:
    """How many bits at the start of `digest` are 0."""
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def new_challenge(signer: Signer, bits: int, lifetime: float, now: float | None = None) -> tuple[str, int]:
    """A fresh challenge asking for `bits` leading zero bits, and when it expires (`lifetime` seconds on)."""
    now = time.time() if now is None else now
    return signer.sign(f"{secrets.token_urlsafe(12)}:{bits}", lifetime, now), int(now + lifetime)


def digest(challenge: str, nonce: str) -> bytes:
    """SHA-256 of what the solver hashes: the challenge, a colon, the nonce."""
    return hashlib.sha256(f"{challenge}:{nonce}".encode()).digest()


def check_solution(signer: Signer, challenge: str, nonce: str, now: float | None = None) -> str:
    """The challenge's id, if `nonce` solves a challenge this signer issued and that has not expired; ProofRefused
    otherwise. Whether the challenge was used before is the caller's to know."""
    issued = signer.verify(challenge, now=0)  # the signature alone: expired is told apart from forged
    challenge_id, _, bits = (issued or "").partition(":")
    if not challenge_id or not bits.isdigit():
        raise ProofRefused("This challenge was not issued by this proxy.", "invalid_challenge")
    if signer.verify(challenge, now) is None:
        raise ProofRefused("This challenge has expired; ask for a new one.", "challenge_expired")
    if not _NONCE.fullmatch(nonce) or leading_zero_bits(digest(challenge, nonce)) < int(bits):
        raise ProofRefused("The nonce does not solve this challenge.", "challenge_unsolved")
    return challenge_id
