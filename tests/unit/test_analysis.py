"""Canary analysis without Prometheus: the queries, reading their results, and the verdicts.
The HTTP client and the queries themselves run against a real Prometheus scraping real Triton
servers in tests/integration/test_canary_analysis.py."""

import asyncio
import math

import pytest

from llmserve.operator.analysis import (
    FAIL, INCONCLUSIVE, PASS, Criteria, Measurement, PrometheusNotAllowed, analyze, judge, measurements,
    prometheus_for, queries,
)

CRITERIA = Criteria(interval=30, max_error_rate=0.01, max_p99_ms=500, min_requests=10)
STABLE = Measurement(requests=200, failures=0, p99_ms=40)


def test_queries_select_one_service_model_and_both_revisions_by_relabeled_pod_labels():
    q = queries("team-a", "chat", "tiny", ["v2-aaaaaa", "v1-bbbbbb"], 30)
    sel = 'namespace="team-a",llmserve_io_service="chat",model="tiny",llmserve_io_revision=~"v2-aaaaaa|v1-bbbbbb"'
    by = "sum by (llmserve_io_revision)"
    # The engine's metrics first; Triton's statistics for a revision whose model publishes none.
    assert q["failures"] == (f"{by} (increase(llmserve:request_failure_total{{{sel}}}[30s]))"
                             f" or {by} (increase(nv_inference_request_failure{{{sel}}}[30s]))")
    assert q["successes"] == (f"{by} (increase(vllm:request_success_total{{{sel}}}[30s]))"
                              f" or {by} (increase(nv_inference_request_success{{{sel}}}[30s]))")
    assert q["p99_us"] == ("1e6 * histogram_quantile(0.99, sum by (le, llmserve_io_revision) "
                           f"(rate(vllm:e2e_request_latency_seconds_bucket{{{sel}}}[30s])))"
                           " or max by (llmserve_io_revision) "
                           f'(max_over_time(nv_inference_request_summary_us{{{sel},quantile="0.99"}}[30s]))')
    assert q["p99_ttft_us"] == ("1e6 * histogram_quantile(0.99, sum by (le, llmserve_io_revision) "
                                f"(rate(vllm:time_to_first_token_seconds_bucket{{{sel}}}[30s])))")
    # The fewest samples of any pod's request counters, from the same source as the counts.
    assert q["samples"] == (
        f"min by (llmserve_io_revision) (count_over_time(llmserve:request_failure_total{{{sel}}}[30s])"
        f" or count_over_time(vllm:request_success_total{{{sel}}}[30s]))"
        f" or min by (llmserve_io_revision) (count_over_time(nv_inference_request_failure{{{sel}}}[30s])"
        f" or count_over_time(nv_inference_request_success{{{sel}}}[30s]))")


def test_time_to_first_token_is_measured_and_judged():
    found = measurements({"failures": {"c": 0.0}, "successes": {"c": 40.0}, "p99_us": {"c": 900_000.0},
                          "p99_ttft_us": {"c": 700_000.0}, "samples": {"c": 30.0}}, ["c"])
    assert found["c"] == Measurement(requests=40, failures=0, p99_ms=900, p99_ttft_ms=700, samples=30)
    criteria = Criteria(interval=30, max_p99_ttft_ms=500, min_requests=10)
    verdict = judge(criteria, found["c"], STABLE, 30)
    assert verdict.result == FAIL and "p99 time to first token 700ms > 500ms" in verdict.message
    assert verdict.to_status()["canary"]["p99TimeToFirstTokenMs"] == 700
    assert judge(criteria, Measurement(40, 0, 900, 300), STABLE, 30).result == PASS
    missing = judge(criteria, Measurement(40, 0, 900), STABLE, 30)
    assert missing.result == INCONCLUSIVE and "no time to first token" in missing.message
    assert Criteria.from_spec({"maxP99TimeToFirstToken": "250ms"}).max_p99_ttft_ms == 250


