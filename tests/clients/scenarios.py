"""What each client does in a recording and in the live tests: one function per scenario, returning the answer text.

The same functions run against the fake upstream directly (`record.py`) and through the proxy (the tests); `Bases`
says where each API lives. Prompts carry the fake upstream's directives (`#fake:tool=NAME`) so that the fake
answers with a tool call first and the client comes back with the tool's result.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import anthropic
import openai

from tests.clients import run_claude, run_codex, version

TOOL_OUTPUT = "fake-tool-ran"  # what every tool prints: the fake's Bash and exec calls, and our SDK tool results
OPENAI_MODEL = "gpt-4o"
ANTHROPIC_MODEL = "claude-sonnet-5"
THINKING = {"type": "enabled", "budget_tokens": 2048}
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER_PROMPT = "What is the weather in Paris? #fake:tool=get_weather"


class Bases(NamedTuple):
    """Base URLs as the clients take them: OpenAI's ends in /v1, Anthropic's does not."""

    openai: str
    anthropic: str


@dataclass(frozen=True)
class Scenario:
    name: str
    client: str  # as recorded in the fixture
    api: str  # "openai" or "anthropic": which of the proxy's routes its requests go to
    run: Callable[[Bases, str], str]  # (bases, key) -> the answer text

    def version(self) -> str:
        return CLIENT_VERSIONS[self.client]()


CLIENT_VERSIONS = {
    "claude-code": lambda: version("claude"),
    "codex-cli": lambda: version("codex"),
    "openai-python": lambda: openai.__version__,
    "anthropic-python": lambda: anthropic.__version__,
}


def _completed(process) -> str:
    assert process.returncode == 0, f"exit {process.returncode}:\n{process.stdout}\n{process.stderr}"
    return process.stdout.strip()


def claude_plain(bases: Bases, key: str) -> str:
    return _completed(run_claude(bases.anthropic, key, "say hi"))


def claude_tool(bases: Bases, key: str) -> str:
    return _completed(
        run_claude(bases.anthropic, key, "Run the command. #fake:tool=Bash", "--allowedTools", "Bash(echo:*)")
    )


def codex_plain(bases: Bases, key: str) -> str:
    return _completed(run_codex(bases.openai, key, "say hi"))


def codex_tool(bases: Bases, key: str) -> str:
    return _completed(run_codex(bases.openai, key, "Run the script. #fake:tool=exec"))


def _openai(bases: Bases, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=bases.openai, api_key=key, max_retries=0)


def _anthropic(bases: Bases, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=bases.anthropic, api_key=key, max_retries=0)


def _required(value, what: str):
    assert value, f"the upstream answered without {what}"
    return value


CHAT_TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER_SCHEMA},
    }
]


def openai_chat_tool(bases: Bases, key: str) -> str:
    """A function tool turn the way OpenAI's docs write it: the assistant message goes back as it came."""
    client = _openai(bases, key)
    messages = [{"role": "user", "content": WEATHER_PROMPT}]
    first = client.chat.completions.create(model=OPENAI_MODEL, messages=messages, tools=CHAT_TOOLS)
    (call,) = _required(first.choices[0].message.tool_calls, "a tool call")
    messages += [first.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": TOOL_OUTPUT}]
    second = client.chat.completions.create(model=OPENAI_MODEL, messages=messages, tools=CHAT_TOOLS)
    return second.choices[0].message.content


def openai_chat_tool_stream(bases: Bases, key: str) -> str:
    """The same turn streamed, with the SDK's stream helper assembling the tool call from its deltas.

    The assistant turn is written out: the helper's message object carries client-side fields (`parsed`).
    """
    client = _openai(bases, key)
    messages = [{"role": "user", "content": WEATHER_PROMPT}]
    with client.chat.completions.stream(model=OPENAI_MODEL, messages=messages, tools=CHAT_TOOLS) as stream:
        first = stream.get_final_completion().choices[0].message
    (call,) = _required(first.tool_calls, "a tool call")
    function = {"name": call.function.name, "arguments": call.function.arguments}
    messages += [
        {"role": "assistant", "tool_calls": [{"id": call.id, "type": "function", "function": function}]},
        {"role": "tool", "tool_call_id": call.id, "content": TOOL_OUTPUT},
    ]
    with client.chat.completions.stream(model=OPENAI_MODEL, messages=messages, tools=CHAT_TOOLS) as stream:
        return stream.get_final_completion().choices[0].message.content


RESPONSES_TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": WEATHER_SCHEMA,
        "strict": True,
    }
]


