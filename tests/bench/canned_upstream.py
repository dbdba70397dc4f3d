"""The scale-out phase's upstream: one canned chat completion for every request, at the least CPU Python allows.

The real upstream runs on someone else's machines; on this one, every millisecond the upstream stand-in spends is
taken from the proxy instances whose scaling is measured. The fake upstream (tests/fakeupstream.py) validates
and records each request, which costs about 0.35 ms of CPU a request under the proxy's load; this server reads
the request's head and body and answers, about 0.05 ms.

    python -m tests.bench.canned_upstream   (prints "listening on 127.0.0.1:PORT")
"""

import asyncio
import json

_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-canned",
        "object": "chat.completion",
        "created": 1764900000,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"},
        ],
        "usage": {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10},
    }
).encode()
_ANSWER = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(_COMPLETION) + _COMPLETION
)


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers the requests of one keep-alive connection, one after the other, until the client closes it."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            writer.write(_ANSWER)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(_serve, "127.0.0.1", 0)
    print(f"listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
