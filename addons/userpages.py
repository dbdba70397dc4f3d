"""The users' web pages under /user: their own usage by token, and temporary tokens by proof of work.

A token is posted in a form, never put in a URL, and taken off the flow once read. Wrong tokens are limited per
address, so that the page cannot be used to guess tokens. With CAPTCHA_MODE=proof_of_work, /user/captcha hands
out temporary tokens to browsers that solved a SHA-256 challenge (llmproxy/web/proofofwork.py); the limits per
address (challenges an hour, tokens per token lifetime) are sliding windows of the store, shared by instances.
"""

import asyncio
import json
import logging
import math
import secrets
import time

from mitmproxy import ctx, exceptions, http

from addons.apierrors import error_response, fail_closed, refuses_config_errors
from addons.flowstate import flow_state
from addons.gatekeeper import client_ip
from addons.quotakeeper import QuotaKeeper
from addons.webpages import form_with_secret, html_response, json_response, redirect, script_nonce
from llmproxy.admin import expired_temporary_users, own_usage
from llmproxy.api import OPENAI
from llmproxy.api.routes import request_path
from llmproxy.identity import identity_digest, user_of_token
from llmproxy.pricing import format_usd
from llmproxy.quota import next_refresh
from llmproxy.store.base import EXPIRED_REASON
from llmproxy.store.storage import Storage
from llmproxy.web import pages
from llmproxy.web.proofofwork import LEVELS, ProofRefused, check_solution, difficulty_bits, new_challenge
from llmproxy.web.signing import Signer

logger = logging.getLogger(__name__)