def openai_responses_tool(bases: Bases, key: str) -> str:
    """A Responses function tool turn: the output items go back as input, then the call's output."""
    client = _openai(bases, key)
    turn = [{"role": "user", "content": WEATHER_PROMPT}]
    first = client.responses.create(model=OPENAI_MODEL, input=turn, tools=RESPONSES_TOOLS)
    call = _required([item for item in first.output if item.type == "function_call"], "a function call")[0]
    turn += [*first.output, {"type": "function_call_output", "call_id": call.call_id, "output": TOOL_OUTPUT}]
    return client.responses.create(model=OPENAI_MODEL, input=turn, tools=RESPONSES_TOOLS).output_text


def openai_responses_stream(bases: Bases, key: str) -> str:
    """Streamed to the end: the helper raises unless `response.completed` arrives."""
    with _openai(bases, key).responses.stream(model=OPENAI_MODEL, input="Hello", instructions="Be brief.") as stream:
        return stream.get_final_response().output_text


ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER_SCHEMA}]


def _tool_result_turn(content) -> list[dict]:
    """The assistant's blocks as they came (thinking with its signature included), then the tool's result."""
    tool_use = _required([block for block in content if block.type == "tool_use"], "a tool_use block")[0]
    return [
        {"role": "assistant", "content": content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": TOOL_OUTPUT}]},
    ]


def anthropic_tool_thinking(bases: Bases, key: str) -> str:
    client = _anthropic(bases, key)
    request = {"model": ANTHROPIC_MODEL, "max_tokens": 4096, "thinking": THINKING, "tools": ANTHROPIC_TOOLS}
    messages = [{"role": "user", "content": WEATHER_PROMPT}]
    first = client.messages.create(**request, messages=messages)
    second = client.messages.create(**request, messages=messages + _tool_result_turn(first.content))
    return "".join(block.text for block in second.content if block.type == "text")


def anthropic_tool_thinking_stream(bases: Bases, key: str) -> str:
    client = _anthropic(bases, key)
    request = {"model": ANTHROPIC_MODEL, "max_tokens": 4096, "thinking": THINKING, "tools": ANTHROPIC_TOOLS}
    messages = [{"role": "user", "content": WEATHER_PROMPT}]
    with client.messages.stream(**request, messages=messages) as stream:
        first = stream.get_final_message()
    with client.messages.stream(**request, messages=messages + _tool_result_turn(first.content)) as stream:
        return "".join(stream.text_stream)


def anthropic_count_tokens(bases: Bases, key: str) -> str:
    counted = _anthropic(bases, key).messages.count_tokens(
        model=ANTHROPIC_MODEL,
        system="Be brief.",
        tools=ANTHROPIC_TOOLS,
        thinking=THINKING,
        messages=[{"role": "user", "content": "Hello"}],
    )
    return str(counted.input_tokens)


SCENARIOS = {
    scenario.name: scenario
    for scenario in [
        Scenario("claude-plain", "claude-code", "anthropic", claude_plain),
        Scenario("claude-tool", "claude-code", "anthropic", claude_tool),
        Scenario("codex-plain", "codex-cli", "openai", codex_plain),
        Scenario("codex-tool", "codex-cli", "openai", codex_tool),
        Scenario("openai-chat-tool", "openai-python", "openai", openai_chat_tool),
        Scenario("openai-chat-tool-stream", "openai-python", "openai", openai_chat_tool_stream),
        Scenario("openai-responses-tool", "openai-python", "openai", openai_responses_tool),
        Scenario("openai-responses-stream", "openai-python", "openai", openai_responses_stream),
        Scenario("anthropic-tool-thinking", "anthropic-python", "anthropic", anthropic_tool_thinking),
        Scenario("anthropic-tool-thinking-stream", "anthropic-python", "anthropic", anthropic_tool_thinking_stream),
        Scenario("anthropic-count-tokens", "anthropic-python", "anthropic", anthropic_count_tokens),
    ]
}
