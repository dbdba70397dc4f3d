"""Anthropic: the Messages API (and its OpenAI-format twin, translated), token counts and legacy completions, with
`ANTHROPIC_KEY` keys."""

from llmproxy.api import ANTHROPIC, DEFAULT_ANTHROPIC_VERSION, OPENAI
from llmproxy.api.routes import FORWARD, LOCAL
from llmproxy.services.base import Endpoint, Service

# The routes of every service that serves Claude to clients of the Messages API: messages, the same in OpenAI's chat
# format (translated), and the local model list.
CLAUDE_ENDPOINTS = (
    Endpoint("messages", "POST", FORWARD, "/v1/messages"),
    Endpoint("chat_completions", "POST", FORWARD, "/v1/messages", OPENAI, client_path="/v1/chat/completions"),
    Endpoint("models", "GET", LOCAL, client_path="/v1/models"),
)
CLAUDE_TIERS = ("opus", "sonnet", "haiku")
CLOUD_MODELS = ("claude-opus-4-8", "claude-sonnet-4-6", "claude-haiku-4-5")  # the clouds' default model lists


def claude_families(prefix: str = "", id_prefix: str = "") -> tuple[str, ...]:
    """The Claude family table, its families named `<prefix>claude-<tier>` and `<prefix>claude` (the fallback), so
    that each service's families are its own; `id_prefix` also matches model ids that carry it (Bedrock's
    `anthropic.claude-...`, after any inference profile's geography)."""

    def patterns(*names: str) -> str:
        return "|".join((*names, *(f"*{id_prefix}{name}" for name in names)) if id_prefix else names)

    tiers = (f"{prefix}claude-{tier}={patterns(f'claude-{tier}-*', f'claude-*-{tier}*')}" for tier in CLAUDE_TIERS)
    return (*tiers, f"{prefix}claude={patterns('claude-*')}")


class Anthropic(Service):
    name = ANTHROPIC
    title = "Anthropic"
    dialect = ANTHROPIC
    key_setting = "anthropic_key"
    key_prefix = "ant"
    default_url = "https://api.anthropic.com"
    hosts = ("api.anthropic.com",)
    endpoints = (
        *CLAUDE_ENDPOINTS,
        Endpoint("count_tokens", "POST", FORWARD, "/v1/messages/count_tokens", counts_tokens=True),
        Endpoint("complete", "POST", FORWARD, "/v1/complete"),
    )
    families = claude_families()
    models = ("claude-opus-5", "claude-sonnet-5", "claude-haiku-5-5", *CLOUD_MODELS)
    probe_path = "/v1/messages"

    def auth_headers(self, key) -> list[tuple[str, str]]:
        return [("x-api-key", key.secret)]

    def check_headers(self, key) -> dict[str, str]:
        return {"x-api-key": key.secret, "anthropic-version": DEFAULT_ANTHROPIC_VERSION}