CAPTCHA_MODES = ("none", "proof_of_work")
# Wrong tokens one address may try on /user/lookup in LOOKUP_WINDOW seconds.
LOOKUP_LIMIT, LOOKUP_WINDOW = 20, 300.0
# A solved challenge is remembered this long, the longest POW_CHALLENGE_TIMEOUT, so that it is never forgotten
# while it could still verify (one period for every binding: the store forgets by the period of each call).
USED_CHALLENGE_SECONDS = 24 * 3600
USED_CHALLENGES = "pow_used"  # the store's affinity space of the challenges that got a token
USED_KEPT = 100_000  # each one cost a solved challenge and one of an address's tokens
# The windows of the store these pages count in, apart from the rate limiter's.
LOOKUP_BUCKET, CHALLENGE_BUCKET, TOKEN_BUCKET = "user_lookup", "pow_challenge", "pow_token"
# (option, lowest, highest, what it counts): the whole-number settings of the proof of work.
_BOUNDS = (
    ("pow_token_hours", 1, 24 * 365, "hours"),
    ("pow_token_max_ips", 0, 1000, "addresses (0: any)"),
    ("pow_challenge_timeout", 1, USED_CHALLENGE_SECONDS // 60, "minutes"),
    ("pow_max_tokens_per_ip", 1, 1000, "tokens"),
    ("pow_challenges_per_hour", 1, 10_000, "challenges"),
    ("temporary_user_purge_hours", 0, 24 * 365, "hours (0: never)"),
)
PURGE_EVERY = 3600.0  # seconds between two looks for expired temporary users


def _retry_after(reset_at: float) -> str:
    return str(max(1, math.ceil(reset_at - time.time())))


class UserPages:
    """Serves /user, /user/lookup and /user/captcha/..."""

    def __init__(self, secrets: dict, storage: Storage, quotas: QuotaKeeper):
        self.admin_key = secrets.get("admin_key", "")
        self.storage = storage
        self.quotas = quotas
        self.challenges = Signer(self.admin_key, "pow")
        self.bits = LEVELS["medium"]
        self._purging: asyncio.Task | None = None

    def load(self, loader):
        loader.add_option(
            "captcha_mode",
            str,
            "none",
            "none, or proof_of_work: /user/captcha hands out temporary tokens (needs GATEKEEPER=user_token).",
            choices=CAPTCHA_MODES,
        )
        loader.add_option(
            "pow_difficulty_level",
            str,
            "medium",
            f"Proof-of-work difficulty: {', '.join(LEVELS)}, or leading zero bits of SHA-256 from 8 to 32.",
        )
        loader.add_option("pow_token_hours", int, 24, "Lifetime of a temporary token from proof of work, in hours.")
        loader.add_option(
            "pow_token_max_ips", int, 2, "Addresses a temporary token from proof of work may be used from."
        )
        loader.add_option("pow_challenge_timeout", int, 30, "Minutes a proof-of-work challenge may take to solve.")
        loader.add_option(
            "pow_max_tokens_per_ip", int, 2, "Temporary tokens one address may get within POW_TOKEN_HOURS."
        )
        loader.add_option(
            "pow_challenges_per_hour", int, 10, "Proof-of-work challenges one address may ask for an hour."
        )
        loader.add_option(
            "temporary_user_purge_hours",
            int,
            48,
            "Hours after its expiry that a temporary user is deleted, with its usage; 0 keeps them.",
        )

    @refuses_config_errors
    def configure(self, updated):
        options = ctx.options
        if "captcha_mode" in updated and options.captcha_mode not in CAPTCHA_MODES:
            raise exceptions.OptionsError(f"CAPTCHA_MODE must be one of {', '.join(CAPTCHA_MODES)}.")
        if updated & {"captcha_mode", "gatekeeper"} and self.proof_of_work and options.gatekeeper != "user_token":
            raise exceptions.OptionsError(
                "CAPTCHA_MODE=proof_of_work needs GATEKEEPER=user_token: the tokens it hands out are user tokens."
            )
        if "pow_difficulty_level" in updated:
            self.bits = difficulty_bits(options.pow_difficulty_level)
        for name, lowest, highest, unit in _BOUNDS:
            if name in updated and not lowest <= getattr(options, name) <= highest:
                raise exceptions.OptionsError(f"{name.upper()} must be from {lowest} to {highest} {unit}.")

    def running(self):
        self._purging = asyncio.create_task(self._purge_expired_users())

    def done(self):
        if self._purging:
            self._purging.cancel()

    async def _purge_expired_users(self) -> None:
        """Deletes temporary users (from proof of work or the admin) TEMPORARY_USER_PURGE_HOURS after they expired,
        at start and every hour, as the original did: tokens handed out to strangers would pile up otherwise. A
        failure (the store unreachable) is logged and tried again an hour later."""
        while True:
            if hours := ctx.options.temporary_user_purge_hours:
                try:
                    store = self.storage.store
                    for user_id in expired_temporary_users(store.list_users(), time.time() - hours * 3600):
                        store.delete_user(user_id)
                        logger.info("temporary user %s deleted, %d hours after it expired", user_id, hours)
                except Exception as error:
                    logger.error("expired temporary users could not be deleted: %s", type(error).__name__)
            await asyncio.sleep(PURGE_EVERY)

    @property
    def proof_of_work(self) -> bool:
        return ctx.options.captcha_mode == "proof_of_work"

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        state = flow_state(flow)
        if state.route_name != "user_pages":
            return
        state.decision = "local"
        flow.response = self._answer(flow, request_path(flow.request.data.path).decode(), flow.request.method)

    def _answer(self, flow: http.HTTPFlow, path: str, method: str) -> http.Response:
        if flow.request.headers.get("sec-fetch-site") == "cross-site" and method == "POST":
            # Another site's page may not look tokens up, nor spend its visitors' processors on tokens for itself.
            return self._refusal(path, 403, "This page takes posts from its own pages only.", "cross_site")
        if path == "/user":
            return self._lookup_form("", 200) if method == "GET" else self._gone(path, ("GET",))
        if path == "/user/lookup":
            return self._lookup(flow) if method == "POST" else redirect("/user")
        if not self.proof_of_work:
            return self._refusal(path, 404, "This proxy does not hand out temporary tokens.", "not_found")
        if path == "/user/captcha":
            return self._captcha_page() if method == "GET" else self._gone(path, ("GET",))
        if method != "POST":
            return self._gone(path, ("POST",))
        return self._challenge(flow) if path == "/user/captcha/challenge" else self._verify(flow)

    # -- pages

    def _render(self, template: str, heading: str, status: int = 200, nonce: str = "", headers=None, **context):
        body = pages.render(
            template,
            title=ctx.options.server_title,
            heading=heading,
            captcha=self.proof_of_work,
            nonce=nonce,
            **context,
        )
        return html_response(body, nonce, status, headers)

    def _refusal(self, path: str, status: int, message: str, code: str, headers=None) -> http.Response:
        """An error as a page for the pages, as JSON for the captcha's script."""
        if path.startswith("/user/captcha/"):
            return error_response(OPENAI, status, message, code, headers)
        return self._render("user_message.html", "Not available", status, headers=headers, message=message)

    def _gone(self, path: str, allowed: tuple[str, ...]) -> http.Response:
        headers = {"allow": ", ".join(allowed)}
        return self._refusal(path, 405, f"This page accepts {', '.join(allowed)} only.", "method_not_allowed", headers)

    def _lookup_form(self, message: str, status: int, headers: dict[str, str] | None = None) -> http.Response:
        return self._render(
            "user_lookup.html",
            "Your usage",
            status,
            headers=headers,
            message=message,
            user_tokens=ctx.options.gatekeeper == "user_token",
        )

    def _lookup(self, flow: http.HTTPFlow) -> http.Response:
        if ctx.options.gatekeeper != "user_token":
            return self._lookup_form("", 404)
        fields = form_with_secret(flow, "token")
        token = fields.get("token", "").strip()
        if not token:
            return self._lookup_form("Paste your token into the field.", 400)
        # Counted first and given back when the token is someone's: only wrong tokens use up the window, and
        # instances sharing a store count together.
        identity, store = f"ip:{client_ip(flow)}", self.storage.store
        allowed, _, reset_at, hit = store.hit_rate_window(identity, LOOKUP_LIMIT, LOOKUP_WINDOW, LOOKUP_BUCKET)
        if not allowed:
            wait = _retry_after(reset_at)
            message = f"Too many wrong tokens from your address; try again in {wait} s."
            return self._lookup_form(message, 429, {"retry-after": wait})
        user = user_of_token(store, token)
        if user is None:
            return self._lookup_form("No user has that token. Check that you pasted all of it.", 401)
        store.refund_rate_window(identity, hit, LOOKUP_BUCKET)
        return self._usage_page(user)

    def _usage_page(self, user: dict) -> http.Response:
        figures = own_usage(user, self.quotas)
        expires_at, reason = figures["expiresAt"], figures["disabledReason"]
        if figures["disabled"] and reason != EXPIRED_REASON:
            state = "disabled"
        elif figures["disabled"] or (user["type"] == "temporary" and expires_at and expires_at <= time.time()):
            state = "expired"  # the gatekeeper disables an expired token at its next use, not before
        else:
            state = "active"
        rows = []
        for family, usage in figures["usage"].items():
            limit = usage["limit"]
            left = None if limit is None else max(0, limit - usage["used"] - usage["reserved"])
            rows.append({**usage, "family": family, "left": left})
        schedule = self.quotas.schedule
        return self._render(
            "user_usage.html",
            figures["nickname"] or "Your usage",
            figures=figures,
            state=state,
            rows=rows,
            show_costs=ctx.options.show_token_costs,
            usd=format_usd,
            refresh=pages.format_time(next_refresh(schedule, self.quotas.clock()).timestamp()) if schedule else "",
            expires=pages.format_time(expires_at) if expires_at else "",
        )

    def _captcha_page(self) -> http.Response:
        options = ctx.options
        return self._render(
            "user_captcha.html",
            "A temporary token",
            nonce=script_nonce(),
            hours=options.pow_token_hours,
            max_ips=options.pow_token_max_ips,
            per_address=options.pow_max_tokens_per_ip,
        )

    # -- the proof of work's JSON endpoints

    def _challenge(self, flow: http.HTTPFlow) -> http.Response:
        identity, store, options = f"ip:{client_ip(flow)}", self.storage.store, ctx.options
        # The tokens looked at, not taken: a challenge this address could not redeem would be work for nothing.
        has_room, _, reset_at, hit = store.hit_rate_window(
            identity, options.pow_max_tokens_per_ip, options.pow_token_hours * 3600, TOKEN_BUCKET
        )
        if not has_room:
            return self._too_many("temporary tokens", reset_at)
        store.refund_rate_window(identity, hit, TOKEN_BUCKET)
        allowed, _, reset_at, _ = store.hit_rate_window(
            identity, options.pow_challenges_per_hour, 3600, CHALLENGE_BUCKET
        )
        if not allowed:
            return self._too_many("challenges", reset_at)
        challenge, expires_at = new_challenge(self.challenges, self.bits, options.pow_challenge_timeout * 60)
        return json_response(200, {"challenge": challenge, "difficulty": self.bits, "expiresAt": expires_at})

    def _verify(self, flow: http.HTTPFlow) -> http.Response:
        try:
            body = json.loads(flow.request.raw_content or b"")
        except ValueError:
            body = None
        if not isinstance(body, dict) or not all(isinstance(body.get(name), str) for name in ("challenge", "nonce")):
            return error_response(OPENAI, 400, 'Send {"challenge": "...", "nonce": "..."} as JSON.', "invalid_request")
        try:
            challenge_id = check_solution(self.challenges, body["challenge"], body["nonce"])
        except ProofRefused as refusal:
            return error_response(OPENAI, 400, str(refusal), refusal.code)
        ip, store, options = client_ip(flow), self.storage.store, ctx.options
        identity = f"ip:{ip}"
        allowed, _, reset_at, hit = store.hit_rate_window(
            identity, options.pow_max_tokens_per_ip, options.pow_token_hours * 3600, TOKEN_BUCKET
        )
        if not allowed:
            return self._too_many("temporary tokens", reset_at)  # the challenge stays unused until it expires
        try:
            granted = self._grant(challenge_id, ip)
        except Exception:
            store.refund_rate_window(identity, hit, TOKEN_BUCKET)  # no token was made: none is counted
            raise
        if granted is None:
            store.refund_rate_window(identity, hit, TOKEN_BUCKET)
            return error_response(OPENAI, 400, "This challenge was used already; ask for a new one.", "challenge_used")
        token, expires_at = granted
        return json_response(200, {"token": token, "expiresAt": expires_at})

    def _grant(self, challenge_id: str, ip: str) -> tuple[str, int] | None:
        """A temporary token and when it expires, for a challenge that was not used before (and is used now); None
        for one that was. The store's compare-and-set decides, so two instances cannot both grant one."""
        store, options, mark = self.storage.store, ctx.options, secrets.token_urlsafe(8)
        if store.bind_affinity(USED_CHALLENGES, challenge_id, mark, None, USED_CHALLENGE_SECONDS, USED_KEPT) != mark:
            return None
        expires_at = time.time() + options.pow_token_hours * 3600
        token, user = store.create_user(
            {
                "type": "temporary",
                "expires_at": expires_at,
                "max_ips": options.pow_token_max_ips,
                "admin_note": f"proof of work from {identity_digest(ip)}",
            }
        )
        logger.info("temporary token of user %s handed out for proof of work from %s", user["id"], identity_digest(ip))
        return token, int(expires_at)

    @staticmethod
    def _too_many(what: str, reset_at: float) -> http.Response:
        wait = _retry_after(reset_at)
        return error_response(
            OPENAI,
            429,
            f"Your address has had all the {what} it may have for now; try again in {wait} s.",
            "rate_limited",
            {"retry-after": wait},
        )
