"""How the predictor reads a generate model's responses and errors, and refuses sampling fields
a model's engine lacks before calling Triton."""

import numpy as np
import orjson
import pytest

from llmserve.predictors.protocol import APIError, Generation, Usage
from llmserve.predictors.triton import ModelInterface, generate_chunk, grpcclient, in_band_error

from tritonclient.grpc import service_pb2  # noqa: E402  (after llmserve.predictors.triton's import)
from tritonclient.utils import serialize_byte_tensor


def interface(*inputs: str) -> ModelInterface:
    return ModelInterface.from_config({
        "name": "chat", "max_batch_size": 0, "model_transaction_policy": {"decoupled": True},
        "input": [{"name": n, "data_type": "TYPE_STRING", "dims": ["1"], "optional": True}
                  for n in ("text_input", *inputs)],
        "output": [{"name": "text_output", "data_type": "TYPE_STRING", "dims": ["1"]}],
    })


def test_engine_parameters_the_model_lacks_are_refused_by_name():
    onnx = interface("messages")
    onnx.check_engine_parameters({})  # a plain request
    with pytest.raises(APIError) as refused:
        onnx.check_engine_parameters({"n": 2, "logprobs": 0})
    assert (refused.value.status, refused.value.code, refused.value.param) == (400, "unsupported_parameter", "n")
    assert refused.value.message.startswith("unsupported parameter: n, logprobs")
    interface("sampling_parameters").check_engine_parameters({"n": 2, "logprobs": 0})


@pytest.mark.parametrize(("message", "param"), [
    ("unsupported parameter: logprobs above 20 (max_logprobs)", "logprobs"),
    ("Failed to process the request: unsupported parameter: 'response_format' json_schema: bad schema",
     "response_format"),
])
def test_the_engines_unsupported_parameter_errors_are_openai_400s(message, param):
    error = in_band_error(message)
    assert (error.status, error.code, error.param, error.message) == (400, "unsupported_parameter", param, message)


def test_other_in_band_errors_are_plain_400s_and_engine_failures_500s():
    error = in_band_error("invalid argument: the prompt has 5000 tokens; the context window is 512")
    assert (error.status, error.code, error.param) == (400, None, None)
    failed = in_band_error("generation failed: EngineDeadError")
    assert (failed.status, failed.code, failed.openai_body()["error"]["type"]) == (500, "generation_failed",
                                                                                   "server_error")


def response(**outputs) -> grpcclient.InferResult:
    message = service_pb2.ModelInferResponse(model_name="chat")
    for name, (datatype, value) in outputs.items():
        message.outputs.add(name=name, datatype=datatype, shape=[1])
        array = np.array([value], dtype=np.object_ if datatype == "BYTES" else np.int32)
        message.raw_output_contents.append(serialize_byte_tensor(array).item() if datatype == "BYTES"
                                           else array.tobytes())
    return grpcclient.InferResult(message)


BASE = {"text_output": ("BYTES", "Hi"), "finish_reason": ("BYTES", ""), "prompt_tokens": ("INT32", 7),
        "completion_tokens": ("INT32", 3)}


def test_an_onnx_response_is_choice_zero_without_logprobs():
    chunk = generate_chunk(response(**BASE))
    assert (chunk.text, chunk.finish_reason, chunk.usage, chunk.index, chunk.logprobs) == ("Hi", None, Usage(7, 3),
                                                                                           0, None)


def test_a_vllm_response_carries_its_choice_index_and_logprobs():
    tokens = [{"token": "Hi", "logprob": -0.5, "top_logprobs": []}]
    chunk = generate_chunk(response(**{**BASE, "finish_reason": ("BYTES", "stop")}, index=("INT32", 1),
                                    logprobs=("BYTES", orjson.dumps(tokens))))
    assert (chunk.finish_reason, chunk.index, chunk.logprobs) == ("stop", 1, tokens)
    assert generate_chunk(response(**BASE, logprobs=("BYTES", b""))).logprobs is None  # not requested


def test_a_vllm_mid_stream_chunk_carries_only_what_changed():
    """The vLLM model's chunks before a choice's last carry its text and token count only."""
    chunk = generate_chunk(response(text_output=("BYTES", "Hi"), completion_tokens=("INT32", 3)))
    assert (chunk.text, chunk.finish_reason, chunk.usage, chunk.index) == ("Hi", None, Usage(None, 3), 0)
    generation = Generation(1)
    generation.add(generate_chunk(response(**{**BASE, "finish_reason": ("BYTES", "length")})))
    generation.add(chunk)
    assert generation.usage == Usage(7, 3)  # the prompt's count from the response that had it
