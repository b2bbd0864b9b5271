"""The real tritonserver from the nvidia-pytriton wheel serves a python-backend model on CPU."""

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from llmserve.testbed.triton import TritonError, TritonServer

pytestmark = pytest.mark.triton

A = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
B = np.array([0.5, 0.5, 5.0, -1.0], dtype=np.float32)


def _inputs(module):
    inputs = [module.InferInput("INPUT0", [4], "FP32"), module.InferInput("INPUT1", [4], "FP32")]
    inputs[0].set_data_from_numpy(A)
    inputs[1].set_data_from_numpy(B)
    return inputs


def test_python_backend_model_answers_over_http_and_grpc(triton_server, sample_model_repo):
    server = triton_server(sample_model_repo, {"add_sub": 1})

    http = httpclient.InferenceServerClient(url=server.http_address)
    try:
        assert http.is_server_ready()
        result = http.infer("add_sub", _inputs(httpclient), model_version="1")
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A - B)
    finally:
        http.close()

    grpc = grpcclient.InferenceServerClient(url=server.grpc_url)
    try:
        assert grpc.is_model_ready("add_sub", "1")
        result = grpc.infer("add_sub", _inputs(grpcclient), model_version="1")
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A - B)
        # Explicit model control loaded exactly the pinned model, as in the pod.
        index = grpc.get_model_repository_index(as_json=True)["models"]
        assert [(m["name"], m["version"], m["state"]) for m in index] == [("add_sub", "1", "READY")]
    finally:
        grpc.close()


def test_start_failure_reports_the_model_error_from_the_log(sample_model_repo):
    with pytest.raises(TritonError) as failure:
        TritonServer(sample_model_repo, {"fails_to_load": 1}).start()
    message = str(failure.value)
    assert "exited with status" in message
    assert "fails_to_load refuses to initialize" in message


def test_a_port_taken_before_tritonserver_binds_it_means_a_start_on_fresh_ports(sample_model_repo, first_pick_taken):
    """Ports are picked free and bound seconds later; in CI a vLLM engine once took a Triton's
    metrics port in between, and that tritonserver served without metrics. Here the first metrics
    port given is taken: the start is retried on fresh ports."""
    server = TritonServer(sample_model_repo, {"add_sub": 1})
    picks = first_pick_taken(server)
    with server:
        assert len(picks) == 2 and server.metrics_port == picks[1][-1] != picks[0][-1]
        assert httpclient.InferenceServerClient(url=server.http_address).is_server_ready()


def test_stop_leaves_no_process_behind(sample_model_repo):
    server = TritonServer(sample_model_repo, {"add_sub": 1}).start()
    repository = next(a.split("=", 1)[1] for a in server.command if a.startswith("--model-repository="))
    assert _processes_mentioning(repository), "tritonserver and its stub should be running"
    server.stop()
    assert _processes_mentioning(repository) == []
    assert not Path(repository).exists()


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (tritonserver and its stubs do)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("State:"))
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
        if text in cmdline and "zombie" not in state:
            found.append(cmdline)
    return found
