"""Canary analysis: is the canary revision worse than the thresholds, by the engine's own metrics?

One check compares the canary's pods with the stable pods over the last `interval`, from the
series Prometheus scrapes from Triton and labels with the pod labels (`labelmap` of the pod
labels, plus `namespace` from Kubernetes service discovery; the same convention the autoscaling
rules use).

The engine metrics come first (docs/engines.md#metrics): every llmserve engine model (vLLM, ONNX
Runtime) publishes them through Triton's custom-metrics API, because Triton's own request
statistics never see a decoupled model's generations (execute() returns before generating):
- error rate = increase(llmserve:request_failure_total) / increase(that + vllm:request_success_total),
  summed over every pod of the revision: every request that ended in an error, a generation that
  failed inside the engine as much as one the new version refuses.
- p99 latency = histogram_quantile(0.99) of vllm:e2e_request_latency_seconds over the summed
  buckets of the revision's pods (arrival to last token), and with `maxP99TimeToFirstToken` the
  same of vllm:time_to_first_token_seconds: a fleet-wide quantile of the window.
For a model that publishes none of these (a plain Triton model), the check falls back, per
revision (PromQL `or`), to Triton's own statistics:
- error rate = increase(nv_inference_request_failure) / increase(failure + success), summed over
  every pod of the revision. Triton counts a request as failed when the backend fails it (a
  python model's `execute` raising, an ONNX/TensorRT error), when it is rejected (queue full) or
  cancelled. Malformed client requests are refused before they reach the model and are counted
  nowhere, so they do not make a canary look bad.
- p99 latency = `nv_inference_request_summary_us{quantile="0.99"}`, the tritonserver summary the
  operator turns on (`--metrics-config=summary_latencies=true`, see `llmserve.operator.tritoncmd`), taken
  as the highest value of any pod of the revision during the window. Why this and not something
  else: Triton exports no latency histogram for non-decoupled models, so no `histogram_quantile`
  over the fleet is possible; its cumulative `nv_inference_request_duration_us` counter gives only
  the mean, which hides exactly the tail a bad release adds. A summary quantile cannot be averaged
  across pods, but the maximum of the pods' p99s is an upper bound of the fleet's p99 (at most 1%
  of each pod's requests, hence of all requests, are slower), so the gate errs on the safe side.
  Triton's summaries cover a 60 s sliding window (prometheus-cpp's default, checked against the
  real 2.51 server), which for short intervals makes a slow spell count a little longer than the
  interval: again the safe side. The summary observes successful requests only.

Verdicts (Argo Rollouts and Flagger count "no data" as success in some setups; we never do):
- Inconclusive: Prometheus unreachable or failing, or a canary pod's request counters hold fewer
  than two samples in the window, or the canary served fewer than `minRequests` requests in the
  window, or a latency threshold is set but no latency was exported. It never advances a step and
  never counts as a failure.
  Why the samples: `increase()` needs two samples of a series in the window and silently drops a
  series with one (a pod scraped once since it started, or an interval shorter than two scrape
  intervals). The sum over the revision's pods would then judge the canary on the other pods
  alone, or find no series and call it "no requests"; counting samples per pod says which.
- Fail: error rate or p99 above its threshold; `fatal` when every request failed (the rollout
  aborts at once instead of waiting for `failureLimit` failed checks).
- Pass: otherwise.
The stable revision is measured with the same queries so every verdict and Event shows both.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from .units import parse_duration, parse_quantity

PASS, FAIL, INCONCLUSIVE = "Pass", "Fail", "Inconclusive"

NAMESPACE_LABEL = "namespace"
SERVICE_LABEL = "llmserve_io_service"
REVISION_LABEL = "llmserve_io_revision"
MODEL_LABEL = "model"  # Triton's own label: the model name

DEFAULT_INTERVAL = "1m"
DEFAULT_FAILURE_LIMIT = 2
DEFAULT_MIN_REQUESTS = 10
MIN_SAMPLES = 2  # increase() and rate() need two samples of each series in the window


@dataclass(frozen=True)
class Criteria:
    """`spec.rollout.analysis`: how often to check and what a failed check is."""

    interval: float = 60.0
    failure_limit: int = DEFAULT_FAILURE_LIMIT
    max_error_rate: float | None = None
    max_p99_ms: float | None = None
    max_p99_ttft_ms: float | None = None
    min_requests: int = DEFAULT_MIN_REQUESTS
    prometheus_url: str = ""  # the service's own Prometheus, if allowed (prometheus_for)

    @classmethod
    def from_spec(cls, section: dict | None) -> Criteria | None:
        """None when the spec asks for no analysis: steps then advance on their pauses alone."""
        if section is None:
            return None
        error_rate, p99, ttft = section.get("maxErrorRate"), section.get("maxP99Latency"), section.get(
            "maxP99TimeToFirstToken")
        return cls(
            interval=parse_duration(section.get("interval") or DEFAULT_INTERVAL),
            failure_limit=int(section.get("failureLimit", DEFAULT_FAILURE_LIMIT)),
            max_error_rate=float(parse_quantity(error_rate)) if error_rate is not None else None,
            max_p99_ms=parse_duration(p99) * 1000 if p99 else None,
            max_p99_ttft_ms=parse_duration(ttft) * 1000 if ttft else None,
            min_requests=int(section.get("minRequests", DEFAULT_MIN_REQUESTS)),
            prometheus_url=(section.get("prometheus") or {}).get("url", ""),
        )


@dataclass(frozen=True)
class Measurement:
    """One revision's numbers over the window. `p99_ms` / `p99_ttft_ms` are None when no latency
    (time to first token) was exported. `samples` is the fewest samples any of the revision's
    pods has of its request counters in the window: below MIN_SAMPLES the counts miss that pod."""

    requests: float
    failures: float
    p99_ms: float | None = None
    p99_ttft_ms: float | None = None
    samples: int = MIN_SAMPLES

    @property
    def error_rate(self) -> float | None:
        return self.failures / self.requests if self.requests > 0 else None

    def describe(self) -> str:
        if self.samples < MIN_SAMPLES:
            return (f"too few samples (a pod's request counters scraped {self.samples} time(s) in the window, "
                    f"a rate needs {MIN_SAMPLES})")
        parts = [f"{self.requests:.0f} requests"]
        if self.error_rate is not None:
            parts.append(f"error rate {self.error_rate:.2%}")
        if self.p99_ms is not None:
            parts.append(f"p99 {self.p99_ms:.0f}ms")
        if self.p99_ttft_ms is not None:
            parts.append(f"p99 time to first token {self.p99_ttft_ms:.0f}ms")
        return ", ".join(parts)

    def to_status(self) -> dict:
        out = {"requests": round(self.requests), "failures": round(self.failures)}
        if self.error_rate is not None:
            out["errorRate"] = f"{self.error_rate:.4f}"
        if self.p99_ms is not None:
            out["p99LatencyMs"] = round(self.p99_ms, 1)
        if self.p99_ttft_ms is not None:
            out["p99TimeToFirstTokenMs"] = round(self.p99_ttft_ms, 1)
        return out


@dataclass(frozen=True)
class Verdict:
    result: str  # PASS | FAIL | INCONCLUSIVE
    message: str
    canary: Measurement | None = None
    stable: Measurement | None = None
    fatal: bool = False  # every canary request failed: abort without waiting for failureLimit

    def to_status(self) -> dict:
        out = {"result": self.result, "message": self.message}
        if self.canary is not None:
            out["canary"] = self.canary.to_status()
        if self.stable is not None:
            out["stable"] = self.stable.to_status()
        return out


def _window(seconds: float) -> str:
    return f"{max(1, round(seconds))}s"


def queries(namespace: str, service: str, model: str, revisions: list[str], window: float) -> dict[str, str]:
    """The instant queries of one check, each grouped by revision so one answer covers the canary
    and the stable pods: the engine's metrics, or Triton's for a revision that publishes none."""
    revs = "|".join(revisions)
    sel = (f'{NAMESPACE_LABEL}="{namespace}",{SERVICE_LABEL}="{service}",{MODEL_LABEL}="{model}",'
           f'{REVISION_LABEL}=~"{revs}"')
    w, by = _window(window), f"sum by ({REVISION_LABEL})"

    def p99_us(histogram: str) -> str:
        return (f"1e6 * histogram_quantile(0.99, sum by (le, {REVISION_LABEL}) "
                f"(rate({histogram}_bucket{{{sel}}}[{w}])))")

    return {
        "failures": (f"{by} (increase(llmserve:request_failure_total{{{sel}}}[{w}]))"
                     f" or {by} (increase(nv_inference_request_failure{{{sel}}}[{w}]))"),
        "successes": (f"{by} (increase(vllm:request_success_total{{{sel}}}[{w}]))"
                      f" or {by} (increase(nv_inference_request_success{{{sel}}}[{w}]))"),
        "p99_us": (f"{p99_us('vllm:e2e_request_latency_seconds')} or max by ({REVISION_LABEL}) "
                   f'(max_over_time(nv_inference_request_summary_us{{{sel},quantile="0.99"}}[{w}]))'),
        "p99_ttft_us": p99_us("vllm:time_to_first_token_seconds"),
        # The fewest samples of any pod's request counters (those the error rate is taken from).
        "samples": (f"min by ({REVISION_LABEL}) (count_over_time(llmserve:request_failure_total{{{sel}}}[{w}])"
                    f" or count_over_time(vllm:request_success_total{{{sel}}}[{w}]))"
                    f" or min by ({REVISION_LABEL}) (count_over_time(nv_inference_request_failure{{{sel}}}[{w}])"
                    f" or count_over_time(nv_inference_request_success{{{sel}}}[{w}]))"),
    }


def measurements(results: dict[str, dict[str, float]], revisions: list[str]) -> dict[str, Measurement]:
    """Per-revision measurements from query results (`{query key: {revision: value}}`).

    A revision without any sample of its request counters in the window (not scraped yet, or no
    pod) gets no measurement; one whose counters hold too few samples for `increase()` gets one
    that says so (`samples`). NaN (a summary with no observations in Triton's window, a histogram
    without requests) means no latency.
    """
    def ms(key: str, rev: str) -> float | None:
        value = results.get(key, {}).get(rev)
        return value / 1000 if value is not None and not math.isnan(value) else None

    out = {}
    for rev in revisions:
        failures, successes = results["failures"].get(rev), results["successes"].get(rev)
        samples = results.get("samples", {}).get(rev)
        if failures is None and successes is None and samples is None:
            continue
        out[rev] = Measurement(
            requests=(failures or 0.0) + (successes or 0.0),
            failures=failures or 0.0,
            p99_ms=ms("p99_us", rev),
            p99_ttft_ms=ms("p99_ttft_us", rev),
            samples=int(samples or 0),
        )
    return out


def judge(criteria: Criteria, canary: Measurement | None, stable: Measurement | None, window: float) -> Verdict:
    """The verdict of one check from the measurements (pure)."""
    context = f"stable: {stable.describe()}" if stable else "stable: no data"
    span = _window(window)
    if canary is not None and canary.samples < MIN_SAMPLES:
        return Verdict(INCONCLUSIVE, f"a canary pod's request counters were scraped {canary.samples} time(s) in the "
                       f"last {span}; a check needs {MIN_SAMPLES} samples of every pod (a pod that just started, "
                       f"or an interval shorter than twice Prometheus' scrape interval) ({context})", canary, stable)
    if canary is None or canary.requests < criteria.min_requests:
        served = f"{canary.requests:.0f}" if canary else "no"
        return Verdict(INCONCLUSIVE, f"canary served {served} requests in the last {span}; a check needs at "
                       f"least {criteria.min_requests} ({context})", canary, stable)
    what = f"canary: {canary.describe()}; {context}"
    if canary.failures >= canary.requests:
        return Verdict(FAIL, f"every canary request failed in the last {span} ({what})", canary, stable, fatal=True)
    breaches = []
    if criteria.max_error_rate is not None and canary.error_rate > criteria.max_error_rate:
        breaches.append(f"error rate {canary.error_rate:.2%} > {criteria.max_error_rate:.2%}")
    if criteria.max_p99_ms is not None:
        if canary.p99_ms is None:
            return Verdict(INCONCLUSIVE, f"no p99 latency exported for the canary in the last {span} "
                           f"(neither the engine's vllm:e2e_request_latency_seconds nor Triton's summary: is "
                           f"tritonserver running with --metrics-config=summary_latencies=true?); {what}",
                           canary, stable)
        if canary.p99_ms > criteria.max_p99_ms:
            breaches.append(f"p99 {canary.p99_ms:.0f}ms > {criteria.max_p99_ms:.0f}ms")
    if criteria.max_p99_ttft_ms is not None:
        if canary.p99_ttft_ms is None:
            return Verdict(INCONCLUSIVE, f"no time to first token exported for the canary in the last {span} "
                           f"(vllm:time_to_first_token_seconds; engine models publish it); {what}", canary, stable)
        if canary.p99_ttft_ms > criteria.max_p99_ttft_ms:
            breaches.append(f"p99 time to first token {canary.p99_ttft_ms:.0f}ms > {criteria.max_p99_ttft_ms:.0f}ms")
    if breaches:
        return Verdict(FAIL, f"{' and '.join(breaches)} ({what})", canary, stable)
    return Verdict(PASS, what, canary, stable)


class PrometheusError(Exception):
    """Prometheus could not answer (unreachable, timeout, HTTP or query error)."""


class PrometheusClient:
    """A minimal async client of Prometheus' instant-query API (`GET /api/v1/query`); one HTTP
    session per `async with` block."""

    def __init__(self, url: str, timeout: float = 10.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        self._session = None

    async def __aenter__(self) -> PrometheusClient:
        import aiohttp

        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    async def query(self, promql: str) -> list[tuple[dict, float]]:
        """The samples of an instant vector: (labels, value) each."""
        import aiohttp

        try:
            async with self._session.get(f"{self.url}/api/v1/query", params={"query": promql}) as response:
                try:
                    body = await response.json(content_type=None)
                except ValueError as exc:
                    raise PrometheusError(f"{self.url} answered HTTP {response.status} without JSON") from exc
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise PrometheusError(f"{self.url} unreachable: {exc or type(exc).__name__}") from exc
        if body.get("status") != "success":
            raise PrometheusError(f"{self.url}: {body.get('errorType')}: {body.get('error')}")
        data = body["data"]
        if data["resultType"] != "vector":
            raise PrometheusError(f"{promql!r} returned a {data['resultType']}, not a vector")
        return [(item["metric"], float(item["value"][1])) for item in data["result"]]


class PrometheusNotAllowed(ValueError):
    """The spec names a Prometheus the operator may not query."""


def prometheus_for(requested: str, default: str, allowed: Iterable[str] = ()) -> str:
    """The Prometheus to query for one service: the operator's (`default`), or the one its spec
    names if that is on the operator's origin or an allowed one (`scheme://host:port` exactly,
    `scheme://host` on any port). The operator fetches no other URL on a tenant's behalf; the CRD
    refuses the rest already (chart values prometheus.url and prometheus.allowedUrls), this covers
    objects stored before the allowlist changed."""
    if not requested:
        return default
    url = urlsplit(requested)
    if url.scheme in ("http", "https") and url.hostname and not (url.username or url.password):
        port = url.port
        for origin, any_port in [(default, False)] * bool(default) + [(a, True) for a in allowed]:
            entry = urlsplit(origin)
            if (url.scheme, url.hostname) == (entry.scheme, entry.hostname) and (
                    port == entry.port or (any_port and entry.port is None)):
                return requested
    raise PrometheusNotAllowed(
        f"spec.rollout.analysis.prometheus.url {requested!r} is not the operator's Prometheus nor on an allowed "
        "origin (chart values prometheus.url, prometheus.allowedUrls): not queried")


async def analyze(prometheus_url: str, criteria: Criteria, *, namespace: str, service: str, model: str,
                  canary: str, stable: str, allowed: Iterable[str] = ()) -> Verdict:
    """Run one check of `canary` against `stable` (revision names) over the last interval, on the
    operator's Prometheus (`prometheus_url`) or the service's own if `allowed` (prometheus_for)."""
    try:
        prometheus_url = prometheus_for(criteria.prometheus_url, prometheus_url, allowed)
    except PrometheusNotAllowed as exc:
        return Verdict(INCONCLUSIVE, str(exc))
    if not prometheus_url:
        return Verdict(INCONCLUSIVE, "no Prometheus to analyze with: set spec.rollout.analysis.prometheus.url "
                       "or the operator's --prometheus-url (chart value prometheus.url)")
    revisions = [canary, stable]
    results = {}
    try:
        async with PrometheusClient(prometheus_url) as prometheus:
            for key, promql in queries(namespace, service, model, revisions, criteria.interval).items():
                results[key] = {labels.get(REVISION_LABEL, ""): value
                                for labels, value in await prometheus.query(promql)}
    except PrometheusError as exc:
        return Verdict(INCONCLUSIVE, f"Prometheus: {exc}")
    found = measurements(results, revisions)
    return judge(criteria, found.get(canary), found.get(stable), criteria.interval)
