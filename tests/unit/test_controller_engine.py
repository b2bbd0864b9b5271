"""The per-LLMService run loop: coalescing, serialization and retries (no cluster involved)."""

import asyncio

import pytest

from llmserve.operator import engine as engine_mod
from llmserve.operator.engine import Engine, RetryLater
from llmserve.operator.reconcile import Children
from llmserve.operator.render import Images


class FakeClient:
    def __init__(self):
        from llmserve.operator.kube import RequestStats
        self.stats = RequestStats()

    def scoped(self):
        return FakeClient()


def make_engine(monkeypatch, behaviour):
    runs = []

    async def fake_reconcile(parent, children, client, images, recorder, **settings):
        runs.append(parent["rev"])
        await behaviour(len(runs))

    monkeypatch.setattr(engine_mod, "reconcile", fake_reconcile)
    eng = Engine(FakeClient(), Images("p", "q"), "me")
    state = {"rev": 0}
    eng.lookup = lambda key: ({"rev": state["rev"]} if state["rev"] >= 0 else None, Children())
    return eng, runs, state


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
        await eng.run_now(("ns", "a"))
        return runs, eng.metrics.reconciles

    runs, reconciles = asyncio.run(scenario())
    assert runs == [0, 19]  # the first run, then one run that saw the latest state
    assert reconciles == 2


def test_run_now_surfaces_failures_for_kopf_to_retry(monkeypatch):
    async def failing(n):
        raise RuntimeError("apiserver said no")

    async def scenario():
        eng, _, _ = make_engine(monkeypatch, failing)
        with pytest.raises(RetryLater) as info:
            await eng.run_now(("ns", "a"))
        return info.value, eng.metrics.failures

    error, failures = asyncio.run(scenario())
    assert "apiserver said no" in str(error) and error.delay == 1.0
    assert failures == 1


def test_event_triggered_failures_are_retried_with_backoff(monkeypatch):
    monkeypatch.setattr(engine_mod, "backoff", lambda failures: 0.01)

    async def flaky(n):
        if n < 3:
            raise RuntimeError("transient")

    async def scenario():
        eng, runs, _ = make_engine(monkeypatch, flaky)
        eng.poke(("ns", "a"))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(runs) >= 3:
                break
        return runs

    assert len(asyncio.run(scenario())) == 3


def test_deleted_llmservices_are_forgotten(monkeypatch):
    async def ok(n):
        pass

    async def scenario():
        eng, runs, state = make_engine(monkeypatch, ok)
        state["rev"] = -1  # not in the index any more
        await eng.run_now(("ns", "gone"))
        return runs, eng._states

    runs, states = asyncio.run(scenario())
    assert runs == [] and states == {}
