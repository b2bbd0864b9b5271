"""Fleet benchmark of the operator on the local test bed: the operator against a baseline.

For each fleet size N it runs, each on a fresh test bed of the same shape (enough simulated GPU
nodes, the chart installed, the model repository claim `models` in the namespace):

- baseline: the children the operator decides for N LLMServices (a Deployment and a Service
  each), created directly by a burst of POSTs, without the operator; timed until every Deployment is
  Available. This is what the API server, scheduler and controllers need anyway.
- operator: N LLMServices created by the same burst, with the operator running locally as the
  chart's ServiceAccount; timed until every LLMService is Ready. Also:
  - API requests per new service and per reconcile (the operator counts every request);
  - writes during one steady-state minute: the operator's own count, and the API server's count of
    writes to LLMServices, their children and Events (apiserver_request_total);
  - the operator's peak RSS (VmHWM);
  - in both runs, the CPU seconds every process on the machine spent until all were ready, by
    command name (kube-apiserver, kube-controller, etcd, python...): both runs saturate a small
    machine, so where the CPU goes is where the time goes.

The table prints both and the ratio operator/baseline. Goals at N = 1,000 (issue 11): all Ready
in < 60 s, <= 1.25x the baseline, <= 6 API requests per new service, 0 writes in a steady minute,
peak RSS < 250 MiB.

Run (after hack/setup.sh):  ~/.cache/llmserve/venv/bin/python bench/fleet.py --sizes 100,1000
Results are also written as JSON to bench/results/fleet-<N>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from llmserve.operator.kube import KubeClient, load_config
from llmserve.operator.reconcile import Children, Observation, decide
from llmserve.operator.render import Images
from llmserve.operator.spec import Spec
from llmserve.testbed import toolchain
from llmserve.testbed.cluster import TestBed
from llmserve.testbed.local_operator import LocalOperator, install_chart, service_account_kubeconfig
from llmserve.testbed.storage import model_repository

NAMESPACE = "fleet"
PODS_PER_NODE = 100  # KWOK nodes advertise 110 pods
OUR_RESOURCES = {"llmservices", "deployments", "services", "poddisruptionbudgets", "events"}
WRITE_VERBS = {"POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION"}
METRIC = re.compile(r'^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$')
MODEL_REPOSITORY = Path(__file__).resolve().parents[1] / "model_repo"  # behind the claim; pods are simulated
IMAGES = Images(puller="llmserve/llmserve:bench", predictor="llmserve/predictor:bench")


def manifest(i: int) -> dict:
    return {"apiVersion": "llmserve.io/v1alpha1", "kind": "LLMService",
            "metadata": {"name": f"svc-{i:04d}", "namespace": NAMESPACE},
            "spec": {"model": {"name": "tiny-gpt", "repository": "pvc://models", "version": 1},
                     "replicas": 1, "runtime": {"gpus": 1}}}


def baseline_children(i: int) -> list[dict]:
    """What the operator creates for LLMService i (its own decide()), without an owner."""
    obj = manifest(i)
    obj["metadata"]["uid"] = "baseline"
    decision = decide(obj, Spec.from_object(obj), Children(), Observation(datetime.now(timezone.utc)), IMAGES)
    children = [child for wave in decision.waves for child in wave]
    for child in children:
        del child["metadata"]["ownerReferences"]
    return children


async def create_all(bed: TestBed, groups: list[list[dict]], concurrency: int = 16) -> None:
    """Create each group's objects in order, the groups concurrently: a burst (kubectl would take
    ~0.4 s per object on this machine)."""
    limit = asyncio.Semaphore(concurrency)

    async def create(client: KubeClient, group: list[dict]) -> None:
        async with limit:
            for obj in group:
                await client.create(obj)

    async with KubeClient(load_config(str(bed.kubeconfig)), user_agent="fleet-bench") as client:
        await asyncio.gather(*(create(client, group) for group in groups))


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


class ConditionWatch:
    """How many objects of `resource` in the namespace have `condition` True, followed by one
    `kubectl get --watch` started before the burst. Polling a list instead (every 2 s, all N
    objects decoded by a fresh kubectl each time) cost the saturated machine several CPU seconds
    per poll, more the longer a run took: the measurement must not load what it measures."""

    def __init__(self, bed: TestBed, resource: str, condition: str):
        template = (f'{{.metadata.name}} {{.status.conditions[?(@.type=="{condition}")].status}}{{"\\n"}}')
        self.state: dict[str, bool] = {}
        self._process = subprocess.Popen(
            [str(toolchain.KUBERNETES.path("kubectl")), "get", resource, "-n", NAMESPACE, "--watch",
             "--output-watch-events=false", "-o", f"jsonpath={template}"],
            env=bed.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._process.stdout:
            name, _, status = line.strip().partition(" ")
            if name:
                self.state[name] = status == "True"

    def count(self) -> int:
        if self._process.poll() is not None:
            raise RuntimeError(f"kubectl get --watch exited ({self._process.returncode})")
        return sum(self.state.values())

    def stop(self) -> None:
        self._process.kill()
        self._process.wait()


def wait_until(n: int, what: str, count, started: float, timeout: float, alive=lambda: None) -> float:
    """Check `count()` every 0.2 s until it reaches n; returns the seconds since `started`."""
    done, reported = 0, started
    while done < n:
        alive()
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"only {done}/{n} {what} after {timeout:.0f}s")
        time.sleep(0.2)
        done = count()
        if time.monotonic() - reported >= 2 or done >= n:
            reported = time.monotonic()
            print(f"[fleet {n}] {done}/{n} {what} after {reported - started:.0f}s", file=sys.stderr, flush=True)
    return time.monotonic() - started


def fresh_bed(n: int, label: str) -> TestBed:
    """A test bed sized for n single-GPU pods, with the chart and the namespace's model claim."""
    nodes = math.ceil(n / PODS_PER_NODE) + 1
    bed = TestBed(f"bench-fleet-{label}-{n}")
    print(f"[fleet {n}] {label}: starting a test bed with {nodes} nodes", file=sys.stderr, flush=True)
    bed.up(nodes=nodes, gpus=PODS_PER_NODE, timeout=300)
    try:
        install_chart(bed)
        bed.kubectl("wait", "--for=condition=Established", "crd/llmservices.llmserve.io", "--timeout=60s")
        bed.kubectl("create", "namespace", NAMESPACE)
        model_repository(bed, NAMESPACE, MODEL_REPOSITORY)
    except BaseException:
        bed.down()
        raise
    return bed


