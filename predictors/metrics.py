"""Prometheus metrics of the predictor, served by kserve's ``/metrics`` (the default registry).

Triton's own ``nv_inference_*`` metrics measure the model; these measure what a client sees
through the predictor: every request with its HTTP status, end-to-end latency, time to first token
of streams, tokens in and out, and requests in flight against the concurrency limit. Labels stay
low-cardinality (model, endpoint, status code); pod identity comes from Prometheus' relabeling.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

from .protocol import APIError, Usage

# Latency buckets from 1 ms to 2 min: an embedding answers in milliseconds, a long generation in
# tens of seconds.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter(
    "llmserve_predictor_requests", "Requests answered, by model, endpoint and HTTP status code",
    ["model", "endpoint", "code"],
)
LATENCY = Histogram(
    "llmserve_predictor_request_duration_seconds",
    "Time from receiving a request to its last byte (streams: the end of the stream)",
    ["model", "endpoint"], buckets=_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "llmserve_predictor_time_to_first_token_seconds",
    "Time from receiving a streaming request to the model's first text chunk",
    ["model", "endpoint"], buckets=_BUCKETS,
)
PROMPT_TOKENS = Counter("llmserve_predictor_prompt_tokens", "Prompt (input) tokens processed", ["model", "endpoint"])
COMPLETION_TOKENS = Counter("llmserve_predictor_completion_tokens", "Completion tokens generated", ["model", "endpoint"])
INFLIGHT = Gauge("llmserve_predictor_inflight_requests", "Requests holding a concurrency slot", ["model"])
REJECTED = Counter(
    "llmserve_predictor_rejected_requests", "Requests refused with 429 because every concurrency slot was taken",
    ["model"],
)


class Admission:
    """Bounded concurrency: at most ``limit`` requests of a model talk to Triton at once.

    A request over the limit is refused at once with 429 and ``Retry-After`` rather than queued:
    Triton already queues and batches what it is given, and a second, invisible queue in front of
    it would only add latency and memory while hiding overload from the load balancer and the
    autoscaler. Everything runs on one event loop, so a counter is enough (no lock).
    """

    def __init__(self, model: str, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the concurrency limit must be at least 1, not {limit}")
        self.model = model
        self.limit = limit
        self.inflight = 0
        self._gauge = INFLIGHT.labels(model)

    def acquire(self) -> Slot:
        if self.inflight >= self.limit:
            REJECTED.labels(self.model).inc()
            raise APIError(429, f"the predictor is serving its limit of {self.limit} concurrent requests; retry shortly",
                           code="too_many_concurrent_requests", headers={"Retry-After": "1"})
        self.inflight += 1
        self._gauge.inc()
        return Slot(self)

    def _release(self) -> None:
        self.inflight -= 1
        self._gauge.dec()


class Slot:
    """A held concurrency slot; ``release`` is idempotent so every exit path may call it."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission._release()
            self._admission = None

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RequestRecord:
    """Metrics of one request, recorded once when it ends (``finish``)."""

    def __init__(self, model: str, endpoint: str) -> None:
        self.model = model
        self.endpoint = endpoint
        self.start = time.perf_counter()
        self._done = False

    def first_token(self) -> None:
        TIME_TO_FIRST_TOKEN.labels(self.model, self.endpoint).observe(time.perf_counter() - self.start)

    def finish(self, code: int, usage: Usage | None = None) -> None:
        if self._done:
            return
        self._done = True
        REQUESTS.labels(self.model, self.endpoint, str(code)).inc()
        LATENCY.labels(self.model, self.endpoint).observe(time.perf_counter() - self.start)
        if usage is not None:
            PROMPT_TOKENS.labels(self.model, self.endpoint).inc(usage.prompt_tokens)
            COMPLETION_TOKENS.labels(self.model, self.endpoint).inc(usage.completion_tokens)

    def fail(self, exc: BaseException) -> None:
        """Record a request that ended with ``exc``: its status, or 500 for an unexpected error."""
        self.finish(exc.status if isinstance(exc, APIError) else 500)
