"""The benchmark: the fake upstream directly vs bare mitmdump in front of it vs this proxy in front of it.

    python -m tests.bench.bench [--quick] [--profile FILE]

Starts the three servers, measures latency, throughput, time to the first SSE byte and many concurrent
streams against each, prints one table and whether the targets were met, and stops everything it started.
Both proxies run as users run them: bare mitmdump with its defaults (and one addon that streams responses, as SSE
needs), this proxy as ./run.sh starts it (with CHECK_KEYS=false and MODEL_RATE_LIMIT=0, which the fake upstream
cannot serve).
Timings are information: the exit code is non-zero only when the benchmark itself could not run.

The client is a minimal HTTP/1.1 client on asyncio streams in this process: it costs less CPU than aiohttp
(the machine may have only 2 cores, shared by client and servers) and does the same work for every target.
"Proxy process CPU" is the CPU time of the process in the middle (mitmdump or this proxy), read from /proc;
"client CPU" is this process's own, to show that the load generator worked alike against every target.
"""

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fakeupstream import CACHE_BLOCK, CACHE_MINIMUM
from tests.harness import ROOT, ProxyProcess, RedisServer

_LISTENING = re.compile(rb"listening (?:at|on) (?:http://)?127\.0\.0\.1:(\d+)")
KEY = "sk-bench-one"
HELLO = "Hello"
FIRST_BYTE_PROMPT = "Hello #fake:events=3 #fake:interval_ms=5"  # short: only its first byte is timed
STREAM_PROMPT = "Hello #fake:events=40 #fake:interval_ms=50"
CONCURRENCY = 16
THROUGHPUT_ROUNDS = 4  # turns of each throughput run
HALF_LIMITED = "this proxy, half the keys 429"
EVERY_SERVICE = "every other service configured"
REQUEST_TIMEOUT = 30  # seconds; a request that takes longer counts as an error
CLIENT_ERRORS = (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)


@dataclass(frozen=True)
class Settings:
    latency_requests: int
    throughput_seconds: float
    first_byte_tries: int
    streams: int
    ramp_seconds: float
    failing_pool_requests: int
    agent_turns: int  # turns of each agent conversation in the affinity row


FULL = Settings(
    latency_requests=1000,
    throughput_seconds=8,
    first_byte_tries=120,  # a median of 10 moved by ±0.5 ms between runs, of 40 by ±0.3 ms
    streams=500,
    ramp_seconds=1.0,
    failing_pool_requests=200,
    agent_turns=12,
)
QUICK = Settings(
    latency_requests=200,
    throughput_seconds=2,
    first_byte_tries=4,
    streams=50,
    ramp_seconds=0.5,
    failing_pool_requests=50,
    agent_turns=4,
)


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    path: str
    pid: int | None  # the process in the middle, whose CPU and memory are reported; None for direct

    token: str = KEY  # what the client presents: the fake's key for direct and bare, a user token for instances

    def request(self, prompt: str, stream: bool = False) -> bytes:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}]}
        if stream:
            body["stream"] = True
        return post_request(self.port, self.path, body, self.token)


def post_request(port: int, path: str, body: dict, token: str | None = None) -> bytes:
    """A raw HTTP/1.1 POST of `body` as JSON."""
    data = json.dumps(body).encode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}Content-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


class Connection:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.reusable = True

    @classmethod
    async def open(cls, port: int, local_address: str | None = None) -> "Connection":
        """A connection from `local_address` (another loopback address is another client), else 127.0.0.1."""
        return cls(
            *await asyncio.open_connection("127.0.0.1", port, local_addr=(local_address, 0) if local_address else None)
        )

    async def request(self, raw: bytes) -> tuple[int, bytes, float | None]:
        """Sends one request; returns the status, the body and when the body's first byte arrived."""
        self.writer.write(raw)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower().split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        fields = {name.strip(): value.strip() for name, _, value in (line.partition(":") for line in head[1:])}
        self.reusable = fields.get("connection") != "close"
        first = None
        if "chunked" in fields.get("transfer-encoding", ""):
            parts = []
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                first = first or time.perf_counter()
                parts.append((await self.reader.readexactly(size + 2))[:-2])
            while await self.reader.readline() != b"\r\n":
                pass  # trailers
            return status, b"".join(parts), first
        if status in (204, 304):
            return status, b"", None
        if "content-length" in fields:
            body = await self.reader.readexactly(int(fields["content-length"]))
        else:
            body, self.reusable = await self.reader.read(), False
        return status, body, time.perf_counter()

    def close(self) -> None:
        self.writer.close()


