"""Runs `reconcile()` per LLMService: one run at a time per object, bursts coalesced, a bound on
concurrent runs, failures retried with backoff, and a periodic relist that catches deletions the
watch missed.

Every watch event that concerns an LLMService (its own, or any of its children's or pods') pokes
its key. If a run is already under way, the key is only marked dirty and one more run follows with
the latest observed state, so a burst of pod events costs one or two reconciles, not one each.
At most `max_concurrent` runs proceed at once, first poked first served, so in a burst of new
services each one finishes in turn instead of all of them crawling together.

Retries: a failed run is retried after `backoff()`: exponential in the consecutive failures, at
least what the API server asked for (Retry-After), with jitter so a fleet that failed together
does not retry together. A run whose write the API server refused (invalid, forbidden, not found)
has written that to the status and is retried the same way, never parked until an unrelated event.
A run never asks to run again sooner than `MIN_REQUEUE` (no busy loop, whatever a rollout computes).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from .kube import ApiError, KubeClient, NotLeading
from .reconcile import Children, GatewayDiscovery, Recorder, Result, reconcile
from .render import Images

log = logging.getLogger("llmserve.operator")

Key = tuple[str, str]  # (namespace, name)
Lookup = Callable[[Key], tuple[dict | None, Children]]

MIN_REQUEUE = 1.0  # seconds: the soonest a run may ask to run again
MAX_BACKOFF = 300.0
RELIST_SECONDS = 300.0


@dataclass
class Metrics:
    """Counters the health server exposes; the fleet benchmark derives per-reconcile costs."""

    reconciles: int = 0
    failures: int = 0
    requests: int = 0  # API requests made by reconciles
    writes: int = 0  # of which writes (POST/PUT/PATCH/DELETE)
    max_requests: int = 0  # the most requests one reconcile made
    relists: int = 0
    pruned: int = 0  # index entries the relists found deleted


@dataclass
class _State:
    dirty: bool = False
    running: bool = False
    failures: int = 0
    timer: asyncio.TimerHandle | None = None  # the next run asked for (rollout step, retry)


def backoff(failures: int, retry_after: float | None = None, rng: Callable[[], float] = random.random) -> float:
    """Seconds before retry number `failures` (1, 2, ...): 1, 2, 4 ... up to MAX_BACKOFF, never
    sooner than the server's Retry-After, spread by +-25 % jitter."""
    base = max(min(MAX_BACKOFF, 2.0 ** (failures - 1)), retry_after or 0.0)
    return base * (0.75 + 0.5 * rng())


def next_delay(again: float | None) -> float | None:
    """When to run again as a reconcile asked for it, never sooner than MIN_REQUEUE."""
    return None if again is None else max(MIN_REQUEUE, again)


