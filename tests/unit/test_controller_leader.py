"""When the operator may write: the lease elector's view of its own leadership (in-memory lease)."""

import asyncio

from llmserve.operator import leader as leader_mod
from llmserve.operator.kube import ApiError
from llmserve.operator.leader import LeaseElector


class LeaseStore:
    """Just enough of the API for one Lease: get, create, update (no resourceVersion checks)."""

    def __init__(self):
        self.lease, self.down = None, False

    async def get(self, path):
        if self.down:
            raise ApiError(503, "Unreachable", "down", "GET", path)
        return None if self.lease is None else {"spec": dict(self.lease["spec"]), "metadata": {}}

    async def create(self, body):
        self.lease = body

    async def update(self, body):
        self.lease = body


def test_writes_stop_when_renewals_fail_before_anyone_can_take_over(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(leader_mod.time, "monotonic", lambda: clock[0])
    store = LeaseStore()
    elector = LeaseElector(store, "ns", "lease", "me", duration=30, renew_every=10)
    asyncio.run(elector.acquire())
    assert elector.holds()
    store.down = True
    clock[0] += 19.9
    assert not asyncio.run(elector._attempt()) and elector.holds()  # within duration - renew period
    clock[0] += 0.2
    assert not elector.holds()  # from here a standby may take over soon: no more writes


def test_another_holder_ends_leadership_at_once(monkeypatch):
    store = LeaseStore()
    elector = LeaseElector(store, "ns", "lease", "me", duration=30, renew_every=10)
    asyncio.run(elector.acquire())
    store.lease["spec"]["holderIdentity"] = "thief"
    assert asyncio.run(elector.try_acquire_or_renew()) is False
    assert not elector.holds() and not elector.leading


def test_release_stops_writes_before_handing_over():
    store = LeaseStore()
    elector = LeaseElector(store, "ns", "lease", "me", duration=30, renew_every=10)
    asyncio.run(elector.acquire())
    asyncio.run(elector.release())
    assert not elector.holds() and store.lease["spec"]["holderIdentity"] == ""
