"""Runs `reconcile()` per LLMService: one run at a time per object, bursts coalesced, failures retried.

Every watch event that concerns an LLMService (its own, or any of its children's or pods') pokes
its key. If a run is already under way, the key is only marked dirty and one more run follows with
the latest observed state, so a burst of pod events costs one or two reconciles, not one each.
Failed runs triggered by kopf's LLMService handlers surface as `RetryLater` (the handler turns it
into `kopf.TemporaryError`); failed runs triggered by child events are retried here with backoff,
because kopf does not retry event handlers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from .kube import KubeClient
from .reconcile import Children, GatewayDiscovery, Recorder, reconcile
from .render import Images

log = logging.getLogger("llmserve.operator")

Key = tuple[str, str]  # (namespace, name)
Lookup = Callable[[Key], tuple[dict | None, Children]]


class RetryLater(Exception):
    def __init__(self, message: str, delay: float):
        super().__init__(message)
        self.delay = delay


@dataclass
class Metrics:
    """Counters the health server exposes; the fleet benchmark derives per-reconcile costs."""

    reconciles: int = 0
    failures: int = 0
    requests: int = 0  # API requests made by reconciles
    writes: int = 0  # of which writes (POST/PUT/PATCH/DELETE)
    max_requests: int = 0  # the most requests one reconcile made


@dataclass
class _State:
    dirty: bool = False
    running: bool = False
    failures: int = 0
    waiters: list[asyncio.Future] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None  # the run a rollout asked for (pause end, analysis due)


def backoff(failures: int) -> float:
    return float(min(300, 2 ** failures))


class Engine:
    def __init__(self, client: KubeClient, images: Images, identity: str, prometheus_url: str = ""):
        self.client, self.images, self.identity = client, images, identity
        self.prometheus_url = prometheus_url
        self.gateway = GatewayDiscovery()
        self.metrics = Metrics()
        self.lookup: Lookup = lambda key: (None, Children())
        self._states: dict[Key, _State] = {}

    def poke(self, key: Key) -> None:
        """Reconcile `key` soon (fire and forget)."""
        self._schedule(key)

    async def run_now(self, key: Key) -> None:
        """Reconcile `key` and wait for a run that saw the state as of now; RetryLater if it failed."""
        await self._schedule(key, wait=True)

    def _schedule(self, key: Key, wait: bool = False) -> asyncio.Future | None:
        state = self._states.setdefault(key, _State())
        state.dirty = True
        waiter = None
        if wait:
            waiter = asyncio.get_running_loop().create_future()
            state.waiters.append(waiter)
        if not state.running:
            state.running = True
            asyncio.get_running_loop().create_task(self._drain(key, state), name=f"reconcile {key[0]}/{key[1]}")
        return waiter

    async def _drain(self, key: Key, state: _State) -> None:
        parent = None
        try:
            while state.dirty:
                state.dirty = False
                waiters, state.waiters = state.waiters, []
                parent, children = self.lookup(key)
                error, again = await self._run(key, parent, children) if parent is not None else (None, None)
                if error is None:
                    state.failures = 0
                    self._wake(key, state, again)
                else:
                    delay = backoff(state.failures)
                    state.failures += 1
                    if not waiters:
                        asyncio.get_running_loop().call_later(delay, self.poke, key)
                    error = RetryLater(error, delay)
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None) if error is None else waiter.set_exception(error)
        finally:
            state.running = False
            if parent is None and not state.waiters:
                self._wake(key, state, None)
                self._states.pop(key, None)

    def _wake(self, key: Key, state: _State, delay: float | None) -> None:
        """Run `key` again after `delay` seconds (replacing any earlier wake-up), or never."""
        if state.timer is not None:
            state.timer.cancel()
        state.timer = None if delay is None else asyncio.get_running_loop().call_later(delay, self.poke, key)

    async def _run(self, key: Key, parent: dict, children: Children) -> tuple[str | None, float | None]:
        """One reconcile; returns an error description instead of raising, and when to run again."""
        client = self.client.scoped()
        try:
            again = await reconcile(parent, children, client, self.images, Recorder(client, instance=self.identity),
                                    prometheus_url=self.prometheus_url, gateway=self.gateway)
            return None, again
        except Exception as exc:  # noqa: BLE001 - any failure is retried; the log keeps the detail
            self.metrics.failures += 1
            log.warning("reconcile %s/%s failed: %s", *key, exc, exc_info=not hasattr(exc, "status"))
            return str(exc), None
        finally:
            self.metrics.reconciles += 1
            self.metrics.requests += client.stats.total
            self.metrics.writes += client.stats.writes
            self.metrics.max_requests = max(self.metrics.max_requests, client.stats.total)
