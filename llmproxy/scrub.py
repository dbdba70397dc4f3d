"""Removes secrets from text that came from somewhere we do not control (upstream errors, exception messages).

Upstream APIs echo the key they were given ("Incorrect API key provided: sk-...") and name the owner's
organisation. The configured keys are removed literally; anything shaped like a key or an account id is
removed by pattern, because a key the pool never had can still appear in an upstream message.
"""

import re

REDACTED = "[redacted]"

_SECRET_SHAPES = re.compile(
    r"sk-[A-Za-z0-9_\-*.]{6,}"  # OpenAI and Anthropic keys, masked or not
    r"|org-[A-Za-z0-9]{8,}"  # OpenAI organisation ids
    r"|proj_[A-Za-z0-9]{8,}"  # OpenAI project ids
    r"|[0-9a-f]{8}-[0-9a-z]{4}-[0-9a-z]{4}-[0-9a-z]{4}-[0-9a-f]{12}"  # Anthropic organisation ids
    r"|AIza[0-9A-Za-z_\-]{35}"  # Google API keys (Gemini)
    r"|\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"  # AWS access key ids
    r"|ya29\.[\w.\-]+"  # Google OAuth2 access tokens
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[^-]*-----END [A-Z ]*PRIVATE KEY-----"  # a PEM private key, whole
)

_known_secrets: list[str] = []


def register(secrets: list[str]) -> None:
    """Adds the configured secrets (keys, proxy and admin passwords) to the literal list."""
    for secret in secrets:
        if secret and secret not in _known_secrets:
            _known_secrets.append(secret)
    _known_secrets.sort(key=len, reverse=True)


def text(value: str) -> str:
    """`value` with every known secret and every secret-shaped token replaced."""
    for secret in _known_secrets:
        if secret in value:
            value = value.replace(secret, REDACTED)
    return _SECRET_SHAPES.sub(REDACTED, value)


def body(value: bytes) -> bytes:
    """`text()` for a response body."""
    return text(value.decode("utf-8", errors="replace")).encode()
