"""What may be asked of the owner's keys: a well-formed body, one completion, bounded output and context, and
no refused phrase anywhere the model will read.

Runs after the model's family is known and before the rate limit counts the request, so that a refused request
costs its sender nothing. Fields that would redirect or re-authenticate a call (`api_base`, `api_key`, ...) are
removed: they never decide where a request goes or which key it uses, and the upstream would only reject them.
"""

import asyncio
import json
import logging
import re
from collections.abc import Sequence

from mitmproxy import ctx, exceptions, http

from addons import tokens
from addons.apierrors import ANTHROPIC, error_response, fail_closed
from addons.body import parsed_body
from addons.families import parse_family_numbers
from addons.routes import forward_route

logger = logging.getLogger(__name__)

REDIRECTING_FIELDS = ("api_base", "base_url", "api_key", "api_type", "api_version", "extra_headers", "extra_query",
                      "extra_body", "organization", "project", "headers", "timeout", "default_headers")  # fmt: skip
OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
ANTHROPIC_ROLES = ("user", "assistant")
# Routes whose prompt is counted and whose output is capped: (body field with the output cap, its limit setting).
_OUTPUT_FIELD = {
    "openai.chat_completions": "max_completion_tokens",
    "openai.completions": "max_tokens",
    "openai.responses": "max_output_tokens",
    "anthropic.messages": "max_tokens",
    "anthropic.complete": "max_tokens_to_sample",
    "anthropic.chat_completions": "max_tokens",
}
INLINE_COUNT_LIMIT = 20_000  # characters; longer prompts are counted on a worker thread, off the event loop
_CJK = re.compile("[\u2e80-\u2ef3\u2f00-\u2fd5\u3005\u3007\u3021-\u3029\u3038-\u303b\u3400-\u4db5\u4e00-\u9fd5"
                  "\uf900-\ufad9]")  # fmt: skip
