"""The wait queue: a request that finds every key of its family resting waits here instead of failing.

One queue per family. In `fair` mode the queue takes turns between identities (a user token, else the client's
address), so one identity's burst of fifty requests cannot hold another identity's single request behind it;
`fifo` serves in arrival order; `none` refuses at once with 429. A request leaves when a key becomes free.
"""

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from llmproxy.pool.keys import KeyAffinity, KeyPool, PoolKey
from llmproxy.store.storage import Storage

QUEUE_MODES = ("fair", "fifo", "none")
WAIT_HISTORY_SECONDS = 300


class QueueRefusal(Exception):
    """The request cannot wait; `status`, `code` and the message are for the client."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.code, self.retry_after = status, code, retry_after


@dataclass(eq=False)
class Waiter:
    identity: str
    arrived: float
    affinity: KeyAffinity | None = None
    granted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def _pinned_key(affinity: KeyAffinity | None) -> str | None:
    return affinity.key_id if affinity and affinity.pinned else None


@dataclass
class FamilyQueue:
    """Waiters of one family, grouped by identity; identities take turns in `fair` mode."""

    by_identity: "OrderedDict[str, deque[Waiter]]" = field(default_factory=OrderedDict)
    timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return sum(len(waiters) for waiters in self.by_identity.values())

    def add(self, waiter: Waiter, fair: bool) -> None:
        """Puts the waiter at the end of its identity's line (`fair`), or of the one line."""
        identity = waiter.identity if fair else ""
        self.by_identity.setdefault(identity, deque()).append(waiter)

    def remove(self, waiter: Waiter) -> None:
        for identity, waiters in list(self.by_identity.items()):
            if waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self.by_identity[identity]
                return

    def take(self, waiter: Waiter) -> None:
        """Removes a waiter that is being served; its identity goes to the back of the line."""
        identity = next(identity for identity, waiters in self.by_identity.items() if waiter in waiters)
        waiters = self.by_identity.pop(identity)
        waiters.remove(waiter)
        if waiters:
            self.by_identity[identity] = waiters

    def in_turn(self) -> list[Waiter]:
        """The waiters in the order the queue serves them: identities take turns, each in arrival order."""
        lines = [list(waiters) for waiters in self.by_identity.values()]
        return [line[turn] for turn in range(max(map(len, lines), default=0)) for line in lines if turn < len(line)]

    def position(self, waiter: Waiter) -> int:
        """1-based place in the order the queue would serve, for the client's heartbeat."""
        order = self.in_turn()
        return order.index(waiter) + 1 if waiter in order else 0

    def holds_back(self, affinity: KeyAffinity | None) -> bool:
        """Whether a request arriving now must wait behind the waiters: some may take the key it would take.
        A waiter pinned to a key takes no other, so it holds back only requests pinned to the same key."""
        pinned = _pinned_key(affinity)
        return any(_pinned_key(w.affinity) in (None, pinned) for waiters in self.by_identity.values() for w in waiters)

    def count(self, identity: str) -> int:
        return sum(w.identity == identity for waiters in self.by_identity.values() for w in waiters)


