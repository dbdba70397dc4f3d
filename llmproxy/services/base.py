"""What an upstream service is to the proxy: its endpoints, its credentials, its model families, and how a request
and a key check reach it. Each service is one module with one subclass of `Service`; the table of them is
`llmproxy/services/__init__.py`.

A service speaks a *dialect*: the wire format of its requests, answers, usage figures and errors (OpenAI's,
Anthropic's or Gemini's). Several services share one: Azure OpenAI and every OpenAI-compatible API speak OpenAI's.
The pool, the queue, the families, the limits and the status page count per service; the request policy, the usage
meter and the error bodies work per dialect.
"""

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from yarl import URL

from llmproxy.api import OPENAI
from llmproxy.pool.keys import Verdict, classify

if TYPE_CHECKING:
    from llmproxy.api.routes import Route
    from llmproxy.pool.keys import PoolKey
    from llmproxy.upstream.client import UpstreamRequest


# What reading an answer of any shape may raise: not JSON, missing or mistyped fields, nesting beyond the parser.
ODD_ANSWER = (ValueError, KeyError, TypeError, AttributeError, RecursionError)


def under(base: URL, path: str) -> URL:
    """`path` appended to the base URL's own path: `https://host/v1` and `/models` make `https://host/v1/models`
    (URL.join would drop the base's `/v1`, and a gateway's path prefix)."""
    return base.with_path(base.path.rstrip("/") + path)


@dataclass(frozen=True)
class Endpoint:
    """One of a service's routes: the client's path under `/proxy/<service>` (with or without `/v1`), and where it
    goes upstream."""

    name: str  # e.g. "chat_completions"; the route is named "<service>.<name>"
    method: str
    kind: str  # routes.FORWARD or routes.LOCAL
    upstream_path: str = ""  # appended to the service's upstream URL; "" for a LOCAL endpoint
    client_format: str = ""  # the dialect the client speaks, when it is not the service's (translated both ways)
    counts_tokens: bool = False  # a token count: no generation, so its own rate limit and no quota
    client_path: str = ""  # the path the client names; "" means the upstream path
    wire: str = ""  # the dialect it speaks upstream, when not its service's (Gemini's OpenAI-compatible endpoint)
    streams: bool = False  # it always streams (Gemini's streamGenerateContent), whatever the body says
    parametric: bool = False  # its paths carry a parameter (Gemini's model): the service's `match` finds it

    @property
    def path(self) -> str:
        return self.client_path or self.upstream_path


@dataclass(frozen=True)
class Outgoing:
    """A request as it leaves for the upstream with one key: never kept on a flow, never logged."""

    url: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True)
class KeyCheck:
    """What a check of a key found: the HTTP status it got, what that says about the key, the model ids it may use
    (none: unknown), organisations of its own besides its default one (OpenAI), and why, for the log."""

    status: int
    verdict: "Verdict"
    models: list[str] = field(default_factory=list)
    organizations: list[str] = field(default_factory=list)
    reason: str = ""


class UpstreamFailure(Exception):
    """No usable answer from the upstream (unreachable, too slow, cut off), or no request could be made for the key
    (a service's `prepare`); the message is for the client. `verdict`, when a service knows it, is what the failure
    says about the key (a credential its token endpoint refuses: REVOKED); else it counts as a server error."""

    def __init__(self, status: int, code: str, message: str, verdict: "Verdict | None" = None):
        super().__init__(message)
        self.status, self.code, self.verdict = status, code, verdict


@dataclass(frozen=True)
class ServiceOption:
    """A setting of one service, declared as a mitmproxy option (`allow_aws_logging`)."""

    name: str
    typespec: type
    default: object
    help: str


# The checker's own requests say so, in upstream logs and in the tests.
USER_AGENT = "llm-key-proxy/key-check"


