"""Keeps mitmproxy's own settings on the safe side of the line this proxy depends on."""

from importlib.metadata import version

from mitmproxy import ctx, exceptions

from addons.config import ConfigError

# Versions below these accept request-smuggling tricks (h11 chunk terminators, h2 header handling).
SECURITY_FLOORS = {"mitmproxy": (12, 1, 2), "h11": (0, 16, 0), "h2": (4, 3, 0)}


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def check_versions() -> None:
    """Refuses to start on a library version below its security floor."""
    for package, floor in SECURITY_FLOORS.items():
        installed = version(package)
        if _version_tuple(installed) < floor:
            raise ConfigError(
                f"{package} {installed} is below the security floor {'.'.join(map(str, floor))}; "
                "run ./run.sh again to install the pinned versions."
            )


def listen_mode(pipe_port: int, bind_address: str, port: int, local: bool = False) -> str:
    """The listener: reverse mode whose fixed target is the dispatcher's loopback pipe, never an API; or, for
    `local`, a regular proxy (the router then handles the two APIs' hosts and passes other hosts through)."""
    host = f"[{bind_address}]" if ":" in bind_address else bind_address
    return f"regular@{host}:{port}" if local else f"reverse:http://127.0.0.1:{pipe_port}@{host}:{port}"


class EngineGuard:
    """Refuses mitmproxy settings that would let a request past the pipeline or change how it is read.

    `connection_strategy=lazy`: no upstream connection before the addons decided. `validate_inbound_headers`:
    mitmproxy's request-smuggling checks. No `stream_large_bodies`: a streamed request body would reach the
    `request` hook empty. The listener's reverse target
    must be the dispatcher's pipe, so a flow that escaped the addons reaches nothing but a refusal.
    """

    def __init__(self, pipe_port: int, local: bool = False):
        self.pipe_target = "regular@" if local else f"reverse:http://127.0.0.1:{pipe_port}@"

    def configure(self, updated):
        options = ctx.options
        if "connection_strategy" in updated and options.connection_strategy != "lazy":
            raise exceptions.OptionsError("connection_strategy must stay 'lazy' for this proxy.")
        if "validate_inbound_headers" in updated and not options.validate_inbound_headers:
            raise exceptions.OptionsError("validate_inbound_headers must stay on for this proxy.")
        if "stream_large_bodies" in updated and options.stream_large_bodies:
            raise exceptions.OptionsError("stream_large_bodies cannot be used with this proxy.")
        if "mode" in updated:
            for mode in options.mode:
                if not mode.startswith(self.pipe_target):
                    raise exceptions.OptionsError(
                        f"The listener mode is set by this proxy (PORT, BIND_ADDRESS); {mode!r} is not accepted."
                    )
