"""The OpenAI API on the real engine: the official `openai` client -> predictor -> tritonserver ->
vLLM's CPU build running `model_repo/vllm` on the tiny LM that `llmserve build --engine vllm`
publishes.

Every sampling parameter the predictor exposes reaches vLLM (structured output that parses and
fits its schema, logprobs in OpenAI's shapes, n choices), streams add up to the non-streamed
answer, what the engine cannot do is an OpenAI-shaped 400, and a client that leaves frees its
sequence inside vLLM (the engine's own running-requests gauge on Triton's metrics port).
Generation is greedy unless a test sets a temperature, so answers are deterministic.
"""

from __future__ import annotations

import json

import openai
import pytest

from fixtures.predictor import scraped
from llmserve.artifacts import client as triton_client
from llmserve.testbed.waiting import poll

pytestmark = [pytest.mark.triton, pytest.mark.slow]

PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Name a city and its country."}]
# Bounded values: the tiny LM's weights are random, so only the schema keeps its answer short.
PLACE = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                   "population": {"type": "integer", "minimum": 0, "maximum": 99999}},
    "required": ["city", "population"],
    "additionalProperties": False,
}


def api(service) -> openai.OpenAI:
    # No retries: the official client retries 429 and 5xx by default, which would hide them.
    return openai.OpenAI(base_url=service.predictor.openai_base_url, api_key="unused", max_retries=0, timeout=120)


def engine_metric(service, name: str) -> float:
    """The vLLM model's own metric, as Prometheus scrapes it from Triton's metrics port."""
    return scraped(service.triton.metrics_url, name, model=service.model)


def predictor_metric(service, name: str, **labels: str) -> float:
    return scraped(f"{service.predictor.url}/metrics", name, **labels)


def wait_for(what: str, condition, timeout: float = 30.0):
    return poll(what, condition, timeout, interval=0.1)


def test_completion_is_what_the_engine_generates(vllm_service):
    (direct,) = triton_client.generate(vllm_service.triton.grpc_url, vllm_service.model,
                                       [{"prompt": PROMPT, "max_tokens": 12}])
    assert direct.error is None, direct.error
    answer = api(vllm_service).completions.create(model=vllm_service.model, prompt=PROMPT, max_tokens=12)
    (choice,) = answer.choices
    assert choice.text == direct.text and choice.text
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    assert answer.usage.prompt_tokens == direct.prompt_tokens > 0
    assert answer.usage.completion_tokens == direct.completion_tokens <= 12


def test_chat_and_its_stream_agree(vllm_service):
    client, model = api(vllm_service), vllm_service.model
    whole = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1, "streamed in more than one piece"
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_json_schema_output_parses_and_fits_the_schema(vllm_service, endpoint):
    client, model = api(vllm_service), vllm_service.model
    response_format = {"type": "json_schema", "json_schema": {"name": "place", "schema": PLACE, "strict": True}}
    if endpoint == "chat":
        answer = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=200,
                                                response_format=response_format)
        text = answer.choices[0].message.content
    else:  # an extension of the completions API, as in vLLM's own server
        answer = client.completions.create(model=model, prompt=PROMPT, max_tokens=200,
                                           extra_body={"response_format": response_format})
        text = answer.choices[0].text
    assert answer.choices[0].finish_reason == "stop", f"cut off: {text!r}"
    place = json.loads(text)
    assert set(place) == {"city", "population"}
    assert place["city"] in ("Paris", "Rome", "Oslo") and type(place["population"]) is int
    assert 0 <= place["population"] <= 99999


