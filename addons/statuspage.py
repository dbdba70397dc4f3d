"""The proxy's own pages: `/health`, `/status` (JSON) and `/` (the same facts as HTML)."""

import html
import json
import re
import subprocess
import time
from pathlib import Path

from mitmproxy import ctx, http

from addons.apierrors import ANTHROPIC, OPENAI, SERVICE_NAMES, fail_closed

_HOST = re.compile(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")
_KEY_SETTINGS = {OPENAI: "OPENAI_KEY", ANTHROPIC: "ANTHROPIC_KEY"}


def format_wait(seconds: float) -> str:
    """`no wait` up to 2 s, else `Nsec` or `Nmin, Nsec` (whole seconds, floored minutes)."""
    if seconds <= 2:
        return "no wait"
    total = round(seconds)
    return f"{total}sec" if total < 60 else f"{total // 60}min, {total % 60}sec"


def git_build() -> str:
    """`<short sha>` of the checkout, with ` (modified)` when it has local changes; `unknown` without git."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=2
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=2,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}{' (modified)' if dirty else ''}" if sha else "unknown"


class StatusPage:
    """Serves the health check and the status page from the proxy itself."""

    def __init__(self):
        self.started = time.time()
        self.build = ""

    def load(self, loader):
        loader.add_option("server_title", str, "LLM key-sharing proxy", "Title of the status page.")
        loader.add_option("build_info", str, "", "Build shown on the status page; empty means the git commit.")

    def configure(self, updated):
        if "build_info" in updated:
            self.build = ctx.options.build_info or git_build()

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        route = flow.metadata.get("llmproxy", {}).get("route")
        if route == "health":
            flow.response = http.Response.make(200, b"OK", {"content-type": "text/plain"})
        elif route == "status":
            body = json.dumps(self.facts(flow.request), indent=2)
            flow.response = http.Response.make(200, body, {"content-type": "application/json"})
        elif route == "status_page":
            body = self.render(self.facts(flow.request))
            flow.response = http.Response.make(200, body, {"content-type": "text/html; charset=utf-8"})
        else:
            return
        flow.metadata["llmproxy"]["decision"] = "local"

    def facts(self, request: http.Request) -> dict:
        """Everything the page shows. Public by design: never a key, a token or an address of a user."""
        pool = ctx.master.addons.get("keypool")
        served = ctx.master.addons.get("dispatcher").served
        base = self._base_url(request)
        facts = {
            "title": ctx.options.server_title,
            "uptime": int(time.time() - self.started),
            "build": self.build,
            "endpoints": {api: f"{base}/proxy/{api}/v1" for api in (OPENAI, ANTHROPIC)},
            "requestsServed": sum(served.values()),
            "status": ctx.master.addons.get("keychecker").status,
        }
        store = ctx.master.addons.get("storage").store
        counters = store.counters()
        facts.update(
            proompts=counters.get("prompts", 0),
            tookens=counters.get("tokens", 0),
            proomptersNow=store.active_identities(60),
        )
        for api in (OPENAI, ANTHROPIC):
            facts[api] = {"keys": pool.counts(api), "requestsServed": served[api]}
        facts["families"] = self.family_facts()
        return facts

    @staticmethod
    def family_facts() -> dict:
        """Per model family with keys: key states, requests waiting, and the estimated wait."""
        pool, queue = ctx.master.addons.get("keypool"), ctx.master.addons.get("waitqueue")
        families = ctx.master.addons.get("modelfamilies")
        facts = {}
        for api in (OPENAI, ANTHROPIC):
            for family in families.all_families(api):
                keys = pool.counts(api, family)
                if not keys["total"]:
                    continue
                wait = queue.estimated_wait(api, family)
                facts[family] = {
                    "activeKeys": keys["active"],
                    "revokedKeys": keys["revoked"],
                    "overQuotaKeys": keys["overQuota"],
                    "proomptersInQueue": len(queue.queue(api, family)),
                    "estimatedQueueTime": format_wait(wait),
                }
        return facts

    @staticmethod
    def _base_url(request: http.Request) -> str:
        """The address the client reached us at; the Host header is used only when it looks like a host."""
        host = request.headers.get("host", "")
        if not _HOST.fullmatch(host):
            host = f"{request.host}:{request.port}"
        scheme = "https" if request.scheme == "https" else "http"
        return f"{scheme}://{host}"

    @staticmethod
    def _family_table(families: dict) -> str:
        if not families:
            return ""
        rows = "".join(
            f"<tr><th>{html.escape(name)}</th><td>{f['activeKeys']}</td><td>{f['proomptersInQueue']}</td>"
            f"<td>{html.escape(f['estimatedQueueTime'])}</td></tr>"
            for name, f in families.items()
        )
        return (
            "<h2>Model families</h2><table><tr><th>Family</th><th>Working keys</th><th>Waiting</th>"
            f"<th>Estimated wait</th></tr>{rows}</table>"
        )

    @staticmethod
    def render(facts: dict) -> str:
        """The HTML page: readable on a phone, no JavaScript, every value escaped."""
        e = html.escape
        rows = []
        for api in (OPENAI, ANTHROPIC):
            keys = facts[api]["keys"]
            if keys["total"]:
                state = f"{keys['active']} active, {keys['revoked']} revoked, {keys['overQuota']} over quota"
            else:
                state = f"no keys yet: set {_KEY_SETTINGS[api]} (comma-separated) and restart"
            rows.append(
                f"<tr><th>{SERVICE_NAMES[api]}</th><td><code>{e(facts['endpoints'][api])}</code></td>"
                f"<td>{e(state)}</td><td>{facts[api]['requestsServed']}</td></tr>"
            )
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(facts["title"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 0 auto; max-width: 52rem; padding: 1rem; line-height: 1.5; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: .4rem .6rem; border-bottom: 1px solid #ddd; vertical-align: top; }}
code {{ word-break: break-all; }}
@media (max-width: 36rem) {{ tr {{ display: block; }} th, td {{ display: block; border: 0; }} }}
</style></head>
<body>
<h1>{e(facts["title"])}</h1>
<p>Point your OpenAI or Anthropic client at the endpoint below; use the key or token you were given.</p>
<table>
<tr><th>Service</th><th>Endpoint</th><th>Keys</th><th>Requests served</th></tr>
{"".join(rows)}
</table>
{StatusPage._family_table(facts["families"])}
<p>Up for {facts["uptime"]} s &middot; build {e(facts["build"])} &middot; <a href="/status">JSON</a></p>
</body></html>
"""
