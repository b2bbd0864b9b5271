"""The per-LLMService run loop: coalescing, serialization, retries, requeues and relists (no cluster
involved)."""

import asyncio

import pytest

from llmserve.operator import engine as engine_mod
from llmserve.operator.engine import MIN_REQUEUE, Engine, backoff, next_delay
from llmserve.operator.kube import ApiError, RequestStats
from llmserve.operator.recent import Recent
from llmserve.operator.reconcile import Children, Result
from llmserve.operator.render import Images


class FakeClient:
    def __init__(self, uids=()):
        self.stats = RequestStats()
        self.recent = Recent()
        self.uids = set(uids)

    def scoped(self):
        return self

    async def list_uids(self, api_version, kind, params=None, namespace=None):
        return self.uids


def make_engine(monkeypatch, behaviour, **kwargs):
    runs = []

    async def fake_reconcile(parent, children, client, images, recorder, **settings):
        runs.append(parent["rev"])
        return await behaviour(len(runs)) or Result()

    monkeypatch.setattr(engine_mod, "reconcile", fake_reconcile)
    eng = Engine(FakeClient(), Images("p", "q"), "me", **kwargs)
    state = {"rev": 0}
    eng.lookup = lambda key: ({"rev": state["rev"]} if state["rev"] >= 0 else None, Children())
    return eng, runs, state


def runs_of(monkeypatch, behaviour, ticks=50):
    """Poke one service once and let the engine run it (and whatever it schedules) for `ticks`."""
    async def scenario():
        eng, runs, _ = make_engine(monkeypatch, behaviour)
        eng.poke(("ns", "a"))
        for _ in range(ticks):
            await asyncio.sleep(0.01)
        return runs

    return asyncio.run(scenario())


async def settle(eng, rounds=50):
    for _ in range(rounds):
        await asyncio.sleep(0.01)
        if not any(s.running for s in eng._states.values()):
            return


def test_bursts_coalesce_into_one_more_run_with_the_latest_state(monkeypatch):
    async def scenario():
        gate = asyncio.Event()

        async def slow(n):
            if n == 1:
                await gate.wait()

        eng, runs, state = make_engine(monkeypatch, slow)
        eng.poke(("ns", "a"))
        await asyncio.sleep(0)
        for rev in range(1, 20):  # a burst of pod events while the first run is busy
            state["rev"] = rev
            eng.poke(("ns", "a"))
        gate.set()
        await settle(eng)
        return runs, eng.metrics.reconciles

    runs, reconciles = asyncio.run(scenario())
    assert runs == [0, 19]  # the first run, then one run that saw the latest state
    assert reconciles == 2


def test_failed_runs_are_retried_with_backoff(monkeypatch):
    delays = []
    monkeypatch.setattr(engine_mod, "backoff", lambda failures, retry_after=None: delays.append(
        (failures, retry_after)) or 0.01)

    async def flaky(n):
        if n == 1:
            raise RuntimeError("transient")
        if n == 2:
            raise ApiError(429, "TooManyRequests", "slow down", "PATCH", "/x", retry_after=7)

    async def scenario():
        eng, runs, _ = make_engine(monkeypatch, flaky)
        eng.poke(("ns", "a"))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(runs) >= 3:
                break
        return runs, eng.metrics.failures

    runs, failures = asyncio.run(scenario())
    assert len(runs) == 3 and failures == 2
    assert delays == [(1, None), (2, 7)]  # consecutive failures count up; the server's Retry-After is kept


def test_a_refused_write_is_retried_not_parked(monkeypatch):
    """A 401/403/404 on a write is reported in the status by the reconcile (Result.failed) and the
    engine runs it again with backoff, without waiting for an unrelated event."""
    monkeypatch.setattr(engine_mod, "backoff", lambda failures, retry_after=None: 0.01)

    async def refused(n):
        return Result(failed=n < 3)

    assert len(runs_of(monkeypatch, refused, ticks=100)) == 3  # two refused runs retried, then no more


def test_backoff_grows_honours_retry_after_and_jitters():
    assert [backoff(n, rng=lambda: 0.5) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert backoff(30, rng=lambda: 0.5) == 300  # capped
    assert backoff(1, retry_after=20, rng=lambda: 0.5) == 20  # never sooner than the server asked
    assert backoff(3, rng=lambda: 0.0) == 3 and backoff(3, rng=lambda: 1.0) == 5  # +-25 % jitter


def test_a_rollout_never_asks_for_a_busy_loop():
    """An analysed step whose pause is over but whose check has not passed asked for 0 s."""
    assert next_delay(0.0) == MIN_REQUEUE and next_delay(-3) == MIN_REQUEUE
    assert next_delay(None) is None and next_delay(42) == 42


def test_requeue_wakes_the_service_again(monkeypatch):
    monkeypatch.setattr(engine_mod, "MIN_REQUEUE", 0.01)

    async def again(n):
        return Result(requeue_after=0.0 if n < 3 else None)

    assert len(runs_of(monkeypatch, again)) == 3


def test_concurrent_runs_are_bounded(monkeypatch):
    active, peak = [0], [0]

    async def busy(n):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        await asyncio.sleep(0.01)
        active[0] -= 1

    async def scenario():
        eng, runs, _ = make_engine(monkeypatch, busy, max_concurrent=3)
        for i in range(10):
            eng.poke(("ns", f"s{i}"))
        await settle(eng, rounds=100)
        return runs

    assert len(asyncio.run(scenario())) == 10 and peak[0] == 3


def test_deleted_llmservices_are_forgotten(monkeypatch):
    async def ok(n):
        pass

    async def scenario():
        eng, runs, state = make_engine(monkeypatch, ok)
        state["rev"] = -1  # not in the index any more
        eng.poke(("ns", "gone"))
        await settle(eng)
        return runs, eng._states

    runs, states = asyncio.run(scenario())
    assert runs == [] and states == {}


def test_relist_prunes_what_the_watch_missed(monkeypatch):
    """An object deleted while the watch was down stays in the index; the relist marks it gone
    and reconciles its service (whose lookup then no longer sees it)."""
    async def ok(n):
        pass

    async def scenario():
        eng, runs, _ = make_engine(monkeypatch, ok)
        eng.client.uids = {"svc-uid", "dep-live"}
        eng.indexes = {
            "llmservices": {("ns", "a"): [{"metadata": {"uid": "svc-uid"}}]},
            "deployments": {("ns", "a"): [{"metadata": {"uid": "dep-live"}}, {"metadata": {"uid": "dep-gone"}}]},
            "pods": {("ns", "a"): [{"uid": "pod-gone"}]},
        }
        kinds = {"llmservices": ("llmserve.io/v1alpha1", "LLMService", {}),
                 "deployments": ("apps/v1", "Deployment", {}), "pods": ("v1", "Pod", {})}
        await eng.relist(kinds)
        await settle(eng)
        return eng.gone, runs, eng.metrics.pruned

    gone, runs, pruned = asyncio.run(scenario())
    assert gone == {"dep-gone", "pod-gone"} and pruned == 2
    assert runs == [0]  # its service was reconciled


@pytest.mark.parametrize("status,retryable", [(409, True), (429, True), (503, True), (401, False),
                                              (403, False), (404, False), (422, False)])
def test_which_api_errors_are_retried_as_they_are(status, retryable):
    error = ApiError(status, "x", "y", "PATCH", "/p")
    assert error.retryable is retryable and error.refused is (not retryable)
