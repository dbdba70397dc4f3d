"""The way to the upstream APIs: the HTTP client (client), the loop over pool keys that obtains an answer (retry),
and the loopback pipe through which streamed answers and queue heartbeats reach mitmproxy (pipe). The Dispatcher
addon (addons/dispatcher.py) drives them from its flow hooks."""
