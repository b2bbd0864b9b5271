"""Fleet benchmark of the operator on the local test bed (issue 3, item 5).

For each fleet size N it starts a fresh test bed with enough simulated GPU nodes, installs the
chart, runs the operator locally as the chart's ServiceAccount, creates N LLMServices and reports:

- time from the first create (a burst of N POSTs) until every LLMService is Ready;
- API requests per reconcile (the operator counts every request its reconciles make);
- writes during one steady-state minute: the operator's own count, and the API server's count of
  writes to LLMServices, their children and Events (apiserver_request_total);
- the operator's peak RSS (VmHWM).

Run (after hack/setup.sh):  ~/.cache/llmserve/venv/bin/python bench/fleet.py --sizes 100,1000
Results are also written as JSON to bench/results/fleet-<N>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import signal
import sys
import time
from pathlib import Path

from llmserve.operator.kube import KubeClient, load_config
from llmserve.testbed.local_operator import LocalOperator, install_chart, service_account_kubeconfig
from llmserve.testbed.cluster import TestBed

NAMESPACE = "fleet"
PODS_PER_NODE = 100  # KWOK nodes advertise 110 pods
OUR_RESOURCES = {"llmservices", "deployments", "services", "poddisruptionbudgets", "events"}
WRITE_VERBS = {"POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION"}
METRIC = re.compile(r'^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$')


def manifest(i: int) -> dict:
    return {"apiVersion": "llmserve.io/v1alpha1", "kind": "LLMService",
            "metadata": {"name": f"svc-{i:04d}", "namespace": NAMESPACE},
            "spec": {"model": {"name": "tiny-gpt", "repository": "file:///var/lib/llmserve/model_repo",
                               "version": 1},
                     "replicas": 1, "runtime": {"gpus": 1}}}


async def create_all(bed: TestBed, n: int, concurrency: int = 16) -> None:
    """Create the fleet as a burst (kubectl would take ~0.4 s per object on this machine)."""
    limit = asyncio.Semaphore(concurrency)

    async def create(client: KubeClient, i: int) -> None:
        async with limit:
            await client.create(manifest(i))

    async with KubeClient(load_config(str(bed.kubeconfig)), user_agent="fleet-bench") as client:
        await asyncio.gather(*(create(client, i) for i in range(n)))


def apiserver_writes(bed: TestBed) -> dict[str, int]:
    """Writes the API server has served so far, by resource, for the kinds the operator touches."""
    out: dict[str, int] = {}
    for line in bed.kubectl("get", "--raw", "/metrics", timeout=60).stdout.splitlines():
        m = METRIC.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
        if labels.get("verb") in WRITE_VERBS and labels.get("resource") in OUR_RESOURCES:
            out[labels["resource"]] = out.get(labels["resource"], 0) + int(float(m.group("value")))
    return out


def ready_count(bed: TestBed) -> int:
    out = bed.kubectl("get", "llms", "-n", NAMESPACE, "-o",
                      'jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\\n"}{end}',
                      timeout=120).stdout
    return sum(1 for line in out.splitlines() if line.strip() == "True")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(n: int, steady_seconds: float, workdir: Path, timeout: float) -> dict:
    nodes = math.ceil(n / PODS_PER_NODE) + 1
    bed = TestBed(f"bench-fleet-{n}")
    print(f"[fleet {n}] starting a test bed with {nodes} nodes", file=sys.stderr, flush=True)
    bed.up(nodes=nodes, gpus=PODS_PER_NODE, timeout=300)
    operator = None
    try:
        install_chart(bed)
        bed.kubectl("wait", "--for=condition=Established", "crd/llmservices.llmserve.io", "--timeout=60s")
        kubeconfig = service_account_kubeconfig(bed, workdir / f"operator-{n}.kubeconfig")
        # One replica, no election: a lease renewal starved by a saturated machine would stop it.
        operator = LocalOperator(kubeconfig, workdir / f"operator-{n}.log", identity="bench",
                                 extra_args=("--no-leader-election",)).start().wait_leading()
        bed.kubectl("create", "namespace", NAMESPACE)

        started = time.monotonic()
        asyncio.run(create_all(bed, n))
        applied = time.monotonic() - started
        ready = 0
        while ready < n:
            if operator.returncode() is not None:
                raise RuntimeError(f"the operator exited ({operator.returncode()}):\n{operator.log()}")
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"only {ready}/{n} Ready after {timeout:.0f}s; operator log:\n{operator.log()}")
            time.sleep(2)
            ready = ready_count(bed)
            print(f"[fleet {n}] {ready}/{n} Ready after {time.monotonic() - started:.0f}s",
                  file=sys.stderr, flush=True)
        all_ready = time.monotonic() - started
        converged = operator.metrics()

        # Let trailing events (last pod and Deployment status updates) drain, then measure a minute.
        previous = -1.0
        while converged["llmserve_operator_reconciles_total"] != previous:
            previous = converged["llmserve_operator_reconciles_total"]
            time.sleep(5)
            converged = operator.metrics()
        server_before = apiserver_writes(bed)
        time.sleep(steady_seconds)
        steady = operator.metrics()
        server_after = apiserver_writes(bed)

        reconciles = converged["llmserve_operator_reconciles_total"]
        result = {
            "llmservices": n,
            "nodes": nodes,
            "seconds_to_apply": round(applied, 1),
            "seconds_until_all_ready": round(all_ready, 1),
            "reconciles": int(reconciles),
            "api_requests_per_reconcile": round(converged["llmserve_operator_reconcile_requests_total"] / reconciles, 2),
            "max_api_requests_in_one_reconcile": int(converged["llmserve_operator_reconcile_requests_max"]),
            "writes_per_llmservice_to_converge": round(converged["llmserve_operator_reconcile_writes_total"] / n, 2),
            "steady_seconds": steady_seconds,
            "steady_reconciles": int(steady["llmserve_operator_reconciles_total"] - reconciles),
            "steady_operator_writes": int(steady["llmserve_operator_reconcile_writes_total"]
                                          - converged["llmserve_operator_reconcile_writes_total"]),
            "steady_apiserver_writes": {r: server_after.get(r, 0) - server_before.get(r, 0) for r in OUR_RESOURCES},
            "operator_peak_rss_mib": round(peak_rss_mib(operator.pid), 1),
        }
        return result
    finally:
        if operator:
            operator.stop()
        bed.down()


def table(results: list[dict]) -> str:
    rows = [
        ("LLMServices", "llmservices"), ("fake GPU nodes", "nodes"),
        ("time until all Ready (s)", "seconds_until_all_ready"),
        ("reconciles until then", "reconciles"),
        ("API requests per reconcile", "api_requests_per_reconcile"),
        ("max API requests in one reconcile", "max_api_requests_in_one_reconcile"),
        ("operator writes per LLMService to converge", "writes_per_llmservice_to_converge"),
        ("steady minute: reconciles", "steady_reconciles"),
        ("steady minute: operator writes", "steady_operator_writes"),
        ("steady minute: apiserver writes (ours)", None),
        ("operator peak RSS (MiB)", "operator_peak_rss_mib"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  " + "  ".join(f"{'N=' + str(r['llmservices']):>10}" for r in results)]
    for label, key in rows:
        values = [sum(r["steady_apiserver_writes"].values()) if key is None else r[key] for r in results]
        lines.append(f"{label:{width}}  " + "  ".join(f"{v:>10}" for v in values))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="comma-separated fleet sizes (default 100,1000)")
    parser.add_argument("--steady-seconds", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="per size, until all Ready")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the operator and the test bed
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        result = run(n, args.steady_seconds, out, args.timeout)
        (out / f"fleet-{n}.json").write_text(json.dumps(result, indent=2))
        results.append(result)
        print(table(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
