"""What the request policy checks and changes in a request body, as plain functions: the fields it reads, the
output cap, the context windows, the prompt filter.

The upstream is the authority on what a valid request is: the APIs change every month, and a proxy that holds a
frozen model of them refuses the newest clients. So the policy checks only the fields it reads itself (output
caps, `stream`, `n`, thinking budgets) and leaves every other field, role and block type as the client sent it;
the filter and the token count walk the whole body generically (`tokens.model_input`). Fields that would redirect
or re-authenticate a call (`api_base`, `api_key`, ...) are removed: they never decide where a request goes or which
key it uses, and the upstream would only reject them.
"""

import fnmatch
import re
from collections.abc import Sequence

from llmproxy.api import ANTHROPIC
from llmproxy.api.routes import Route
from llmproxy.config import ConfigError

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
# Endpoints whose output is capped, by Route.form: the body field with the output cap.
_OUTPUT_FIELD = {
    "openai.chat_completions": "max_completion_tokens",
    "openai.completions": "max_tokens",
    "openai.responses": "max_output_tokens",
    "anthropic.messages": "max_tokens",
    "anthropic.complete": "max_tokens_to_sample",
    "anthropic.chat_completions": "max_tokens",
    "gemini.generate_content": "generationConfig.maxOutputTokens",
    "gemini.stream_generate_content": "generationConfig.maxOutputTokens",
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
    if isinstance(config := body.get("generationConfig"), dict):  # Gemini's
        _whole_number(config.get("maxOutputTokens"), "generationConfig.maxOutputTokens")
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
        raise ConfigError(f"REJECT_PHRASES pattern {pattern!r} could take exponential time; simplify it.")
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as error:
        raise ConfigError(f"REJECT_PHRASES pattern {pattern!r} is not a valid expression: {error}.") from None


def reject_patterns(phrases: Sequence[str], regex: bool) -> list[re.Pattern]:
    """REJECT_PHRASES as case-insensitive patterns: literal phrases, or (with `regex`) regular expressions."""
    return [
        safe_pattern(phrase) if regex else re.compile(re.escape(phrase.strip()), re.IGNORECASE)
        for phrase in phrases
        if phrase.strip()
    ]


def is_rejected(texts: list[str], phrases: list[re.Pattern], reject_cjk: bool) -> bool:
    """Whether a text holds a refused phrase or, with `reject_cjk` (the original's REJECT_DISALLOWED), a CJK
    ideograph."""
    if not phrases and not reject_cjk:
        return False
    return any(any(phrase.search(text) for phrase in phrases) or (reject_cjk and _CJK.search(text)) for text in texts)


def cap_output(route: Route, body: dict, cap: int) -> tuple[int, bool]:
    """Applies the owner's output cap (0: none) to `body`; returns (the request's output limit, or 0 when it names
    none; changed).

    A lowered Claude `max_tokens` lowers a thinking budget that no longer fits under it, or the upstream would
    refuse the request; when even the smallest budget does not fit, thinking is turned off."""
    if route.form not in _OUTPUT_FIELD:
        return 0, False
    field = _OUTPUT_FIELD[route.form]
    if route.form == "openai.chat_completions" and "max_tokens" in body and "max_completion_tokens" not in body:
        field = "max_tokens"  # the older name, still accepted; the cap applies to whichever is sent
    config, _, field = field.rpartition(".")  # Gemini's sits in generationConfig
    holder = body.get(config, {}) if config else body
    if not isinstance(holder, dict):  # no object where Gemini's config belongs: the upstream refuses it, not the cap
        return 0, False
    if not cap or (holder.get(field) is not None and holder[field] <= cap):
        return holder.get(field) or 0, False
    (body.setdefault(config, holder) if config else body)[field] = cap
    thinking = body.get("thinking")
    if route.wire == ANTHROPIC and isinstance(thinking, dict) and (thinking.get("budget_tokens") or 0) >= cap:
        if cap - 1 >= MIN_THINKING_BUDGET:
            thinking["budget_tokens"] = cap - 1
        else:
            body["thinking"] = {"type": "disabled"}
    return cap, True


def context_window(windows: dict[str, int], model: str, family: str) -> int:
    """The model's context window from MODEL_CONTEXT_WINDOWS (a model pattern or a family name); 0: unknown."""
    model = model.lower()
    return next(
        (tokens for name, tokens in windows.items() if name == family or fnmatch.fnmatchcase(model, name.lower())),
        0,
    )
