"""A fake Azure OpenAI data plane: resources, their model deployments and keys, in front of the fake OpenAI upstream.

Requests come as Azure takes them (the openai SDK's AzureOpenAI client sends exactly these):
`POST /<resource>/openai/deployments/<deployment>/{chat/completions,completions,embeddings}?api-version=V` with an
`api-key` header, and `GET /<resource>/openai/deployments/<deployment>?api-version=2022-12-01` (the early
deployment lookup). Each resource is a path segment here, as the proxy's AZURE_UPSTREAM_URL override asks for it;
at Azure it is the host's first label.

Azure's own refusals are its own (bodies as the Azure OpenAI REST reference and real answers show them): a wrong
key 401, an unknown deployment 404 DeploymentNotFound, a missing or unknown api-version 404. Everything else is
answered by the fake upstream as OpenAI's `/v1/<endpoint>` for the deployment's model, with the api key as the
bearer key (so its key markers, `-429` and the like, and the prompt's `#fake:` directives work through Azure).
"""

import json
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from tests.fakes.server import FakeServer

# The GA and preview versions the fake accepts (Azure answers 404 for any other).
API_VERSIONS = {"2022-12-01", "2023-05-15", "2024-02-01", "2024-06-01", "2024-10-21", "2025-01-01-preview"}
ENDPOINTS = ("chat/completions", "completions", "embeddings")
_INVALID_KEY = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an "
    "active subscription and use a correct regional API endpoint for your resource."
)
_NO_DEPLOYMENT = (
    "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, "
    "please wait a moment and try again."
)


@dataclass(frozen=True)
class Deployment:
    resource: str
    name: str
    model: str
    key: str


@dataclass(frozen=True)
class AzureCall:
    """A request as the fake received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


class FakeAzure(FakeServer):
    """The fake; `start_in_thread()` it, `add_deployment(...)` what a test needs, point the proxy's
    AZURE_UPSTREAM_URL at `url`."""

    def __init__(self, openai_url: str):
        super().__init__()
        self.openai_url = openai_url  # the fake upstream that makes the answers
        self.deployments: dict[tuple[str, str], Deployment] = {}
        self.calls: list[AzureCall] = []

    def add_deployment(self, resource: str, deployment: str, model: str, key: str) -> str:
        """Registers a deployment; returns its AZURE_CREDENTIALS entry (resource:deployment:key)."""
        self.deployments[(resource, deployment)] = Deployment(resource, deployment, model, key)
        return f"{resource}:{deployment}:{key}"

    def reset(self) -> None:
        """Forgets the deployments and the calls."""
        self.deployments.clear()
        self.calls.clear()

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{resource}/openai/deployments/{deployment}", self._lookup)
        app.router.add_route("*", "/{resource}/openai/deployments/{deployment}/{endpoint:.+}", self._inference)
        return app

    def make_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(auto_decompress=False)

    async def _record(self, request: web.Request) -> bytes:
        body = await request.read()
        self.calls.append(AzureCall(request.method, request.path, dict(request.query), dict(request.headers), body))
        return body

    def _refusal(self, request: web.Request) -> tuple[Deployment | None, web.Response | None]:
        """The deployment a request names, or Azure's refusal of it."""
        if request.query.get("api-version") not in API_VERSIONS:
            return None, _error(404, "404", "Resource not found")
        deployment = self.deployments.get((request.match_info["resource"], request.match_info["deployment"]))
        resource_keys = {d.key for d in self.deployments.values() if d.resource == request.match_info["resource"]}
        if request.headers.get("api-key") not in resource_keys:
            return None, _error(401, "401", _INVALID_KEY)
        if deployment is None:
            return None, _error(404, "DeploymentNotFound", _NO_DEPLOYMENT)
        return deployment, None

    async def _lookup(self, request: web.Request) -> web.Response:
        await self._record(request)
        deployment, refusal = self._refusal(request)
        if refusal:
            return refusal
        if request.method != "GET" or request.query["api-version"] != "2022-12-01":
            return _error(404, "404", "Resource not found")  # the lookup left the API with later versions
        return web.json_response(
            {"id": deployment.name, "model": deployment.model, "status": "succeeded", "object": "deployment"}
        )

    async def _inference(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        deployment, refusal = self._refusal(request)
        if refusal:
            return refusal
        endpoint = request.match_info["endpoint"]
        if request.method != "POST" or endpoint not in ENDPOINTS:
            return _error(404, "404", "Resource not found")
        try:
            payload = {**json.loads(body), "model": deployment.model}  # Azure runs the deployment's model
        except (ValueError, TypeError):
            return _error(400, "BadRequest", "Invalid JSON body.")
        async with self._session.post(
            f"{self.openai_url}/v1/{endpoint}",
            json=payload,
            headers={"authorization": f"Bearer {deployment.key}"},
        ) as upstream:
            answer = web.StreamResponse(status=upstream.status)
            for name in ("content-type", "retry-after", "x-ratelimit-remaining-requests", "x-ratelimit-limit-requests"):
                if name in upstream.headers:
                    answer.headers[name] = upstream.headers[name]
            await answer.prepare(request)
            async for chunk in upstream.content.iter_any():
                await answer.write(chunk)
            await answer.write_eof()
            return answer


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)
