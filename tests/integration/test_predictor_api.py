"""The predictor's APIs with the official clients, in front of the real tritonserver serving the
artifacts `llmserve build` produces (the tiny LM as `generate`, MiniLM int8 as `embedding`).

The reference for every answer is Triton itself, asked directly with tritonclient
(`llmserve.artifacts.client`): the predictor must change the protocol, never the result.
Generation is greedy unless a test sets a temperature, so answers are deterministic.
"""

from __future__ import annotations


import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as httpclient

from fixtures.predictor import scraped
from llmserve.artifacts import client as triton_client

pytestmark = pytest.mark.triton

PROMPT = "Once upon a time"
MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Tell me a story."}]


def api(service) -> openai.OpenAI:
    # No retries: the official client retries 429 and 5xx by default, which would hide them.
    return openai.OpenAI(base_url=service.predictor.openai_base_url, api_key="unused", max_retries=0, timeout=60)


def direct(service, **request) -> triton_client.Generation:
    (answer,) = triton_client.generate(service.triton.grpc_url, service.model, [request])
    assert answer.error is None, answer.error
    return answer


def metric(service, name: str, **labels: str) -> float:
    return scraped(f"{service.predictor.url}/metrics", name, **labels)


def test_models_are_listed_and_retrieved(generate_service):
    client = api(generate_service)
    assert [m.id for m in client.models.list()] == [generate_service.model]
    assert client.models.retrieve(generate_service.model).owned_by == "llmserve"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert missing.value.body["code"] == "model_not_found"


def test_completion_is_what_triton_generates(generate_service):
    reference = direct(generate_service, prompt=PROMPT, max_tokens=12)
    answer = api(generate_service).completions.create(model=generate_service.model, prompt=PROMPT, max_tokens=12)
    assert answer.object == "text_completion" and answer.model == generate_service.model
    (choice,) = answer.choices
    assert (choice.text, choice.finish_reason) == (reference.text, "length")
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (reference.prompt_tokens, 12)
    assert answer.usage.total_tokens == reference.prompt_tokens + 12


