"""The predictor under failure: client disconnects, overload, and Triton going away.

These use the ``echo`` test model (the generate model's tensor interface, one word per token,
``delay_ms`` between tokens) in the real tritonserver, so a generation stays open exactly as long
as a test needs and the model's log shows when Triton cancelled a request. Nothing here asserts a
duration: waits poll a condition until a generous deadline, and every client call has a timeout so
a hang fails instead of passing.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from urllib.error import HTTPError

import openai
import pytest

from fixtures.predictor import scraped
from llmserve.artifacts.testmodels import BuiltModel
from llmserve.testbed.procs import free_ports

pytestmark = pytest.mark.triton

# Slow enough that a generation outlives any test step (60 tokens take a minute), fast enough to
# see cancellation reach the model within a token.
SLOW_MS = 1000


def client(predictor) -> openai.OpenAI:
    # No retries: the official client retries 429 and 5xx by default, which would hide them.
    return openai.OpenAI(base_url=predictor.openai_base_url, api_key="unused", max_retries=0, timeout=30)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def metric(predictor, name: str, **labels: str) -> float:
    """A sample of the predictor's /metrics (0 when absent)."""
    return scraped(f"{predictor.url}/metrics", name, **labels)


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except HTTPError as err:
        return err.code


def log_count(triton, text: str) -> int:
    return triton.log_path.read_text(errors="replace").count(text)


def test_closing_a_stream_cancels_the_generation_in_triton(triton_server, predictor, echo_repository):
    triton = triton_server(echo_repository(delay_ms=SLOW_MS), {"echo": 1})
    server = predictor(triton.grpc_url, "echo")

    stream = client(server).chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "one two three"}], max_tokens=60, stream=True)
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.role == "assistant"
    assert next(chunks).choices[0].delta.content == "one"
    stream.close()

    wait_until(lambda: log_count(triton, "cancelled") == 1, "the echo model to log the cancellation")
    wait_until(lambda: metric(server, "llmserve_predictor_requests_total", endpoint="chat.completions",
                              code="499") == 1, "the predictor to count a 499")
    assert metric(server, "llmserve_predictor_inflight_requests", model="echo") == 0


def test_disconnecting_before_the_answer_cancels_the_generation(triton_server, predictor, echo_repository):
    triton = triton_server(echo_repository(delay_ms=SLOW_MS), {"echo": 1})
    server = predictor(triton.grpc_url, "echo")
    body = b'{"model": "echo", "prompt": "one two", "max_tokens": 60}'

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: predictor\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: log_count(triton, "started") == 1, "the generation to start")
    # The connection is closed while the (non-streaming) answer is still being generated.
    wait_until(lambda: log_count(triton, "cancelled") == 1, "the echo model to log the cancellation")
    wait_until(lambda: metric(server, "llmserve_predictor_requests_total", endpoint="completions",
                              code="499") == 1, "the predictor to count a 499")


def test_requests_over_the_concurrency_limit_get_429(triton_server, predictor, echo_repository):
    triton = triton_server(echo_repository(delay_ms=SLOW_MS), {"echo": 1})
    server = predictor(triton.grpc_url, "echo", max_concurrency=1)
    api = client(server)

    holder = api.completions.create(model="echo", prompt="one two", max_tokens=60, stream=True)
    assert next(iter(holder)).choices[0].text == "one"  # the only slot is taken
    with pytest.raises(openai.RateLimitError) as refused:
        api.completions.create(model="echo", prompt="three", max_tokens=1)
    assert refused.value.status_code == 429
    assert refused.value.response.headers["retry-after"] == "1"
    assert refused.value.body["code"] == "too_many_concurrent_requests"
    assert metric(server, "llmserve_predictor_rejected_requests_total", model="echo") == 1

    holder.close()
    wait_until(lambda: metric(server, "llmserve_predictor_inflight_requests", model="echo") == 0,
               "the slot to be released")
    answer = api.completions.create(model="echo", prompt="three", max_tokens=1)
    assert answer.choices[0].text == "three"