# A quantified group that itself contains a quantifier can backtrack exponentially: (a+)+, (a|aa)*, (.*)*.
_NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*[*+?}](?:[^()\\]|\\.)*\)[*+?{]|\((?:[^()\\]|\\.)*\|(?:[^()\\]|\\.)*\)[*+{]")
DEFAULT_CONTEXT_WINDOWS = [
    "gpt6=1000000", "gpt5=400000", "gpt4.1=1047576", "gpt4o=128000", "gpt4-turbo=128000", "gpt4-32k=32768",
    "gpt4=8192", "o=200000", "turbo=16385", "embeddings=8192", "claude-opus=200000", "claude-sonnet=200000",
    "claude-haiku=200000", "claude=200000",
]  # fmt: skip


class PolicyError(ValueError):
    """A refused request; the message is for the user, `code` for programs."""

    def __init__(self, message: str, code: str = "invalid_request"):
        super().__init__(message)
        self.code = code


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise PolicyError(message)


def _positive_int(body: dict, field: str, required: bool = False) -> None:
    value = body.get(field)
    if value is None:
        _require(not required, f"'{field}' is required.")
        return
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
             f"'{field}' must be a positive whole number.")  # fmt: skip


def _check_content(content, where: str, allow_null: bool) -> None:
    if content is None:
        _require(allow_null, f"'{where}.content' is required.")
    elif isinstance(content, list):
        for number, part in enumerate(content):
            _require(isinstance(part, dict) and isinstance(part.get("type"), str),
                     f"'{where}.content[{number}]' must be an object with a 'type'.")  # fmt: skip
    else:
        _require(isinstance(content, str), f"'{where}.content' must be a string or a list of parts.")


def _check_messages(body: dict, roles: tuple[str, ...], nullable_roles: tuple[str, ...]) -> None:
    messages = body.get("messages")
    _require(isinstance(messages, list) and messages, "'messages' must be a non-empty list.")
    for number, message in enumerate(messages):
        where = f"messages[{number}]"
        _require(isinstance(message, dict), f"'{where}' must be an object.")
        _require(message.get("role") in roles, f"'{where}.role' must be one of {', '.join(roles)}.")
        _check_content(message.get("content"), where, allow_null=message["role"] in nullable_roles)


def validate(route: str, body: dict) -> None:
    """Checks the shape of the body for its route; raises PolicyError naming the field."""
    _require(isinstance(body.get("stream", False), bool), "'stream' must be true or false.")
    if route in ("openai.chat_completions", "anthropic.chat_completions"):
        _check_messages(body, OPENAI_ROLES, nullable_roles=("assistant", "function"))
        _positive_int(body, "max_tokens")
        _positive_int(body, "max_completion_tokens")
        _positive_int(body, "n")
    elif route in ("anthropic.messages", "anthropic.count_tokens"):
        _check_messages(body, ANTHROPIC_ROLES, nullable_roles=())
        system = body.get("system")
        _require(system is None or isinstance(system, (str, list)), "'system' must be a string or a list of blocks.")
        _positive_int(body, "max_tokens", required=route == "anthropic.messages")
    elif route == "openai.completions":
        _require(isinstance(body.get("prompt"), (str, list)), "'prompt' must be a string or a list.")
        _positive_int(body, "max_tokens")
        _positive_int(body, "n")
    elif route == "openai.responses":
        _require(isinstance(body.get("input"), (str, list)), "'input' must be a string or a list.")
        _positive_int(body, "max_output_tokens")
    elif route == "openai.embeddings":
        _require(isinstance(body.get("input"), (str, list)), "'input' must be a string or a list.")
    elif route == "anthropic.complete":
        _require(isinstance(body.get("prompt"), str), "'prompt' must be a string.")
        _positive_int(body, "max_tokens_to_sample", required=True)


def prompt_texts(body: dict) -> list[str]:
    """Everything the model will read: system prompt, every message, every text part."""
    return tokens.texts_of([body.get(f) for f in ("system", "messages", "prompt", "input", "instructions")])


def safe_pattern(pattern: str) -> re.Pattern:
    """A case-insensitive regular expression, refused if it can backtrack catastrophically."""
    if _NESTED_QUANTIFIER.search(pattern) or re.search(r"\\[1-9]", pattern):
        raise exceptions.OptionsError(f"REJECT_PHRASES pattern {pattern!r} could take exponential time; simplify it.")
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as error:
        raise exceptions.OptionsError(f"REJECT_PHRASES pattern {pattern!r} is not a valid expression: {error}.") from None


class RequestPolicy:
    """Validation, output and context limits, and prompt filters."""

    def __init__(self):
        self.phrases: list[re.Pattern] = []
        self.windows: dict[str, int] = {}

    def load(self, loader):
        loader.add_option("max_output_tokens_openai", int, 0, "Cap on output tokens of OpenAI requests; 0: none.")
        loader.add_option("max_output_tokens_anthropic", int, 0, "Cap on output tokens of Claude requests; 0: none.")
        loader.add_option("max_context_tokens_openai", int, 0, "Cap on prompt + output tokens (OpenAI); 0: none.")
        loader.add_option("max_context_tokens_anthropic", int, 0, "Cap on prompt + output tokens (Claude); 0: none.")
        loader.add_option("model_context_windows", Sequence[str], DEFAULT_CONTEXT_WINDOWS,
                          "Each family's own context window: family=tokens.")  # fmt: skip
        loader.add_option("allow_multiple_completions", bool, False, "Allow n > 1 (several answers per request).")
        loader.add_option("reject_phrases", Sequence[str], [], "Phrases refused anywhere in a prompt (any case).")
        loader.add_option("reject_phrases_regex", bool, False, "Treat REJECT_PHRASES as regular expressions.")
        loader.add_option("reject_disallowed", bool, False, "Refuse prompts with CJK ideographs, as the original.")
        loader.add_option("reject_message", str, "This content violates /aicg/'s acceptable use policy.",
                          "The sentence a refused prompt gets.")  # fmt: skip

    def configure(self, updated):
        if updated & {"reject_phrases", "reject_phrases_regex"}:
            phrases = [phrase for phrase in ctx.options.reject_phrases if phrase.strip()]
            regex = ctx.options.reject_phrases_regex
            self.phrases = [safe_pattern(p) if regex else re.compile(re.escape(p.strip()), re.IGNORECASE)
                            for p in phrases]  # fmt: skip
        if "model_context_windows" in updated:
            self.windows = parse_family_numbers("model_context_windows", ctx.options.model_context_windows)
        for name in ("max_output_tokens_openai", "max_output_tokens_anthropic", "max_context_tokens_openai",
                     "max_context_tokens_anthropic"):  # fmt: skip
            if name in updated and getattr(ctx.options, name) < 0:
                raise exceptions.OptionsError(f"{name.upper()} must not be negative.")

    async def running(self):
        """Loads the encodings on a worker thread, so that the first request does not wait for them."""
        asyncio.get_running_loop().run_in_executor(None, self._load_encodings)

    @staticmethod
    def _load_encodings() -> None:
        try:
            for name in ("o200k_base", "cl100k_base"):
                tokens.encoding(name)
        except tokens.TokenizerUnavailable as error:
            logger.error("%s", error)

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if (route := forward_route(flow)) is None:
            return
        meta = flow.metadata["llmproxy"]
        body = parsed_body(flow)
        try:
            changed = await self._apply(route.name, route.api, meta, body)
        except PolicyError as refusal:
            meta["decision"] = "filtered" if refusal.code == "content_rejected" else "invalid_request"
            flow.response = error_response(route.dialect, 400, str(refusal), refusal.code)
            return
        if changed:  # a large body is serialised again only when the policy altered it
            flow.request.content = json.dumps(body).encode()

    async def _apply(self, route: str, api: str, meta: dict, body: dict) -> bool:
        """Validates and normalises `body` in place; returns whether it changed; raises PolicyError."""
        changed = False
        for field in REDIRECTING_FIELDS:
            if field in body:
                del body[field]
                changed = True
        validate(route, body)
        if body.get("n", 1) > 1 and not ctx.options.allow_multiple_completions:
            raise PolicyError("This proxy answers one completion per request ('n' must be 1).", "n_not_allowed")
        self._filter(prompt_texts(body))
        if route not in _OUTPUT_FIELD:
            return changed
        field = _OUTPUT_FIELD[route]
        if route == "openai.chat_completions" and "max_tokens" in body and "max_completion_tokens" not in body:
            field = "max_tokens"  # the older name, still accepted; the cap applies to whichever is sent
        cap = ctx.options.max_output_tokens_anthropic if api == ANTHROPIC else ctx.options.max_output_tokens_openai
        if cap and (body.get(field) is None or body[field] > cap):
            body[field] = cap
            changed = True
        texts = prompt_texts(body)
        count = lambda: tokens.count_prompt(api, meta["model"], body)  # noqa: E731
        if sum(map(len, texts)) > INLINE_COUNT_LIMIT:
            prompt = await asyncio.get_running_loop().run_in_executor(None, count)
        else:
            prompt = count()
        meta["prompt_tokens"] = prompt
        output = body.get(field) or 0
        limits = [limit for limit in (
            ctx.options.max_context_tokens_anthropic if api == ANTHROPIC else ctx.options.max_context_tokens_openai,
            self.windows.get(meta["family"], 0)) if limit]  # fmt: skip
        if limits and prompt + output > min(limits):
            raise PolicyError(
                f"This request needs {prompt} prompt + {output} output = {prompt + output} tokens, more than the "
                f"{min(limits)} allowed for {meta['model']} here.", "context_length_exceeded",
            )  # fmt: skip
        return changed

    def _filter(self, texts: list[str]) -> None:
        for text in texts:
            if any(phrase.search(text) for phrase in self.phrases) or \
                    (ctx.options.reject_disallowed and _CJK.search(text)):  # fmt: skip
                raise PolicyError(ctx.options.reject_message, "content_rejected")
