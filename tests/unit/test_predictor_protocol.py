"""The predictor's OpenAI protocol: request validation, error shapes, chat messages, bodies."""

import base64
import json

import numpy as np
import pytest

from llmserve.predictors.protocol import (
    SSE_DONE, APIError, ChatCompletionRequest, ChatFormat, Choice, Chunk, CompletionFormat, CompletionRequest,
    EmbeddingRequest, Generation, Usage, chat_messages, check_not_empty, embedding_response, engine_parameters,
    parse_request, requested_max_tokens, sse_event,
)


def completion(**fields):
    return parse_request(CompletionRequest, json.dumps({"model": "m", "prompt": "hi", **fields}).encode())


def chat(messages, **fields):
    return parse_request(ChatCompletionRequest, json.dumps({"model": "m", "messages": messages, **fields}).encode())


def refused(call) -> APIError:
    with pytest.raises(APIError) as error:
        call()
    assert error.value.status == 400
    return error.value


def test_single_strings_become_lists():
    request = completion(stop="\n", seed=7, temperature=0, stream=True, stream_options={"include_usage": True})
    assert request.prompt == ["hi"] and request.stop == ["\n"]
    assert request.include_usage and request.seed == 7
    assert parse_request(EmbeddingRequest, b'{"model": "m", "input": "x"}').input == ["x"]


@pytest.mark.parametrize(("body", "code", "param", "message"), [
    (b"{not json", "invalid_json", None, "We could not parse the JSON body"),
    (b"[1, 2]", "invalid_json", None, "must be a JSON object"),
    (b'{"prompt": "hi"}', "missing_required_parameter", "model", "Missing required parameter: 'model'"),
    (b'{"model": "m", "prompt": "hi", "logit_bias": {}}', "unsupported_parameter", "logit_bias",
     "Unrecognized request argument supplied: logit_bias"),
    (b'{"model": "m", "prompt": "hi", "logprobs": 6}', "invalid_value", "logprobs", "less than or equal to 5"),
    (b'{"model": "m", "prompt": "hi", "logprobs": true}', "invalid_value", "logprobs", "valid integer"),
    (b'{"model": "m", "prompt": "hi", "presence_penalty": 3}', "invalid_value", "presence_penalty", "2"),
    (b'{"model": "m", "prompt": "hi", "top_k": -2}', "invalid_value", "top_k", "-1"),
    (b'{"model": "m", "prompt": "hi", "response_format": {"type": "xml"}}', "invalid_value",
     "response_format.type", "'text', 'json_object' or 'json_schema'"),
    (b'{"model": "m", "prompt": "hi", "response_format": {"type": "json_schema"}}', "invalid_value",
     "response_format", "'json_schema' is required"),
    (b'{"model": "m", "prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}',
     "missing_required_parameter", "response_format.json_schema.name", "'response_format.json_schema.name'"),
    (b'{"model": "m", "prompt": "hi", "max_tokens": "16"}', "invalid_value", "max_tokens", "valid integer"),
    (b'{"model": "m", "prompt": "hi", "max_tokens": 0}', "invalid_value", "max_tokens", "greater than or equal to 1"),
    (b'{"model": "m", "prompt": "hi", "temperature": "hot"}', "invalid_value", "temperature", "valid number"),
    (b'{"model": "m", "prompt": "hi", "top_p": 0}', "invalid_value", "top_p", "greater than 0"),
    (b'{"model": "m", "prompt": "hi", "n": 0}', "invalid_value", "n", "greater than or equal to 1"),
    (b'{"model": "m", "prompt": "hi", "stream": "yes"}', "invalid_value", "stream", "valid boolean"),
    (b'{"model": "m", "prompt": 42}', "invalid_value", "prompt", "expected a string or an array of strings"),
    (b'{"model": "m", "prompt": [42]}', "invalid_value", "prompt[0]", "valid string"),
    (b'{"model": "m", "prompt": ["a", "b"]}', "invalid_value", "prompt", "at most 1 item"),
    (b'{"model": "m", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', "invalid_value", "stop", "at most 4"),
])
def test_bad_completion_requests_are_400_in_openai_shape(body, code, param, message):
    error = refused(lambda: parse_request(CompletionRequest, body))
    assert error.openai_body() == {"error": {"message": error.message, "type": "invalid_request_error",
                                             "param": param, "code": code}}
    assert message in error.message


def test_chat_content_parts_join_and_developer_is_system():
    request = chat([{"role": "developer", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "you"}]},
                    {"role": "assistant", "content": None}])
    assert chat_messages(request) == [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hello you"},
                                      {"role": "assistant", "content": ""}]


