"""Anthropic: the Messages API (and its OpenAI-format twin, translated), token counts and legacy completions, with
`ANTHROPIC_KEY` keys."""

from llmproxy.api import ANTHROPIC, DEFAULT_ANTHROPIC_VERSION, OPENAI
from llmproxy.api.routes import FORWARD, LOCAL
from llmproxy.services.base import Endpoint, Service


class Anthropic(Service):
    name = ANTHROPIC
    title = "Anthropic"
    dialect = ANTHROPIC
    key_setting = "anthropic_key"
    key_prefix = "ant"
    default_url = "https://api.anthropic.com"
    hosts = ("api.anthropic.com",)
    endpoints = (
        Endpoint("messages", "POST", FORWARD, "/v1/messages"),
        Endpoint(  # OpenAI format, translated
            "chat_completions", "POST", FORWARD, "/v1/messages", OPENAI, client_path="/v1/chat/completions"
        ),
        Endpoint("count_tokens", "POST", FORWARD, "/v1/messages/count_tokens", counts_tokens=True),
        Endpoint("complete", "POST", FORWARD, "/v1/complete"),
        Endpoint("models", "GET", LOCAL, client_path="/v1/models"),
    )
    families = (
        "claude-opus=claude-opus-*|claude-*-opus*",
        "claude-sonnet=claude-sonnet-*|claude-*-sonnet*",
        "claude-haiku=claude-haiku-*|claude-*-haiku*",
        "claude=claude-*",
    )
    models = (
        "claude-opus-5",
        "claude-sonnet-5",
        "claude-haiku-5-5",
        "claude-opus-4-8",
        "claude-sonnet-4-6",
        "claude-haiku-4-5",
    )
    probe_path = "/v1/messages"

    def auth_headers(self, key) -> list[tuple[str, str]]:
        return [("x-api-key", key.secret)]

    def check_headers(self, key) -> dict[str, str]:
        return {"x-api-key": key.secret, "anthropic-version": DEFAULT_ANTHROPIC_VERSION}