def test_completion_stream_adds_up_to_the_completion(generate_service):
    client = api(generate_service)
    whole = client.completions.create(model=generate_service.model, prompt=PROMPT, max_tokens=12)
    chunks = list(client.completions.create(model=generate_service.model, prompt=PROMPT, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len([t for t in texts if t]) > 1, "streamed in more than one piece"
    assert "".join(texts) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_chat_completion_uses_the_models_chat_template(generate_service):
    reference = direct(generate_service, messages=MESSAGES, max_tokens=10)
    client = api(generate_service)
    answer = client.chat.completions.create(model=generate_service.model, messages=MESSAGES, max_tokens=10)
    assert answer.object == "chat.completion"
    message = answer.choices[0].message
    assert (message.role, message.content) == ("assistant", reference.text)
    assert answer.usage.prompt_tokens == reference.prompt_tokens

    stream = client.chat.completions.create(model=generate_service.model, messages=MESSAGES, max_tokens=10,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reference.text
    assert chunks[-1].choices[0].finish_reason == reference.finish_reason


def test_stop_sequences_and_seeded_sampling(generate_service):
    client = api(generate_service)
    greedy = client.completions.create(model=generate_service.model, prompt=PROMPT, max_tokens=16).choices[0].text
    stop = greedy[4:6]
    stopped = client.completions.create(model=generate_service.model, prompt=PROMPT, max_tokens=16, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == greedy[:greedy.index(stop)]

    def sample(seed):
        return client.completions.create(model=generate_service.model, prompt=PROMPT, max_tokens=16,
                                         temperature=1.0, top_p=0.9, seed=seed).choices[0].text

    assert sample(7) == sample(7) == direct(generate_service, prompt=PROMPT, max_tokens=16, temperature=1.0,
                                            top_p=0.9, seed=7).text


def test_embeddings_are_tritons_in_float_and_base64(embedding_service):
    texts = ["A cat sits on the mat.", "Kubernetes schedules pods."]
    reference, counts = triton_client.embed(embedding_service.triton.http_address, embedding_service.model, texts)
    client = api(embedding_service)
    as_base64 = client.embeddings.create(model=embedding_service.model, input=texts)  # the client's default
    as_float = client.embeddings.create(model=embedding_service.model, input=texts, encoding_format="float")
    for answer in (as_base64, as_float):
        assert [d.index for d in answer.data] == [0, 1]
        np.testing.assert_allclose(np.array([d.embedding for d in answer.data]), reference, rtol=1e-6, atol=1e-6)
        assert answer.usage.prompt_tokens == answer.usage.total_tokens == int(counts.sum())
    # Alone, as Triton embeds it alone (int8 activations are quantized per batch, so a batch
    # mate changes the last digits).
    single = client.embeddings.create(model=embedding_service.model, input=texts[0], encoding_format="float")
    alone, _ = triton_client.embed(embedding_service.triton.http_address, embedding_service.model, texts[:1])
    np.testing.assert_allclose(single.data[0].embedding, alone[0], rtol=1e-6, atol=1e-6)


def test_bad_requests_get_openai_errors(generate_service, embedding_service):
    client, model = api(generate_service), generate_service.model

    def refused(call, status=400):
        with pytest.raises(openai.APIStatusError) as error:
            call()
        assert error.value.status_code == status
        assert set(error.value.body) == {"message", "type", "param", "code"}
        return error.value.body

    assert refused(lambda: client.completions.create(model="gpt-4", prompt="hi"), 404)["code"] == "model_not_found"
    too_many = refused(lambda: client.completions.create(model=model, prompt="hi", max_tokens=100_000))
    assert (too_many["code"], too_many["param"]) == ("context_length_exceeded", "max_tokens")
    too_long = refused(lambda: client.completions.create(model=model, prompt="word " * 1000, max_tokens=1))
    assert "context window" in too_long["message"]
    assert refused(lambda: client.completions.create(model=model, prompt=""))["param"] == "prompt"
    wrong_type = refused(lambda: client.completions.create(model=model, prompt="hi", extra_body={"max_tokens": "5"}))
    assert (wrong_type["param"], wrong_type["code"]) == ("max_tokens", "invalid_value")
    assert refused(lambda: client.chat.completions.create(model=model, messages=[]))["param"] == "messages"
    # The ONNX engine has no n, logprobs, penalties or structured output: refused before Triton.
    unsupported = refused(lambda: client.completions.create(model=model, prompt="hi", n=2, logprobs=1))
    assert (unsupported["code"], unsupported["param"]) == ("unsupported_parameter", "n")
    assert "n, logprobs" in unsupported["message"]
    no_json = refused(lambda: client.chat.completions.create(model=model, messages=MESSAGES,
                                                             response_format={"type": "json_object"}))
    assert no_json["param"] == "response_format"
    assert refused(lambda: client.embeddings.create(model=model, input="hi"))["code"] == "model_not_supported"
    encoder = api(embedding_service)
    assert refused(lambda: encoder.completions.create(model=embedding_service.model,
                                                      prompt="hi"))["code"] == "model_not_supported"
    assert refused(lambda: encoder.embeddings.create(model=embedding_service.model, input=["a", ""]))[
        "param"] == "input[1]"

    bad_json = httpx.post(f"{generate_service.predictor.openai_base_url}/completions", content=b'{"model": ',
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"


def test_v2_protocol_with_tritonclient(embedding_service, generate_service):
    predictor = httpclient.InferenceServerClient(embedding_service.predictor.url.removeprefix("http://"))
    triton = httpclient.InferenceServerClient(embedding_service.triton.http_address)
    try:
        assert predictor.is_server_live() and predictor.is_server_ready()
        assert predictor.is_model_ready(embedding_service.model)
        ours, theirs = (c.get_model_metadata(embedding_service.model) for c in (predictor, triton))
        for key in ("inputs", "outputs"):
            assert ours[key] == theirs[key]
        texts = ["one sentence", "and another one"]
        via, counts = triton_client.embed(predictor, embedding_service.model, texts)
        reference, reference_counts = triton_client.embed(triton, embedding_service.model, texts)
        np.testing.assert_allclose(via, reference, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(counts, reference_counts)
    finally:
        predictor.close()
        triton.close()

    # The decoupled generate model answers a V2 infer with its one (non-streaming) response.
    generate = httpclient.InferenceServerClient(generate_service.predictor.url.removeprefix("http://"))
    try:
        tensor = httpclient.InferInput("text_input", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[PROMPT.encode()]], dtype=object))
        result = generate.infer(generate_service.model, [tensor])  # binary outputs, tritonclient's default
        assert result.as_numpy("text_output")[0][0].decode() == direct(generate_service, prompt=PROMPT).text
        as_json = generate.infer(generate_service.model, [tensor],
                                 outputs=[httpclient.InferRequestedOutput("finish_reason", binary_data=False)])
        assert as_json.get_response()["outputs"][0]["data"] == ["length"]
    finally:
        generate.close()


def test_metrics_count_requests_tokens_and_first_tokens(generate_service):
    before = {name: metric(generate_service, name, endpoint="chat.completions") for name in (
        "llmserve_predictor_completion_tokens_total",
        "llmserve_predictor_time_to_first_token_seconds_count", "llmserve_predictor_request_duration_seconds_count")}
    client = api(generate_service)
    client.chat.completions.create(model=generate_service.model, messages=MESSAGES, max_tokens=5)
    list(client.chat.completions.create(model=generate_service.model, messages=MESSAGES, max_tokens=5, stream=True))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=generate_service.model, messages=MESSAGES, max_tokens=0)

    def delta(name):
        return metric(generate_service, name, endpoint="chat.completions") - before[name]

    assert metric(generate_service, "llmserve_predictor_requests_total", endpoint="chat.completions",
                  code="200") >= 2
    assert delta("llmserve_predictor_completion_tokens_total") == 10
    assert delta("llmserve_predictor_time_to_first_token_seconds_count") == 1
    assert delta("llmserve_predictor_request_duration_seconds_count") == 2
