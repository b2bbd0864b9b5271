"""model_repo/vllm on the real parts: the tiny LM built with `llmserve build --engine vllm`,
pulled as the pod's init container pulls it, served by vLLM's CPU build inside the real
tritonserver (in the vLLM engine environment), asked over tritonclient gRPC.

One server for the module (vLLM takes a minute or two to start here); every test reads or
compares metric deltas, so the order of the tests does not matter. That a tampered vLLM version
is refused is tested with the ONNX one in test_artifacts.py.
"""

from __future__ import annotations

import json
import queue
import urllib.request

import pytest
import tritonclient.grpc as grpcclient

from fixtures.dataplane import _register
from fixtures.models import torch_greedy
from fixtures.predictor import TESTBED_VLLM_ENGINE_ARGS, scraped
from llmserve.artifacts import client
from llmserve.artifacts.manifest import Serving, list_files, pull, verify_version
from llmserve.testbed.triton import TritonServer
from llmserve.testbed.waiting import poll

pytestmark = [pytest.mark.triton, pytest.mark.slow]

PROMPTS = ["Beautiful is", "Now is better", "Errors should", "Simple", "If the implementation is"]
CHOICE = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["answer", "score"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def _server(tiny_vllm_artifact, tmp_path_factory):
    built = tiny_vllm_artifact
    repo = tmp_path_factory.mktemp("pulled")
    pull(built.repo, built.name, built.version, repo,
         serving=Serving(engine="vllm", instance_kind="KIND_CPU", engine_args=TESTBED_VLLM_ENGINE_ARGS))
    with TritonServer(repo, {built.name: built.version}, startup_timeout=600) as triton:
        yield triton


@pytest.fixture
def server(request, _server):
    """The module's server; its log tail goes into the report of a test that fails."""
    _register(request, "triton (vLLM)", _server)
    return _server


def ask(server, model, **request):
    (answer,) = client.generate(server.grpc_url, model, [request])
    return answer


def metric(server, name, **labels):
    return scraped(server.metrics_url, name, **labels)


def test_the_version_holds_hugging_face_files_engine_settings_and_code(tiny_vllm_artifact):
    files = set(list_files(tiny_vllm_artifact.path))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "chat_template.jinja", "engine.json", "model.py",
            "config.pbtxt", "manifest.json"} <= files
    assert not any(f.endswith(".onnx") for f in files)
    manifest = verify_version(tiny_vllm_artifact.path)
    assert manifest.data["engine"] == "vllm" and manifest.data["accuracy"]["passed"]
    assert manifest.data["accuracy"]["next_token_agreement"] >= 0.98
    assert json.loads((tiny_vllm_artifact.path / "engine.json").read_text())["enable_prefix_caching"] is True


def test_greedy_output_equals_pytorch(server, tiny_vllm_artifact):
    expected = torch_greedy(tiny_vllm_artifact.source, PROMPTS, 24)
    answers = client.generate(server.grpc_url, tiny_vllm_artifact.name,
                              [{"prompt": p, "max_tokens": 24} for p in PROMPTS])
    assert [a.error for a in answers] == [None] * len(PROMPTS)
    assert [a.text for a in answers] == expected
    assert all(a.finish_reason == "length" and a.completion_tokens == 24 for a in answers)


def test_stream_chunks_add_up_to_the_whole_answer_and_stop_strings_end_it(server, tiny_vllm_artifact):
    model = tiny_vllm_artifact.name
    whole = ask(server, model, prompt="Beautiful is", max_tokens=40)
    streamed = ask(server, model, prompt="Beautiful is", max_tokens=40, stream=True)
    assert len(streamed.chunks) > 3 and streamed.text == whole.text
    assert streamed.completion_tokens == whole.completion_tokens == 40
    stop = whole.text.split()[2]
    stopped = ask(server, model, prompt="Beautiful is", max_tokens=40, stop=[stop], stream=True)
    assert stopped.finish_reason == "stop" and stopped.text == whole.text[:whole.text.index(stop)]


def test_chat_messages_go_through_the_versions_chat_template(server, tiny_vllm_artifact):
    chat = ask(server, tiny_vllm_artifact.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert chat.error is None and chat.completion_tokens == 5
    assert chat.prompt_tokens == len("<|user|>Hi\n<|assistant|>")  # byte-level tokenizer, no BOS


def test_n_choices_seeded_sampling_and_logprobs(server, tiny_vllm_artifact):
    model = tiny_vllm_artifact.name
    sampled = {"prompt": "Flat is", "max_tokens": 12, "temperature": 1.0, "seed": 3,
               "sampling_parameters": {"n": 3, "top_k": 20}}
    first, second = client.generate(server.grpc_url, model, [sampled, sampled])
    assert first.error is None and len(first.choices) == 3
    assert first.choices == second.choices  # seeded: reproducible, even side by side

    scored = ask(server, model, prompt="Flat is", max_tokens=6, sampling_parameters={"logprobs": 2})
    assert len(scored.logprobs) == scored.completion_tokens == 6
    for entry in scored.logprobs:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
        # Greedy: the chosen token is the most likely one.
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])
    assert "".join(e["token"] for e in scored.logprobs) == scored.text


