"""Canary rollout and rollback times on the local test bed (issue 6).

Each scenario is a fresh LLMService (3 replicas, maxSurge 1) moving from version 1 of the
`rollout_probe` model to another version, with the same data plane as the end-to-end tests: one
real tritonserver per revision, a real Prometheus scraping them every second with the pods'
labels, and paced load (20 requests/s) routed at the tracks in the proportions the operator
publishes. The operator runs locally with the chart's ServiceAccount.

- good (v2): steps 30% and 60% held `--pause` each, analysis every `--interval`: seconds from the
  spec change to the canary's first traffic, to the promotion, and failed requests (expected 0);
- errors (v3, a third of requests fail), slow (v4, 300 ms per request, p99 bound 150 ms),
  all-fail (v5): seconds from the canary's first traffic (status.rollout.weightSince) to the abort,
  and from the spec change to the canary scaled to zero. The bound is failureLimit x interval for
  errors and slow (plus one scrape and the reconcile), one interval for all-fail.

Run (after hack/setup.sh):  ~/.cache/llmserve/venv/bin/python bench/rollout.py
Options: --interval 4s, --failure-limit 2, --pause 2s, --repeat N, --testbed NAME (reuse a
running `llmserve testbed up --name NAME`). Results also go to bench/results/rollout.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

from llmserve.testbed.local_operator import LocalOperator, install_chart, service_account_kubeconfig
from llmserve.operator.rollout import parse_stamp
from llmserve.testbed.cluster import TestBed
from llmserve.testbed.prometheus import Prometheus
from llmserve.testbed.rollout import MODEL, TrackRouter, revision_of, scrape_target, stage_probe_versions
from llmserve.testbed.storage import model_repository
from llmserve.testbed.triton import TritonServer
from testbed_run import run_on_testbed

ROOT = Path(__file__).resolve().parents[1]
MODEL_REPO = ROOT / "tests" / "data" / "model_repo"
SCENARIOS = {"good": (2, "2s"), "errors": (3, "2s"), "slow": (4, "150ms"), "all-fail": (5, "2s")}


def log(message: str) -> None:
    print(f"[rollout] {message}", file=sys.stderr, flush=True)


def llmservice(namespace: str, args: argparse.Namespace, latency: str) -> dict:
    steps = [{"weight": 30, "pause": args.pause}, {"weight": 60, "pause": args.pause}]
    return {"apiVersion": "llmserve.io/v1alpha1", "kind": "LLMService",
            "metadata": {"name": "chat", "namespace": namespace},
            "spec": {"model": {"name": MODEL, "repository": "pvc://models", "version": 1},
                     "replicas": 3, "runtime": {"gpus": 1, "startupTimeout": "1m"},
                     "rollout": {"steps": steps, "maxSurge": 1, "analysis": {
                         "interval": args.interval, "failureLimit": args.failure_limit, "maxErrorRate": "0.05",
                         "maxP99Latency": latency, "minRequests": 5}}}}


def scenario(bed: TestBed, args: argparse.Namespace, repo: Path, label: str, run: int) -> dict:
    version, latency = SCENARIOS[label]
    namespace = f"bench-rollout-{label}-{run}"
    bed.kubectl("create", "namespace", namespace, check=False)
    model_repository(bed, namespace, repo)
    bed.apply(llmservice(namespace, args, latency))
    bed.kubectl("wait", "--for=condition=Ready", "llms/chat", "-n", namespace, "--timeout=180s", timeout=200)
    spec = json.loads(bed.kubectl("get", "llms", "chat", "-n", namespace, "-o", "json").stdout)["spec"]
    servers = {revision_of(spec, v): TritonServer(repo, {MODEL: v}).start() for v in (1, version)}
    prometheus = Prometheus([scrape_target(s, namespace, "chat", v, r)
                             for (r, s), v in zip(servers.items(), (1, version))]).start()
    try:
        with TrackRouter(bed, namespace, "chat", servers) as router:
            router.wait_for(lambda s: (s.get("stable") or {}).get("readyReplicas") == 3, "stable to serve")
            patch = {"spec": {"model": {"version": version},
                              "rollout": {"analysis": {"prometheus": {"url": prometheus.url}}}}}
            started = time.monotonic()
            bed.kubectl("patch", "llms/chat", "-n", namespace, "--type=merge", "-p", json.dumps(patch))
            done = router.wait_for(
                lambda s: s["rollout"]["phase"] == "Complete" and s["stable"]["version"] == version
                or s["rollout"]["phase"] == "Aborted" and s["canary"]["replicas"] == 0 and not s["canary"]["weight"],
                f"{label}: promotion or rollback", timeout=600)
        first_traffic = next(o.at for o in router.timeline if (o.status.get("canary") or {}).get("weight"))
        result = {"version": version, "outcome": done["history"][-1]["outcome"],
                  "spec_change_to_canary_traffic_s": round(first_traffic - started, 1),
                  "spec_change_to_end_s": round(router.timeline[-1].at - started, 1),
                  "failed_requests": dict(router.tally.failed), "answered_requests": dict(router.tally.ok),
                  "safety_violations": router.violations}
        if result["outcome"] == "Aborted":
            aborted = next(o.status["rollout"] for o in router.timeline if o.status["rollout"]["phase"] == "Aborted")
            result["canary_traffic_to_abort_s"] = round(
                (parse_stamp(done["history"][-1]["time"]) - parse_stamp(aborted["weightSince"])).total_seconds(), 1)
            result["failed_checks"], result["reason"] = aborted["failedChecks"], aborted["message"]
        log(f"{label} #{run}: {json.dumps(result)}")
        return result
    finally:
        prometheus.stop()
        for server in servers.values():
            server.stop()
        bed.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def run(bed: TestBed, args: argparse.Namespace, workdir: Path) -> dict:
    install_chart(bed)
    bed.kubectl("wait", "--for=condition=Established", "crd/llmservices.llmserve.io", "--timeout=60s")
    kubeconfig = service_account_kubeconfig(bed, workdir / "operator.kubeconfig")
    operator = LocalOperator(kubeconfig, workdir / "operator.log", identity="bench").start().wait_leading()
    repo = stage_probe_versions(MODEL_REPO, workdir / "model_repo")
    try:
        runs = {label: [scenario(bed, args, repo, label, i) for i in range(args.repeat)] for label in SCENARIOS}
    finally:
        operator.stop()
    key = {"good": "spec_change_to_end_s"}
    summary = {label: {"median_s": round(statistics.median(r[key.get(label, "canary_traffic_to_abort_s")] for r in rs), 1),
                       "outcomes": sorted({r["outcome"] for r in rs})} for label, rs in runs.items()}
    return {"interval": args.interval, "failure_limit": args.failure_limit, "pause": args.pause,
            "replicas": 3, "max_surge": 1, "steps": [30, 60], "load_rps": 20,
            "when": datetime.now().isoformat(timespec="seconds"),
            "summary (good: spec change to promotion; bad: canary traffic to abort)": summary, "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", default="4s", help="analysis interval (default 4s)")
    parser.add_argument("--failure-limit", type=int, default=2)
    parser.add_argument("--pause", default="2s", help="pause of each of the two steps (default 2s)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each scenario (default 1)")
    parser.add_argument("--testbed", help="reuse this running test bed instead of starting one")
    args = parser.parse_args()
    return run_on_testbed("rollout", args.testbed, lambda bed, tmp: run(bed, args, tmp))


if __name__ == "__main__":
    sys.exit(main())
