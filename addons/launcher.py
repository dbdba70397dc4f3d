"""Starts the policy pipeline inside mitmdump or mitmweb (from the `-s` script), and holds mitmproxy's own
settings where the pipeline needs them.

mitmproxy starts its listener before it loads a `-s` script, with whatever `--mode`, `-p` and `--listen-host`
said (a forward proxy on *:8080 when nothing did). The launcher then sets the listener this proxy needs and, once
running, has mitmproxy bring it up: a reverse-mode listener on PORT and BIND_ADDRESS (or `-p`/`--listen-host`)
whose target only stands in, because every request is answered by the addons or sent to the dispatcher's
pipe, and FailClosed refuses the rest before mitmproxy would connect anywhere.
"""

import asyncio
import logging

from mitmproxy import ctx, exceptions
from mitmproxy.net import server_spec
from mitmproxy.proxy import mode_specs

from addons.failclosed import FailClosed
from addons.hookindex import index_hooks
from addons.modeguard import STAND_IN_TARGET, ModeGuard, accepted_mode
from addons.requestheadlimit import RequestHeadLimit
from llmproxy import config
from llmproxy.quota import legacy_quota_settings
from llmproxy.versions import check_versions

logger = logging.getLogger(__name__)

REVERSE_LISTENER = "llm-proxy (OpenAI under /proxy/openai, Anthropic under /proxy/anthropic)"
FORWARD_LISTENER = "llm-proxy as a forward proxy for api.openai.com and api.anthropic.com"
LOG_LEVELS = ("error", "warn", "info", "debug")
UPSTREAM_OPTIONS = {"api.anthropic.com": "anthropic_upstream_url"}  # other hosts: the OpenAI API or a compatible one

_fail_closed: FailClosed | None = None  # one per process: it must outlive every reload of the script
_mitmproxy_options: set[str] = set()  # the options that are not this proxy's
_settings_applied = False  # config.yaml and the environment are applied once, so a reload keeps `--set` values