def percentile(samples: list[float], p: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[p - 1] if len(samples) > 1 else samples[0]


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def busy_cores_since(start: tuple[int, int] | None = None) -> tuple[int, int] | float:
    """The machine's busy and total CPU jiffies now (no argument), or how many cores were busy since `start`."""
    with open("/proc/stat") as stat:
        user, nice, system, idle, iowait, *rest = map(int, stat.readline().split()[1:])
    busy, total = user + nice + system + sum(rest), user + nice + system + idle + iowait + sum(rest)
    if start is None:
        return busy, total
    return (busy - start[0]) / max(1, total - start[1]) * (os.cpu_count() or 1)


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def other_services() -> dict[str, str]:
    """Credentials of every service besides OpenAI (none of which the load uses) and one declared OpenAI-compatible
    service: what a request to OpenAI pays for services that are configured but not used."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem = private_key.decode().strip().replace("\n", "\\n")  # one line, as GCP_CREDENTIALS carries it
    return {
        "ANTHROPIC_KEY": "sk-ant-bench-one,sk-ant-bench-two",
        "AZURE_CREDENTIALS": "contoso:gpt-4o:bench-azure-key,contoso:embed:bench-azure-key",
        "AWS_CREDENTIALS": "AKIABENCHBENCHBENCH0:bench-aws-secret:us-east-1",
        "GCP_CREDENTIALS": f"bench-project:bench@bench-project.iam.gserviceaccount.com:us-east5:{pem}",
        "GOOGLE_AI_KEY": "AIzaBenchBenchBenchBenchBenchBenchBench",
        "SERVICES": json.dumps([{"name": "local", "url": "http://127.0.0.1:9/v1"}]),
        "LOCAL_KEY": "bench-local-key",
    }


async def in_turns(targets: list[Target], prompt: str, stream: bool, rounds: int, per_round: int) -> dict:
    """Sequential requests, one keep-alive connection per target; the targets take turns, `per_round` requests
    each, so that the machine's slow spells (they last seconds here) hit every target alike. Round 0 only
    warms up. Returns each target's (total ms, first body byte ms) per request; a failure stops the benchmark."""
    conns = {target.name: await Connection.open(target.port) for target in targets}
    samples = {target.name: [] for target in targets}
    for round_ in range(1 + rounds):
        for target in targets:
            raw = target.request(prompt, stream)
            for _ in range(per_round):
                started = time.perf_counter()
                status, body, first = await conns[target.name].request(raw)
                complete = body.rstrip().endswith(b"data: [DONE]") if stream else b'"chat.completion"' in body
                if status != 200 or not complete:
                    raise RuntimeError(f"{target.name} answered {status}: {body[-300:]!r}")
                if round_:
                    samples[target.name].append(((time.perf_counter() - started) * 1000, (first - started) * 1000))
    for conn in conns.values():
        conn.close()
    return samples


async def throughput(target: Target, seconds: float, also: tuple[Target, ...] = ()) -> dict[str, float]:
    """CONCURRENCY keep-alive connections sending requests back to back for a fixed time; with `also`, the
    connections are spread round-robin over `target` and those (a load balancer in front of instances)."""
    raw, counts = target.request(HELLO), collections.Counter()
    ports = [member.port for member in (target, *also)]
    conns = [(await Connection.open(ports[i % len(ports)]), ports[i % len(ports)]) for i in range(CONCURRENCY)]

    async def worker(conn: Connection | None, port: int) -> None:
        while time.perf_counter() < deadline:
            try:
                conn = conn or await Connection.open(port)
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    status, _, _ = await conn.request(raw)
                counts["ok" if status == 200 else f"HTTP {status}"] += 1
                if not conn.reusable:
                    conn.close()
                    conn = None
            except CLIENT_ERRORS as e:
                counts[type(e).__name__] += 1
                if conn:
                    conn.close()
                conn = None
        if conn:
            conn.close()

    server_cpu, client_cpu, started = cpu_seconds(target.pid), time.process_time(), time.perf_counter()
    machine = busy_cores_since()
    deadline = started + seconds
    await asyncio.gather(*(worker(conn, port) for conn, port in conns))
    elapsed, requests = time.perf_counter() - started, max(1, sum(counts.values()))
    return {
        "rps": counts["ok"] / elapsed,
        "errors": requests - counts["ok"],
        "client_us": (time.process_time() - client_cpu) / requests * 1e6,
        "busy_cores": busy_cores_since(machine),
        "server_us": (cpu_seconds(target.pid) - server_cpu) / requests * 1e6 if target.pid else None,
        "error_kinds": {kind: n for kind, n in counts.items() if kind != "ok"},
    }


async def throughput_in_turns(
    runs: dict[str, Callable[[float], Awaitable[dict]]], seconds: float, rounds: int = THROUGHPUT_ROUNDS
) -> dict[str, dict]:
    """Each named throughput run `rounds` times for `seconds / rounds`, the runs taking turns, so that the machine's
    slow spells (they last seconds here, and moved a single 8 s ratio by ±10 %) hit every run alike; each run's
    median round, with the errors of all rounds."""
    rounds_of: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            rounds_of[name].append(await run(seconds / rounds))
    results = {}
    for name, measured in rounds_of.items():
        middle = sorted(measured, key=lambda result: result["rps"])[len(measured) // 2]
        errors = collections.Counter()
        for result in measured:
            errors.update(result["error_kinds"])
        results[name] = {**middle, "errors": sum(errors.values()), "error_kinds": dict(errors)}
    return results


async def streams(target: Target, n: int, ramp: float) -> dict[str, float]:
    """N streams at once, each on its own connection, started over `ramp` seconds; peak RSS sampled meanwhile."""
    raw, errors, peak = target.request(STREAM_PROMPT, stream=True), collections.Counter(), [rss_mb(target.pid)]

    async def one(i: int) -> float | None:
        await asyncio.sleep(i * ramp / n)
        started, conn = time.perf_counter(), None
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                conn = await Connection.open(target.port)
                status, body, _ = await conn.request(raw)
        except CLIENT_ERRORS as e:
            errors[type(e).__name__] += 1
            return None
        finally:
            if conn:
                conn.close()
        if status != 200 or not body.rstrip().endswith(b"data: [DONE]"):
            errors[f"HTTP {status}" if status != 200 else "incomplete stream"] += 1
            return None
        return (time.perf_counter() - started) * 1000

    async def sample_rss() -> None:
        while True:
            peak.append(rss_mb(target.pid))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample_rss()) if target.pid else None
    server_cpu = cpu_seconds(target.pid)
    totals = [t for t in await asyncio.gather(*(one(i) for i in range(n))) if t is not None]
    if sampler:
        sampler.cancel()
    return {
        "errors": n - len(totals),
        "p50": statistics.median(totals) if totals else None,
        "p99": percentile(totals, 99) if totals else None,
        "server_ms": (cpu_seconds(target.pid) - server_cpu) / n * 1000 if target.pid else None,
        "rss_peak": max(peak) if target.pid else None,
        "error_kinds": dict(errors),
    }


async def clear_fake_records(fake: Target) -> None:
    """The fake keeps every request it saw; forget them between phases so its memory stays flat."""
    conn = await Connection.open(fake.port)
    await conn.request(b"DELETE /_fake/requests HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
    conn.close()


async def failing_pool(target: Target, n: int, concurrency: int = 8) -> dict[str, float]:
    """`n` requests over `concurrency` connections, counting successes; then the first SSE byte of 10 streams."""
    raw, latencies, statuses = target.request(HELLO), [], collections.Counter()
    remaining = iter(range(n))

    async def worker() -> None:
        conn = await Connection.open(target.port)
        for _ in remaining:
            started = time.perf_counter()
            status, _, _ = await conn.request(raw)
            latencies.append((time.perf_counter() - started) * 1000)
            statuses[status] += 1
        conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    conn, firsts = await Connection.open(target.port), []
    for _ in range(10):
        started = time.perf_counter()
        status, _, first = await conn.request(target.request(FIRST_BYTE_PROMPT, stream=True))
        statuses[status] += 1
        firsts.append((first - started) * 1000)
    conn.close()
    return {
        "success": statuses[200] / (n + 10),
        "p50": statistics.median(latencies),
        "first_byte": statistics.median(firsts),
    }


# -- affinity: agent conversations on a pool of rate-limited keys, each key with its own prompt cache ------------

AGENT_KEYS = 8
AGENT_SESSIONS = 20
AGENT_PREFIX_WORDS = 6000  # the agent's instructions: long, and the same in every turn (the fake counts words)
AGENT_TURN_WORDS = (2000, 3000)  # what each turn adds: tool output, files read
AGENT_GENERATION_MS = 500  # how long the fake takes to answer a turn
AGENT_BUDGET = (30, 5)  # each key's rate limit: requests per window of seconds
WITH_AFFINITY, WITHOUT_AFFINITY = "with affinity", "without (AFFINITY=false)"
AGENT_PROXIES = {WITH_AFFINITY: ("on", "true"), WITHOUT_AFFINITY: ("off", "false")}  # the keys' tag, AFFINITY


def agent_keys(tag: str) -> list[str]:
    return [f"sk-bench-{tag}-{n}" for n in range(AGENT_KEYS)]


def cacheable(prompt_tokens: int) -> int:
    """What the fake's cache keeps of a prompt: its whole blocks, once it is long enough."""
    return prompt_tokens // CACHE_BLOCK * CACHE_BLOCK if prompt_tokens >= CACHE_MINIMUM else 0


async def agent_sessions(fake: Target, proxy: Target, turns: int, run: int) -> collections.Counter:
    """AGENT_SESSIONS agent conversations at once through `proxy`, each from its own client address, over its
    keys (tagged with its name; fresh caches, AGENT_BUDGET each). Returns the prompt tokens, the tokens read from
    the cache, the ideal read (every turn after the first reads all that the turn before wrote), turns, time and
    429s. `run` makes the conversations new ones to the proxy; their prompts are the same in every run."""
    await clear_fake_records(fake)
    conn = await Connection.open(fake.port)
    for key in agent_keys(proxy.name):
        spec = json.dumps({"behaviour": "ok", "budget": AGENT_BUDGET[0], "budget_seconds": AGENT_BUDGET[1]}).encode()
        await conn.request(
            f"PUT /_fake/keys/{key} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(spec)}\r\n\r\n".encode()
            + spec
        )
    conn.close()
    totals = collections.Counter()

    async def conversation(n: int) -> None:
        rng = random.Random(n)  # the same conversations in both runs

        def words(count: int) -> str:
            return " ".join(f"w{rng.randrange(50_000)}" for _ in range(count))

        instructions = f"You are agent {n}. #fake:delay_ms={AGENT_GENERATION_MS} {words(AGENT_PREFIX_WORDS)}"
        history, previous = [], 0
        conn = await Connection.open(proxy.port, f"127.0.0.{10 + n}")
        try:
            for turn in range(turns):
                history.append({"role": "user", "content": words(rng.randint(*AGENT_TURN_WORDS))})
                body = {
                    "model": "gpt-4o",
                    "instructions": instructions,
                    "input": history,
                    "store": False,
                    "prompt_cache_key": f"agent-{n}-run-{run}",
                }
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    status, answer, _ = await conn.request(post_request(proxy.port, proxy.path, body))
                if status != 200:
                    totals["errors"] += 1
                    return
                answer = json.loads(answer)
                prompt, read = answer["usage"]["input_tokens"], answer["usage"]["input_tokens_details"]["cached_tokens"]
                totals.update(prompt=prompt, read=read, ideal=cacheable(previous) if turn else 0, turns=1)
                previous = prompt
                history.append({"role": "assistant", "content": answer["output"][-1]["content"][0]["text"]})
        except CLIENT_ERRORS:
            totals["errors"] += 1
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(conversation(n) for n in range(AGENT_SESSIONS)))
    elapsed = time.perf_counter() - started
    attempts = await count_fake_requests(fake, f"sk-bench-{proxy.name}-")
    totals.update(seconds=elapsed, rate_limited=attempts - totals["turns"])
    return totals


def time_token_count() -> tuple[int, float]:
    """The proxy's prompt count of a chat request of about 100,000 tokens: (tokens, median ms of 3)."""
    from llmproxy import tokens

    tokens.encoding("o200k_base")  # loaded by the first prompt the proxy counts
    body = {"messages": [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 10_000}]}
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        counted = tokens.count_prompt("openai", "gpt-4o", tokens.model_input(body)).high
        timings.append((time.perf_counter() - started) * 1000)
    return counted, statistics.median(timings)


