"""Checks every key against its API in the background, without spending tokens.

Each service says how (llmproxy/services): a model list (`GET /v1/models`) tells whether the key works and which
families it can use; OpenAI's `GET /v1/organizations` names a key's organisations, and each extra organisation
becomes a pool entry of its own.
Working keys are checked every `key_check_interval`; retired ones far more rarely, and they come back when the
upstream says they work again.

It also decides every suspicion: an answer to a client's request that would retire a key (or bar it from a family)
only makes the key suspect, because a client can provoke such answers. The checker then sends its own probe with
no client input: a generation request with an empty message list, which a working key gets refused as invalid
(no tokens spent) and a dead key gets refused as dead, for the suspect's model. Its answer decides.
"""

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import aiohttp
from yarl import URL

from llmproxy.pool.keys import ACTIVE, OVER_QUOTA, REVOKED, KeyPool, PoolKey, Verdict
from llmproxy.services.base import Service

logger = logging.getLogger(__name__)

CONCURRENT_CHECKS = 4
RETIRED_CHECK_FACTOR = 6  # retired keys are checked this many times less often
MAX_BACKOFF = 600.0


class Upstream(Protocol):
    """The dispatcher's connection to the APIs, which the checker's own requests use too."""

    ready: asyncio.Event  # set once `session` is open
    session: aiohttp.ClientSession | None
    upstreams: dict[str, URL]  # each service's base URL


class KeyChecker:
    """Runs the checks: all keys at start-up, then each key again when it is due; and decides suspicions.

    `family_of(api, model)` names a model's family (None: no family), for the families a key can use."""

    def __init__(
        self,
        services: Sequence[Service],
        pool: KeyPool,
        family_of: Callable[[str, str], str | None],
        upstream: Upstream,
    ):
        self.services = {service.name: service for service in services}
        self.pool = pool
        self.family_of = family_of
        self.upstream = upstream
        self.interval = 3600  # KEY_CHECK_INTERVAL: seconds between two checks of a working key
        self.status = "Key checking is disabled."
        self.checked_at: dict[str, float] = {}
        self.failures: dict[str, int] = {}
        self._task: asyncio.Task | None = None
        self._probes: dict[tuple[str, str], asyncio.Task] = {}  # (key id, family) -> its running confirmation

    def start(self) -> None:
        """Starts the periodic checks in the background."""
        self._task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def _run(self) -> None:
        await self.upstream.ready.wait()
        semaphore = asyncio.Semaphore(CONCURRENT_CHECKS)

        async def check_one(key: PoolKey) -> None:
            async with semaphore:
                await self.check(key)

        while True:
            keys = [key for key in list(self.pool.all_keys()) if self._is_due(key)]
            if keys:
                self.status = f"Checking {len(keys)} keys."
                await asyncio.gather(*(check_one(key) for key in keys))
                self.status = "Finished checking keys."
            await asyncio.sleep(1)

    def recheck_all(self) -> None:
        """Makes every key due for a check now (the admin API's re-check)."""
        self.checked_at.clear()
        self.failures.clear()

    def _is_due(self, key: PoolKey) -> bool:
        if key.id not in self.checked_at:
            return True
        interval = self.interval * (1 if key.state == ACTIVE else RETIRED_CHECK_FACTOR)
        if failures := self.failures.get(key.id):
            interval = min(MAX_BACKOFF, 2**failures)
        return time.time() - self.checked_at[key.id] >= interval

    async def check(self, key: PoolKey) -> None:
        """One check of one key, as its service checks keys; network trouble is retried with exponential back-off."""
        service = self.services[key.service]
        self.checked_at[key.id] = time.time()
        try:
            found = await service.check(key, self.upstream.session, self.upstream.upstreams[key.service])
        except (aiohttp.ClientError, TimeoutError) as error:
            self.failures[key.id] = self.failures.get(key.id, 0) + 1
            logger.info("key %s check failed (%s); retrying later", key.id, type(error).__name__)
            return
        self.failures.pop(key.id, None)
        if found.verdict is Verdict.SUCCESS:
            key.families = {f for model in found.models if (f := self.family_of(key.service, model))} or None
            self.pool.set_state(key, ACTIVE, "the key check succeeded")
            self.pool.add_organizations(key, found.organizations)
        elif found.verdict in (Verdict.REVOKED, Verdict.OVER_QUOTA):
            self.pool.set_state(key, REVOKED if found.verdict is Verdict.REVOKED else OVER_QUOTA, found.reason)
        else:
            logger.info("key %s check got %d; keeping its state", key.id, found.status)

    def confirm(self, key: PoolKey, suspected: Verdict, family: str, model: str) -> None:
        """Starts the probe that decides a suspicion (one at a time per key and family)."""
        if (key.id, family) in self._probes:
            return
        probe = asyncio.create_task(self._confirm(key, suspected, family, model))
        self._probes[(key.id, family)] = probe
        probe.add_done_callback(lambda _: self._probes.pop((key.id, family), None))

    async def _confirm(self, key: PoolKey, suspected: Verdict, family: str, model: str) -> None:
        await self.upstream.ready.wait()
        service = self.services[key.service]
        try:
            status, verdict = await service.probe(
                key, model, self.upstream.session, self.upstream.upstreams[key.service]
            )
        except (aiohttp.ClientError, TimeoutError) as error:
            self.pool.clear_suspicion(key, family, f"its probe could not reach the API ({type(error).__name__})")
            return
        reason = f"an answer to a request said {suspected.value}; the checker's probe confirmed it with HTTP {status}"
        if verdict in (Verdict.REVOKED, Verdict.OVER_QUOTA):
            self.pool.set_state(key, REVOKED if verdict is Verdict.REVOKED else OVER_QUOTA, reason)
        elif verdict is Verdict.FAMILY_FORBIDDEN:
            self.pool.forbid_family(key, family, reason)
            self.pool.clear_suspicion(key, family, "only the family was refused")
        else:
            self.pool.clear_suspicion(key, family, f"the checker's probe got HTTP {status}, so the request caused it")