class _ConfigErrorsAsSentences(logging.Filter):
    """mitmproxy logs a script's start-up or reload failure with its traceback; a refused setting is one
    sentence for the operator, so it is logged as that sentence alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, (exceptions.OptionsError, config.ConfigError)):
            record.msg, record.args, record.exc_info, record.exc_text = str(error), (), None, None
        return True


def install_fail_closed(master) -> FailClosed:
    """FailClosed at the end of the chain, RequestHeadLimit right after NextLayer and ModeGuard right before the
    proxyserver, registered once per process before anything in the script can fail."""
    global _fail_closed, _mitmproxy_options
    if _fail_closed is None:
        _mitmproxy_options = set(master.options.keys())  # and those of scripts loaded before this one
        index_hooks(master)
        logging.getLogger("mitmproxy.addons.script").addFilter(_ConfigErrorsAsSentences())
        _fail_closed = FailClosed()
        _register(master, _fail_closed)  # last: after every other request hook, the user's scripts' too
        # RequestHeadLimit adjusts the layer NextLayer chose; the proxyserver restarts the listener on a mode change.
        _register(master, RequestHeadLimit(), after=master.addons.get("nextlayer"))
        _register(master, ModeGuard(), before=master.addons.get("proxyserver"))
    return _fail_closed


def _register(master, addon, before: object = None, after: object = None) -> None:
    """Registers `addon` on mitmproxy itself: at the end of the chain, or right before or after one of its own."""
    master.addons.add(addon)
    if neighbour := before or after:
        chain = master.addons.chain
        chain.remove(addon)
        chain.insert(chain.index(neighbour) + (neighbour is after), addon)


def log_level(level: str) -> str:
    """LOG_LEVEL (the original's setting) as mitmproxy's termlog verbosity."""
    level = {"warning": "warn"}.get(level.strip().lower(), level.strip().lower())
    if level not in LOG_LEVELS:
        raise config.ConfigError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {level!r}.")
    return level


def read_settings() -> config.ConfigSources:
    """config.yaml, .env and the environment, once the library versions were checked."""
    check_versions()
    return config.ConfigSources()


class Launcher:
    """Applies config.yaml and the environment to the options, keeps the listener, and attaches the pipeline
    to FailClosed once every addon configured and started. It is the last addon of the pipeline, so its
    `configure` runs only when every other addon's passed."""

    def __init__(
        self,
        sources: config.ConfigSources,
        key_settings: list[str],
        fail_closed: FailClosed,
        pipe_address: tuple[str, int],
        families,
    ):
        self.sources = sources
        self.key_settings = key_settings  # the services' key settings: settings, never options
        self.fail_closed = fail_closed
        self.pipe_address = pipe_address
        self.families = families
        self.configured = False
        self.refused = False

    def load(self, loader):
        loader.add_option(
            "forward_proxy",
            bool,
            False,
            "Listen as a forward proxy for apps whose API URL is hard-coded (./run.sh local), not as a reverse proxy.",
        )
        # A mitmweb intercept must pause a request before the policy looks at it, so mitmweb's Intercept addon
        # goes where the scripts are, in front of them.
        chain, intercept = ctx.master.addons.chain, ctx.master.addons.get("intercept")
        if intercept is not None:
            chain.remove(intercept)
            chain.insert(chain.index(ctx.master.addons.get("scriptloader")), intercept)
        if not _settings_applied:
            try:
                self._apply_settings()
            except config.ConfigError as error:
                logger.error(str(error))  # at start-up mitmproxy then exits; after a reload FailClosed refuses
                self.refused = True
        try:
            # The command line's `--set` values for this proxy's options, which win over the settings above. A
            # malformed one would make mitmproxy drop the script without a word; here it is named.
            ctx.options.process_deferred()
        except exceptions.OptionsError as error:
            logger.error(str(error))
            self.refused = True

    def _apply_settings(self) -> None:
        """config.yaml, .env and the environment as option values, under what the command line set."""
        global _settings_applied
        options = ctx.options
        # lazy: no upstream connection before the addons decided (an eager one would go to the stand-in target);
        # the Host the client used, for the status page; and a listener even under ./run.sh's server=false. Set
        # before anything here can fail, so that a refused setting is the only complaint.
        engine = {"connection_strategy": "lazy", "keep_host_header": True, "server": True}
        options.update(**{name: value for name, value in engine.items() if name in options})
        ours = {name: option.typespec for name, option in options.items() if name not in _mitmproxy_options}
        values = self.sources.options(ours, self.key_settings)
        # (A master without a terminal log or a proxy server, as in unit tests, lacks some of mitmproxy's options.)
        if "termlog_verbosity" in options and options.termlog_verbosity == options.default("termlog_verbosity"):
            values["termlog_verbosity"] = log_level(self.sources.value("log_level", str, "info"))
        bind_address, port = self.sources.listen_address()
        if options.listen_port is None:  # -p and --set listen_port win
            values["listen_port"] = port
        if not options.listen_host:
            values["listen_host"] = bind_address
        options.update(**values)
        _settings_applied = True

    def configure(self, updated):
        if self.refused:
            return
        options = ctx.options
        if {"mode", "forward_proxy"} & updated:
            listener = "regular" if options.forward_proxy else f"reverse:{STAND_IN_TARGET}"
            mode_specs.ProxyMode.parse(listener).description = (
                FORWARD_LISTENER if options.forward_proxy else REVERSE_LISTENER
            )  # what mitmproxy's start-up line and mitmweb's status bar call the listener
            if options.mode != [listener]:
                options.update(mode=[listener], **self._from_mode(options.mode))
        # The round that configures every addon from scratch (the script's load or reload), as opposed to the
        # rounds an option change starts, also inside that one. Reaching its end means every addon before took it.
        if updated >= set(options.keys()):
            # The original's TOKEN_QUOTA_<FAMILY> settings, now that the families are known.
            legacy = legacy_quota_settings(self.sources.prefixed("TOKEN_QUOTA_"), self.families.all_families())
            if missing := [entry for entry in legacy if entry not in options.token_quotas]:
                options.update(token_quotas=[*options.token_quotas, *missing])
            self.configured = True

    @staticmethod
    def _from_mode(modes: list[str]) -> dict:
        """The settings a user's `--mode` stands for: mitmproxy's default (regular) stands for none, and
        `reverse:URL[@[host:]port]` for the upstream of the API it names and the listener's address."""
        if (mode := accepted_mode(modes)) is None:
            return {}
        host, port = mode.address
        default_port = server_spec.parse(f"{mode.scheme}://{host}", default_scheme="https")[1][1]
        url = f"{mode.scheme}://{host}" + ("" if port == default_port else f":{port}")
        settings = {UPSTREAM_OPTIONS.get(host, "openai_upstream_url"): url}
        if mode.custom_listen_port is not None:
            settings["listen_port"] = mode.custom_listen_port
        if mode.custom_listen_host is not None:
            settings["listen_host"] = mode.custom_listen_host
        return settings

    def running(self):
        if not self.configured:
            return  # a setting was refused: FailClosed answers every request and says why
        self.fail_closed.attach(self, self.pipe_address)
        # mitmproxy brought its listener up before this script set the mode and address; bring up ours.
        asyncio.get_running_loop().create_task(ctx.master.addons.get("proxyserver").setup_servers())

    def done(self):
        self.fail_closed.detach(self)