def test_measurements_read_results_per_revision():
    found = measurements({"failures": {"c": 3.0, "s": 0.0}, "successes": {"c": 97.0, "s": 50.0},
                          "p99_us": {"c": 812_000.0, "s": math.nan}, "samples": {"c": 30.0, "s": 30.0, "new": 1.0}},
                         ["c", "s", "new", "gone"])
    assert found["c"] == Measurement(requests=100, failures=3, p99_ms=812, samples=30)
    assert found["s"] == Measurement(requests=50, failures=0, p99_ms=None, samples=30)  # NaN: no observation
    # Scraped once: increase() has nothing for it, but the measurement says why, not "0 requests".
    assert found["new"] == Measurement(requests=0, failures=0, samples=1)
    assert "gone" not in found  # no series at all: not scraped, or no pod


@pytest.mark.parametrize("canary", [
    Measurement(requests=0, failures=0, samples=1),  # every pod of the canary scraped once
    Measurement(requests=100, failures=0, p99_ms=40, samples=1),  # one pod scraped once: counted without it
])
def test_a_canary_with_too_few_samples_is_inconclusive_never_judged(canary):
    verdict = judge(CRITERIA, canary, STABLE, 30)
    assert verdict.result == INCONCLUSIVE and not verdict.fatal
    assert "a canary pod's request counters were scraped 1 time(s) in the last 30s; a check needs 2" in verdict.message


def test_a_stable_with_too_few_samples_says_so_beside_the_canary():
    verdict = judge(CRITERIA, Measurement(100, 3, 40), Measurement(0, 0, samples=1), 30)
    assert verdict.result == FAIL and "stable: too few samples" in verdict.message


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


# ------------------------------------------------------------- which Prometheus a service may use

OPERATOR_PROMETHEUS = "http://prometheus.monitoring.svc:9090"


@pytest.mark.parametrize("requested,allowed,expected", [
    ("", (), OPERATOR_PROMETHEUS),
    ("http://prometheus.monitoring.svc:9090/prom", (), "http://prometheus.monitoring.svc:9090/prom"),
    ("http://127.0.0.1:41234", ("http://127.0.0.1",), "http://127.0.0.1:41234"),
    ("https://thanos.team-a.svc:10902", ("https://thanos.team-a.svc:10902",), "https://thanos.team-a.svc:10902"),
])
def test_a_service_may_name_the_operators_prometheus_or_an_allowed_origin(requested, allowed, expected):
    assert prometheus_for(requested, OPERATOR_PROMETHEUS, allowed) == expected


@pytest.mark.parametrize("requested,allowed", [
    ("http://169.254.169.254/latest/meta-data", ()),  # cloud metadata: the classic SSRF target
    ("http://prometheus.monitoring.svc:9091", ()),  # another port of the operator's host
    ("https://prometheus.monitoring.svc:9090", ()),  # another scheme
    ("http://user:secret@prometheus.monitoring.svc:9090", ()),
    ("http://127.0.0.1.evil.example:80", ("http://127.0.0.1",)),
    ("http://thanos.team-a.svc:9090", ("https://thanos.team-a.svc:10902",)),
    ("file:///etc/passwd", ("http://127.0.0.1",)),
])
def test_any_other_url_is_refused(requested, allowed):
    with pytest.raises(PrometheusNotAllowed, match="spec.rollout.analysis.prometheus.url"):
        prometheus_for(requested, OPERATOR_PROMETHEUS, allowed)


def test_a_refused_url_is_never_fetched_and_the_check_is_inconclusive():
    criteria = Criteria(prometheus_url="http://169.254.169.254/latest/meta-data")
    verdict = asyncio.run(analyze(OPERATOR_PROMETHEUS, criteria, namespace="ns", service="chat", model="m",
                                  canary="v2-b", stable="v1-a"))
    assert verdict.result == INCONCLUSIVE and "not queried" in verdict.message
