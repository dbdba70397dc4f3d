"""What may be asked of the owner's keys: one completion, bounded output and context, and no refused phrase
anywhere the model will read.

The upstream is the authority on what a valid request is: the APIs change every month, and a proxy that holds a
frozen model of them refuses the newest clients. So the policy checks only the fields it reads itself (output
caps, `stream`, `n`, thinking budgets) and leaves every other field, role and block type as the client sent it;
the filter and the token count walk the whole body generically (`tokens.model_input`).

Runs after the model's family is known and before the rate limit counts the request, so that a refused request
costs its sender nothing. Fields that would redirect or re-authenticate a call (`api_base`, `api_key`, ...) are
removed: they never decide where a request goes or which key it uses, and the upstream would only reject them.
"""

import asyncio
import fnmatch
import json
import logging
import re
from collections.abc import Sequence

from mitmproxy import ctx, exceptions, http

from addons import tokens
from addons.apierrors import ANTHROPIC, error_response, fail_closed
from addons.body import parsed_body
from addons.families import parse_family_numbers
from addons.flowstate import flow_state
from addons.routes import Route, forward_route
from llmproxy.flowstate import FlowState

logger = logging.getLogger(__name__)

REDIRECTING_FIELDS = (
    "api_base",
    "base_url",
    "api_key",
    "api_type",
    "api_version",
    "extra_headers",
    "extra_query",
    "extra_body",
    "organization",
    "project",
    "headers",
    "timeout",
    "default_headers",
)
OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# Routes whose output is capped: the body field with the output cap.
_OUTPUT_FIELD = {
    "openai.chat_completions": "max_completion_tokens",
    "openai.completions": "max_tokens",
    "openai.responses": "max_output_tokens",
    "anthropic.messages": "max_tokens",
    "anthropic.complete": "max_tokens_to_sample",
    "anthropic.chat_completions": "max_tokens",
}
OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "max_tokens_to_sample")
MIN_THINKING_BUDGET = 1024  # Anthropic refuses a smaller thinking.budget_tokens
# Typed tools the client runs itself, by type prefix: they cost tokens only. Every other typed tool (web search,
# web fetch, code execution, file search, image generation, MCP, and types no API has yet) the provider runs.
_CLIENT_RUN_TOOLS = (
    "function",
    "custom",
    "bash_",
    "text_editor_",
    "computer_",
    "memory_",
    "local_shell",
    "shell",
    "apply_patch",
)
INLINE_COUNT_LIMIT = 20_000  # characters; longer prompts are counted on a worker thread, off the event loop
_CJK = re.compile(
    "[\u2e80-\u2ef3\u2f00-\u2fd5\u3005\u3007\u3021-\u3029\u3038-\u303b\u3400-\u4db5\u4e00-\u9fd5\uf900-\ufad9]"
)
# A quantified group that itself contains a quantifier can backtrack exponentially: (a+)+, (a|aa)*, (.*)*.
_NESTED_QUANTIFIER = re.compile(
    r"\((?:[^()\\]|\\.)*[*+?}](?:[^()\\]|\\.)*\)[*+?{]|\((?:[^()\\]|\\.)*\|(?:[^()\\]|\\.)*\)[*+{]"
)
# Context windows by model-name pattern (or family name), first match first; a model no entry names has no window
# here and the upstream decides. Each figure is the largest window the model can have (current Claude models: 1M
# tokens with the `context-1m` beta header), so the default table never refuses a request the upstream accepts.
DEFAULT_CONTEXT_WINDOWS = [
    "claude-3*=200000",
    "claude-*=1000000",
    "gpt-4.1*=1047576",
    "gpt-4o*=128000",
    "chatgpt-4o*=128000",
    "gpt-4-turbo*=128000",
    "gpt-4-*-preview=128000",
    "gpt-4-32k*=32768",
    "gpt-4=8192",
    "gpt-4-0*=8192",
    "gpt-3.5-turbo-instruct*=4096",
    "gpt-3.5-turbo*=16385",
    "o1*=200000",
    "o3*=200000",
    "o4*=200000",
    "gpt-5*=1050000",
]


class PolicyError(ValueError):
    """A refused request; the message is for the user, `code` for programs."""

    def __init__(self, message: str, code: str = "invalid_request"):
        super().__init__(message)
        self.code = code


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise PolicyError(message)


def _whole_number(value, where: str) -> None:
    """A field the policy reads: absent, or a positive whole number."""
    _require(
        value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0),
        f"'{where}' must be a positive whole number.",
    )