def test_no_triton_means_not_ready_and_503_at_once(predictor):
    (nothing_listens,) = free_ports(1)
    server = predictor(f"127.0.0.1:{nothing_listens}", "echo", wait_ready=False)
    api = client(server)

    assert status(f"{server.url}/v2/health/live") == 200
    assert status(f"{server.url}/v2/health/ready") == 503
    assert status(f"{server.url}/v2/models/echo/ready") == 503
    assert [m.id for m in api.models.list()] == ["echo"]
    for call in (lambda: api.completions.create(model="echo", prompt="hi"),
                 lambda: api.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}],
                                                     stream=True),
                 lambda: api.embeddings.create(model="echo", input="hi")):
        with pytest.raises(openai.InternalServerError) as unavailable:
            call()
        assert unavailable.value.status_code == 503
        assert unavailable.value.body["type"] == "server_error"
        assert "cannot serve model 'echo'" in unavailable.value.body["message"]
    for endpoint in ("completions", "chat.completions", "embeddings"):
        assert metric(server, "llmserve_predictor_requests_total", endpoint=endpoint, code="503") == 1


def test_a_wedged_triton_is_an_error_not_a_hang(predictor):
    """A listener that accepts connections and never speaks gRPC: calls end at their deadline or
    when gRPC gives up on the connection, whichever comes first, and the client gets a 5xx."""
    with socket.socket() as wedged:
        wedged.bind(("127.0.0.1", 0))
        wedged.listen(8)  # the kernel completes TCP handshakes; nothing ever answers
        server = predictor(f"127.0.0.1:{wedged.getsockname()[1]}", "echo", wait_ready=False, request_timeout=3)
        assert status(f"{server.url}/v2/health/ready") == 503
        with pytest.raises(openai.InternalServerError) as failed:
            client(server).completions.create(model="echo", prompt="hi")
        assert failed.value.status_code == 503
        assert "cannot serve model 'echo'" in failed.value.body["message"]


def test_readiness_and_requests_follow_triton_going_away(triton_server, predictor, echo_repository):
    triton = triton_server(echo_repository(delay_ms=SLOW_MS), {"echo": 1})
    server = predictor(triton.grpc_url, "echo")
    api = client(server)
    assert status(f"{server.url}/v2/health/ready") == 200

    stream = api.completions.create(model="echo", prompt="one two", max_tokens=60, stream=True)
    chunks = iter(stream)
    assert next(chunks).choices[0].text == "one"
    triton.stop()

    # The open stream ends with an error event (the official client raises it), not a hang.
    with pytest.raises(openai.APIError):
        for _ in chunks:
            pass
    assert status(f"{server.url}/v2/health/ready") == 503
    assert status(f"{server.url}/v2/health/live") == 200
    with pytest.raises(openai.InternalServerError) as unavailable:
        api.completions.create(model="echo", prompt="hi")
    assert unavailable.value.status_code == 503
    # The process itself stays up: Kubernetes restarts Triton's container, not the predictor's.
    assert server.returncode() is None


def test_triton_stops_at_once_after_streams_the_predictor_ended(triton_server, predictor,
                                                               tiny_lm_artifact: BuiltModel):
    """A pod's Triton and predictor get SIGTERM together. The predictor closes each stream as soon
    as the final response is in; if it cancelled a call Triton was itself ending, Triton 2.51
    kept the model referenced, never unloaded it on SIGTERM and exited only when its 30-s exit
    timeout expired, with an error. The race is widest on a busy machine, so two processes keep
    both CPUs busy while the streams run (it failed every time so, before the fix)."""
    built = tiny_lm_artifact
    triton = triton_server(built.repo, {built.name: built.version})
    api = client(predictor(triton.grpc_url, built.name))
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for i in range(8):
            chunks = list(api.completions.create(model=built.name, prompt=f"stream {i}", max_tokens=4, stream=True))
            assert chunks[-1].choices[0].finish_reason is not None
    finally:
        for process in busy:
            process.kill()
            process.wait()
    status = triton.terminate(timeout=60)
    log = triton.log_tail(40)
    assert status == 0, f"tritonserver exited with {status} after SIGTERM:\n{log}"
    assert f"successfully unloaded '{built.name}'" in log
