"""OpenAI: chat completions, completions, the Responses API and embeddings, with `OPENAI_KEY` keys. A key that
belongs to several organisations is one pool entry per organisation."""

import json

from yarl import URL

from llmproxy.api import OPENAI
from llmproxy.api.routes import FORWARD, LOCAL
from llmproxy.services.base import ODD_ANSWER, Endpoint, Service, under


class OpenAI(Service):
    name = OPENAI
    title = "OpenAI"
    dialect = OPENAI
    key_setting = "openai_key"
    key_prefix = "oai"
    default_url = "https://api.openai.com"
    hosts = ("api.openai.com",)
    endpoints = (
        Endpoint("chat_completions", "POST", FORWARD, "/v1/chat/completions"),
        Endpoint("completions", "POST", FORWARD, "/v1/completions"),
        Endpoint("responses", "POST", FORWARD, "/v1/responses"),
        Endpoint("responses_compact", "POST", FORWARD, "/v1/responses/compact"),  # Codex's remote compaction
        Endpoint("responses_input_tokens", "POST", FORWARD, "/v1/responses/input_tokens", counts_tokens=True),
        Endpoint("embeddings", "POST", FORWARD, "/v1/embeddings"),
        Endpoint("models", "GET", LOCAL, client_path="/v1/models"),
    )
    families = (
        "gpt6=gpt-6*",
        "gpt5=gpt-5*",
        "gpt4.1=gpt-4.1*",
        "gpt4o=gpt-4o*|chatgpt-4o*",
        "gpt4-32k=gpt-4-32k*",
        "gpt4-turbo=gpt-4-turbo*|gpt-4-*-preview|gpt-4-vision*",
        "gpt4=gpt-4|gpt-4-0*",
        "o=o[0-9]*|codex-*",
        "embeddings=text-embedding-*",
        "turbo=gpt-*|chatgpt-*|davinci-*|babbage-*",
    )
    models = (
        "gpt-6-astra",
        "gpt-6-sol",
        "gpt-6-luna",
        "gpt-5.5",
        "gpt-5.4",
        "gpt-5.4-mini",
        "gpt-5.4-nano",
        "gpt-5",
        "gpt-5-mini",
        "gpt-4.1",
        "gpt-4.1-mini",
        "gpt-4o",
        "gpt-4o-mini",
        "o4-mini",
        "o3",
        "o3-mini",
        "gpt-3.5-turbo",
        "text-embedding-3-small",
        "text-embedding-3-large",
    )

    def auth_headers(self, key) -> list[tuple[str, str]]:
        headers = [("authorization", f"Bearer {key.secret}")]
        if key.organization:
            headers.append(("openai-organization", key.organization))
        return headers

    async def extra_organizations(self, key, session, base: URL) -> list[str]:
        if key.organization:
            return []
        async with session.get(under(base, "/v1/organizations"), headers=self.checker_headers(key)) as response:
            return _organization_ids(await response.read()) if response.ok else []


def _organization_ids(body: bytes) -> list[str]:
    """The organisations other than the default one that a `/v1/organizations` answer lists."""
    try:
        return [str(org["id"]) for org in json.loads(body)["data"] if org.get("id") and not org.get("is_default")]
    except ODD_ANSWER:
        return []
