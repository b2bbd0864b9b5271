"""Autoscaling reaction time on the local test bed (issue 7, item 4).

One LLMService (minReplicas 1, maxReplicas N, queue/compute ratio target 1) whose first pod is
stood for by a real tritonserver serving `fixed_latency` (50 ms per request, one at a time).
Closed-loop clients load it; the path to new replicas is all real: Prometheus scrapes Triton with
the pod's labels, prometheus-adapter (the chart's rules) serves the custom metrics API, the
controller manager's HPA controller (5 s sync on the test bed; 15 s is the Kubernetes default)
writes the LLMService's scale subresource, the operator resizes the Deployment, the scheduler
places the pods on KWOK GPU nodes. Printed: seconds from load start to each step up to all N
replicas Ready, then from load stop to the service back at 1 replica.

Run (after hack/setup.sh):  ~/.cache/llmserve/venv/bin/python bench/autoscaling.py
Options: --max-replicas N, --concurrency C, --scale-down-window 15s, --cycles 3, --testbed NAME
(reuse a running `llmserve testbed up --name NAME`). The HPA syncs every 5 s, so the reaction time
depends on where in that period the load starts: several cycles show the spread. Results also go to bench/results/autoscaling.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llmserve.testbed.local_operator import LocalOperator, install_chart, service_account_kubeconfig
from llmserve.operator.units import parse_quantity
from llmserve.testbed.cluster import TestBed
from llmserve.testbed.load import InferenceLoad
from llmserve.testbed.metrics_adapter import MetricsAdapter
from llmserve.testbed.prometheus import Prometheus
from llmserve.testbed.scaling import (
    MODEL, MODEL_INPUTS, chart_adapter_config, first_pod, llmservice, snapshot, triton_target,
)
from llmserve.testbed.storage import model_repository
from llmserve.testbed.triton import TritonServer
from llmserve.testbed.waiting import poll
from testbed_run import run_on_testbed

ROOT = Path(__file__).resolve().parents[1]
MODEL_REPO = ROOT / "tests" / "data" / "model_repo"
NAMESPACE, NAME, METRIC = "bench-autoscaling", "chat", "llmserve_queue_compute_ratio"


def log(message: str) -> None:
    print(f"[autoscaling] {message}", file=sys.stderr, flush=True)


def milestones(bed: TestBed, adapter: MetricsAdapter, steps: dict, timeout: float) -> dict[str, float]:
    """Poll until every step's predicate held once; seconds from now to the first time each did.

    A predicate takes the Snapshot and a function returning the metric as the adapter serves it,
    which is only asked for while a step still needs it (every request slows the poll down).
    """
    start, reached = time.monotonic(), {}
    while len(reached) < len(steps):
        state = snapshot(bed, NAMESPACE, NAME)
        cache: list[float] = []

        def metric() -> float:
            if not cache:
                item = adapter.object_metric(NAMESPACE, "llmservices.llmserve.io", NAME, METRIC)
                cache.append(float(parse_quantity(item["value"])))
            return cache[0]

        now = time.monotonic() - start
        for label, holds in steps.items():
            if label not in reached and holds(state, metric):
                reached[label] = round(now, 1)
                log(f"{now:6.1f}s  {label}")
        if now > timeout:
            missing = [label for label in steps if label not in reached]
            raise TimeoutError(f"not reached within {timeout:.0f}s: {missing}")
        time.sleep(0.1)
    return reached


def run(bed: TestBed, args: argparse.Namespace, workdir: Path) -> dict:
    install_chart(bed)
    bed.kubectl("wait", "--for=condition=Established", "crd/llmservices.llmserve.io", "--timeout=60s")
    kubeconfig = service_account_kubeconfig(bed, workdir / "operator.kubeconfig")
    operator = LocalOperator(kubeconfig, workdir / "operator.log", identity="bench").start().wait_leading()
    triton = prometheus = adapter = None
    try:
        bed.kubectl("create", "namespace", NAMESPACE, check=False)
        model_repository(bed, NAMESPACE, MODEL_REPO)
        bed.apply(llmservice(NAME, NAMESPACE, min_replicas=1, max_replicas=args.max_replicas,
                             scale_down=args.scale_down_window))
        pod = poll("the first pod Ready", lambda: first_pod(bed, NAMESPACE, NAME), 180)
        triton = TritonServer(MODEL_REPO, {MODEL: 1}).start()
        prometheus = Prometheus([triton_target(triton.metrics_target, NAMESPACE, pod)]).start()
        adapter = MetricsAdapter(bed, prometheus.url, chart_adapter_config(bed)).start()
        poll("the HPA to read the metric", lambda: snapshot(bed, NAMESPACE, NAME).hpa_condition(
            "ScalingActive").get("status") == "True", 180)
        n = args.max_replicas
        cycles = []
        for cycle in range(1, args.cycles + 1):
            log(f"cycle {cycle}: {args.concurrency} closed-loop clients on {MODEL} (50 ms per request)")
            load = InferenceLoad(triton.http_url, MODEL, MODEL_INPUTS, args.concurrency).start()
            up = milestones(bed, adapter, {
                "metric above target (adapter)": lambda s, m: m() > 1,
                "HPA desiredReplicas raised": lambda s, m: (s.hpa_desired or 0) > 1,
                "LLMService spec.replicas raised": lambda s, m: s.replicas > 1,
                "Deployment replicas raised": lambda s, m: s.deployment_replicas > 1,
                f"all {n} replicas Ready": lambda s, m: s.ready_pods == n and s.replicas == n,
            }, timeout=300)
            stats = load.stop()
            log(f"cycle {cycle}: load stopped: {stats.requests} requests, {stats.failures} failed")
            down = milestones(bed, adapter, {
                "metric back to 0 (1m rate window drained)": lambda s, m: m() == 0,
                "LLMService spec.replicas back to 1": lambda s, m: s.replicas == 1,
                "pods back to 1": lambda s, m: s.pods == 1,
            }, timeout=600)
            cycles.append({"requests": stats.requests, "failed_requests": stats.failures,
                           "scale_up_seconds_from_load_start": up, "scale_down_seconds_from_load_stop": down})
        ready = sorted(c["scale_up_seconds_from_load_start"][f"all {n} replicas Ready"] for c in cycles)
        return {"max_replicas": n, "concurrency": args.concurrency, "scale_down_window": args.scale_down_window,
                "hpa_sync_period_seconds": 5, "poll_resolution_seconds": 0.3, "cycles": cycles,
                "load_start_to_all_ready_seconds": {"min": ready[0], "median": ready[len(ready) // 2],
                                                    "max": ready[-1]}}
    finally:
        for component in (adapter, prometheus, triton):
            if component is not None:
                component.stop()
        bed.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        operator.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-replicas", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4, help="closed-loop clients (default 4)")
    parser.add_argument("--scale-down-window", default="15s", help="scaleDown.stabilizationWindow (default 15s)")
    parser.add_argument("--cycles", type=int, default=3, help="load / idle cycles to measure (default 3)")
    parser.add_argument("--testbed", help="reuse this running test bed instead of starting one")
    args = parser.parse_args()
    return run_on_testbed("autoscaling", args.testbed, lambda bed, tmp: run(bed, args, tmp))


if __name__ == "__main__":
    sys.exit(main())
