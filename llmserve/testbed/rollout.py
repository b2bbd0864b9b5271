"""Canary rollouts on a test bed, shared by the end-to-end tests and `bench/rollout.py`.

The operator, API server, scheduler and KWOK GPU nodes are real, but KWOK's pods run nothing, so
the data plane of each revision is a real local tritonserver serving that model version, scraped
by a real Prometheus with the labels in-cluster relabeling gives the revision's pods
(`namespace`, `llmserve_io_service`, `llmserve_io_model_version`, `llmserve_io_revision`).

`TrackRouter` stands for the traffic split: it follows the LLMService's status through a watch and
sends each request to the stable or the canary revision in the proportion the operator publishes
(`status.canary.weight`), and fails a request sent to a track without ready pods, as a Service
without endpoints would (kserve#5983). It checks the rollout's safety rules on every status it
sees: no weight on a canary without ready pods, ready capacity never below the requested
replicas, never more than replicas + maxSurge pods.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..operator.render import puller_command
from ..operator.rollout import revision_name, serving_spec
from ..operator.spec import VLLM, Spec
from .cluster import TestBed
from .prometheus import metric_labels

MODEL = "rollout_probe"  # tests/data/model_repo/rollout_probe: versions good, flaky, slow and broken
VERSIONS = (1, 2, 3, 4, 5)
INFER_BODY = json.dumps({"inputs": [{"name": "INPUT0", "shape": [4], "datatype": "FP32",
                                     "data": [1.0, 2.0, 3.0, 4.0]}]}).encode()


def stage_probe_versions(source: Path, destination: Path) -> Path:
    """A model repository with every version of `rollout_probe`: the repository keeps only
    version 1, and each version is a copy of it that picks its behaviour from its version."""
    model = destination / MODEL
    model.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / MODEL / "config.pbtxt", model / "config.pbtxt")
    for version in VERSIONS:
        (model / str(version)).mkdir(exist_ok=True)
        shutil.copy2(source / MODEL / "1" / "model.py", model / str(version) / "model.py")
    return destination


def revision_of(stored_spec: dict, version: int) -> str:
    """The revision the operator gives `version` of a service whose spec is `stored_spec` (as the
    API server stored it, defaults included): only the version differs between the revisions."""
    serving = serving_spec(stored_spec)
    return revision_name({**serving, "model": {**serving["model"], "version": version}})


# What this GPU-less machine adds to a vLLM revision's engine settings (a GPU pod needs neither):
# eager mode (compiled mode takes minutes to start on the CPU) and a KV budget in bytes (the
# CPU build reads gpu_memory_utilization as a fraction of the whole host). 64 MiB holds 32k
# tokens of the tiny test LM (2 KiB each), and several of these servers run side by side.
CPU_VLLM_ENGINE_ARGS = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}


def pull_revision(stored: dict, serving: dict, source_repo: Path, destination: Path) -> Spec:
    """Run the model-puller command the operator renders for `serving` (a revision of the stored
    LLMService `stored`) here, with the pod's volumes swapped for local directories (and no
    termination message): the served config.pbtxt gets that revision's instance kind and engine
    settings exactly as in a pod, plus `CPU_VLLM_ENGINE_ARGS` under them for vLLM (the revision's
    own settings win)."""
    spec = Spec.from_object(stored, serving)
    argv = puller_command(spec)
    argv[argv.index("--source") + 1] = str(source_repo)
    argv[argv.index("--dest") + 1] = str(destination)
    # No pod here: nothing reads a termination message, and /dev is no place to write one.
    flag = argv.index("--termination-message")
    del argv[flag:flag + 2]
    if spec.engine == VLLM:
        settings = json.dumps({**CPU_VLLM_ENGINE_ARGS, **spec.engine_args})
        if "--engine-args" in argv:
            argv[argv.index("--engine-args") + 1] = settings
        else:
            argv += ["--engine-args", settings]
    result = subprocess.run([sys.executable, "-m", "llmserve", *argv[1:]], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr}")
    return spec


def generate_request(texts: Sequence[str] = ("Tell me a short story about the sea and a lighthouse.",),
                     max_tokens: int = 4):
    """`request(server, model) -> urllib Request` for TrackRouter: one generation through Triton's
    generate endpoint (a decoupled model answers with one response when not streaming), the
    prompts `texts` taken in turn across all clients."""
    bodies = itertools.cycle([json.dumps({"text_input": text, "max_tokens": max_tokens}).encode() for text in texts])

    def request(server, model: str) -> urllib.request.Request:
        return urllib.request.Request(f"{server.http_url}/v2/models/{model}/generate", data=next(bodies),
                                      headers={"Content-Type": "application/json"})
    return request


def probe_request(server, model: str) -> urllib.request.Request:
    return urllib.request.Request(f"{server.http_url}/v2/models/{model}/infer", data=INFER_BODY,
                                  headers={"Content-Type": "application/json"})


def scrape_target(server, namespace: str, service: str, version: int, revision: str) -> dict:
    """A Prometheus target for `server` labeled as a pod of `revision` would be."""
    labels = metric_labels({"llmserve.io/service": service, "llmserve.io/model-version": str(version),
                            "llmserve.io/revision": revision})
    return {"target": server.metrics_target, "labels": {"namespace": namespace, **labels}}


@dataclass
class Observation:
    """One LLMService status as the watch delivered it, and when."""

    at: float  # time.monotonic()
    status: dict


@dataclass
class Tally:
    ok: Counter = field(default_factory=Counter)  # revision -> answered requests
    failed: Counter = field(default_factory=Counter)  # revision -> failed requests
    errors: list[str] = field(default_factory=list)  # the first failures, for the report


class TrackRouter:
    """Route `rate` requests per second over the revisions of LLMService `namespace/name` in the
    proportions its status publishes, using `servers` (revision -> TritonServer); a request that
    takes longer than `timeout` seconds counts as failed."""

    def __init__(self, bed: TestBed, namespace: str, name: str, servers: dict, *, rate: float = 20.0,
                 clients: int = 8, max_surge: int = 1, model: str = MODEL, request=probe_request,
                 timeout: float = 30.0):
        self.bed, self.namespace, self.name, self.servers = bed, namespace, name, servers
        self.model, self.request, self.timeout = model, request, timeout
        self.interval, self.clients, self.max_surge = clients / rate, clients, max_surge
        self.timeline: list[Observation] = []
        self.violations: list[str] = []
        self.tally = Tally()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._credit = 0
        self._status: dict = {}
        self._threads: list[threading.Thread] = []
        self._watch: subprocess.Popen | None = None

    # -- the status the operator publishes ------------------------------------------------------
    def start(self) -> TrackRouter:
        self._watch = subprocess.Popen(
            [str(self.bed.bin_dir / "kubectl"), "get", "llms", self.name, "-n", self.namespace, "-o", "json",
             "--watch"], env=self.bed.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._threads = [threading.Thread(target=self._follow, name="router-watch", daemon=True)]
        self._threads += [threading.Thread(target=self._client, name=f"router-{i}", daemon=True)
                          for i in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def _follow(self) -> None:
        decoder, buffer = json.JSONDecoder(), ""
        for line in self._watch.stdout:
            buffer += line
            try:
                obj, end = decoder.raw_decode(buffer.lstrip())
            except ValueError:
                continue
            buffer = buffer.lstrip()[end:]
            self._observe(obj)

    def _observe(self, obj: dict) -> None:
        status, spec = obj.get("status") or {}, obj.get("spec") or {}
        replicas = spec.get("replicas", 1)
        stable, canary = status.get("stable") or {}, status.get("canary") or {}
        where = f"{(status.get('rollout') or {}).get('phase')} step {(status.get('rollout') or {}).get('step')}"
        if canary.get("weight") and not canary.get("readyReplicas"):
            self.violations.append(f"{where}: weight {canary['weight']}% on canary without ready pods")
        if stable and stable.get("replicas", 0) + canary.get("readyReplicas", 0) < replicas:
            self.violations.append(f"{where}: stable asked for {stable.get('replicas')} pods with "
                                   f"{canary.get('readyReplicas', 0)} ready canary pods, below {replicas}")
        if stable.get("replicas", 0) + canary.get("replicas", 0) > replicas + self.max_surge:
            self.violations.append(f"{where}: {stable.get('replicas')} + {canary.get('replicas')} pods exceed "
                                   f"{replicas} + maxSurge {self.max_surge}")
        with self._lock:
            self._status = status
            self.timeline.append(Observation(time.monotonic(), status))

    def latest(self) -> dict:
        with self._lock:
            return self._status

    # -- the load -------------------------------------------------------------------------------
    def _pick(self) -> dict:
        """The track block the next request goes to: smooth weighted round robin on the weight."""
        with self._lock:
            stable, canary = self._status.get("stable") or {}, self._status.get("canary") or {}
            self._credit += canary.get("weight", 0) if canary else 0
            if self._credit >= 100:
                self._credit -= 100
                return canary
            return stable

    def _client(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            track = self._pick()
            if track:
                self._send(track)
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _send(self, track: dict) -> None:
        revision, server = track.get("revision"), self.servers.get(track.get("revision"))
        if not track.get("readyReplicas"):
            error = f"{revision}: no ready pods (a Service without endpoints)"
        elif server is None:
            error = f"{revision}: no tritonserver for this revision"
        else:
            try:
                with urllib.request.urlopen(self.request(server, self.model), timeout=self.timeout) as response:
                    response.read()
                error = ""
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                error = f"{revision}: {exc}"
        with self._lock:
            if error:
                self.tally.failed[revision] += 1
                if len(self.tally.errors) < 20:
                    self.tally.errors.append(error)
            else:
                self.tally.ok[revision] += 1

    def wait_for(self, predicate, what: str, timeout: float = 180.0) -> dict:
        """The first observed status for which `predicate(status)` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.latest()
            if status and predicate(status):
                return status
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last status: "
                             f"{json.dumps(self.latest(), indent=1)[:3000]}")

    def stop(self) -> Tally:
        self._stop.set()
        if self._watch is not None:
            self._watch.terminate()
            self._watch.wait(10)
        for thread in self._threads:
            thread.join(self.timeout + 5)
        return self.tally

    def __enter__(self) -> TrackRouter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