def run_baseline(n: int, timeout: float) -> tuple[float, dict[str, float]]:
    """Seconds until the same children, created without the operator, are all Available, and the
    CPU seconds each component spent until then."""
    bed = fresh_bed(n, "baseline")
    try:
        watch = ConditionWatch(bed, "deployments", "Available")
        try:
            cpu_before, started = cpu_by_pid(), time.monotonic()
            asyncio.run(create_all(bed, [baseline_children(i) for i in range(n)]))
            seconds = wait_until(n, "Deployments Available", watch.count, started, timeout)
            return seconds, cpu_spent(cpu_before)
        finally:
            watch.stop()
    finally:
        bed.down()


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat utime and stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_pid() -> dict[int, tuple[str, float]]:
    """(command name, CPU seconds so far) of every process on the machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                found[int(entry.name)] = (stat[stat.index("(") + 1:stat.rindex(")")], cpu_seconds(int(entry.name)))
            except (OSError, ValueError):  # exited meanwhile
                pass
    return found


def cpu_spent(before: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent since `before`, by command name (the test bed's components, python...):
    both runs saturate the machine, so where the CPU goes is where the time goes."""
    spent: dict[str, float] = {}
    for pid, (name, seconds) in cpu_by_pid().items():
        spent[name] = spent.get(name, 0.0) + seconds - before.get(pid, (name, 0.0))[1]
    return {name: round(value, 1) for name, value in sorted(spent.items(), key=lambda kv: -kv[1]) if value >= 0.5}