def _check_chat_messages(body: dict) -> None:
    """The OpenAI-format Claude endpoint translates messages itself, so it reads (and checks) their roles."""
    messages = body.get("messages")
    _require(isinstance(messages, list) and messages, "'messages' must be a non-empty list.")
    for number, message in enumerate(messages):
        where = f"messages[{number}]"
        _require(isinstance(message, dict), f"'{where}' must be an object.")
        _require(message.get("role") in OPENAI_ROLES, f"'{where}.role' must be one of {', '.join(OPENAI_ROLES)}.")
        content = message.get("content")
        _require(
            content is None
            or isinstance(content, str)
            or (isinstance(content, list) and all(isinstance(part, dict) for part in content)),
            f"'{where}.content' must be a string or a list of parts.",
        )
        _require(_are_functions(message.get("tool_calls")), f"'{where}.tool_calls' must be a list of function calls.")
    _require(_are_functions(body.get("tools")), "'tools' must be a list of function tools.")


def _are_functions(items) -> bool:
    """Absent, or a list of objects whose `function` (when of type function) names it: OpenAI tools, tool calls."""
    return items is None or (
        isinstance(items, list)
        and all(
            isinstance(item, dict)
            and (
                item.get("type", "function") != "function"
                or (isinstance(item.get("function"), dict) and isinstance(item["function"].get("name"), str))
            )
            for item in items
        )
    )


def server_tools(body: dict) -> list[str]:
    """What a request asks the provider to run itself: the types of its server tools (also among Codex's
    `additional_tools` input items), Anthropic's `mcp_servers`, OpenAI chat's `web_search_options`."""
    tools = body.get("tools") if isinstance(body.get("tools"), list) else []
    for item in body.get("input") if isinstance(body.get("input"), list) else []:
        if isinstance(item, dict) and item.get("type") == "additional_tools" and isinstance(item.get("tools"), list):
            tools = tools + item["tools"]
    found = [
        tool["type"]
        for tool in tools
        if isinstance(tool, dict)
        and isinstance(tool.get("type"), str)
        and not tool["type"].startswith(_CLIENT_RUN_TOOLS)
    ]
    asked = [field for field in ("mcp_servers", "web_search_options") if body.get(field) not in (None, [])]
    return list(dict.fromkeys(found + asked))


def validate(route: str, body: dict) -> None:
    """Checks the fields the policy itself reads; raises PolicyError naming the field. Everything else is the
    upstream's to judge."""
    _require(isinstance(body.get("stream"), bool | None), "'stream' must be true or false.")  # null: not given
    for field in (*OUTPUT_FIELDS, "n"):
        _whole_number(body.get(field), field)
    thinking = body.get("thinking")
    if isinstance(thinking, dict):
        _whole_number(thinking.get("budget_tokens"), "thinking.budget_tokens")
    if route == "openai.responses":
        _require(
            body.get("background") is not True,
            "This proxy does not run background responses ('background': true): it must see the answer to "
            "account for it. Stream the response instead.",
        )
    if route == "anthropic.chat_completions":
        _check_chat_messages(body)


