"""Plain logic of the proxy: no mitmproxy hooks."""
