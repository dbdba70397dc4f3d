"""The proxy's object graph in one place: the upstream services, the shared parts built once, and every addon in
pipeline order, each given its collaborators. Nothing finds another addon by name."""

from addons import (
    adminapi,
    adminpages,
    affinity,
    backbone,
    claudechattranslator,
    dispatcher,
    engineguard,
    flownotes,
    gatekeeper,
    headerhygiene,
    interceptbeforepolicy,
    launcher,
    metrics,
    modelfamilies,
    modellist,
    promptlog,
    quotakeeper,
    ratelimiter,
    refusalformat,
    requestpolicy,
    router,
    statuspage,
    userpages,
)
from addons.failclosed import FailClosed
from llmproxy import scrub
from llmproxy.admin import FailedLogins
from llmproxy.api.routes import RouteTable
from llmproxy.config import ConfigSources
from llmproxy.pool.checker import KeyChecker
from llmproxy.pool.keys import KeyPool
from llmproxy.pool.queue import WaitQueue
from llmproxy.services import BUILT_IN, pool_keys
from llmproxy.services.compatible import declared_services
from llmproxy.store.storage import Storage
from llmproxy.upstream.pipe import bind_pipe_socket


def build_addons(sources: ConfigSources, fail_closed: FailClosed) -> list:
    """Every addon, in the order a request passes them, for the settings `sources` read. `fail_closed` (one per
    process, outside this list) lets requests leave only through the pipe of a pipeline that started."""
    # The upstream APIs (llmproxy/services), each with its routes, keys and families: the built-in ones, and the
    # OpenAI-compatible ones the owner declared.
    services = (*BUILT_IN, *declared_services(sources.declared_services(), [s.name for s in BUILT_IN]))
    key_settings = [service.key_setting for service in services]
    secrets = sources.secrets(key_settings)
    keys = pool_keys(services, secrets)
    by_name = {service.name: service for service in services}
    secret_keys = [
        part for name, entries in keys.items() for key in entries for part in by_name[name].secret_parts(key.secret)
    ]
    scrub.register([*secret_keys, secrets.get("proxy_key", ""), secrets.get("admin_key", "")])  # out of every log

    # The backbone: no hooks; its options and lifecycle are the Backbone addon's.
    storage = Storage()  # SQLite or Redis: users, usage, key health, rests, affinity across restarts
    model_families = modelfamilies.ModelFamilies(services)
    pool = KeyPool(keys, storage, model_families.all_families)
    queue = WaitQueue(pool, storage)
    pool.on_key_usable(queue.serve_waiting)  # a key that rested, came back or was given back serves a waiter
    # The addons that others use.
    conversations = affinity.Affinity(storage)
    failed_logins = FailedLogins()  # the admin API and the login form lock an address out together
    quotas = quotakeeper.QuotaKeeper(storage, model_families, {s.name: s.price_fallback for s in services})
    pipe_socket = bind_pipe_socket()  # the loopback socket streamed answers pass through
    upstream = dispatcher.Dispatcher(services, pipe_socket, pool, queue, conversations, quotas)
    checker = KeyChecker(
        services, pool, model_families.family_of, upstream
    )  # its requests use the dispatcher's session
    pool.on_suspicion(checker.confirm)  # a key that one answer makes suspect retires only if the checker confirms

    return [
        engineguard.EngineGuard(),  # mitmproxy's own settings stay safe
        interceptbeforepolicy.InterceptBeforePolicy(),  # mitmweb's intercept holds a request here, before any check
        backbone.Backbone(services, storage, pool, queue, checker),  # settings; opens the store, starts key checks
        router.Router(services, RouteTable(services)),  # exact routes; the rest gets 404/405/302 or a CORS preflight
        headerhygiene.HeaderHygiene(),  # client credentials leave the flow; allowlisted headers only, both ways
        statuspage.StatusPage(services, storage, pool, queue, checker, model_families, upstream),  # /, /status, /health
        metrics.Metrics(services, pool, queue, secrets.get("admin_key", "")),  # /metrics; one log line per request
        promptlog.PromptLog(),  # prompts and completions, when the owner turns it on
        adminapi.AdminApi(secrets, storage, pool, checker, quotas, failed_logins),  # /admin/... API; /user/usage
        adminpages.AdminPages(secrets, storage, pool, checker, quotas, failed_logins),  # /admin pages (a session)
        userpages.UserPages(secrets, storage, quotas),  # /user pages: own usage; temporary tokens by proof of work
        gatekeeper.Gatekeeper(secrets, storage),  # none, proxy_key or user_token; names the identity for limits
        modellist.ModelList(services, model_families, pool),  # GET .../v1/models, answered locally
        model_families,  # the requested model's family; unknown or disallowed models refused
        requestpolicy.RequestPolicy(),  # body validation, output and context caps, prompt filters, token count
        claudechattranslator.ClaudeChatTranslator(),  # OpenAI-format requests for Claude become Messages API requests
        conversations,  # the conversation's key: prompt caches and Responses API state stay on one key
        ratelimiter.RateLimiter(storage),  # requests per minute and in flight, per identity
        quotas,  # reserves the worst case against the user's token and USD quotas; settles afterwards
        upstream,  # a pool key (waiting its turn while all rest), the upstream call, retries; SSE via the pipe
        refusalformat.RefusalFormat(),  # errors as real errors, or as assistant messages (PROXY_ERROR_FORMAT)
        flownotes.FlowNotes(),  # mitmweb: each flow's decision as a comment and a marker; a bounded flow list
        # Last, so that its configure runs only once every other addon's passed: settings, the listener, and
        # the word to fail_closed that this pipeline may send requests out.
        launcher.Launcher(sources, key_settings, fail_closed, pipe_socket.getsockname(), model_families),
    ]
