"""Refuses a listener mode this proxy cannot take, before mitmproxy's proxyserver acts on it.

mitmproxy's proxyserver comes before the scripts in the chain and restarts the listener as soon as `mode` changes;
had only the Launcher refused a mode changed in mitmweb, the proxy would have listened as, say, a SOCKS proxy
until the refusal rolled the option back. This addon is registered once per process, in front of the proxyserver.
"""

from mitmproxy import ctx, exceptions
from mitmproxy.proxy import mode_specs

# The reverse target of the listener. Nothing listens on port 1, so even a flow that escaped every check could
# reach nothing; it never gets that far, as FailClosed answers it first.
STAND_IN_TARGET = "http://127.0.0.1:1"


def accepted_mode(modes: list[str]) -> mode_specs.ReverseMode | None:
    """A user's `reverse:URL` mode, to be taken as an upstream URL; None for mitmproxy's default (regular) and the
    proxy's own listener. Any other mode is refused with one sentence."""
    if modes in (["regular"], [f"reverse:{STAND_IN_TARGET}"]):
        return None
    refusal = (
        f"--mode {' '.join(modes)} is not accepted: this proxy listens in reverse mode for both APIs "
        "(or --set forward_proxy=true); --mode reverse:URL may only name the upstream of one API."
    )
    try:
        mode = mode_specs.ProxyMode.parse(modes[0]) if len(modes) == 1 else None
    except ValueError:
        mode = None
    if not isinstance(mode, mode_specs.ReverseMode) or mode.scheme not in ("http", "https"):
        raise exceptions.OptionsError(refusal)
    return mode


class ModeGuard:
    """Checks `mode` ahead of mitmproxy's proxyserver."""

    def configure(self, updated):
        if "mode" in updated:
            accepted_mode(ctx.options.mode)
