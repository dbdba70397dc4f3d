"""The request policy on each forwarded request (llmproxy/policy.py): one completion, bounded output and context,
and no refused phrase anywhere the model will read.

Runs after the model's family is known and before the rate limit counts the request, so that a refused request
costs its sender nothing.
"""

import asyncio
import functools
import json
import logging
import re
from collections.abc import Sequence

from mitmproxy import ctx, exceptions, http

from addons.apierrors import error_response, fail_closed, refuses_config_errors
from addons.flowstate import flow_state, forward_route, parsed_body
from llmproxy import tokens
from llmproxy.api import ANTHROPIC, GEMINI, OPENAI
from llmproxy.api.routes import Route
from llmproxy.families import parse_family_numbers
from llmproxy.flowstate import FlowState
from llmproxy.policy import (
    DEFAULT_CONTEXT_WINDOWS,
    REDIRECTING_FIELDS,
    PolicyError,
    cap_output,
    context_window,
    is_rejected,
    reject_patterns,
    server_tools,
    validate,
)

logger = logging.getLogger(__name__)

INLINE_COUNT_LIMIT = 20_000  # characters; longer prompts are counted on a worker thread, off the event loop


# Whose output and context caps a dialect's requests get: Azure's and the compatible services' are OpenAI's, Bedrock's
# and Vertex's Claude Anthropic's.
_CAPS = {OPENAI: "openai", ANTHROPIC: "anthropic", GEMINI: "google_ai"}


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
        loader.add_option("max_output_tokens_google_ai", int, 0, "Cap on output tokens of Gemini requests; 0: none.")
        loader.add_option("max_context_tokens_google_ai", int, 0, "Cap on prompt + output tokens (Gemini); 0: none.")
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

    @refuses_config_errors
    def configure(self, updated):
        if updated & {"reject_phrases", "reject_phrases_regex"}:
            self.phrases = reject_patterns(ctx.options.reject_phrases, ctx.options.reject_phrases_regex)
        if "model_context_windows" in updated:
            self.windows = parse_family_numbers("model_context_windows", ctx.options.model_context_windows)
        for name in (
            "max_output_tokens_openai",
            "max_output_tokens_anthropic",
            "max_context_tokens_openai",
            "max_context_tokens_anthropic",
            "max_output_tokens_google_ai",
            "max_context_tokens_google_ai",
        ):
            if name in updated and getattr(ctx.options, name) < 0:
                raise exceptions.OptionsError(f"{name.upper()} must not be negative.")

    def running(self):
        # The vocabularies load when a prompt first needs counting; that they can is known now.
        if missing := tokens.missing_vocabularies():
            logger.error(
                "The tokenizers cannot be loaded offline (%s missing); reinstall the pinned requirements.",
                ", ".join(missing),
            )

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
        validate(route.form, body)
        if (body.get("n") or 1) > 1 and not ctx.options.allow_multiple_completions:  # "n": null is absent
            raise PolicyError("This proxy answers one completion per request ('n' must be 1).", "n_not_allowed")
        if not ctx.options.allow_server_tools and not route.counts_tokens and (provider_run := server_tools(body)):
            raise PolicyError(
                f"This proxy does not pass on tools the provider runs itself "
                f"({', '.join(provider_run)}); send only tools your client runs.",
                "server_tools_not_allowed",
            )
        found = tokens.model_input(body)
        if is_rejected(found.texts + found.names, self.phrases, ctx.options.reject_disallowed):
            raise PolicyError(ctx.options.reject_message, "content_rejected")
        if route.counts_tokens:
            return changed
        caps = _CAPS[route.wire]
        output, capped = cap_output(route, body, getattr(ctx.options, f"max_output_tokens_{caps}"))
        cap = getattr(ctx.options, f"max_context_tokens_{caps}")
        window = context_window(self.windows, state.model, state.family)
        # Counting needs the model's vocabulary in memory (21-43 MB each). A user's token quota reserves the count;
        # otherwise the prompt is counted only when its bytes, an upper bound of its tokens, might not fit.
        prompt = tokens.bound_prompt(route.wire, found)
        if state.user or (cap and prompt.high + output > cap) or (window and prompt.high > window):
            prompt = await self._count(route.wire, state.model, found)
        state.prompt_tokens = prompt.high
        if cap and prompt.high + output > cap:
            raise PolicyError(
                f"This request needs about {prompt.high} prompt + {output} output = {prompt.high + output} tokens, "
                f"more than the {cap} allowed here.",
                "context_length_exceeded",
            )
        if window and prompt.low > window:
            raise PolicyError(
                f"This prompt has at least {prompt.low} tokens, more than the {window}-token context window of "
                f"{state.model}.",
                "context_length_exceeded",
            )
        return changed or capped

    @staticmethod
    async def _count(api: str, model: str, found: tokens.ModelInput) -> tokens.Estimate:
        """The prompt's count; on a worker thread when it is long or the vocabulary still has to load."""
        count = functools.partial(tokens.count_prompt, api, model, found)
        if sum(map(len, found.texts)) > INLINE_COUNT_LIMIT or not tokens.is_loaded(tokens.encoding_for(api, model)):
            return await asyncio.get_running_loop().run_in_executor(None, count)
        return count()