def test_json_object_output_parses(vllm_service):
    answer = api(vllm_service).chat.completions.create(
        model=vllm_service.model, messages=MESSAGES, max_tokens=200, response_format={"type": "json_object"})
    assert answer.choices[0].finish_reason == "stop", answer.choices[0].message.content
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_chat_logprobs_in_openais_shape(vllm_service):
    answer = api(vllm_service).chat.completions.create(model=vllm_service.model, messages=MESSAGES, max_tokens=8,
                                                       logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    for token in content:
        assert token.logprob <= 0 and token.bytes == list(token.token.encode())
        assert len(token.top_logprobs) == 3
        ranked = [t.logprob for t in token.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert token.token == token.top_logprobs[0].token and token.logprob == pytest.approx(ranked[0])

    streamed = list(api(vllm_service).chat.completions.create(
        model=vllm_service.model, messages=MESSAGES, max_tokens=8, logprobs=True, stream=True))
    tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == [t.token for t in content]


def test_completion_logprobs_in_the_legacy_shape(vllm_service):
    answer = api(vllm_service).completions.create(model=vllm_service.model, prompt=PROMPT, max_tokens=8, logprobs=2)
    logprobs = answer.choices[0].logprobs
    count = answer.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == count > 0
    assert all(len(top) <= 2 and token in top for token, top in zip(logprobs.tokens, logprobs.top_logprobs))
    offsets = [0]
    for token in logprobs.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert logprobs.text_offset == offsets


def test_n_choices_streamed_and_not(vllm_service):
    client, model = api(vllm_service), vllm_service.model
    answer = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, n=2, temperature=1.0, seed=3)
    assert [c.index for c in answer.choices] == [0, 1]
    assert all(c.text and c.finish_reason in ("stop", "length") for c in answer.choices)
    assert answer.usage.completion_tokens <= 16 and answer.usage.completion_tokens >= 2

    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, n=2, temperature=1.0,
                                                 seed=3, stream=True, stream_options={"include_usage": True}))
    texts, finished = {0: "", 1: ""}, {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert set(finished) == {0, 1} and all(texts.values())
    assert chunks[-1].usage.completion_tokens <= 16


def test_sampling_parameters_reach_the_engine(vllm_service):
    client, model = api(vllm_service), vllm_service.model
    sampled = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 11,
               "presence_penalty": 0.5, "frequency_penalty": 0.5, "extra_body": {"top_k": 20}}
    first, again = client.completions.create(**sampled), client.completions.create(**sampled)
    assert first.choices[0].text == again.choices[0].text, "seeded sampling is reproducible"
    other_seed = [client.completions.create(**{**sampled, "seed": seed}).choices[0].text for seed in (12, 13, 14)]
    assert set(other_seed) != {first.choices[0].text}, "the seed reaches the engine"

    greedy = client.completions.create(model=model, prompt=PROMPT, max_tokens=12).choices[0].text
    stop = greedy[3:5]
    stopped = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, stop=[stop]).choices[0]
    assert (stopped.text, stopped.finish_reason) == (greedy[:greedy.index(stop)], "stop")


def test_what_the_engine_cannot_do_is_an_openai_400(vllm_service):
    client, model = api(vllm_service), vllm_service.model

    def refused(call):
        with pytest.raises(openai.BadRequestError) as error:
            call()
        assert set(error.value.body) == {"message", "type", "param", "code"}
        assert error.value.body["type"] == "invalid_request_error"
        return error.value.body

    # A parameter no engine of ours has: refused by the predictor, named.
    best_of = refused(lambda: client.completions.create(model=model, prompt=PROMPT, extra_body={"best_of": 2}))
    assert (best_of["code"], best_of["param"]) == ("unsupported_parameter", "best_of")
    # More choices than the engine model serves: refused by the model, in OpenAI's shape.
    too_many = refused(lambda: client.completions.create(model=model, prompt=PROMPT, max_tokens=2, n=100))
    assert "n must be" in too_many["message"]
    # Still serving afterwards.
    assert client.completions.create(model=model, prompt=PROMPT, max_tokens=2).choices[0].text is not None


def test_a_client_that_leaves_frees_its_sequence_in_vllm(vllm_service):
    client, model = api(vllm_service), vllm_service.model
    wait_for("an idle engine", lambda: engine_metric(vllm_service, "vllm:num_requests_running") == 0)
    left_before = predictor_metric(vllm_service, "llmserve_predictor_requests_total", code="499")
    # No max_tokens: the whole context window, far longer than the test waits.
    stream = client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 3:
            break
    wait_for("the engine to report the running sequence",
             lambda: engine_metric(vllm_service, "vllm:num_requests_running") >= 1, timeout=10)
    stream.close()
    wait_for("vLLM to drop the abandoned sequence",
             lambda: engine_metric(vllm_service, "vllm:num_requests_running") == 0)
    wait_for("the predictor to count the client that left",
             lambda: predictor_metric(vllm_service, "llmserve_predictor_requests_total", code="499") == left_before + 1)
    assert client.completions.create(model=model, prompt=PROMPT, max_tokens=2).choices[0].text is not None
