"""Canary analysis against a real Prometheus scraping real tritonservers (no cluster): the queries
select each revision's pods by the relabeled labels, the verdict carries both revisions' numbers,
and a Prometheus that cannot answer, or a canary scraped too seldom to measure, is inconclusive,
never a pass.

A check reads `increase()` over its window, which needs two samples of every series in it. So a
test asks only once Prometheus holds, for every track, a sample from before its first request
and one from after its last: then the measurement covers every request the test sent.
"""

import asyncio
import urllib.error
import urllib.request

import pytest

from llmserve.operator.analysis import FAIL, INCONCLUSIVE, PASS, Criteria, Measurement, analyze
from llmserve.testbed.procs import free_ports
from llmserve.testbed.rollout import INFER_BODY, MODEL, scrape_target

pytestmark = [pytest.mark.triton, pytest.mark.prometheus]
# The window is longer than a test runs, however busy the machine: it holds every sample since
# Prometheus started, so the zero sample before the first request never slides out of it.
CRITERIA = Criteria(interval=300, max_error_rate=0.05, max_p99_ms=2000, min_requests=5)
REQUESTS = 'sum by (llmserve_io_revision) ({__name__=~"nv_inference_request_(success|failure)",namespace="team-a"})'


def send(server, count):
    for _ in range(count):
        request = urllib.request.Request(f"{server.http_url}/v2/models/{MODEL}/infer", data=INFER_BODY,
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=30).read()
        except urllib.error.HTTPError:
            pass  # the flaky version's failures, counted by Triton


def check(url, canary="v3-cccccc", stable="v1-aaaaaa"):
    return asyncio.run(analyze(url, CRITERIA, namespace="team-a", service="chat", model=MODEL,
                               canary=canary, stable=stable))


def test_a_flaky_canary_fails_next_to_a_healthy_stable(triton_server, prometheus, probe_repository):
    stable, canary = triton_server(probe_repository, {MODEL: 1}), triton_server(probe_repository, {MODEL: 3})
    prom = prometheus([scrape_target(stable, "team-a", "chat", 1, "v1-aaaaaa"),
                       scrape_target(canary, "team-a", "chat", 3, "v3-cccccc"),
                       scrape_target(stable, "team-b", "chat", 1, "v1-aaaaaa")])  # another namespace: ignored
    # Both tracks scraped before any request (their counters at zero), then after the last one.
    prom.wait_for('count(nv_inference_request_success{namespace="team-a"})', lambda r: r and r[0].value == 2)
    send(stable, 20)
    send(canary, 30)  # every third request fails
    prom.wait_for(REQUESTS, lambda r: {s.labels["llmserve_io_revision"]: s.value for s in r}
                  == {"v1-aaaaaa": 20, "v3-cccccc": 30})
    verdict = check(prom.url)
    assert verdict.result == FAIL and not verdict.fatal
    assert verdict.canary.failures > 0 and 0.2 < verdict.canary.error_rate < 0.5
    assert verdict.stable.failures == 0 and verdict.stable.requests > 0 and verdict.stable.p99_ms is not None
    assert "> 5.00%" in verdict.message and "stable: " in verdict.message

    healthy = check(prom.url, canary="v1-aaaaaa", stable="v3-cccccc")  # the roles swapped: v1 passes
    assert healthy.result == PASS


def test_a_canary_scraped_once_is_inconclusive_not_judged(triton_server, prometheus, probe_repository):
    """A pod scraped once in the window has no `increase()`: the check says so instead of judging
    the canary without it (or calling it "no requests"). With scrapes 30 s apart, the check right
    after the first scrape sees that one sample; the requests before it all failed."""
    canary = triton_server(probe_repository, {MODEL: 5})
    send(canary, 10)
    prom = prometheus([scrape_target(canary, "team-a", "chat", 5, "v5-eeeeee")], scrape_interval="30s")
    prom.wait_for('count_over_time(nv_inference_request_success{namespace="team-a"}[5m])',
                  lambda r: r and r[0].value == 1, timeout=75)  # the first scrape comes at an offset up to 30 s
    verdict = check(prom.url, canary="v5-eeeeee")
    assert verdict.result == INCONCLUSIVE, verdict.message
    assert verdict.canary == Measurement(requests=0, failures=0, samples=1)
    assert "scraped 1 time(s) in the last 300s; a check needs 2 samples of every pod" in verdict.message


def test_no_data_and_an_unreachable_prometheus_are_inconclusive(triton_server, prometheus, probe_repository):
    server = triton_server(probe_repository, {MODEL: 1})
    prom = prometheus([scrape_target(server, "team-a", "chat", 1, "v1-aaaaaa")])
    assert check(prom.url, canary="v9-999999", stable="v1-aaaaaa").result == INCONCLUSIVE
    (closed,) = free_ports(1)
    down = check(f"http://127.0.0.1:{closed}")
    assert down.result == INCONCLUSIVE and "unreachable" in down.message
