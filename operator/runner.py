"""The operator process: credentials, health/metrics endpoint, leader election, then kopf.

Order matters: the health endpoint answers from the first second (a standby replica is healthy,
not dead), kopf starts only once this replica holds the lease, and losing the lease stops kopf and
exits non-zero so the kubelet restarts the process as a fresh standby.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import uuid
from dataclasses import dataclass

from .engine import Engine
from .kube import KubeClient, load_config
from .leader import LeaseElector
from .render import Images
from .spec import KIND, MANAGED_SELECTOR

log = logging.getLogger("llmserve.operator")


@dataclass(frozen=True)
class Options:
    namespaces: tuple[str, ...]  # empty: every namespace
    images: Images
    kubeconfig: str | None = None
    leader_election: bool = True
    lease_namespace: str | None = None  # default: the credentials' namespace
    lease_name: str = "llmserve-operator"
    lease_duration: float = 30.0
    health_address: str = "0.0.0.0"
    health_port: int = 8081
    identity: str = ""
    prometheus_url: str = ""  # where KEDA triggers query Triton's metrics (docs/autoscaling.md)
    prometheus_allowed: tuple[str, ...] = ()  # other origins spec.rollout.analysis.prometheus.url may name
    max_concurrent_reconciles: int = 32  # in a burst, services finish in turn, not all together


def relist_kinds() -> dict[str, tuple[str, str, dict]]:
    """What the engine's periodic relist reads: every indexed kind, children by our label."""
    from .handlers import INDEXED_KINDS

    return {name: (api_version, kind, {} if kind == KIND else {"labelSelector": MANAGED_SELECTOR})
            for name, (api_version, kind) in INDEXED_KINDS.items()}


def default_identity() -> str:
    """Pod name when in a pod (the chart sets POD_NAME), else host + random suffix."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


def metrics_text(engine: Engine, leading: bool, client: KubeClient) -> str:
    """Prometheus text exposition of the operator's own counters."""
    m = engine.metrics
    lines = [
        "# TYPE llmserve_operator_leader gauge", f"llmserve_operator_leader {int(leading)}",
        "# TYPE llmserve_operator_reconciles_total counter", f"llmserve_operator_reconciles_total {m.reconciles}",
        "# TYPE llmserve_operator_reconcile_failures_total counter",
        f"llmserve_operator_reconcile_failures_total {m.failures}",
        "# TYPE llmserve_operator_reconcile_requests_total counter",
        f"llmserve_operator_reconcile_requests_total {m.requests}",
        "# TYPE llmserve_operator_reconcile_writes_total counter",
        f"llmserve_operator_reconcile_writes_total {m.writes}",
        "# TYPE llmserve_operator_reconcile_requests_max gauge",
        f"llmserve_operator_reconcile_requests_max {m.max_requests}",
        "# TYPE llmserve_operator_api_requests_total counter",
    ]
    lines += [f'llmserve_operator_api_requests_total{{verb="{verb}"}} {n}'
              for verb, n in sorted(client.stats.by_verb.items())]
    return "\n".join(lines) + "\n"


async def _serve_health(opts: Options, engine: Engine, client: KubeClient, leading) -> object:
    from aiohttp import web

    async def healthz(_request):
        return web.json_response({"status": "ok", "leader": leading()})

    async def metrics(_request):
        return web.Response(text=metrics_text(engine, leading(), client), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, opts.health_address, opts.health_port).start()
    return runner


async def run(opts: Options) -> int:
    """Run until SIGTERM/SIGINT (exit 0) or until the lease is lost (exit 1)."""
    import kopf

    from . import handlers

    config = load_config(opts.kubeconfig)
    identity = opts.identity or default_identity()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    # The lease has its own connections: a burst of reconciles must never delay a renewal. Its
    # requests may take until the renew deadline (lease duration minus one renew period), as
    # client-go bounds them by its renew deadline: a renewal is lost only when the API server does
    # not answer in that time. With a timeout of one period, one GET slower than that lost a
    # 6 s lease on a loaded test machine, and the operator stopped.
    renew_every = opts.lease_duration / 3
    async with KubeClient(config) as client, \
            KubeClient(config, max_inflight=2, timeout=opts.lease_duration - renew_every) as lease_client:
        engine = Engine(client, opts.images, identity, prometheus_url=opts.prometheus_url,
                        prometheus_allowed=opts.prometheus_allowed,
                        max_concurrent=opts.max_concurrent_reconciles, namespaces=opts.namespaces)
        elector = None
        if opts.leader_election:
            elector = LeaseElector(lease_client, opts.lease_namespace or config.namespace, opts.lease_name,
                                   identity, duration=opts.lease_duration, renew_every=renew_every)
            client.may_write = elector.holds  # no write once the lease is lost or released
        health = await _serve_health(opts, engine, client, lambda: elector.holds() if elector else True)
        try:
            if elector and not await _first(elector.acquire(), stop.wait()):
                return 0
            settings = kopf.OperatorSettings()
            handlers.watch_settings(settings)
            settings.posting.reporting_component = "llmserve-operator"
            settings.posting.reporting_instance = identity
            operator = asyncio.create_task(kopf.operator(
                registry=handlers.registry, settings=settings, standalone=True,
                clusterwide=not opts.namespaces, namespaces=list(opts.namespaces),
                stop_flag=stop, memo=kopf.Memo(engine=engine),
            ))
            relist = asyncio.create_task(engine.relist_forever(relist_kinds()))
            lost = False
            try:
                if elector:
                    holder = asyncio.create_task(elector.hold())
                    await asyncio.wait({operator, holder}, return_when=asyncio.FIRST_COMPLETED)
                    lost = holder.done()
                    stop.set()
                    holder.cancel()
                await operator
            finally:
                relist.cancel()
            if elector and not lost:
                await elector.release()
            return 1 if lost else 0
        finally:
            await health.cleanup()


async def _first(wanted, other) -> bool:
    """Await `wanted` unless `other` finishes first; True if `wanted` finished."""
    tasks = [asyncio.ensure_future(wanted), asyncio.ensure_future(other)]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return tasks[0] in done