@pytest.mark.parametrize(("messages", "param", "message"), [
    ([], "messages", "at least 1 item"),
    ([{"role": "tool", "content": "x"}], "messages[0].role", "'system', 'developer', 'user' or 'assistant'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content",
     "only text content parts are supported, not 'image_url'"),
    ([{"role": "user", "content": "hi", "tool_calls": []}], "messages[0].tool_calls", "Unrecognized"),
])
def test_bad_chat_messages_name_the_offending_field(messages, param, message):
    error = refused(lambda: chat(messages))
    assert error.param == param
    assert message in error.message


def test_empty_prompts_and_inputs_are_refused():
    error = refused(lambda: check_not_empty([""], "prompt"))
    assert (error.param, error.message) == ("prompt", "'prompt' must not be empty")
    assert refused(lambda: check_not_empty(["a", ""], "input")).param == "input[1]"
    check_not_empty([" "], "prompt")  # whitespace is text for a tokenizer
    assert refused(lambda: chat_messages(chat([{"role": "user", "content": ""}]))).param == "messages"


def test_token_budget():
    assert requested_max_tokens(completion(), default=16, limit=100) == 16
    assert requested_max_tokens(completion(), default=16, limit=8) == 8
    assert requested_max_tokens(completion(max_tokens=100), default=16, limit=100) == 100
    too_many = refused(lambda: requested_max_tokens(completion(max_tokens=101), default=16, limit=100))
    assert (too_many.code, too_many.param) == ("context_length_exceeded", "max_tokens")
    assert "at most 100" in too_many.message
    messages = [{"role": "user", "content": "hi"}]
    assert requested_max_tokens(chat(messages, max_completion_tokens=5), default=100, limit=100) == 5
    both = refused(lambda: requested_max_tokens(chat(messages, max_tokens=5, max_completion_tokens=5), 100, 100))
    assert both.param == "max_completion_tokens"


def test_error_types_by_status():
    assert APIError(429, "busy").openai_body()["error"]["type"] == "rate_limit_error"
    assert APIError(503, "down").openai_body()["error"]["type"] == "server_error"
    assert APIError(404, "no").openai_body()["error"]["type"] == "invalid_request_error"
    assert APIError(503, "down").v2_body() == {"error": "down"}


def test_plain_requests_carry_no_engine_parameters():
    assert engine_parameters(completion()) == {}
    # Values every engine's defaults equal are not extras: the ONNX model serves them.
    neutral = completion(n=1, top_k=-1, presence_penalty=0, frequency_penalty=0.0, response_format={"type": "text"})
    assert engine_parameters(neutral) == {}
    assert engine_parameters(chat([{"role": "user", "content": "hi"}], logprobs=False)) == {}


def test_sampling_fields_become_the_contracts_engine_parameters():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    request = chat([{"role": "user", "content": "hi"}], n=2, top_k=40, presence_penalty=0.5, frequency_penalty=-1,
                   logprobs=True, top_logprobs=3,
                   response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema,
                                                                           "strict": True}})
    assert engine_parameters(request) == {
        "top_k": 40, "n": 2, "logprobs": 3, "presence_penalty": 0.5, "frequency_penalty": -1.0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}},
    }
    # Chat: logprobs without top_logprobs is the chosen token's only; completions: the count.
    assert engine_parameters(chat([{"role": "user", "content": "hi"}], logprobs=True)) == {"logprobs": 0}
    assert engine_parameters(completion(logprobs=2, response_format={"type": "json_object"})) == {
        "logprobs": 2, "response_format": {"type": "json_object"}}
    assert engine_parameters(completion(logprobs=0)) == {"logprobs": 0}