async def count_fake_requests(fake: Target, key_marker: str) -> int:
    """How many requests the fake saw with a key containing `key_marker`."""
    conn = await Connection.open(fake.port)
    _, body, _ = await conn.request(b"GET /_fake/requests HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    conn.close()
    return sum(key_marker in (recorded["key"] or "") for recorded in json.loads(body))


async def measure(
    targets: list[Target],
    half_limited: Target,
    shared: tuple[Target, Target, Target, Target],
    agents: dict[str, Target],
    settings: Settings,
    profile: Path | None = None,
) -> dict:
    """Every measurement against every target: sequential ones taking turns, loads one target at a time; then
    this proxy against a copy of itself whose pool has half its keys always answering 429; then agent
    conversations through a proxy with affinity and one without."""
    results = {"rss_start": {t.name: rss_mb(t.pid) for t in targets}, "latency": {}, "first_byte": {}}
    print("  latency and first SSE byte, the targets taking turns ...", file=sys.stderr, flush=True)
    for name, samples in (await in_turns(targets, HELLO, False, settings.latency_requests // 50, 50)).items():
        totals = [total for total, _ in samples]
        results["latency"][name] = {"p50": statistics.median(totals), "p99": percentile(totals, 99)}
    # Two streams back to back on each turn: a stream that follows another on a kept-alive connection is the
    # common case (an agent's turns), and the one where a Nagle delay showed (40 ms, while the first was on time).
    first_bytes = await in_turns(targets, FIRST_BYTE_PROMPT, True, settings.first_byte_tries // 2, 2)
    for name, samples in first_bytes.items():
        results["first_byte"][name] = {"ms": statistics.median(first for _, first in samples)}
    print("  throughput, the targets taking turns ...", file=sys.stderr, flush=True)
    await clear_fake_records(targets[0])
    runs = {target.name: functools.partial(throughput, target) for target in targets}
    results["throughput"] = await throughput_in_turns(runs, settings.throughput_seconds)
    if profile:
        print("  throughput of this proxy under py-spy ...", file=sys.stderr, flush=True)
        with profiling(targets[2].pid, settings.throughput_seconds, profile):
            await throughput(targets[2], settings.throughput_seconds)
    results["streams"] = {}
    for target in targets:
        await clear_fake_records(targets[0])
        print(f"  streams    {target.name} ...", file=sys.stderr, flush=True)
        results["streams"][target.name] = await streams(target, settings.streams, settings.ramp_seconds)
    await asyncio.sleep(1)
    results["rss_end"] = {t.name: rss_mb(t.pid) for t in targets}
    results["token_count"] = time_token_count()
    print(
        "  throughput with the Redis store and user tokens (1 instance, 2), the default, and the default with every "
        "other service configured, in turns ...",
        file=sys.stderr,
        flush=True,
    )
    one, two, default, every_service = shared
    results["scale_out"] = await throughput_in_turns(
        {
            "1 instance": functools.partial(throughput, one),
            "2 instances": functools.partial(throughput, one, also=(two,)),
            "default configuration": functools.partial(throughput, default),
            EVERY_SERVICE: functools.partial(throughput, every_service),
        },
        settings.throughput_seconds,
    )
    results["failing_pool"] = {}
    for target in [targets[2], half_limited]:
        await clear_fake_records(targets[0])
        print(f"  pool with rate-limited keys: {target.name} ...", file=sys.stderr, flush=True)
        results["failing_pool"][target.name] = await failing_pool(target, settings.failing_pool_requests)
        results["failing_pool"][target.name]["retries"] = await count_fake_requests(targets[0], "-429")
    results["affinity"] = {name: collections.Counter() for name in agents}
    for name in agents:  # the first agent conversations a process sees are slower; they warm up and are not counted
        await agent_sessions(targets[0], agents[name], 2, run=-1)
    for run, name in enumerate([*agents, *reversed(agents)]):  # in turns, so that a drift of the machine hits both
        print(f"  agent conversations, {name} ...", file=sys.stderr, flush=True)
        results["affinity"][name].update(await agent_sessions(targets[0], agents[name], settings.agent_turns, run))
    await clear_fake_records(targets[0])
    return results


@contextlib.contextmanager
def profiling(pid: int, seconds: float, output: Path):
    """py-spy samples the process for `seconds` while the body loads it, and writes its profile to `output`."""
    command = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--duration"]
    command += [str(max(1, round(seconds))), "--rate", "250", "--format", "speedscope", "--output", str(output)]
    sampler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield
    finally:
        _, errors = sampler.communicate(timeout=seconds + 30)
        if sampler.returncode:
            print(f"  py-spy could not profile the proxy: {errors.decode(errors='replace').strip()}", file=sys.stderr)
        else:
            print(f"  profile of this proxy under load: {output}", file=sys.stderr)


def report(results: dict, names: list[str], settings: Settings) -> None:
    """The table, the targets and anything that went wrong in detail."""
    direct, bare, proxy = names
    n = settings.streams

    def get(phase: str, key: str) -> dict:
        return {name: results[phase][name][key] for name in names}

    lat50, thr, fb, st50 = (
        get("latency", "p50"),
        get("throughput", "rps"),
        get("first_byte", "ms"),
        get("streams", "p50"),
    )
    added = {name: lat50[name] - lat50[direct] for name in names}
    rows = [
        ("latency c=1 p50 (ms)", lat50, ".2f"),
        ("latency c=1 p99 (ms)", get("latency", "p99"), ".2f"),
        ("added latency p50 (ms)", added, ".2f"),
        (f"throughput c={CONCURRENCY} (req/s)", thr, ".0f"),
        (f"throughput c={CONCURRENCY} errors", get("throughput", "errors"), "d"),
        ("throughput: proxy process CPU (us/req)", get("throughput", "server_us"), ".0f"),
        ("throughput: client CPU (us/req)", get("throughput", "client_us"), ".0f"),
        ("first SSE byte, median (ms)", fb, ".2f"),
        (f"{n} streams: errors", get("streams", "errors"), "d"),
        (f"{n} streams: total p50 (ms)", st50, ".0f"),
        (f"{n} streams: total p99 (ms)", get("streams", "p99"), ".0f"),
        (f"{n} streams: proxy process CPU (ms/stream)", get("streams", "server_ms"), ".1f"),
        ("RSS after start-up (MB)", results["rss_start"], ".1f"),
        (f"RSS peak, {n} streams (MB)", get("streams", "rss_peak"), ".1f"),
        ("RSS at the end (MB)", results["rss_end"], ".1f"),
    ]
    cell = lambda value, fmt: "-" if value is None else format(value, fmt)  # noqa: E731
    ratio = lambda a, b: "-" if a is None or not b else f"{a / b:.2f}"  # noqa: E731
    header = ("measurement", "direct", "bare mitmdump", "this proxy", "proxy÷bare", "proxy÷direct")
    lines = [header] + [
        (
            label,
            *(cell(values[name], fmt) for name in names),
            ratio(values[proxy], values[bare]),
            ratio(values[proxy], values[direct]),
        )
        for label, values, fmt in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join([line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)]))

    rss = results["rss_end"]
    scale_out = results["scale_out"]
    single, double = scale_out["1 instance"]["rps"], scale_out["2 instances"]["rps"]
    default = scale_out["default configuration"]["rps"]
    every = scale_out[EVERY_SERVICE]["rps"]
    targets = [
        (f"throughput ≥ 1.0× bare mitmdump ({thr[proxy] / thr[bare]:.2f}×)", thr[proxy] >= thr[bare]),
        (
            f"p50 added latency ≤ bare's + 0.5 ms ({added[proxy]:.2f} vs {added[bare]:.2f} ms)",
            added[proxy] <= added[bare] + 0.5,
        ),
        (f"first SSE byte within 1 ms of bare mitmdump ({fb[proxy] - fb[bare]:+.2f} ms)", fb[proxy] <= fb[bare] + 1),
        (
            f"{n} streams: 0 errors, total p50 ≤ 1.2× bare ({results['streams'][proxy]['errors']} errors, "
            + (f"{st50[proxy] / st50[bare]:.2f}×)" if st50[proxy] and st50[bare] else "no p50)"),
            results["streams"][proxy]["errors"] == 0
            and bool(st50[proxy] and st50[bare])
            and st50[proxy] <= 1.2 * st50[bare],
        ),
        (f"RSS after the streams ≤ 1.5× bare ({rss[proxy] / rss[bare]:.2f}×)", rss[proxy] <= 1.5 * rss[bare]),
        (f"two instances sharing Redis ≥ 1.6× one ({double / single:.2f}×)", double >= 1.6 * single),
        (
            f"one instance with user tokens and Redis ≥ 0.8× the default configuration ({single / default:.2f}×)",
            single >= 0.8 * default,
        ),
        (
            f"services configured but not used cost nothing a request: ≥ 0.95× the default ({every / default:.2f}×)",
            every >= 0.95 * default,
        ),
    ]
    print("\ntargets:")
    for text, met in targets:
        print(f"  [{'met' if met else 'MISSED'}] {text}")
    for phase in ("throughput", "streams"):
        for name in names:
            if kinds := results[phase][name]["error_kinds"]:
                print(f"  {phase} errors at {name}: {kinds}")

    good, half = results["failing_pool"][proxy], results["failing_pool"][HALF_LIMITED]
    print(
        f"\npool of 4 keys, 2 of them always answering 429; {settings.failing_pool_requests} requests at c=8, "
        "then 10 streams:"
    )
    print(f"  {'':<28}{'all keys work':>15}{'half rate-limited':>19}")
    print(f"  {'success rate':<28}{good['success']:>15.1%}{half['success']:>19.1%}")
    print(
        f"  {'p50 latency (ms)':<28}{good['p50']:>15.2f}{half['p50']:>19.2f}"
        f"   (+{half['p50'] - good['p50']:.2f} ms from retries)"
    )
    print(f"  {'first SSE byte, median (ms)':<28}{good['first_byte']:>15.2f}{half['first_byte']:>19.2f}")
    print(f"  {'attempts on 429 keys':<28}{good['retries']:>15}{half['retries']:>19}")
    print(f"  [{'met' if half['success'] == 1 else 'MISSED'}] every request answered 200 despite the 429 keys")
    print(
        f"\nRedis store and user tokens, c={CONCURRENCY}, against the canned upstream: 1 instance {single:.0f} req/s, "
        f"2 instances behind a round-robin {double:.0f} req/s ({double / single:.2f}x); the default configuration "
        f"{default:.0f} req/s, and with every other service configured but not used {every:.0f} req/s, in the same "
        f"turns. Busy cores of {os.cpu_count()}: "
        + ", ".join(f"{name} {result['busy_cores']:.2f}" for name, result in scale_out.items())
    )
    counted, milliseconds = results["token_count"]
    print(f"\ncounting a {counted:,}-token prompt (o200k_base, on a worker thread in the proxy): {milliseconds:.0f} ms")
    report_affinity(results["affinity"], settings)


def report_affinity(runs: dict[str, dict], settings: Settings) -> None:
    on, off = runs[WITH_AFFINITY], runs[WITHOUT_AFFINITY]
    print(
        f"\naffinity: {AGENT_SESSIONS} agent conversations at once, {settings.agent_turns} turns each "
        f"({AGENT_PREFIX_WORDS:,}-token instructions, {AGENT_TURN_WORDS[0]:,}-{AGENT_TURN_WORDS[1]:,} tokens "
        f"added a turn, {AGENT_GENERATION_MS} ms to answer), on {AGENT_KEYS} keys of {AGENT_BUDGET[0]} requests "
        f"per {AGENT_BUDGET[1]} s, each with its own prompt cache:"
    )
    rows = [
        ("cache reads, share of input tokens", lambda r: f"{r['read'] / max(1, r['prompt']):.1%}"),
        ("ideal (every later turn reads the last)", lambda r: f"{r['ideal'] / max(1, r['prompt']):.1%}"),
        ("cache reads, share of the ideal", lambda r: f"{r['read'] / max(1, r['ideal']):.1%}"),
        ("turns per second", lambda r: f"{r['turns'] / r['seconds']:.1f}"),
        ("turns answered", lambda r: f"{r['turns']}"),
        ("upstream 429s (extra attempts)", lambda r: f"{r['rate_limited']}"),
        ("errors", lambda r: f"{r['errors']}"),
    ]
    print(f"  {'':<42}{WITH_AFFINITY:>16}{WITHOUT_AFFINITY:>28}")
    for label, cell in rows:
        print(f"  {label:<42}{cell(on):>16}{cell(off):>28}")
    share, speed = on["read"] / max(1, on["ideal"]), (on["turns"] / on["seconds"]) / (off["turns"] / off["seconds"])
    for text, met in [
        (f"with affinity at least 95 % of the ideal cache reads ({share:.1%})", share >= 0.95),
        (f"no loss of throughput ({speed:.2f}x the turns per second without)", speed >= 0.95),
        (
            f"no more 429s than without ({on['rate_limited']} vs {off['rate_limited']})",
            on["rate_limited"] <= off["rate_limited"],
        ),
        ("every turn answered", on["errors"] == off["errors"] == 0),
    ]:
        print(f"  [{'met' if met else 'MISSED'}] {text}")


def spawn(command: list[str], log_path: Path, cwd: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            command,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def wait_for_port(process: subprocess.Popen, log_path: Path, timeout: float = 15) -> int:
    """Waits for the process's "listening" line and returns the port it names."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if match := _LISTENING.search(log_path.read_bytes()):
            return int(match.group(1))
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:3]} exited with {process.returncode}; see {log_path}")
        time.sleep(0.05)
    raise RuntimeError(f"{process.args[:3]} did not start within {timeout} s; see {log_path}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs and 50 streams instead of 500")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="write py-spy's profile of this proxy under the c=16 load to FILE (speedscope JSON: speedscope.app); "
        "sampling slows the proxy, so that run's throughput reads low",
    )
    arguments = parser.parse_args()
    settings = QUICK if arguments.quick else FULL
    workdir = Path(tempfile.mkdtemp(prefix="llmproxy-bench-"))
    logs = {
        "fake upstream": workdir / "fake.log",
        "canned upstream": workdir / "canned.log",
        "bare mitmdump": workdir / "mitmdump.log",
    }
    processes: list[subprocess.Popen] = []
    proxy = half_limited = redis = None
    agent_proxies: dict[str, ProxyProcess] = {}
    instances: list[ProxyProcess] = []
    started, failed = time.monotonic(), True
    try:
        fake = spawn([sys.executable, "-m", "tests.fakeupstream", "--port", "0"], logs["fake upstream"], ROOT)
        processes.append(fake)
        fake_port = wait_for_port(fake, logs["fake upstream"])
        fake_url = f"http://127.0.0.1:{fake_port}"
        bare = spawn(  # waited for after the proxy started: both boot at once
            [
                sys.executable,
                "-c",
                "from mitmproxy.tools.main import mitmdump; mitmdump()",
                "--mode",
                f"reverse:{fake_url}@127.0.0.1:0",
                "-s",
                str(Path(__file__).with_name("stream_responses.py")),
                "--set",
                f"confdir={workdir / 'conf'}",
            ],
            logs["bare mitmdump"],
            workdir,
        )
        processes.append(bare)
        upstreams = {
            "OPENAI_UPSTREAM_URL": fake_url,
            "ANTHROPIC_UPSTREAM_URL": fake_url,
            "CHECK_KEYS": "false",
            "MODEL_RATE_LIMIT": "0",
        }
        canned = spawn([sys.executable, "-m", "tests.bench.canned_upstream"], logs["canned upstream"], ROOT)
        processes.append(canned)
        canned_url = f"http://127.0.0.1:{wait_for_port(canned, logs['canned upstream'])}"
        canned_upstreams = {**upstreams, "OPENAI_UPSTREAM_URL": canned_url}
        proxy = ProxyProcess({"OPENAI_KEY": "sk-bench-one,sk-bench-two", **upstreams})
        half_limited = ProxyProcess(
            {"OPENAI_KEY": "sk-bench-a,sk-bench-b-429,sk-bench-c,sk-bench-d-429", **upstreams},
        )
        logs["this proxy"], logs[HALF_LIMITED] = proxy.log_path, half_limited.log_path
        for name, (tag, setting) in AGENT_PROXIES.items():
            agent_proxies[name] = ProxyProcess(
                {**upstreams, "OPENAI_KEY": ",".join(agent_keys(tag)), "AFFINITY": setting},
            )
        proxy.start()
        half_limited.start()
        for process in agent_proxies.values():
            process.start()
        redis = RedisServer().start()
        shared_env = {
            "OPENAI_KEY": "sk-bench-one,sk-bench-two",
            **canned_upstreams,
            "STORE": "redis",
            "REDIS_URL": redis.url,
            "GATEKEEPER": "user_token",
            "ADMIN_KEY": "bench-admin",
        }
        instances = [ProxyProcess(shared_env).start() for _ in range(2)]
        instances.append(ProxyProcess({"OPENAI_KEY": "sk-bench-one,sk-bench-two", **canned_upstreams}).start())
        every_service = {"OPENAI_KEY": "sk-bench-one,sk-bench-two", **canned_upstreams, **other_services()}
        instances.append(ProxyProcess(every_service).start())
        token = httpx.post(
            f"{instances[0].url}/admin/users",
            json={"nickname": "bench"},
            headers={"authorization": "Bearer bench-admin"},
        ).json()["token"]
        targets = [
            Target("direct", fake_port, "/v1/chat/completions", None),
            Target("bare mitmdump", wait_for_port(bare, logs["bare mitmdump"]), "/v1/chat/completions", bare.pid),
            Target("this proxy", proxy.port, "/proxy/openai/v1/chat/completions", proxy.process.pid),
        ]
        print(
            f"benchmark ({'quick' if settings is QUICK else 'full'}): {settings}; {os.cpu_count()} cores",
            file=sys.stderr,
        )
        limited = Target(HALF_LIMITED, half_limited.port, targets[2].path, half_limited.process.pid)
        shared = tuple(
            Target(name, p.port, targets[2].path, p.process.pid, token if name.startswith("instance") else KEY)
            for name, p in zip(
                ("instance 1", "instance 2", "default configuration", EVERY_SERVICE), instances, strict=True
            )
        )
        agents = {
            name: Target(AGENT_PROXIES[name][0], process.port, "/proxy/openai/v1/responses", process.process.pid)
            for name, process in agent_proxies.items()
        }
        results = asyncio.run(measure(targets, limited, shared, agents, settings, arguments.profile))
        print()
        report(results, [t.name for t in targets], settings)
        print(f"\nbenchmark took {time.monotonic() - started:.0f} s")
        failed = False
        return 0
    except KeyboardInterrupt:
        print("benchmark interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("benchmark failed", file=sys.stderr)
        return 1
    finally:
        for process in (proxy, half_limited, *instances, *agent_proxies.values()):
            if process:
                process.stop()
        if redis:
            redis.stop()
        for process in reversed(processes):
            stop(process)
        if failed:  # the logs are kept only when they may be needed
            print("logs:\n" + "\n".join(f"  {name}: {path}" for name, path in logs.items()), file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.rmtree(proxy.workdir, ignore_errors=True)
            for process in (half_limited, *instances, *agent_proxies.values()):
                shutil.rmtree(process.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
