"""The upstream services: one module each (llmproxy/services/<name>.py, a subclass of base.Service), and the table
of them. A service in BUILT_IN is always served; its keys' setting decides whether it has any keys."""

from collections.abc import Iterable, Mapping

from llmproxy.api import GEMINI, OPENAI, usage
from llmproxy.api.usage import StreamMeter, Usage
from llmproxy.pool.keys import PoolKey
from llmproxy.services import gemini
from llmproxy.services.anthropic import Anthropic
from llmproxy.services.azure import Azure
from llmproxy.services.base import Service
from llmproxy.services.bedrock import Bedrock
from llmproxy.services.gemini import GoogleAI
from llmproxy.services.openai import OpenAI
from llmproxy.services.vertex import Vertex

BUILT_IN: tuple[Service, ...] = (OpenAI(), Anthropic(), Azure(), Bedrock(), Vertex(), GoogleAI())
_PATH_DIALECTS = tuple((f"/proxy/{service.name}".encode(), service.dialect) for service in BUILT_IN)


def dialect_of_path(raw_path: bytes) -> str:
    """The dialect of the built-in service a request target names (`/proxy/<service>/...`), OpenAI's for any other:
    the error format of a request that matched no route. Declared services speak OpenAI's."""
    for prefix, dialect in _PATH_DIALECTS:
        if raw_path.startswith(prefix) and raw_path[len(prefix) : len(prefix) + 1] in (b"", b"/"):
            return dialect
    return OPENAI


def read_answer(wire: str, body: bytes) -> tuple[Usage | None, str]:
    """The usage and the text of a complete answer in the `wire` dialect."""
    return gemini.read_answer(body) if wire == GEMINI else usage.read_answer(body)


def stream_meter(wire: str, drop_usage_chunk: bool, keep_text: bool) -> StreamMeter | gemini.GeminiStreamMeter:
    """A meter of one stream in the `wire` dialect: it passes the stream on and reads its usage as it goes."""
    if wire == GEMINI:
        return gemini.GeminiStreamMeter(keep_text=keep_text)
    return StreamMeter(wire, drop_usage_chunk=drop_usage_chunk, keep_text=keep_text)


def pool_keys(services: Iterable[Service], secrets: Mapping[str, list[str] | str]) -> dict[str, list[PoolKey]]:
    """Each service's keys, from its key setting, as pool entries."""
    return {
        service.name: [
            PoolKey(service.name, secret, service.key_prefix)
            for secret in service.parse_keys(list(secrets.get(service.key_setting, [])))
        ]
        for service in services
    }