class Engine:
    def __init__(self, client: KubeClient, images: Images, identity: str, prometheus_url: str = "",
                 max_concurrent: int = 32, namespaces: tuple[str, ...] = (),
                 prometheus_allowed: tuple[str, ...] = ()):
        self.client, self.images, self.identity = client, images, identity
        self.prometheus_url, self.prometheus_allowed = prometheus_url, prometheus_allowed
        self.namespaces = namespaces
        self.gateway = GatewayDiscovery()
        self.metrics = Metrics()
        self.lookup: Lookup = lambda key: (None, Children())
        self.indexes: dict | None = None  # kopf's indexes by name, bound by the first handler call
        self.gone: set[str] = set()  # uids the last relist found deleted but the indexes still hold
        self._states: dict[Key, _State] = {}
        self._slots = asyncio.Semaphore(max_concurrent)

    def poke(self, key: Key) -> None:
        """Reconcile `key` soon (fire and forget)."""
        state = self._states.setdefault(key, _State())
        state.dirty = True
        if not state.running:
            state.running = True
            asyncio.get_running_loop().create_task(self._drain(key, state), name=f"reconcile {key[0]}/{key[1]}")

    async def _drain(self, key: Key, state: _State) -> None:
        parent = None
        try:
            async with self._slots:
                while state.dirty:
                    state.dirty = False
                    parent, children = self.lookup(key)
                    if parent is None:
                        break
                    result = await self._run(key, parent, children)
                    if result.failed:
                        state.failures += 1
                        self._wake(key, state, backoff(state.failures, result.retry_after))
                    else:
                        state.failures = 0
                        self._wake(key, state, next_delay(result.requeue_after))
        finally:
            state.running = False
            if parent is None:
                self._wake(key, state, None)
                self._states.pop(key, None)

    def _wake(self, key: Key, state: _State, delay: float | None) -> None:
        """Run `key` again after `delay` seconds (replacing any earlier wake-up), or never."""
        if state.timer is not None:
            state.timer.cancel()
        state.timer = None if delay is None else asyncio.get_running_loop().call_later(delay, self.poke, key)

    async def _run(self, key: Key, parent: dict, children: Children) -> Result:
        """One reconcile; failures become a Result (logged), never an exception."""
        client = self.client.scoped()
        try:
            return await reconcile(parent, children, client, self.images, Recorder(client, instance=self.identity),
                                   prometheus_url=self.prometheus_url, gateway=self.gateway,
                                   prometheus_allowed=self.prometheus_allowed)
        except NotLeading as exc:  # shutting down or lost the lease: the next leader takes over
            log.info("reconcile %s/%s stopped: %s", *key, exc)
            return Result()
        except Exception as exc:  # noqa: BLE001 - any failure is retried; the log keeps the detail
            self.metrics.failures += 1
            conflict = isinstance(exc, ApiError) and exc.status == 409
            log.log(logging.INFO if conflict else logging.WARNING, "reconcile %s/%s failed: %s", *key, exc,
                    exc_info=not isinstance(exc, ApiError))
            return Result(failed=True, retry_after=getattr(exc, "retry_after", None))
        finally:
            self.metrics.reconciles += 1
            self.metrics.requests += client.stats.total
            self.metrics.writes += client.stats.writes
            self.metrics.max_requests = max(self.metrics.max_requests, client.stats.total)

    # -- watch gaps ----------------------------------------------------------------------------
    async def relist_forever(self, kinds: dict[str, tuple[str, str, dict]], every: float = RELIST_SECONDS) -> None:
        """Every `every` seconds, list each indexed kind (uids only) and prune what the indexes
        still hold although the API server no longer has it: an object deleted while the watch
        was down never gets its DELETED event. `kinds`: index name -> (apiVersion, kind, params)."""
        while True:
            await asyncio.sleep(every)
            try:
                await self.relist(kinds)
            except (ApiError, OSError) as exc:
                log.warning("relist failed (retrying in %.0fs): %s", every, exc)

    async def relist(self, kinds: dict[str, tuple[str, str, dict]]) -> None:
        if self.indexes is None:
            return
        started = time.monotonic()
        before = {name: self._indexed(name) for name in kinds}
        live: set[str] = set()
        for name, (api_version, kind, params) in kinds.items():
            for namespace in self.namespaces or (None,):
                try:
                    live |= await self.client.list_uids(api_version, kind, params, namespace=namespace)
                except ApiError as exc:
                    if exc.status != 404:
                        raise
                    # A kind whose CRD is not installed (LeaderWorkerSet): its index is empty.
        gone, keys = set(), set()
        for name, entries in before.items():
            for uid, key in entries.items():
                if uid not in live:
                    gone.add(uid)
                    keys.add(key)
        self.gone = gone
        self.client.recent.retain(live, {kind for _, kind, _ in kinds.values()}, started)
        self.metrics.relists += 1
        self.metrics.pruned += len(gone)
        if gone:
            log.info("relist: %d objects deleted while the watch was down; reconciling %d services",
                     len(gone), len(keys))
        for key in keys:
            self.poke(key)

    def _indexed(self, name: str) -> dict[str, Key]:
        """uid -> LLMService key of every object one index holds."""
        out = {}
        for key, store in self.indexes[name].items():
            for obj in store:
                uid = obj.get("uid") or (obj.get("metadata") or {}).get("uid")
                if uid:
                    out[uid] = key
        return out