def safe_pattern(pattern: str) -> re.Pattern:
    """A case-insensitive regular expression, refused if it can backtrack catastrophically."""
    if _NESTED_QUANTIFIER.search(pattern) or re.search(r"\\[1-9]", pattern):
        raise exceptions.OptionsError(f"REJECT_PHRASES pattern {pattern!r} could take exponential time; simplify it.")
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as error:
        raise exceptions.OptionsError(
            f"REJECT_PHRASES pattern {pattern!r} is not a valid expression: {error}."
        ) from None


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
        loader.add_option(
            "model_context_windows",
            Sequence[str],
            DEFAULT_CONTEXT_WINDOWS,
            "Context windows: model-pattern=tokens (or family=tokens), first match first.",
        )
        loader.add_option("allow_multiple_completions", bool, False, "Allow n > 1 (several answers per request).")
        loader.add_option(
            "allow_server_tools",
            bool,
            True,
            "Pass on tools the provider runs itself (web search, code execution, ...).",
        )
        loader.add_option("reject_phrases", Sequence[str], [], "Phrases refused anywhere in a prompt (any case).")
        loader.add_option("reject_phrases_regex", bool, False, "Treat REJECT_PHRASES as regular expressions.")
        loader.add_option("reject_disallowed", bool, False, "Refuse prompts with CJK ideographs, as the original.")
        loader.add_option(
            "reject_message",
            str,
            "This content violates /aicg/'s acceptable use policy.",
            "The sentence a refused prompt gets.",
        )

    def configure(self, updated):
        if updated & {"reject_phrases", "reject_phrases_regex"}:
            phrases = [phrase for phrase in ctx.options.reject_phrases if phrase.strip()]
            regex = ctx.options.reject_phrases_regex
            self.phrases = [
                safe_pattern(p) if regex else re.compile(re.escape(p.strip()), re.IGNORECASE) for p in phrases
            ]
        if "model_context_windows" in updated:
            self.windows = parse_family_numbers("model_context_windows", ctx.options.model_context_windows)
        for name in (
            "max_output_tokens_openai",
            "max_output_tokens_anthropic",
            "max_context_tokens_openai",
            "max_context_tokens_anthropic",
        ):
            if name in updated and getattr(ctx.options, name) < 0:
                raise exceptions.OptionsError(f"{name.upper()} must not be negative.")

    def running(self):
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
        state = flow_state(flow)
        body = parsed_body(flow)
        try:
            changed = await self._apply(route, state, body)
        except PolicyError as refusal:
            state.decision = "filtered" if refusal.code == "content_rejected" else "invalid_request"
            flow.response = error_response(route.dialect, 400, str(refusal), refusal.code)
            return
        if changed:  # a large body is serialised again only when the policy altered it
            flow.request.content = json.dumps(body).encode()

    async def _apply(self, route: Route, state: FlowState, body: dict) -> bool:
        """Checks and normalises `body` in place; returns whether it changed; raises PolicyError."""
        changed = False
        for field in REDIRECTING_FIELDS:
            if field in body:
                del body[field]
                changed = True
        validate(route.name, body)
        if (body.get("n") or 1) > 1 and not ctx.options.allow_multiple_completions:  # "n": null is absent
            raise PolicyError("This proxy answers one completion per request ('n' must be 1).", "n_not_allowed")
        if not ctx.options.allow_server_tools and not route.counts_tokens and (provider_run := server_tools(body)):
            raise PolicyError(
                f"This proxy does not pass on tools the provider runs itself "
                f"({', '.join(provider_run)}); send only tools your client runs.",
                "server_tools_not_allowed",
            )
        found = tokens.model_input(body)
        self._filter(found.texts + found.names)
        if route.counts_tokens:
            return changed
        output, capped = self._cap_output(route, body)
        count = lambda: tokens.count_prompt(route.api, state.model, found)  # noqa: E731
        if sum(map(len, found.texts)) > INLINE_COUNT_LIMIT:
            prompt = await asyncio.get_running_loop().run_in_executor(None, count)
        else:
            prompt = count()
        state.prompt_tokens = prompt.high
        anthropic = route.api == ANTHROPIC
        cap = ctx.options.max_context_tokens_anthropic if anthropic else ctx.options.max_context_tokens_openai
        if cap and prompt.high + output > cap:
            raise PolicyError(
                f"This request needs about {prompt.high} prompt + {output} output = {prompt.high + output} tokens, "
                f"more than the {cap} allowed here.",
                "context_length_exceeded",
            )
        window = self._window_of(state.model, state.family)
        if window and prompt.low > window:
            raise PolicyError(
                f"This prompt has at least {prompt.low} tokens, more than the {window}-token context window of "
                f"{state.model}.",
                "context_length_exceeded",
            )
        return changed or capped

    @staticmethod
    def _cap_output(route: Route, body: dict) -> tuple[int, bool]:
        """Applies the owner's output cap; returns (the request's output limit, or 0 when it names none; changed).

        A lowered Claude `max_tokens` lowers a thinking budget that no longer fits under it, or the upstream
        would refuse the request; when even the smallest budget does not fit, thinking is turned off."""
        if route.name not in _OUTPUT_FIELD:
            return 0, False
        field = _OUTPUT_FIELD[route.name]
        if route.name == "openai.chat_completions" and "max_tokens" in body and "max_completion_tokens" not in body:
            field = "max_tokens"  # the older name, still accepted; the cap applies to whichever is sent
        cap = (
            ctx.options.max_output_tokens_anthropic if route.api == ANTHROPIC else ctx.options.max_output_tokens_openai
        )
        if not cap or (body.get(field) is not None and body[field] <= cap):
            return body.get(field) or 0, False
        body[field] = cap
        thinking = body.get("thinking")
        if route.api == ANTHROPIC and isinstance(thinking, dict) and (thinking.get("budget_tokens") or 0) >= cap:
            if cap - 1 >= MIN_THINKING_BUDGET:
                thinking["budget_tokens"] = cap - 1
            else:
                body["thinking"] = {"type": "disabled"}
        return cap, True

    def _window_of(self, model: str, family: str) -> int:
        """The model's context window from MODEL_CONTEXT_WINDOWS (a model pattern or a family name); 0: unknown."""
        model = model.lower()
        return next(
            (
                tokens
                for name, tokens in self.windows.items()
                if name == family or fnmatch.fnmatchcase(model, name.lower())
            ),
            0,
        )

    def _filter(self, texts: list[str]) -> None:
        for text in texts:
            if any(phrase.search(text) for phrase in self.phrases) or (
                ctx.options.reject_disallowed and _CJK.search(text)
            ):
                raise PolicyError(ctx.options.reject_message, "content_rejected")
