"""Leader election on a coordination.k8s.io Lease, the way client-go's leaderelection does it.

Why not kopf peering: peering is built for a developer's operator to pause a deployed one (by
priority); operators of equal priority all freeze with a warning, so two identical replicas of a
Deployment would leave the cluster unserved. A Lease gives the usual semantics: one holder, the
others stand by and take over once the holder stops renewing, and a graceful holder releases it
at once on shutdown.

Expiry is judged on this process's monotonic clock from the moment it last saw the lease record
change, never by comparing the holder's timestamps with our wall clock, so clock skew between
nodes cannot make two replicas lead at once. Writes: one renewal per `renew_every / 2` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .kube import ApiError, KubeClient, now_rfc3339, resource_path

log = logging.getLogger("llmserve.leader")


class LeaseElector:
    def __init__(self, client: KubeClient, namespace: str, name: str, identity: str, *,
                 duration: float = 30.0, renew_every: float = 10.0, retry_every: float = 2.0):
        if not 0 < renew_every < duration:
            raise ValueError("the renew period must be shorter than the lease duration")
        self.client, self.namespace, self.name, self.identity = client, namespace, name, identity
        self.duration, self.renew_every, self.retry_every = duration, renew_every, retry_every
        self._seen: tuple | None = None  # (holder, renewTime) last observed
        self._seen_at = 0.0
        self._renewed_at = 0.0  # monotonic time of our last successful acquire or renewal
        self.leading = False

    def holds(self) -> bool:
        """Whether this replica may write now: it leads and its last renewal is recent enough that
        no other replica can have taken over (the lease duration minus one renew period, the
        margin client-go keeps too). The operator's client refuses writes otherwise."""
        return self.leading and time.monotonic() - self._renewed_at < self.duration - self.renew_every

    @property
    def _path(self) -> str:
        return resource_path("coordination.k8s.io/v1", "Lease", self.namespace, self.name)

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when we hold the lease afterwards."""
        lease, now = await self.client.get(self._path), now_rfc3339(micro=True)
        if lease is None:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.duration),
                             "acquireTime": now, "renewTime": now, "leaseTransitions": 0}}
            return await self._write(self.client.create, body)
        spec = lease.setdefault("spec", {})
        holder = spec.get("holderIdentity") or ""
        if holder != self.identity and self.leading:
            self.leading = False  # someone else holds it now: stop writing at once
            log.error("lease %s/%s taken over by %s", self.namespace, self.name, holder or "nobody")
            return False
        if holder != self.identity:
            record = (holder, spec.get("renewTime"))
            if record != self._seen:
                self._seen, self._seen_at = record, time.monotonic()
            held_for = spec.get("leaseDurationSeconds") or self.duration
            if holder and time.monotonic() - self._seen_at < held_for:
                return False
            spec["acquireTime"] = now
            spec["leaseTransitions"] = (spec.get("leaseTransitions") or 0) + 1
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=int(self.duration), renewTime=now)
        return await self._write(self.client.update, lease)

    async def _write(self, write, body: dict) -> bool:
        try:
            await write(body)
            self._renewed_at = time.monotonic()
            return True
        except ApiError as exc:
            if exc.status == 409:  # someone else wrote the lease first
                return False
            raise

    async def acquire(self) -> None:
        """Stand by until we hold the lease."""
        announced = False
        while not await self._attempt():
            if not announced:
                log.info("standing by: lease %s/%s is held by another replica", self.namespace, self.name)
                announced = True
            await asyncio.sleep(self.retry_every)
        self.leading = True
        log.info("became leader (lease %s/%s, identity %s)", self.namespace, self.name, self.identity)

    async def _attempt(self) -> bool:
        try:
            return await self.try_acquire_or_renew()
        except ApiError as exc:
            log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
            return False

    async def hold(self) -> None:
        """Renew until another replica holds the lease or a renewal has not succeeded for the
        lease duration minus one period (the point where another replica may take over); then
        return: leadership is lost, and `holds()` already says so."""
        while True:
            # Renew at half the period: an attempt whose request hangs (its timeout is the whole
            # renew deadline) still has half a period more to finish before the deadline.
            await asyncio.sleep(self.renew_every / 2 if time.monotonic() - self._renewed_at < self.renew_every / 2
                                else self.retry_every)
            await self._attempt()
            if not self.holds():
                self.leading = False
                log.error("lost the lease %s/%s", self.namespace, self.name)
                return

    async def release(self) -> None:
        """Hand the lease over at once (graceful shutdown) so a standby need not wait for expiry."""
        if not self.leading:
            return
        self.leading = False  # writes stop before the lease is handed over
        try:
            lease = await self.client.get(self._path)
            if lease and lease.get("spec", {}).get("holderIdentity") == self.identity:
                lease["spec"].update(holderIdentity="", leaseDurationSeconds=1)
                await self.client.update(lease)
        except ApiError as exc:
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, exc)
