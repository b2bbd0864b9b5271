"""Canary analysis against a real Prometheus scraping real tritonservers (no cluster): the queries
select each revision's pods by the relabeled labels, the verdict carries both revisions' numbers,
and a Prometheus that cannot answer is inconclusive, never a pass."""

import asyncio
import urllib.error
import urllib.request

import pytest

from llmserve.operator.analysis import FAIL, INCONCLUSIVE, PASS, Criteria, analyze
from llmserve.testbed.procs import free_ports
from llmserve.testbed.rollout import INFER_BODY, MODEL, scrape_target

pytestmark = [pytest.mark.triton, pytest.mark.prometheus]
CRITERIA = Criteria(interval=30, max_error_rate=0.05, max_p99_ms=2000, min_requests=5)


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
    prom.wait_for('count(nv_inference_request_success{namespace="team-a"})', lambda r: r and r[0].value == 2)
    send(stable, 20)
    send(canary, 30)  # every third request fails
    prom.wait_for('sum(nv_inference_request_failure{llmserve_io_revision="v3-cccccc"})',
                  lambda r: r and r[0].value == 10)
    verdict = check(prom.url)
    assert verdict.result == FAIL and not verdict.fatal
    assert verdict.canary.failures > 0 and 0.2 < verdict.canary.error_rate < 0.5
    assert verdict.stable.failures == 0 and verdict.stable.requests > 0 and verdict.stable.p99_ms is not None
    assert "> 5.00%" in verdict.message and "stable: " in verdict.message

    healthy = check(prom.url, canary="v1-aaaaaa", stable="v3-cccccc")  # the roles swapped: v1 passes
    assert healthy.result == PASS


def test_no_data_and_an_unreachable_prometheus_are_inconclusive(triton_server, prometheus, probe_repository):
    server = triton_server(probe_repository, {MODEL: 1})
    prom = prometheus([scrape_target(server, "team-a", "chat", 1, "v1-aaaaaa")])
    assert check(prom.url, canary="v9-999999", stable="v1-aaaaaa").result == INCONCLUSIVE
    (closed,) = free_ports(1)
    down = check(f"http://127.0.0.1:{closed}")
    assert down.result == INCONCLUSIVE and "unreachable" in down.message
