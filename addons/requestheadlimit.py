"""Bounds the request head of every HTTP/1 client connection, which mitmproxy buffers without bound, before any body
is read."""

import logging
import re

from mitmproxy.net.http.http1 import assemble_response
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.layers.http._http1 import Http1Server

from addons.apierrors import error_response
from llmproxy.api.errors import api_of_path

logger = logging.getLogger(__name__)

# Longest request line accepted (nginx's and Node's default, 8 KiB); real clients send paths under 100 bytes.
MAX_REQUEST_LINE = 8192
# Longest request head (request line and headers); Node's default is 16 KiB, Claude Code's heads are about 2 KiB.
MAX_REQUEST_HEAD = 65536
_HEAD_END = re.compile(rb"\n\r?\n")  # how h11, under mitmproxy, finds the end of a head


class _BoundedHttp1Server(Http1Server):
    """mitmproxy's HTTP/1 server, which buffers a request head without bound ("FIXME: protect against header size
    DoS" in its source: a 100 MB request line took 300 MB), refusing a head over the bounds as soon as it is seen,
    before any body is read."""

    def read_headers(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived) and (refusal := self._oversized_head()):
            status, message, code, target = refusal
            logger.info("%s: refused a request head: %s", self.conn.peername, message)
            response = error_response(api_of_path(target), status, message, code, {"connection": "close"})
            yield commands.SendData(self.conn, assemble_response(response))
            yield commands.CloseConnection(self.conn)
            self.state = self.done
            return
        yield from super().read_headers(event)

    def _oversized_head(self) -> tuple[int, str, str, bytes] | None:
        """What to answer when the buffered head is already over a bound; None while it is within them."""
        if len(self.buf) <= MAX_REQUEST_LINE:
            return None
        buffered = bytes(self.buf)  # a head and at most one read of its body: larger heads are refused on arrival
        line, found, _ = buffered.lstrip(b"\r\n").partition(b"\n")
        target = (line.split(b" ")[1:2] or [b""])[0]  # for the error's format; the line may be cut short
        if len(line.rstrip(b"\r")) > MAX_REQUEST_LINE or not found:
            message = f"The request line is longer than this proxy accepts ({MAX_REQUEST_LINE} bytes)."
            return 414, message, "request_line_too_long", target
        head_end = _HEAD_END.search(buffered)
        if (head_end.start() if head_end else len(buffered)) > MAX_REQUEST_HEAD:
            message = f"The request head is larger than this proxy accepts ({MAX_REQUEST_HEAD} bytes)."
            return 431, message, "request_head_too_large", target
        return None


class RequestHeadLimit:
    """Gives every HTTP/1 client connection a server that bounds the request head (HTTP/2 has its own limits)."""

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        http_layer = nextlayer.layer
        if isinstance(http_layer, layers.HttpLayer) and nextlayer.context.client.alpn not in (b"h2", b"h3"):
            # HttpLayer keeps a connection already present (mitmproxy's client playback relies on that).
            client = nextlayer.context.client
            http_layer.connections.setdefault(client, _BoundedHttp1Server(http_layer.context.fork()))
