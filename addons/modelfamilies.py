"""Model families (llmproxy/families.py): the requested model's family names the keys, limits and queue that serve it;
a model no table entry matches, or of a family the owner did not allow, is refused."""

from collections.abc import Sequence

from mitmproxy import ctx, exceptions, http

from addons.apierrors import error_response, fail_closed, refuses_config_errors
from addons.flowstate import flow_state, forward_route, parsed_body
from llmproxy.api import OPENAI
from llmproxy.api.body import BodyError
from llmproxy.families import LEGACY_ALIASES, FamilyRule, parse_table
from llmproxy.services.base import Service


class ModelFamilies:
    """Reads the requested model, names its family, and refuses unknown or disallowed models."""

    def __init__(self, services: Sequence[Service]):
        self.services = services
        self.tables: dict[str, list[FamilyRule]] = {}
        self.allowed: set[str] | None = None

    def load(self, loader):
        for service in self.services:
            loader.add_option(
                f"{service.option_prefix}_model_families",
                Sequence[str],
                list(service.families),
                f"{service.title} family table: family=pattern|pattern, first match wins, the last entry is the "
                "fallback.",
            )
        loader.add_option(
            "allowed_model_families",
            Sequence[str],
            [],
            "Families users may request; empty means all. The original's names (turbo, gpt4, claude) work.",
        )
        loader.add_option("turbo_only", bool, False, "Allow only the turbo family of OpenAI models.")

    @refuses_config_errors
    def configure(self, updated):
        tables = {f"{service.option_prefix}_model_families": service.name for service in self.services}
        for name, service in tables.items():
            if name in updated:
                self.tables[service] = parse_table(name, getattr(ctx.options, name))
        if "allowed_model_families" in updated or updated & tables.keys():
            known = self.all_families()
            requested = [family.strip() for family in ctx.options.allowed_model_families if family.strip()]
            expanded = {member for family in requested for member in LEGACY_ALIASES.get(family, [family])}
            if unknown := sorted(expanded - set(known)):
                raise exceptions.OptionsError(f"ALLOWED_MODEL_FAMILIES names an unknown family: {unknown[0]!r}.")
            self.allowed = expanded or None

    def all_families(self, service: str | None = None) -> list[str]:
        """Family names in table order, of one service or of all."""
        names = [service] if service else [s.name for s in self.services]
        return list(dict.fromkeys(rule.family for name in names for rule in self.tables[name]))

    def family_of(self, service: str, model: str) -> str | None:
        """The family of `model`, or None when no entry of the service's table matches it."""
        model = model.lower()
        return next((rule.family for rule in self.tables[service] if rule.matches(model)), None)

    def is_allowed(self, service: str, family: str) -> bool:
        if ctx.options.turbo_only and service == OPENAI and family != "turbo":
            return False
        return self.allowed is None or family in self.allowed

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if (route := forward_route(flow)) is None:
            return
        state = flow_state(flow)
        try:
            body = parsed_body(flow)
        except BodyError as error:
            state.decision = "bad_request"
            flow.response = error_response(route.dialect, 400, str(error), "invalid_body")
            return
        model = state.path_model or body.get("model")
        if not isinstance(model, str) or not model:
            state.decision = "bad_request"
            flow.response = error_response(route.dialect, 400, "The request must name a model.", "model_missing")
            return
        family = self.family_of(route.service, model)
        state.model, state.stream = model[:100], route.streams or body.get("stream") is True
        if family is None:
            state.decision = "unknown_model"
            flow.response = error_response(
                route.dialect, 400, f"This proxy does not know the model {model[:100]!r}.", "model_not_found"
            )
            return
        state.family = family
        if not self.is_allowed(route.service, family):
            state.decision = "family_not_allowed"
            flow.response = error_response(
                route.dialect,
                403,
                f"Models of the {family} family are not available on this proxy.",
                "model_family_not_allowed",
            )