def test_json_schema_structured_output_parses_and_fits(server, tiny_vllm_artifact):
    # The tiny LM, trained on prose, pads JSON with any whitespace the grammar allows until
    # max_tokens: the model's compact-JSON engine default is what lets it close the object.
    answer = ask(server, tiny_vllm_artifact.name, prompt="Is simple better than complex?", max_tokens=48,
                 sampling_parameters={"response_format": {
                     "type": "json_schema", "json_schema": {"name": "choice", "schema": CHOICE}}})
    assert answer.error is None and answer.finish_reason == "stop"
    parsed = json.loads(answer.text)
    assert parsed["answer"] in ("yes", "no") and 0 <= parsed["score"] <= 9 and set(parsed) == {"answer", "score"}


def test_what_vllm_cannot_do_and_bad_input_are_clear_errors(server, tiny_vllm_artifact):
    model = tiny_vllm_artifact.name
    failures = metric(server, "llmserve:request_failure_total")
    # Refused while parsing, in the order sent (errors on a stream carry no request id).
    unsupported, bad_value, no_prompt = client.generate(server.grpc_url, model, [
        {"prompt": "x", "sampling_parameters": {"best_of": 2}},
        {"prompt": "x", "max_tokens": 0},
        {"max_tokens": 5},
    ])
    too_long = ask(server, model, prompt="x" * 600)  # refused by vLLM: longer than max_model_len
    assert unsupported.error.endswith("unsupported parameter: best_of")
    assert "invalid argument: max_tokens must be in" in bad_value.error
    assert "invalid argument: send exactly one of text_input and messages" in no_prompt.error
    assert "invalid argument:" in too_long.error and "maximum" in too_long.error
    # Counted as Triton counts nv_inference_request_failure: a prompt over this revision's
    # max_model_len is what the canary analysis must see.
    assert metric(server, "llmserve:request_failure_total") == failures + 4


def test_a_cancelled_stream_frees_its_sequence_inside_vllm(server, tiny_vllm_artifact):
    model = tiny_vllm_artifact.name
    aborted = metric(server, "vllm:request_success_total", finished_reason="abort")
    responses: queue.Queue = queue.Queue()
    stream = grpcclient.InferenceServerClient(server.grpc_url)
    stream.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        stream.async_stream_infer(model, client.generate_inputs(prompt="Beautiful is", max_tokens=400, stream=True,
                                                                batched=False))
        result, error = responses.get(timeout=120)
        assert error is None
        poll("the sequence running in vLLM", lambda: metric(server, "vllm:num_requests_running") == 1, 30)
    finally:
        stream.stop_stream(cancel_requests=True)
        stream.close()
    poll("vLLM to free the cancelled sequence", lambda: metric(server, "vllm:num_requests_running") == 0, 30)
    poll("the abort to be counted",
         lambda: metric(server, "vllm:request_success_total", finished_reason="abort") == aborted + 1, 30)
    assert metric(server, "vllm:kv_cache_usage_perc") == 0


def test_engine_metrics_appear_on_tritons_metrics_port(server, tiny_vllm_artifact):
    model = tiny_vllm_artifact.name
    labels = {"model": model, "version": str(tiny_vllm_artifact.version)}
    before = {name: metric(server, name, **labels) for name in (
        "vllm:request_success_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
        "vllm:inter_token_latency_seconds_count")}
    answer = ask(server, model, prompt="Beautiful is", max_tokens=10)
    expected = {
        "vllm:request_success_total": 1, "vllm:prompt_tokens_total": answer.prompt_tokens,
        "vllm:generation_tokens_total": 10, "vllm:time_to_first_token_seconds_count": 1,
        "vllm:e2e_request_latency_seconds_count": 1, "vllm:inter_token_latency_seconds_count": 9,
    }
    poll("the engine's counters to move",
         lambda: {n: metric(server, n, **labels) - v for n, v in before.items()} == expected, 30)
    assert metric(server, "vllm:e2e_request_latency_seconds_bucket", le="+Inf", **labels) == \
        metric(server, "vllm:e2e_request_latency_seconds_count", **labels)
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert f"# TYPE {gauge} gauge" in text
    assert "# TYPE vllm:time_to_first_token_seconds histogram" in text
