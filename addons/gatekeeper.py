"""Who may use the proxy: everyone (`none`), holders of one shared `PROXY_KEY`, or users with personal tokens.

The client presents its token the way its SDK already does: `Authorization: Bearer ...` (OpenAI SDK) or
`x-api-key` (Anthropic SDK), on either API's routes. A token is compared byte for byte, in constant time, with
only the spaces and tabs HTTP allows around a header value taken off; an empty secret never matches anything.
"""

import time

from mitmproxy import ctx, exceptions, http

from addons.apierrors import error_response, fail_closed
from addons.flowstate import flow_state
from addons.headerhygiene import client_token
from llmproxy.identity import admit_token, secret_matches
from llmproxy.store.storage import Storage

GATEKEEPER_MODES = ("none", "proxy_key", "user_token")
# Seconds a token's admission from an address is taken as it was: each admission is a round trip to a shared
# store, and a change to the user made by another instance (disabled, new limits) counts here that much later.
# Changes made through this instance count at once; a temporary token still ends on time.
ADMISSION_TTL = 1.0
ADMISSIONS_KEPT = 10_000  # beyond this many tokens, those whose admissions all expired are dropped


def client_ip(flow: http.HTTPFlow) -> str:
    """The socket's address, or with TRUSTED_PROXIES=N the address N hops back in X-Forwarded-For."""
    peer = flow.client_conn.peername[0]
    hops = ctx.options.trusted_proxies
    if not hops:
        return peer
    forwarded = [a.strip() for v in flow.request.headers.get_all("x-forwarded-for") for a in v.split(",") if a.strip()]
    if not forwarded:
        return peer
    return forwarded[-hops] if len(forwarded) >= hops else forwarded[0]


def _latest(admissions: dict[str, tuple[float, int, dict]]) -> float:
    """When the last of a token's admissions ends."""
    return max(until for until, _, _ in admissions.values())


class Gatekeeper:
    """Checks the client's token on every API route and names the request's identity for limits and queues."""

    def __init__(self, secrets: dict, storage: Storage):
        self.proxy_key = secrets.get("proxy_key", "")
        self.admin_key = secrets.get("admin_key", "")
        self.storage = storage
        # token -> address -> (until, the store's users_version, the user as admitted)
        self._admitted: dict[str, dict[str, tuple[float, int, dict]]] = {}

    def load(self, loader):
        loader.add_option("gatekeeper", str, "none", "none, proxy_key or user_token.", choices=GATEKEEPER_MODES)
        loader.add_option(
            "trusted_proxies",
            int,
            0,
            "Hops of reverse proxies in front of this one whose X-Forwarded-For is trusted; 0 trusts none.",
        )
        loader.add_option("max_ips_per_user", int, 0, "Addresses a user token may be used from; 0 means any.")
        loader.add_option(
            "max_ips_auto_ban",
            bool,
            False,
            "Disable a user who goes over MAX_IPS_PER_USER, instead of refusing the new address only.",
        )

    def configure(self, updated):
        if "gatekeeper" in updated:
            if ctx.options.gatekeeper not in GATEKEEPER_MODES:
                raise exceptions.OptionsError(f"GATEKEEPER must be one of {', '.join(GATEKEEPER_MODES)}.")
            if ctx.options.gatekeeper == "user_token" and not self.admin_key:
                raise exceptions.OptionsError("GATEKEEPER=user_token needs an ADMIN_KEY to manage the users.")
            if ctx.options.gatekeeper == "proxy_key" and not self.proxy_key:
                raise exceptions.OptionsError("GATEKEEPER=proxy_key needs a PROXY_KEY.")
        if updated & {"max_ips_per_user", "max_ips_auto_ban"}:
            self._admitted.clear()
        for name in ("trusted_proxies", "max_ips_per_user"):
            if name in updated and getattr(ctx.options, name) < 0:
                raise exceptions.OptionsError(f"{name.upper()} must not be negative.")

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Runs before the body is read, while X-Forwarded-For is still on the request."""
        if flow.response or not flow.live:
            return
        state = flow_state(flow)
        route = state.route
        if route is None or not route.service:
            return  # the status pages are public; the admin API checks the admin key itself
        ip = client_ip(flow)
        state.identity = f"ip:{ip}"
        mode = ctx.options.gatekeeper
        token = client_token(flow)
        if mode == "proxy_key" and not secret_matches(token, self.proxy_key):
            self._refuse(flow, route.dialect, 401, "A valid proxy key is required.", "invalid_proxy_key")
        elif mode == "user_token":
            self._check_user(flow, route.dialect, token, ip)

    def _check_user(self, flow: http.HTTPFlow, api: str, token: str, ip: str) -> None:
        user, visit = self._admit(token, ip)
        if user is None:
            return self._refuse(flow, api, 401, "A valid user token is required.", "invalid_user_token")
        if visit != "ok":
            message = (
                "Forbidden: IP address limit exceeded."
                if visit == "banned"
                else "Forbidden: no more IP addresses allowed for this user token."
            )
            return self._refuse(flow, api, 403, message, "ip_limit")
        if user["disabled_at"] is not None:
            reason = user["disabled_reason"] or "Token disabled."
            return self._refuse(flow, api, 403, f"Forbidden: {reason}", "user_disabled")
        state = flow_state(flow)
        state.identity, state.user, state.user_type = f"user:{user['id']}", user["id"], user["type"]
        state.nickname, state.user_record = user["nickname"], user

    def _admit(self, token: str, ip: str) -> tuple[dict | None, str]:
        """Store.admit, or its answer of less than ADMISSION_TTL ago for the same token and address."""
        store, now = self.storage.store, time.monotonic()
        kept = self._admitted.get(token, {}).get(ip)
        if kept and kept[0] > now and kept[1] == store.users_version:
            return kept[2], "ok"
        version = store.users_version
        user, visit = admit_token(store, token, ip, ctx.options.max_ips_per_user, ctx.options.max_ips_auto_ban)
        if user is None:
            return user, visit  # nobody's token: nothing is kept
        if visit != "ok" or user["disabled_at"] is not None:
            self._admitted.pop(token, None)  # a ban from another address, or an expiry, ends every admission
            return user, visit
        ttl = ADMISSION_TTL
        if user["type"] == "temporary" and user["expires_at"]:
            ttl = min(ttl, user["expires_at"] - time.time())
        if len(self._admitted) >= ADMISSIONS_KEPT:
            self._admitted = {
                kept_token: by_ip
                for kept_token, by_ip in self._admitted.items()
                if max(e[0] for e in by_ip.values()) > now
            }
        self._admitted.setdefault(token, {})[ip] = (now + ttl, version, user)
        return user, visit

    @staticmethod
    def _refuse(flow: http.HTTPFlow, api: str, status: int, message: str, code: str) -> None:
        flow_state(flow).decision = "unauthorized" if status == 401 else "forbidden"
        flow.response = error_response(api, status, message, code)