class Service:
    """An upstream API. The defaults are those of an API that takes an `Authorization: Bearer` key and serves
    `GET /v1/models`, as OpenAI's and every OpenAI-compatible API do."""

    name: str  # its path segment (`/proxy/<name>`) and the name its keys, queue and figures are counted under
    path_prefix = ""  # between `/proxy/<name>` and its endpoints' paths (Azure: `/openai`, as the original had it)
    title: str  # as the status page names it
    dialect: str = OPENAI
    key_setting: str  # the setting that holds its keys, comma-separated (a secret: never a mitmproxy option)
    key_prefix: str  # key ids: "<prefix>-<8 hex digits of a hash>"
    default_url: str  # its base URL, without the version segment its endpoints' paths begin with
    endpoints: tuple[Endpoint, ...]
    families: tuple[str, ...]  # the default family table (llmproxy/families.py), the last entry the fallback
    models: tuple[str, ...] = ()  # the model ids its local `/v1/models` lists by default
    hosts: tuple[str, ...] = ()  # its API hosts, as apps with a hard-coded URL name them (the forward proxy)
    price_fallback: str = ""  # the MODEL_PRICES entry its unlisted models cost, when not one of its own name
    models_path = "/v1/models"  # the check's model list, relative to the upstream URL
    probe_path = "/v1/chat/completions"  # where the checker's probe goes
    stream_media_type = "text/event-stream"  # the content type of its streamed answers
    options: tuple[ServiceOption, ...] = ()  # its own settings, besides its URL, families and models

    def configure(self, values: Mapping[str, object]) -> None:
        """Takes the current values of its `options`."""

    @property
    def option_prefix(self) -> str:
        """Its settings' prefix: `openai_upstream_url`, `google_ai_model_families`."""
        return self.name.replace("-", "_")

    @property
    def client_base(self) -> str:
        """The path clients use as their SDK's base URL (after the proxy's address)."""
        return f"/proxy/{self.name}{self.path_prefix}/v1"

    def match(self, target: bytes) -> tuple[Endpoint, str, str] | None:
        """For a service with parametric endpoints: the endpoint a request target under `/proxy/<name>` (path and
        query) names, the path (and query) to send upstream, rebuilt from checked parts, and the model it names."""
        return None

    def parse_keys(self, values: list[str]) -> list[str]:
        """The keys of its key setting, checked; raises ConfigError naming the setting for a malformed one."""
        return values

    def secret_parts(self, key: str) -> list[str]:
        """The parts of a key that are secret, for the log scrubber (a credential may name public parts too)."""
        return [key]

    def auth_headers(self, key: "PoolKey") -> list[tuple[str, str]]:
        """The headers that authenticate a request with `key`."""
        return [("authorization", f"Bearer {key.secret}")]

    async def prepare(self, request: "UpstreamRequest", route: "Route", key: "PoolKey", base: URL) -> Outgoing:
        """The client's request as it goes upstream with `key`: its URL (`request.url` is the route's path under
        `base`, the service's configured URL), its headers with the key's last, and its body. Called for every
        attempt, so that a signature or token is always fresh."""
        return Outgoing(request.url, [*request.headers, *self.auth_headers(key)], request.body)

    def verdict(self, status: int, headers: Mapping[str, str], body: bytes) -> Verdict:
        """What an upstream answer says about the key that got it (llmproxy/pool/keys.py's rules)."""
        return classify(status, body)

    def client_error(self, status: int, headers: Mapping[str, str], body: bytes) -> tuple[int, bytes]:
        """An upstream error answer as the client's dialect words it (its status may change with it)."""
        return status, body

    def stream_decoder(self) -> Callable[[bytes], bytes] | None:
        """For a service whose streams are no SSE: a new decoder of one stream's bytes, in any chunking, into the
        dialect's SSE."""
        return None

    async def check(self, key: "PoolKey", session, base: URL) -> KeyCheck:
        """Checks the key without spending tokens: a model list, read by `read_check`."""
        async with session.get(self.check_url(key, base), headers=self.checker_headers(key)) as response:
            status, body = response.status, await response.read()
        verdict, models = self.read_check(key, status, body)
        organizations = await self.extra_organizations(key, session, base) if verdict is Verdict.SUCCESS else []
        return KeyCheck(status, verdict, models, organizations, f"key check got {status}")

    async def probe(self, key: "PoolKey", model: str, session, base: URL) -> tuple[int, Verdict]:
        """The checker's probe of a suspect key with `model`: its status, and what it says about the key."""
        url, body = self.probe_url(key, base), self.probe_body(model)
        async with session.post(url, json=body, headers=self.checker_headers(key)) as response:
            status, body = response.status, await response.read()
        return status, self.verdict(status, response.headers, body)

    def check_url(self, key: "PoolKey", base: URL) -> URL:
        """Where the checker asks about a key (a model list), under the service's configured URL."""
        return under(base, self.models_path)

    def read_check(self, key: "PoolKey", status: int, body: bytes) -> tuple["Verdict", list[str]]:
        """What a check's answer says about the key, and the model ids it may use (none: unknown)."""
        verdict = classify(status, body)
        return verdict, self.model_ids(body) if verdict is Verdict.SUCCESS else []

    def probe_url(self, key: "PoolKey", base: URL) -> URL:
        """Where the checker's probe goes."""
        return under(base, self.probe_path)

    def check_headers(self, key: "PoolKey") -> dict[str, str]:
        """The headers that authenticate the checker's own requests with `key`."""
        return dict(self.auth_headers(key))

    def checker_headers(self, key: "PoolKey") -> dict[str, str]:
        """The headers of the checker's own requests with `key`: its user agent and the key's. The shared session
        decompresses nothing (the client gets bodies as they came), and aiohttp would ask for gzip: so identity."""
        return {"user-agent": USER_AGENT, "accept-encoding": "identity", **self.check_headers(key)}

    def model_ids(self, body: bytes) -> list[str]:
        """The model ids a model list answer names; none when it has another shape."""
        try:
            return [str(model["id"]) for model in json.loads(body)["data"]]
        except ODD_ANSWER:
            return []

    async def extra_organizations(self, key: "PoolKey", session, base: URL) -> list[str]:
        """Organisations of the key besides its default one, each a pool entry of its own (only OpenAI has them)."""
        return []

    def probe_body(self, model: str) -> dict:
        """The checker's probe: a generation request the API refuses as invalid to a working key, spending nothing,
        and refuses as dead to a dead one."""
        return {"model": model, "messages": [], "max_tokens": 1}
