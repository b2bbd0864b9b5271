"""Canary analysis without Prometheus: the queries, reading their results, and the verdicts.
The HTTP client and the queries themselves run against a real Prometheus scraping real Triton
servers in tests/integration/test_canary_analysis.py."""

import asyncio
import math

import pytest

from llmserve.operator.analysis import (
    FAIL, INCONCLUSIVE, PASS, Criteria, Measurement, analyze, judge, measurements, queries,
)

CRITERIA = Criteria(interval=30, max_error_rate=0.01, max_p99_ms=500, min_requests=10)
STABLE = Measurement(requests=200, failures=0, p99_ms=40)


def test_queries_select_one_service_model_and_both_revisions_by_relabeled_pod_labels():
    q = queries("team-a", "chat", "tiny", ["v2-aaaaaa", "v1-bbbbbb"], 30)
    sel = 'namespace="team-a",llmserve_io_service="chat",model="tiny",llmserve_io_revision=~"v2-aaaaaa|v1-bbbbbb"'
    assert q["failures"] == f"sum by (llmserve_io_revision) (increase(nv_inference_request_failure{{{sel}}}[30s]))"
    assert q["successes"] == f"sum by (llmserve_io_revision) (increase(nv_inference_request_success{{{sel}}}[30s]))"
    assert q["p99_us"] == ("max by (llmserve_io_revision) "
                           f'(max_over_time(nv_inference_request_summary_us{{{sel},quantile="0.99"}}[30s]))')


def test_measurements_read_results_per_revision():
    found = measurements({"failures": {"c": 3.0, "s": 0.0}, "successes": {"c": 97.0, "s": 50.0},
                          "p99_us": {"c": 812_000.0, "s": math.nan}}, ["c", "s", "gone"])
    assert found["c"] == Measurement(requests=100, failures=3, p99_ms=812)
    assert found["s"] == Measurement(requests=50, failures=0, p99_ms=None)  # NaN: no observation in Triton's window
    assert "gone" not in found  # no series at all: not scraped, or no pod


@pytest.mark.parametrize("canary, result, fatal, words", [
    (None, INCONCLUSIVE, False, "canary served no requests in the last 30s; a check needs at least 10"),
    (Measurement(5, 0, 10), INCONCLUSIVE, False, "canary served 5 requests"),
    (Measurement(50, 50, None), FAIL, True, "every canary request failed in the last 30s"),
    (Measurement(100, 3, 40), FAIL, False, "error rate 3.00% > 1.00%"),
    (Measurement(100, 0, 812), FAIL, False, "p99 812ms > 500ms"),
    (Measurement(100, 2, 900), FAIL, False, "error rate 2.00% > 1.00% and p99 900ms > 500ms"),
    (Measurement(100, 0, None), INCONCLUSIVE, False, "no p99 latency exported"),
    (Measurement(100, 1, 120), PASS, False, "canary: 100 requests, error rate 1.00%, p99 120ms"),
])
def test_verdicts(canary, result, fatal, words):
    verdict = judge(CRITERIA, canary, STABLE, 30)
    assert (verdict.result, verdict.fatal) == (result, fatal)
    assert words in verdict.message and "stable: 200 requests, error rate 0.00%, p99 40ms" in verdict.message


def test_thresholds_are_optional():
    verdict = judge(Criteria(interval=30, min_requests=1), Measurement(10, 9, 5000), None, 30)
    assert verdict.result == PASS and "stable: no data" in verdict.message


def test_verdict_status_carries_the_measured_values():
    verdict = judge(CRITERIA, Measurement(100, 3, 40.04), STABLE, 30)
    assert verdict.to_status() == {
        "result": FAIL, "message": verdict.message,
        "canary": {"requests": 100, "failures": 3, "errorRate": "0.0300", "p99LatencyMs": 40.0},
        "stable": {"requests": 200, "failures": 0, "errorRate": "0.0000", "p99LatencyMs": 40.0},
    }


def test_criteria_from_spec():
    assert Criteria.from_spec(None) is None
    assert Criteria.from_spec({}) == Criteria()
    assert Criteria.from_spec({"interval": "2s", "maxErrorRate": "50m", "maxP99Latency": "1.5s", "minRequests": 3,
                               "prometheus": {"url": "http://prom:9090"}}) == Criteria(
        interval=2.0, max_error_rate=0.05, max_p99_ms=1500.0, min_requests=3, prometheus_url="http://prom:9090")


def test_no_prometheus_configured_is_inconclusive():
    verdict = asyncio.run(analyze("", CRITERIA, namespace="n", service="s", model="m", canary="c", stable="s"))
    assert verdict.result == INCONCLUSIVE and "--prometheus-url" in verdict.message
