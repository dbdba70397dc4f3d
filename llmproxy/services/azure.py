"""Azure OpenAI: OpenAI's API on the owner's Azure resources, each credential one model deployment
(`AZURE_CREDENTIALS=resource:deployment:key,...`, the original project's format). Clients speak OpenAI's format under
`/proxy/azure/openai/v1/...`; a request goes to the deployment of the key the pool picked for its model's family,
`https://<resource>.openai.azure.com/openai/deployments/<deployment>/<endpoint>?api-version=...`, with an `api-key`
header. Azure ignores the body's `model`: the deployment decides it.
"""

import json
import re

from yarl import URL

from llmproxy.api import OPENAI
from llmproxy.api.routes import FORWARD, LOCAL
from llmproxy.config import ConfigError
from llmproxy.pool.keys import Verdict, classify
from llmproxy.services.base import ODD_ANSWER, Endpoint, Outgoing, Service, under

# The GA data-plane version of the chat, completion and embedding endpoints (Azure OpenAI REST reference, "Data plane
# - inference", 2024-10-21).
API_VERSION = "2024-10-21"
# The data-plane deployment lookup (`GET /openai/deployments/{id}`, which names the deployed model) exists only in the
# early API versions; newer ones answer 404, and then the deployment's name stands for its model.
DEPLOYMENT_API_VERSION = "2022-12-01"
DEFAULT_URL = "https://openai.azure.com"  # each resource is its subdomain
# Azure's rules: a resource name is 2-64 letters, digits and hyphens; a deployment name 2-64 letters, digits, `-`,
# `_` and `.`. Both become parts of the URL, so nothing else may pass.
_RESOURCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}[A-Za-z0-9]")
_DEPLOYMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Azure(Service):
    name = "azure"
    path_prefix = "/openai"
    title = "Azure OpenAI"
    dialect = OPENAI
    key_setting = "azure_credentials"
    key_prefix = "azu"
    default_url = DEFAULT_URL
    endpoints = (
        Endpoint("chat_completions", "POST", FORWARD, "/chat/completions", client_path="/v1/chat/completions"),
        Endpoint("completions", "POST", FORWARD, "/completions", client_path="/v1/completions"),
        Endpoint("embeddings", "POST", FORWARD, "/embeddings", client_path="/v1/embeddings"),
        Endpoint("models", "GET", LOCAL, client_path="/v1/models"),
    )
    # The original's azure-* families: a family's keys are the deployments of its models.
    families = (
        "azure-gpt5=gpt-5*",
        "azure-gpt4.1=gpt-4.1*",
        "azure-gpt4o=gpt-4o*",
        "azure-gpt4-turbo=gpt-4-turbo*|gpt-4-*-preview",
        "azure-gpt4-32k=gpt-4-32k*",
        "azure-gpt4=gpt-4|gpt-4-0*",
        "azure-o=o[0-9]*",
        "azure-embeddings=text-embedding-*",
        "azure-turbo=gpt-35-turbo*|gpt-3.5-turbo*|gpt-*",
    )
    models = ("gpt-4.1", "gpt-4.1-mini", "gpt-4o", "gpt-4o-mini", "o4-mini", "text-embedding-3-small")
    price_fallback = "openai"
    probe_path = "/chat/completions"

    def parse_keys(self, values: list[str]) -> list[str]:
        for position, value in enumerate(values, 1):
            resource, _, rest = value.partition(":")
            deployment, _, key = rest.partition(":")
            if not (_RESOURCE.fullmatch(resource) and _DEPLOYMENT.fullmatch(deployment) and key):
                raise ConfigError(
                    f"AZURE_CREDENTIALS entry {position} must look like resource:deployment:key (a resource and a "
                    "deployment name of letters, digits and hyphens)."
                )
        return values

    def secret_parts(self, key: str) -> list[str]:
        return [key.split(":", 2)[2]]

    def auth_headers(self, key) -> list[tuple[str, str]]:
        return [("api-key", key.secret.split(":", 2)[2])]

    def deployment_url(self, key, base: URL, path: str, api_version: str = API_VERSION) -> URL:
        """The URL of one of the key's deployment's endpoints. At Azure's own address each resource is a subdomain;
        another base URL (a gateway, a test double) serves each resource under `/<resource>`."""
        resource, deployment, _ = key.secret.split(":", 2)
        at_azure = base == URL(DEFAULT_URL)
        base = base.with_host(f"{resource}.{base.host}") if at_azure else under(base, f"/{resource}")
        return under(base, f"/openai/deployments/{deployment}{path}").with_query({"api-version": api_version})

    async def prepare(self, request, route, key, base: URL) -> Outgoing:
        url = self.deployment_url(key, base, route.upstream_path)
        return Outgoing(str(url), [*request.headers, *self.auth_headers(key)], request.body)

    def check_url(self, key, base: URL) -> URL:
        return self.deployment_url(key, base, "", DEPLOYMENT_API_VERSION)

    def read_check(self, key, status: int, body: bytes) -> tuple[Verdict, list[str]]:
        """The deployed model a deployment lookup names (`model`, e.g. `gpt-4o`). A 404 passed the key's check (a
        bad key gets 401 first) on an API version without the lookup: the deployment's name then stands for its
        model, as owners usually name deployments."""
        if status == 404:
            return Verdict.SUCCESS, [key.secret.split(":", 2)[1]]
        verdict = classify(status, body)
        if verdict is not Verdict.SUCCESS:
            return verdict, []
        try:
            model = json.loads(body)["model"]
        except ODD_ANSWER:
            return verdict, []
        return verdict, [model] if isinstance(model, str) else []

    def probe_url(self, key, base: URL) -> URL:
        return self.deployment_url(key, base, self.probe_path)
