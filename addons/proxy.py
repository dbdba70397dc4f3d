"""The proxy's entry point: mitmdump or mitmweb with our addons registered before any option is parsed.

    python -m addons.proxy dump [mitmdump args]
    python -m addons.proxy web  [mitmweb args]
    python -m addons.proxy local [web] [args]   (a forward proxy for apps with a hard-coded API URL)

mitmproxy's `-s script` loading fails open (a script that breaks, or an option value it rejects, leaves
mitmproxy forwarding without it), so the addons are part of the master here and a failure stops the process.
"""

import sys

from mitmproxy import exceptions, hooks
from mitmproxy.tools import cmdline, main
from mitmproxy.tools.dump import DumpMaster
from mitmproxy.tools.web.master import WebMaster

from addons import (
    admin,
    affinity,
    config,
    dispatcher,
    families,
    flownotes,
    gatekeeper,
    guard,
    headers,
    interception,
    keychecker,
    keypool,
    metrics,
    models,
    policy,
    promptlog,
    quota,
    ratelimit,
    refusals,
    router,
    scrub,
    statuspage,
    storage,
    translate,
    waitqueue,
)

PROGRAM = "llm-proxy"


def build_addons(secrets: dict[str, list[str]], pipe_socket, local: bool = False) -> list:
    """Every addon, in the order a request passes them."""
    return [
        guard.EngineGuard(pipe_socket.getsockname()[1], local),  # mitmproxy's own settings stay safe
        interception.InterceptBeforePolicy(),  # mitmweb's intercept holds a request here, before any check
        storage.Storage(),  # SQLite: users, usage and key health across restarts
        router.Router(),  # exact route table; everything else is answered 404/405/302 or a CORS preflight
        headers.HeaderHygiene(),  # client credentials leave the flow; allowlisted headers only, both ways
        statuspage.StatusPage(),  # /, /status, /health (and the owner's PAGE_BODY)
        metrics.Metrics(),  # /metrics; one log line per request
        promptlog.PromptLog(),  # prompts and completions, when the owner turns it on
        admin.AdminApi(secrets),  # /admin/... with ADMIN_KEY; /user/usage with a user's own token
        gatekeeper.Gatekeeper(secrets),  # none, proxy_key or user_token; names the identity for limits
        models.ModelList(),  # GET .../v1/models, answered locally
        families.ModelFamilies(),  # the requested model's family; unknown or disallowed models refused
        policy.RequestPolicy(),  # body validation, output and context caps, prompt filters, token count
        translate.ClaudeChatTranslator(),  # OpenAI-format requests for Claude become Messages API requests
        affinity.Affinity(),  # the conversation's key: prompt caches and Responses API state stay on one key
        ratelimit.RateLimiter(),  # requests per minute and in flight, per identity
        quota.QuotaKeeper(),  # reserves the worst case against the user's token and USD quotas; settles afterwards
        keypool.KeyPool(secrets),  # the owner's keys, their health and rate-limit headroom
        keychecker.KeyChecker(),  # background checks: revoked, over quota, families, organisations
        waitqueue.WaitQueue(),  # requests wait their turn, fairly, while every key of their family rests
        dispatcher.Dispatcher(pipe_socket),  # upstream call with the key added last; retries; SSE via the pipe
        refusals.RefusalFormat(),  # errors as real errors, or as assistant messages (PROXY_ERROR_FORMAT)
        flownotes.FlowNotes(),  # mitmweb: each flow's decision as a comment and a marker; a bounded flow list
    ]


LOG_LEVELS = ("error", "warn", "info", "debug")


def log_level(level: str) -> str:
    """LOG_LEVEL (the original's setting) as mitmproxy's termlog verbosity."""
    level = {"warning": "warn"}.get(level.strip().lower(), level.strip().lower())
    if level not in LOG_LEVELS:
        raise config.ConfigError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {level!r}.")
    return level


def _fail(message: str):
    print(f"{PROGRAM}: {message}", file=sys.stderr)
    sys.exit(2)


def with_addons(base: type, local: bool = False) -> type:
    """`base` (DumpMaster or WebMaster) with our addons placed where mitmproxy puts scripts; `local` listens as a
    regular (forward) proxy for apps whose API URL is hard-coded, instead of as a reverse proxy."""

    class ProxyMaster(base):
        def __init__(self, options, **kwargs):
            super().__init__(options, **kwargs)
            try:
                guard.check_versions()
                sources = config.ConfigSources()
                bind_address, port = sources.listen_address()
                pipe_socket = dispatcher.bind_pipe_socket()
                options.update(
                    termlog_verbosity=log_level(sources.value("log_level", str, "info")),
                    mode=[guard.listen_mode(pipe_socket.getsockname()[1], local)],
                    listen_host=bind_address,
                    listen_port=port,
                    connection_strategy="lazy",
                    keep_host_header=True,  # the status page names the address the client used
                )
                builtin_options = set(options.keys())
                secrets = sources.secrets()
                scrub.register([secrets["proxy_key"], secrets["admin_key"]])
                ours = build_addons(secrets, pipe_socket, local)
                self.addons.add(*ours)
                # After blocklist/anticomp, before save, dumper and mitmweb's view: where `-s` scripts sit.
                # mitmweb's Intercept right before ours, so that an intercepted request waits before the policy.
                intercept = [addon for addon in self.addons.chain if type(addon).__name__ == "Intercept"]
                rest = [addon for addon in self.addons.chain if addon not in ours and addon not in intercept]
                position = next(i for i, addon in enumerate(rest) if type(addon).__name__ == "ScriptLoader") + 1
                self.addons.chain = rest[:position] + intercept + ours + rest[position:]
                # It adjusts the layer mitmproxy's NextLayer chose, so it must come right after it.
                head_limit = guard.RequestHeadLimit()  # request lines over 8 KiB, heads over 64 KiB: refused
                self.addons.add(head_limit)
                self.addons.chain.remove(head_limit)
                next_layer = next(i for i, addon in enumerate(self.addons.chain) if type(addon).__name__ == "NextLayer")
                self.addons.chain.insert(next_layer + 1, head_limit)
                our_options = {name: o.typespec for name, o in options.items() if name not in builtin_options}
                options.update(**sources.options(our_options))
                # As mitmproxy does for scripts: every addon sees every option once, set or default.
                for addon in ours:
                    self.addons.invoke_addon_sync(addon, hooks.ConfigureHook(set(options.keys())))
                family_names = self.addons.get("modelfamilies").all_families()
                if legacy := quota.legacy_quota_settings(sources.prefixed("TOKEN_QUOTA_"), family_names):
                    options.update(token_quotas=[*options.token_quotas, *legacy])
            except (config.ConfigError, exceptions.OptionsError) as error:
                _fail(str(error))

    return ProxyMaster


def run(argv: list[str]) -> None:
    sys.argv[0] = PROGRAM  # mitmproxy prefixes its own option errors with it
    ui, args = (argv[0], argv[1:]) if argv and argv[0] in ("dump", "web", "local") else ("dump", argv)
    local = ui == "local"
    if local:  # `local web`: the forward proxy under mitmweb
        ui, args = ("web", args[1:]) if args[:1] == ["web"] else ("dump", args)
    if ui == "web":
        main.run(with_addons(WebMaster, local), cmdline.mitmweb, args)
    else:
        main.run(with_addons(DumpMaster, local), cmdline.mitmdump, args)


if __name__ == "__main__":
    run(sys.argv[1:])
