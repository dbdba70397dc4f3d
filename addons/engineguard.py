"""Keeps mitmproxy's own settings on the safe side of the line this proxy depends on."""

from mitmproxy import ctx, exceptions


class EngineGuard:
    """Refuses mitmproxy settings that would let a request past the pipeline or change how it is read.

    `connection_strategy=lazy`: no upstream connection before the addons decided. `validate_inbound_headers`:
    mitmproxy's request-smuggling checks. No `stream_large_bodies`: a streamed request body would leave before
    the `request` hook read it. (The listener's mode and address are the Launcher's.)
    """

    def configure(self, updated):
        options = ctx.options
        if "connection_strategy" in updated and options.connection_strategy != "lazy":
            raise exceptions.OptionsError("connection_strategy must stay 'lazy' for this proxy.")
        if "validate_inbound_headers" in updated and not options.validate_inbound_headers:
            raise exceptions.OptionsError("validate_inbound_headers must stay on for this proxy.")
        if "stream_large_bodies" in updated and options.stream_large_bodies:
            raise exceptions.OptionsError("stream_large_bodies cannot be used with this proxy.")