class WaitQueue:
    """Gives each request a free key of its family, making it wait its turn while none is free.

    A request is named by its identity (a user, else the client's address) and comes with its conversation's key
    affinity, if any. `serve_waiting` is to be called whenever a key may have become usable."""

    def __init__(self, pool: KeyPool, storage: Storage):
        self.pool = pool
        self.storage = storage
        self.queues: dict[tuple[str, str], FamilyQueue] = {}
        self.mode = "fair"  # QUEUE_MODE: fair, fifo or none
        self.timeout = 300  # QUEUE_TIMEOUT: seconds a request may wait
        self.max_per_identity = 1  # MAX_QUEUED_PER_IDENTITY: requests one identity may have waiting

    def queue(self, api: str, family: str) -> FamilyQueue:
        return self.queues.setdefault((api, family), FamilyQueue())

    def would_wait(self, identity: str, api: str, family: str, affinity: KeyAffinity | None) -> bool:
        """Whether the request would have to queue if it arrived now; raises QueueRefusal when it may not wait at
        all, so that a refusal goes out as an error status before any byte of a stream."""
        now = time.time()
        if not self.queue(api, family).holds_back(affinity) and any(
            key.is_free(family, now) for key in self.pool.candidates(api, family, affinity)
        ):
            return False
        self._check_may_wait(identity, api, family, affinity)
        return True

    def _check_may_wait(self, identity: str, api: str, family: str, affinity: KeyAffinity | None) -> None:
        """Raises QueueRefusal when no key serves the family (or the pinned key no longer serves), the queue is
        off, or the identity waits already."""
        rest = self.pool.seconds_until_free(api, family, affinity)
        if rest is None and _pinned_key(affinity):
            raise QueueRefusal(400, *affinity.unavailable)
        if rest is None:
            raise QueueRefusal(503, "no_keys_available", f"This proxy has no working key for {family} models.")
        if self.mode == "none":
            raise QueueRefusal(
                429,
                "no_key_free",
                f"Every key for {family} models is busy; try again shortly.",
                retry_after=max(1.0, rest),
            )
        if self.queue(api, family).count(identity) >= self.max_per_identity:
            raise QueueRefusal(
                429,
                "too_many_queued",
                "You already have a request waiting for a key; wait for it to finish before sending another.",
                retry_after=max(1.0, rest),
            )

    async def acquire(
        self,
        identity: str,
        api: str,
        family: str,
        arrived: float,
        affinity: KeyAffinity | None,
        on_queued: Callable[[Callable[[], int]], None],
    ) -> PoolKey:
        """A free key for the request, waiting for one if needed. Raises QueueRefusal. When the request joins the
        queue, `on_queued` is called with a function that tells its current place."""
        queue = self.queue(api, family)
        if not queue.holds_back(affinity) and (key := self.pool.choose(api, family, affinity=affinity)):
            return key
        self._check_may_wait(identity, api, family, affinity)
        waiter = Waiter(identity, arrived, affinity)
        queue.add(waiter, fair=self.mode == "fair")
        on_queued(lambda: queue.position(waiter))
        self._pump(api, family)
        remaining = arrived + self.timeout - time.time()
        try:
            key = await asyncio.wait_for(asyncio.shield(waiter.granted), max(0.0, remaining))
        except (TimeoutError, asyncio.CancelledError) as stop:
            queue.remove(waiter)
            if waiter.granted.done() and not waiter.granted.cancelled():
                self.pool.abandon(waiter.granted.result(), family)  # granted in the same instant: give it back
            if isinstance(stop, asyncio.CancelledError):
                raise
            awaited = "The key that holds this conversation" if _pinned_key(affinity) else f"No key for {family} models"
            raise QueueRefusal(
                503,
                "queue_timeout",
                f"{awaited} did not become free within {self.timeout} s; try again later.",
            ) from None
        self.storage.store.record_wait(family, time.time() - arrived)
        return key

    def serve_waiting(self) -> None:
        """Hands the keys that are free now to the waiters of every family."""
        for api, family in list(self.queues):
            self._pump(api, family)

    def _pump(self, api: str, family: str) -> None:
        """Hands free keys to waiters in turn (a pinned waiter only its key); when no waiter can be served, wakes
        up again when the next rest a waiter waits for ends."""
        queue = self.queue(api, family)
        while grant := self._next_grant(queue, api, family):
            waiter, key = grant
            queue.take(waiter)
            waiter.granted.set_result(key)
        affinities = {_pinned_key(w.affinity): w.affinity for w in queue.in_turn()}.values()
        rests = [rest for a in affinities if (rest := self.pool.seconds_until_free(api, family, a)) is not None]
        if rests and min(rests) > 0:
            if queue.timer:
                queue.timer.cancel()
            queue.timer = asyncio.get_running_loop().call_later(min(rests), self._pump, api, family)

    def _next_grant(self, queue: FamilyQueue, api: str, family: str) -> tuple[Waiter, PoolKey] | None:
        """The first waiter in turn that a free key can serve, with that key. Waiters that want what an earlier one
        could not get (any key, or the same pinned key) are not asked again."""
        refused: set[str | None] = set()
        for waiter in queue.in_turn():
            if (pinned := _pinned_key(waiter.affinity)) in refused:
                continue
            if key := self.pool.choose(api, family, affinity=waiter.affinity):
                return waiter, key
            refused.add(pinned)
        return None

    def estimated_wait(self, api: str, family: str) -> float:
        """Seconds a request arriving now may wait: recent waits, or the time until a key frees."""
        queue = self.queue(api, family)
        waits = self.storage.store.recent_waits(family, WAIT_HISTORY_SECONDS)
        recent = sum(waits) / len(waits) if waits else 0.0
        if not len(queue):
            return recent
        rest = self.pool.seconds_until_free(api, family) or 0.0
        return max(recent, rest)
