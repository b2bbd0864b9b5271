"""The predictor's OpenAI protocol: request validation, error shapes, chat messages, bodies."""

import base64
import json

import numpy as np
import pytest

from llmserve.predictors.protocol import (
    SSE_DONE, APIError, ChatCompletionRequest, ChatFormat, CompletionFormat, CompletionRequest, EmbeddingRequest,
    Usage, chat_messages, check_not_empty, embedding_response, parse_request, requested_max_tokens, sse_event,
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
    (b'{"model": "m", "prompt": "hi", "logprobs": 2}', "unsupported_parameter", "logprobs",
     "Unrecognized request argument supplied: logprobs"),
    (b'{"model": "m", "prompt": "hi", "max_tokens": "16"}', "invalid_value", "max_tokens", "valid integer"),
    (b'{"model": "m", "prompt": "hi", "max_tokens": 0}', "invalid_value", "max_tokens", "greater than or equal to 1"),
    (b'{"model": "m", "prompt": "hi", "temperature": "hot"}', "invalid_value", "temperature", "valid number"),
    (b'{"model": "m", "prompt": "hi", "top_p": 0}', "invalid_value", "top_p", "greater than 0"),
    (b'{"model": "m", "prompt": "hi", "n": 2}', "invalid_value", "n", "1"),
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


def test_completion_bodies():
    fmt = CompletionFormat("m")
    body = fmt.response("hello", "length", Usage(3, 2))
    assert fmt.id.startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": "hello", "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert fmt.first_chunk() is None
    assert fmt.chunk("he")["choices"][0]["text"] == "he"
    assert fmt.finish_chunk("stop")["choices"][0]["finish_reason"] == "stop"
    assert fmt.usage_chunk(Usage(1, 1))["choices"] == []


def test_chat_bodies_and_stream_events():
    fmt = ChatFormat("m")
    body = fmt.response("hi", "stop", Usage(1, 1))
    assert fmt.id.startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    events = [fmt.first_chunk(), fmt.chunk("h"), fmt.finish_chunk("stop"), fmt.usage_chunk(Usage(1, 1))]
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert [e["choices"][0]["delta"] for e in events[:3]] == [{"role": "assistant", "content": ""},
                                                               {"content": "h"}, {}]
    assert len({e["id"] for e in events}) == 1
    encoded = sse_event(events[1])
    assert encoded.startswith(b"data: {") and encoded.endswith(b"\n\n")
    assert json.loads(encoded[len(b"data: "):]) == events[1]
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_embedding_bodies_in_float_and_base64():
    vectors = np.array([[0.5, -1.0], [0.25, 2.0]], dtype=np.float32)
    floats = embedding_response("e", vectors, Usage(7), "float")
    assert [d["index"] for d in floats["data"]] == [0, 1]
    assert floats["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    encoded = embedding_response("e", vectors, Usage(7), "base64")["data"][1]["embedding"]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(encoded), dtype="<f4"), vectors[1])