def test_top_logprobs_needs_logprobs():
    for fields in ({"top_logprobs": 2}, {"top_logprobs": 2, "logprobs": False}):
        error = refused(lambda: engine_parameters(chat([{"role": "user", "content": "hi"}], **fields)))
        assert (error.param, error.code) == ("top_logprobs", "invalid_value")
    assert refused(lambda: chat([{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=21)).param == \
        "top_logprobs"


def chunk(text, finish=None, index=0, completion_tokens=1, logprobs=None):
    return Chunk(text, finish, Usage(5, completion_tokens), index=index, logprobs=logprobs)


def test_a_generation_assembles_interleaved_choices():
    generation = Generation(2)
    generation.add(chunk("Hel", index=1, completion_tokens=1))
    generation.add(chunk("Hi", index=0, completion_tokens=1, logprobs=[{"token": "Hi", "logprob": -0.1}]))
    assert not generation.done
    generation.add(chunk("lo", "length", index=1, completion_tokens=2))
    generation.add(chunk("", "stop", index=0, completion_tokens=1))
    assert generation.done
    assert generation.usage == Usage(5, 3)  # prompt counted once, completions summed over choices
    assert generation.choices() == [Choice(0, "Hi", "stop", [{"token": "Hi", "logprob": -0.1}]),
                                    Choice(1, "Hello", "length", [])]


TOKENS = [{"token": " Paris", "logprob": -0.25, "top_logprobs": [{"token": " Paris", "logprob": -0.25},
                                                                 {"token": " Lyon", "logprob": -2.0}]},
          {"token": "é", "logprob": -1.5, "top_logprobs": []}]


def test_completion_bodies():
    fmt = CompletionFormat("m")
    body = fmt.response([Choice(0, "hello", "length", [])], Usage(3, 2))
    assert fmt.id.startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": "hello", "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert fmt.first_chunks(2) == []
    assert fmt.chunk(1, "he")["choices"][0] == {"index": 1, "text": "he", "logprobs": None, "finish_reason": None}
    assert fmt.finish_chunk(0, "stop")["choices"][0]["finish_reason"] == "stop"
    assert fmt.usage_chunk(Usage(1, 1))["choices"] == []


def test_completion_logprobs_in_the_legacy_shape():
    body = CompletionFormat("m", logprobs=2).response([Choice(0, " Parisé", "stop", TOKENS)], Usage(3, 2))
    assert body["choices"][0]["logprobs"] == {
        "tokens": [" Paris", "é"], "token_logprobs": [-0.25, -1.5],
        "top_logprobs": [{" Paris": -0.25, " Lyon": -2.0}, {}], "text_offset": [0, 6]}
    streamed = CompletionFormat("m", logprobs=1)
    first, second = (streamed.chunk(0, t["token"], [t])["choices"][0]["logprobs"] for t in TOKENS)
    assert (first["text_offset"], second["text_offset"]) == ([0], [6])  # offsets continue across chunks
    assert streamed.chunk(1, "x", [])["choices"][0]["logprobs"]["text_offset"] == []


def test_chat_bodies_and_stream_events():
    fmt = ChatFormat("m")
    body = fmt.response([Choice(0, "hi", "stop", [])], Usage(1, 1))
    assert fmt.id.startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert body["choices"][0]["logprobs"] is None
    events = [*fmt.first_chunks(1), fmt.chunk(0, "h"), fmt.finish_chunk(0, "stop"), fmt.usage_chunk(Usage(1, 1))]
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert [e["choices"][0]["delta"] for e in events[:3]] == [{"role": "assistant", "content": ""},
                                                               {"content": "h"}, {}]
    assert len({e["id"] for e in events}) == 1
    encoded = sse_event(events[1])
    assert encoded.startswith(b"data: {") and encoded.endswith(b"\n\n")
    assert json.loads(encoded[len(b"data: "):]) == events[1]
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_chat_with_n_choices_and_logprobs():
    fmt = ChatFormat("m", logprobs=1)
    assert [e["choices"][0]["index"] for e in fmt.first_chunks(3)] == [0, 1, 2]
    body = fmt.response([Choice(0, "a", "stop", TOKENS), Choice(1, "b", "length", [])], Usage(4, 2))
    assert [c["index"] for c in body["choices"]] == [0, 1]
    content = body["choices"][0]["logprobs"]["content"]
    assert content[0] == {"token": " Paris", "logprob": -0.25, "bytes": list(b" Paris"),
                          "top_logprobs": [{"token": " Paris", "logprob": -0.25, "bytes": list(b" Paris")},
                                           {"token": " Lyon", "logprob": -2.0, "bytes": list(b" Lyon")}]}
    assert content[1]["bytes"] == [0xC3, 0xA9]
    assert body["choices"][1]["logprobs"] == {"content": [], "refusal": None}
    delta = fmt.chunk(1, "é", TOKENS[1:])["choices"][0]
    assert delta["index"] == 1 and delta["logprobs"]["content"][0]["token"] == "é"


def test_embedding_bodies_in_float_and_base64():
    vectors = np.array([[0.5, -1.0], [0.25, 2.0]], dtype=np.float32)
    floats = embedding_response("e", vectors, Usage(7), "float")
    assert [d["index"] for d in floats["data"]] == [0, 1]
    assert floats["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    encoded = embedding_response("e", vectors, Usage(7), "base64")["data"][1]["embedding"]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(encoded), dtype="<f4"), vectors[1])