def run(n: int, steady_seconds: float, workdir: Path, timeout: float) -> dict:
    baseline, baseline_cpu = run_baseline(n, timeout)
    bed = fresh_bed(n, "operator")
    operator = None
    try:
        kubeconfig = service_account_kubeconfig(bed, workdir / f"operator-{n}.kubeconfig")
        # One replica, no election: a lease renewal starved by a saturated machine would stop it.
        operator = LocalOperator(kubeconfig, workdir / f"operator-{n}.log", identity="bench",
                                 extra_args=("--no-leader-election",)).start().wait_leading()

        def alive() -> None:
            if operator.returncode() is not None:
                raise RuntimeError(f"the operator exited ({operator.returncode()}):\n{operator.log()}")

        watch = ConditionWatch(bed, "llmservices", "Ready")
        try:
            cpu_before, started = cpu_by_pid(), time.monotonic()
            asyncio.run(create_all(bed, [[manifest(i)] for i in range(n)]))
            all_ready = wait_until(n, "LLMServices Ready", watch.count, started, timeout, alive)
            operator_cpu, run_cpu = cpu_seconds(operator.pid), cpu_spent(cpu_before)
        finally:
            watch.stop()
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
        return {
            "llmservices": n,
            "nodes": math.ceil(n / PODS_PER_NODE) + 1,
            "baseline_seconds_until_all_available": round(baseline, 1),
            "seconds_until_all_ready": round(all_ready, 1),
            "ratio_to_baseline": round(all_ready / baseline, 2),
            "operator_cpu_seconds_until_all_ready": round(operator_cpu, 1),
            "baseline_cpu_total": round(sum(baseline_cpu.values()), 1),
            "operator_run_cpu_total": round(sum(run_cpu.values()), 1),
            "baseline_cpu_seconds_by_component": baseline_cpu,
            "operator_run_cpu_seconds_by_component": run_cpu,
            "api_requests_per_llmservice": round(converged["llmserve_operator_reconcile_requests_total"] / n, 2),
            "reconciles": int(reconciles),
            "api_requests_per_reconcile": round(
                converged["llmserve_operator_reconcile_requests_total"] / reconciles, 2),
            "max_api_requests_in_one_reconcile": int(converged["llmserve_operator_reconcile_requests_max"]),
            "writes_per_llmservice_to_converge": round(converged["llmserve_operator_reconcile_writes_total"] / n, 2),
            "steady_seconds": steady_seconds,
            "steady_reconciles": int(steady["llmserve_operator_reconciles_total"] - reconciles),
            "steady_operator_writes": int(steady["llmserve_operator_reconcile_writes_total"]
                                          - converged["llmserve_operator_reconcile_writes_total"]),
            "steady_apiserver_writes": {r: server_after.get(r, 0) - server_before.get(r, 0) for r in OUR_RESOURCES},
            "operator_peak_rss_mib": round(peak_rss_mib(operator.pid), 1),
        }
    finally:
        if operator:
            operator.stop()
        bed.down()


def table(results: list[dict]) -> str:
    rows = [
        ("LLMServices", "llmservices"), ("fake GPU nodes", "nodes"),
        ("baseline: all Deployments Available (s)", "baseline_seconds_until_all_available"),
        ("operator: all LLMServices Ready (s)", "seconds_until_all_ready"),
        ("ratio operator / baseline", "ratio_to_baseline"),
        ("operator CPU seconds until then", "operator_cpu_seconds_until_all_ready"),
        ("baseline: machine CPU seconds", "baseline_cpu_total"),
        ("operator run: machine CPU seconds", "operator_run_cpu_total"),
        ("API requests per new LLMService", "api_requests_per_llmservice"),
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
    for r in results:
        lines.append(f"CPU seconds by component at N={r['llmservices']}: baseline {r['baseline_cpu_seconds_by_component']}; "
                     f"operator run {r['operator_run_cpu_seconds_by_component']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="comma-separated fleet sizes (default 100,1000)")
    parser.add_argument("--steady-seconds", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="per size and run, until all Ready")
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
