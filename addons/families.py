"""Model families: groups of models that share keys, limits and a queue.

A family table per service maps model-name patterns to family names, first match first; the last entry of
each table is that service's fallback family and catches the service's other model names. A model no entry
matches is unknown and refused.
"""

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from mitmproxy import ctx, exceptions, http

from addons.apierrors import ANTHROPIC, OPENAI, error_response, fail_closed
from addons.body import BodyError, parsed_body
from addons.flowstate import flow_state
from addons.routes import forward_route

DEFAULT_OPENAI_FAMILIES = [
    "gpt6=gpt-6*",
    "gpt5=gpt-5*",
    "gpt4.1=gpt-4.1*",
    "gpt4o=gpt-4o*|chatgpt-4o*",
    "gpt4-32k=gpt-4-32k*",
    "gpt4-turbo=gpt-4-turbo*|gpt-4-*-preview|gpt-4-vision*",
    "gpt4=gpt-4|gpt-4-0*",
    "o=o[0-9]*|codex-*",
    "embeddings=text-embedding-*",
    "turbo=gpt-*|chatgpt-*|davinci-*|babbage-*",
]
DEFAULT_ANTHROPIC_FAMILIES = [
    "claude-opus=claude-opus-*|claude-*-opus*",
    "claude-sonnet=claude-sonnet-*|claude-*-sonnet*",
    "claude-haiku=claude-haiku-*|claude-*-haiku*",
    "claude=claude-*",
]
# Names the original project used in settings; each stands for the families it covered there.
LEGACY_ALIASES = {
    "claude": ["claude", "claude-opus", "claude-sonnet", "claude-haiku"],
    "gpt432k": ["gpt4-32k"],
}


@dataclass(frozen=True)
class FamilyRule:
    family: str
    patterns: tuple[str, ...]

    def matches(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.patterns)


def parse_table(name: str, entries: Sequence[str]) -> list[FamilyRule]:
    """`family=pattern|pattern` entries, in order."""
    rules = []
    for entry in entries:
        family, sep, patterns = entry.partition("=")
        if not sep or not family.strip() or not patterns.strip():
            raise exceptions.OptionsError(f"{name.upper()} entries look like family=pattern|pattern, not {entry!r}.")
        rules.append(FamilyRule(family.strip(), tuple(p.strip().lower() for p in patterns.split("|") if p.strip())))
    if not rules:
        raise exceptions.OptionsError(f"{name.upper()} needs at least one family.")
    return rules


def parse_family_numbers(name: str, entries: Sequence[str]) -> dict[str, int]:
    """`family=number` entries (token quotas, context windows) as a mapping."""
    numbers = {}
    for entry in entries:
        family, _, number = entry.partition("=")
        if not number.strip().isdigit():
            raise exceptions.OptionsError(f"{name.upper()} entries look like family=tokens, not {entry!r}.")
        numbers[family.strip()] = int(number)
    return numbers


class ModelFamilies:
    """Reads the requested model, names its family, and refuses unknown or disallowed models."""

    def __init__(self):
        self.tables: dict[str, list[FamilyRule]] = {}
        self.allowed: set[str] | None = None

    def load(self, loader):
        loader.add_option(
            "openai_model_families",
            Sequence[str],
            DEFAULT_OPENAI_FAMILIES,
            "OpenAI family table: family=pattern|pattern, first match wins, the last entry is the fallback.",
        )
        loader.add_option(
            "anthropic_model_families",
            Sequence[str],
            DEFAULT_ANTHROPIC_FAMILIES,
            "Anthropic family table: family=pattern|pattern, first match wins, the last entry is the fallback.",
        )
        loader.add_option(
            "allowed_model_families",
            Sequence[str],
            [],
            "Families users may request; empty means all. The original's names (turbo, gpt4, claude) work.",
        )
        loader.add_option("turbo_only", bool, False, "Allow only the turbo family of OpenAI models.")

    def configure(self, updated):
        for api in (OPENAI, ANTHROPIC):
            name = f"{api}_model_families"
            if name in updated:
                self.tables[api] = parse_table(name, getattr(ctx.options, name))
        if updated & {"allowed_model_families", "openai_model_families", "anthropic_model_families"}:
            known = self.all_families()
            requested = [family.strip() for family in ctx.options.allowed_model_families if family.strip()]
            expanded = {member for family in requested for member in LEGACY_ALIASES.get(family, [family])}
            if unknown := sorted(expanded - set(known)):
                raise exceptions.OptionsError(f"ALLOWED_MODEL_FAMILIES names an unknown family: {unknown[0]!r}.")
            self.allowed = expanded or None

    def all_families(self, api: str | None = None) -> list[str]:
        """Family names in table order, of one service or of both."""
        apis = [api] if api else [OPENAI, ANTHROPIC]
        return list(dict.fromkeys(rule.family for a in apis for rule in self.tables[a]))

    def family_of(self, api: str, model: str) -> str | None:
        """The family of `model`, or None when no entry of the service's table matches it."""
        model = model.lower()
        return next((rule.family for rule in self.tables[api] if rule.matches(model)), None)

    def is_allowed(self, api: str, family: str) -> bool:
        if ctx.options.turbo_only and api == OPENAI and family != "turbo":
            return False
        return self.allowed is None or family in self.allowed

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if (route := forward_route(flow)) is None:
            return
        state = flow_state(flow)
        try:
            body = parsed_body(flow)
        except BodyError as error:
            state.decision = "bad_request"
            flow.response = error_response(route.dialect, 400, str(error), "invalid_body")
            return
        model = body.get("model")
        if not isinstance(model, str) or not model:
            state.decision = "bad_request"
            flow.response = error_response(route.dialect, 400, "The request must name a model.", "model_missing")
            return
        family = self.family_of(route.api, model)
        state.model, state.stream = model[:100], body.get("stream") is True
        if family is None:
            state.decision = "unknown_model"
            flow.response = error_response(
                route.dialect, 400, f"This proxy does not know the model {model[:100]!r}.", "model_not_found"
            )
            return
        state.family = family
        if not self.is_allowed(route.api, family):
            state.decision = "family_not_allowed"
            flow.response = error_response(
                route.dialect,
                403,
                f"Models of the {family} family are not available on this proxy.",
                "model_family_not_allowed",
            )
