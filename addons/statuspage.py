"""The proxy's own pages: `/health`, `/status` (JSON) and `/` (the same facts as HTML)."""

import json
import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from mitmproxy import ctx, http

from addons.apierrors import fail_closed, refuses_config_errors
from addons.dispatcher import Dispatcher
from addons.flowstate import flow_state
from addons.modelfamilies import ModelFamilies
from llmproxy.api import ANTHROPIC
from llmproxy.pool.checker import KeyChecker
from llmproxy.pool.keys import KeyPool
from llmproxy.pool.queue import WaitQueue
from llmproxy.pricing import format_usd, usd
from llmproxy.services.base import Service
from llmproxy.store.storage import Storage
from llmproxy.web import pages

_HOST = re.compile(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")


def git_build() -> str:
    """`<short sha>` of the checkout, with ` (modified)` when it has local changes; `unknown` without git."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=2, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=2,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}{' (modified)' if dirty else ''}" if sha else "unknown"


FACTS_CACHE_SECONDS = 1.5
_FAMILY_FIELDS = ("activeKeys", "revokedKeys", "overQuotaKeys", "proomptersInQueue", "estimatedQueueTime")
# The page's key figures and the KeyPool.counts state each one shows.
_KEY_FIELDS = {"activeKeys": "active", "revokedKeys": "revoked", "overQuotaKeys": "overQuota"}
# The original's page tags for families it grouped differently: gpt432k is gpt4-32k, anthropic is every Claude family.
_TAG_ALIASES = {"gpt432k": ["gpt4-32k"], "anthropic": ["claude", "claude-opus", "claude-sonnet", "claude-haiku"]}


class StatusPage:
    """Serves the health check and the status page (default, or the owner's PAGE_BODY template). The requests
    served are the dispatcher's count."""

    def __init__(
        self,
        services: Sequence[Service],
        storage: Storage,
        pool: KeyPool,
        queue: WaitQueue,
        checker: KeyChecker,
        families: ModelFamilies,
        dispatcher: Dispatcher,
    ):
        self.services = services
        # The header's row per service: its name, and the setting that adds its keys (shown while it has none).
        self.header_rows = {
            service.name: {"name": service.title, "key_setting": service.key_setting.upper()} for service in services
        }
        self.storage = storage
        self.pool = pool
        self.queue = queue
        self.checker = checker
        self.families = families
        self.dispatcher = dispatcher
        self.started = time.time()
        self.build = ""
        self.template = ""
        self._cached: tuple[float, dict, dict] | None = None

    def load(self, loader):
        loader.add_option("server_title", str, "LLM key-sharing proxy", "Title of the status page.")
        loader.add_option("build_info", str, "", "Build shown on the status page; empty means the git commit.")
        loader.add_option("page_body", str, "", "Base64 HTML replacing the status page; {tags} are filled in.")
        loader.add_option("show_token_costs", bool, False, "Show tokens and their cost per family on the status page.")

    @refuses_config_errors
    def configure(self, updated):
        if "build_info" in updated:
            self.build = ctx.options.build_info or git_build()
        if "page_body" in updated:
            self.template = pages.decode_page_body(ctx.options.page_body) if ctx.options.page_body else ""

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        state = flow_state(flow)
        if state.route_name == "health":
            if self.storage.healthy():
                flow.response = http.Response.make(200, b"OK", {"content-type": "text/plain"})
            else:
                flow.response = http.Response.make(503, b"store unavailable", {"content-type": "text/plain"})
        elif state.route_name == "status":
            body = json.dumps(self.facts(flow.request), indent=2)
            flow.response = http.Response.make(200, body, {"content-type": "application/json"})
        elif state.route_name == "status_page":
            body = self.page(self.facts(flow.request))
            flow.response = http.Response.make(200, body, {"content-type": "text/html; charset=utf-8"})
        else:
            return
        state.decision = "local"

    def facts(self, request: http.Request) -> dict:
        """Everything the page shows. Public by design: never a key, a token or an address of a user."""
        now = time.time()
        if self._cached is None or now - self._cached[0] > FACTS_CACHE_SECONDS:
            self._cached = (now, *self._gather())
        base = self._base_url(request)
        return {**self._cached[1], "endpoints": {s.name: f"{base}{s.client_base}" for s in self.services}}

    def _gather(self) -> tuple[dict, dict]:
        """(the page's facts, what only a PAGE_BODY template needs: every family and the users), cached together."""
        pool, served, store = self.pool, self.dispatcher.served, self.storage.store
        counters = store.counters()
        facts = {
            "title": ctx.options.server_title,
            "uptime": int(time.time() - self.started),
            "build": self.build,
            "requestsServed": sum(served.values()),
            "proompts": counters.get("prompts", 0),
            "tookens": counters.get("tokens", 0),
            "proomptersNow": store.active_identities(60),
            **{f"{service.name}Keys": pool.counts(service.name)["total"] for service in self.services},
            "status": self.checker.status,
        }
        for service in self.services:
            facts[service.name] = {"keys": pool.counts(service.name), "requestsServed": served[service.name]}
        every_family, with_keys = self.family_facts()
        if ctx.options.show_token_costs:
            facts["costUsd"] = usd(counters.get("cost_nanousd", 0))
            for family, figures in every_family.items():
                figures.update(
                    tokens=counters.get(f"tokens:{family}", 0), costUsd=usd(counters.get(f"cost_nanousd:{family}", 0))
                )
        facts["families"] = {family: every_family[family] for family in with_keys}
        facts["config"] = self.public_config()
        template_only = {"families": every_family, "users": store.list_users() if self.template else []}
        return facts, template_only

    def family_facts(self) -> tuple[dict, list[str]]:
        """Per model family: key states, requests waiting and the estimated wait; and the families with keys."""
        pool, queue = self.pool, self.queue
        facts, with_keys = {}, []
        for service in self.services:
            for family in self.families.all_families(service.name):
                keys = pool.counts(service.name, family)
                wait = queue.estimated_wait(service.name, family)
                if keys["total"]:
                    with_keys.append(family)
                facts[family] = {
                    **{field: keys[state] for field, state in _KEY_FIELDS.items()},
                    "proomptersInQueue": len(queue.queue(service.name, family)),
                    "estimatedQueueTime": pages.format_wait(wait),
                    "estimatedQueueSeconds": round(wait),
                }
        return facts, with_keys

    @staticmethod
    def public_config() -> dict:
        """The settings users may know, as strings (the original's names)."""
        options = ctx.options
        return {
            "gatekeeper": options.gatekeeper,
            "modelRateLimit": str(options.model_rate_limit),
            "maxContextTokensOpenAI": str(options.max_context_tokens_openai),
            "maxContextTokensAnthropic": str(options.max_context_tokens_anthropic),
            "maxOutputTokensOpenAI": str(options.max_output_tokens_openai),
            "maxOutputTokensAnthropic": str(options.max_output_tokens_anthropic),
            "rejectDisallowed": str(options.reject_disallowed).lower(),
            "rejectMessage": options.reject_message,
            "promptLogging": str(options.prompt_logging).lower(),
            "queueMode": options.queue_mode,
            "turboOnly": str(options.turbo_only).lower(),
            "allowedModelFamilies": ", ".join(options.allowed_model_families) or "all",
            "captchaMode": options.captcha_mode,
        }

    def page(self, facts: dict) -> str:
        """The owner's PAGE_BODY with its tags filled in, else the default page."""
        if not self.template:
            return pages.status_page(facts, self.header_rows, format_usd)
        return pages.page_body(self.template, self.tag_values(facts), pages.header_html(facts, self.header_rows))

    def tag_values(self, facts: dict) -> dict[str, str]:
        """PAGE_BODY's tags and their values as plain text (the renderer escapes them); all but {headerHtml}."""
        values = {
            key: str(facts[key])
            for key in (
                "uptime",
                "title",
                "build",
                "proompts",
                "tookens",
                "proomptersNow",
                "status",
                *(f"{service.name}Keys" for service in self.services),
            )
        }
        values.update({f"endpoints:{api}": url for api, url in facts["endpoints"].items()})
        values.update({f"config:{name}": value for name, value in facts["config"].items()})
        values["config:page_body"] = self.template
        template_only = self._cached[2]
        families = dict(template_only["families"])
        for tag, members in _TAG_ALIASES.items():
            group = [families[m] for m in members if m in families]
            families[tag] = {field: sum(f[field] for f in group) for field in _FAMILY_FIELDS[:4]}
            families[tag]["estimatedQueueTime"] = pages.format_wait(
                max((f["estimatedQueueSeconds"] for f in group), default=0)
            )
        # The sum above counts a key serving four Claude families four times; the service's tag counts it once.
        families[ANTHROPIC].update({field: facts[ANTHROPIC]["keys"][state] for field, state in _KEY_FIELDS.items()})
        values.update(
            {
                f"{family}:{field}": str(figures[field])
                for family, figures in families.items()
                for field in _FAMILY_FIELDS
            }
        )
        values.update(self._cost_tags(facts, families))
        users = template_only["users"]
        values["user:data"] = json.dumps(
            [
                {
                    "nickname": u["nickname"],
                    "type": u["type"],
                    "promptCount": u["prompt_count"],
                    "createdAt": u["created_at"],
                    "lastUsedAt": u["last_used_at"],
                }
                for u in users
            ]
        )
        values["user:aliases"] = json.dumps([u["nickname"] for u in users if u["nickname"]])
        values["JSON"] = json.dumps(facts, indent=2)
        return values

    @staticmethod
    def _cost_tags(facts: dict, families: dict) -> dict[str, str]:
        """{cost}, {FAMILY:tokens} and {FAMILY:cost}; empty unless SHOW_TOKEN_COSTS is on."""
        shown = "costUsd" in facts
        tags = {"cost": format_usd(facts["costUsd"]) if shown else ""}
        for family in families:
            members = [families[m] for m in _TAG_ALIASES.get(family, [family]) if m in families]
            tokens, cost = (sum(member.get(field, 0) for member in members) for field in ("tokens", "costUsd"))
            tags[f"{family}:tokens"], tags[f"{family}:cost"] = (str(tokens), format_usd(cost)) if shown else ("", "")
        return tags

    @staticmethod
    def _base_url(request: http.Request) -> str:
        """The address the client reached us at; the Host header is used only when it looks like a host."""
        host = request.headers.get("host", "")
        if not _HOST.fullmatch(host):
            host = f"{request.host}:{request.port}"
        scheme = "https" if request.scheme == "https" else "http"
        return f"{scheme}://{host}"
