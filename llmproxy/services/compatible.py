"""OpenAI-compatible APIs the owner declares in config.yaml (DeepSeek, Mistral, OpenRouter, a local vLLM, llama.cpp
or Ollama server): each is a service of its own under `/proxy/<name>/v1/...`, with the allowlist, limits, pool and
queue of every service, its keys in `<NAME>_KEY`.

    services:
      - name: deepseek                     # /proxy/deepseek/v1/chat/completions; keys in DEEPSEEK_KEY
        url: https://api.deepseek.com/v1   # the base URL, as the OpenAI SDK's base_url names it
        title: DeepSeek                    # on the status page (default: the name)
        families: ["deepseek-reasoner=deepseek-reasoner", "deepseek=*"]   # default: "<name>=*"
        models: [deepseek-chat, deepseek-reasoner]                       # its /v1/models list
        endpoints: [chat_completions, completions, embeddings]           # default: chat_completions
"""

import re
from collections.abc import Sequence

from yarl import URL

from llmproxy.api.routes import FORWARD, LOCAL
from llmproxy.config import ConfigError
from llmproxy.families import parse_table
from llmproxy.services.base import Endpoint, Service

# The endpoints a compatible API may offer, each at its path under the declared base URL (which ends in its version).
_ENDPOINTS = {
    "chat_completions": Endpoint(
        "chat_completions", "POST", FORWARD, "/chat/completions", client_path="/v1/chat/completions"
    ),
    "completions": Endpoint("completions", "POST", FORWARD, "/completions", client_path="/v1/completions"),
    "embeddings": Endpoint("embeddings", "POST", FORWARD, "/embeddings", client_path="/v1/embeddings"),
    "responses": Endpoint("responses", "POST", FORWARD, "/responses", client_path="/v1/responses"),
}
_MODELS = Endpoint("models", "GET", LOCAL, client_path="/v1/models")
_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
_FIELDS = {"name", "url", "title", "families", "models", "endpoints"}
MAX_NAME = 32


class Compatible(Service):
    """One declared OpenAI-compatible API."""

    key_prefix = "cmp"
    models_path = "/models"
    probe_path = "/chat/completions"

    def __init__(self, name: str, url: str, title: str, families: tuple[str, ...], models: tuple[str, ...], endpoints):
        self.name = name
        self.title = title
        self.default_url = url
        self.families = families
        self.models = models
        self.endpoints = (*endpoints, _MODELS)
        self.key_setting = f"{self.option_prefix}_key"


def declared_services(entries: object, reserved: Sequence[str]) -> list[Compatible]:
    """The SERVICES setting's entries as services; `reserved` are the names already taken (the built-in services').
    Raises ConfigError with one sentence for anything malformed."""
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ConfigError("SERVICES must be a list of services, each a mapping with a name and a url.")
    services: list[Compatible] = []
    for position, entry in enumerate(entries, 1):
        services.append(_declared(entry, position, [*reserved, *(service.name for service in services)]))
    return services


def _declared(entry: object, position: int, taken: list[str]) -> Compatible:
    where = f"SERVICES entry {position}"
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("url"), str):
        raise ConfigError(f"{where} must be a mapping with a name and a url.")
    if unknown := sorted(set(entry) - _FIELDS):
        raise ConfigError(f"{where} has a field this proxy does not know: {unknown[0]!r}.")
    name = entry["name"]
    if not _NAME.fullmatch(name) or len(name) > MAX_NAME:
        raise ConfigError(
            f"{where}: the name {name[:40]!r} must be lower-case letters, digits and single hyphens, starting with a "
            f"letter, at most {MAX_NAME} characters (it becomes the path /proxy/<name>)."
        )
    if name in taken:
        raise ConfigError(f"{where}: the name {name!r} is taken already.")
    key_setting = f"{name.upper().replace('-', '_')}_KEY"
    try:
        url = URL(entry["url"])
    except ValueError:
        url = URL()
    if url.user or url.password:  # checked first: the other messages show the url
        raise ConfigError(f"{where}: the url must not hold credentials; put the key in {key_setting}.")
    if url.scheme not in ("http", "https") or not url.host or url.query_string or url.fragment:
        raise ConfigError(
            f"{where}: the url must be an http:// or https:// base URL without query, not {entry['url']!r}."
        )
    families = _strings(entry.get("families", [f"{name}=*"]), f"{where}: families")
    parse_table(f"{name.replace('-', '_')}_model_families", families)  # the option the families become
    endpoint_names = _strings(entry.get("endpoints", ["chat_completions"]), f"{where}: endpoints")
    if unknown := [endpoint for endpoint in endpoint_names if endpoint not in _ENDPOINTS]:
        raise ConfigError(f"{where}: endpoints may be {', '.join(_ENDPOINTS)}, not {unknown[0]!r}.")
    title = entry.get("title", name)
    if not isinstance(title, str):
        raise ConfigError(f"{where}: the title must be text.")
    return Compatible(
        name,
        str(url).rstrip("/"),
        title,
        tuple(families),
        tuple(_strings(entry.get("models", []), f"{where}: models")),
        tuple(_ENDPOINTS[endpoint] for endpoint in dict.fromkeys(endpoint_names)),
    )


def _strings(value: object, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{what} must be a list of strings.")
    return value
