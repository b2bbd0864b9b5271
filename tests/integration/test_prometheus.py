"""Debian's prometheus scrapes real Triton servers with the labels in-cluster relabeling produces."""

import numpy as np
import pytest
import tritonclient.http as httpclient

from llmserve.testbed.procs import free_ports
from llmserve.testbed.prometheus import Prometheus, PrometheusError, metric_labels

pytestmark = [pytest.mark.prometheus, pytest.mark.triton]


def _infer(server, times: int) -> None:
    client = httpclient.InferenceServerClient(url=server.http_address)
    try:
        for _ in range(times):
            inputs = [httpclient.InferInput(name, [4], "FP32") for name in ("INPUT0", "INPUT1")]
            for tensor in inputs:
                tensor.set_data_from_numpy(np.ones(4, dtype=np.float32))
            client.infer("add_sub", inputs, model_version="1")
    finally:
        client.close()


def test_scrapes_triton_request_counts_per_track(triton_server, prometheus, sample_model_repo):
    stable = triton_server(sample_model_repo, {"add_sub": 1})
    canary = triton_server(sample_model_repo, {"add_sub": 1})
    pod_labels = {"llmserve.io/service": "chat", "llmserve.io/model-version": "1"}
    prom = prometheus(
        [
            {"target": stable.metrics_target, "labels": metric_labels({**pod_labels, "llmserve.io/track": "stable"})},
            {"target": canary.metrics_target, "labels": metric_labels({**pod_labels, "llmserve.io/track": "canary"})},
        ]
    )
    _infer(stable, 3)
    _infer(canary, 1)

    expected = {"stable": 3.0, "canary": 1.0}
    per_track = prom.wait_for(
        'sum by (llmserve_io_track) (nv_inference_request_success{model="add_sub", llmserve_io_service="chat"})',
        until=lambda result: {s.labels["llmserve_io_track"]: s.value for s in result} == expected,
    )
    assert len(per_track) == 2

    (series,) = prom.query('nv_inference_request_success{llmserve_io_track="stable"}')
    assert series.value == 3.0
    assert series.labels | {
        "__name__": "nv_inference_request_success",
        "model": "add_sub",
        "version": "1",
        "instance": stable.metrics_target,
        "llmserve_io_service": "chat",
        "llmserve_io_model_version": "1",
        "llmserve_io_track": "stable",
    } == series.labels


def test_errors_explain_bad_queries_and_unscraped_targets(prometheus):
    (closed_port,) = free_ports(1)
    prom = prometheus([{"target": f"127.0.0.1:{closed_port}", "labels": {"llmserve_io_track": "stable"}}])

    with pytest.raises(PrometheusError, match="bad_data"):
        prom.query("sum(")

    with pytest.raises(PrometheusError) as timeout:
        prom.wait_for("nv_inference_request_success", timeout=3)
    message = str(timeout.value)
    assert "last result: []" in message
    assert f"127.0.0.1:{closed_port}/metrics" in message
    assert '"health": "down"' in message or '"health": "unknown"' in message


def test_a_port_taken_before_prometheus_binds_it_means_a_start_on_fresh_ports(first_pick_taken):
    """Any test-bed server, not only Triton: Prometheus exits with "bind: address already in use"
    on a taken port, and the start is made again on a fresh one."""
    (closed_port,) = free_ports(1)
    server = Prometheus([{"target": f"127.0.0.1:{closed_port}", "labels": {}}])
    picks = first_pick_taken(server)
    with server:
        assert len(picks) == 2 and server.port == picks[1][0] != picks[0][0]
        assert "address already in use" not in server.log_tail()
