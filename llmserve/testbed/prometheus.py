"""Runs Debian's ``prometheus`` locally, scraping given targets, queried through its HTTP API.

In the cluster, Prometheus discovers Triton pods and relabels their pod labels into metric labels
(``labelmap`` of ``__meta_kubernetes_pod_label_(.+)``), so ``llmserve.io/track: canary`` becomes
``llmserve_io_track="canary"``. Here the pods are simulated and Triton runs as a local process, so
each target is listed statically with the labels that relabeling would have produced
(``metric_labels`` computes them); queries written against the test bed select series exactly as
they will in the cluster.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .procs import LocalServer

JOB = "triton"


class PrometheusError(RuntimeError):
    """Prometheus could not start, or a query failed or never matched; the message says why."""


@dataclass(frozen=True)
class Sample:
    """One element of an instant-query result."""

    labels: dict[str, str]
    value: float


def metric_labels(pod_labels: Mapping[str, str]) -> dict[str, str]:
    """The metric labels Kubernetes service discovery plus ``labelmap`` derive from pod labels.

    Prometheus sanitizes discovered label names by replacing every character outside
    ``[a-zA-Z0-9_]`` with ``_`` (``llmserve.io/track`` -> ``llmserve_io_track``).
    """
    return {re.sub(r"[^a-zA-Z0-9_]", "_", key): value for key, value in pod_labels.items()}


def render_config(targets: Iterable[Mapping[str, Any]], scrape_interval: str = "1s") -> dict[str, Any]:
    """The ``prometheus.yml`` for ``targets`` (``[{"target": "host:port", "labels": {...}}]``).

    One static config per target, so each carries its own labels; the scrape timeout equals the
    interval because Prometheus refuses a timeout longer than the interval.
    """
    static_configs = []
    for entry in targets:
        unknown = set(entry) - {"target", "labels"}
        if "target" not in entry or unknown:
            raise ValueError(f"a target is {{'target': 'host:port', 'labels': {{...}}}}, not {dict(entry)!r}")
        static_configs.append({"targets": [entry["target"]], "labels": dict(entry.get("labels", {}))})
    if not static_configs:
        raise ValueError("give Prometheus at least one target to scrape")
    return {
        "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [{"job_name": JOB, "metrics_path": "/metrics", "static_configs": static_configs}],
    }


class Prometheus(LocalServer):
    """A local Prometheus on a free loopback port with its own TSDB in a temporary directory."""

    what, log_name, error = "Prometheus", "prometheus.log", PrometheusError
    workdir_prefix = "llmserve-prometheus-"

    def __init__(
        self,
        targets: Iterable[Mapping[str, Any]],
        *,
        scrape_interval: str = "1s",
        binary: str = "prometheus",
        startup_timeout: float = 60.0,
    ) -> None:
        self.config = render_config(targets, scrape_interval)
        self.binary = binary
        self.startup_timeout = startup_timeout
        super().__init__()

    def _command(self, workdir: Path) -> tuple[list[str], None]:
        executable = shutil.which(self.binary)
        if executable is None:
            raise PrometheusError(
                f"{self.binary!r} is not on PATH; install Debian's prometheus package "
                "(apt-get install prometheus; hack/setup.sh does)"
            )
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config, sort_keys=False))
        (self.port,) = self.pick_ports(1)
        return [
            executable,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ], None

    def _wait_ready(self) -> None:
        """Wait until Prometheus answers and has picked up every target.

        ``/-/ready`` turns true before the scrape manager applies the configuration (it reloads
        every few seconds), so readiness alone does not mean the targets are being scraped.
        """
        expected = len(self.config["scrape_configs"][0]["static_configs"])
        deadline = time.monotonic() + self.startup_timeout
        waiting_for = f"{self.url}/-/ready"
        while True:
            self._raise_if_failed("while starting")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        waiting_for = f"{expected} active targets in {self.url}/api/v1/targets"
                        if len(self.target_health()) == expected:
                            return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise PrometheusError(
                    f"prometheus not ready after {self.startup_timeout:.0f}s (waiting for {waiting_for})\n"
                    f"--- log tail ({self.log_path}) ---\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def _api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        if self._process is None:
            raise PrometheusError("Prometheus is not running")
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as err:  # bad PromQL answers 400 with a JSON explanation
            text = err.read().decode(errors="replace")
            try:
                body = json.loads(text)
            except ValueError:
                body = {"errorType": f"HTTP {err.code}", "error": text[:500]}
        if body.get("status") != "success":
            raise PrometheusError(f"GET {url}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[Sample]:
        """Evaluate an instant query now; a scalar result is one sample without labels."""
        data = self._api("query", {"query": promql})
        if data["resultType"] == "vector":
            return [Sample(labels=item["metric"], value=float(item["value"][1])) for item in data["result"]]
        if data["resultType"] == "scalar":
            return [Sample(labels={}, value=float(data["result"][1]))]
        raise PrometheusError(f"{promql!r} returned a {data['resultType']}; query() takes an instant vector or scalar")

    def target_health(self) -> list[dict[str, Any]]:
        """Each active target's scrape URL, labels, health and last error, as Prometheus sees it."""
        return [
            {key: target.get(key) for key in ("scrapeUrl", "labels", "health", "lastError")}
            for target in self._api("targets", {"state": "active"})["activeTargets"]
        ]

    def wait_for(
        self,
        promql: str,
        until: Callable[[list[Sample]], bool] = bool,
        timeout: float = 30.0,
    ) -> list[Sample]:
        """Poll ``promql`` until ``until(result)`` holds (default: the result is not empty).

        Scrapes and rule evaluation are periodic, so a test waits for a value instead of sleeping.
        On timeout the error shows the last result and each target's health, which tells "not
        scraped" from "scraped but different".
        """
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if until(result):
                return result
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        raise PrometheusError(
            f"{promql!r} did not reach the expected result within {timeout:.0f}s; last result: {result}\n"
            f"targets: {json.dumps(self.target_health(), indent=2)}\n"
            f"--- log tail ({self.log_path}) ---\n{self.log_tail(20)}"
        )

