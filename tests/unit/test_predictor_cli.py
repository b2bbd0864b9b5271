"""The `llmserve predictor` command line, its sidecar contract with the operator, and how the
predictor reads a Triton model's tensor interface."""

import numpy as np
import pytest

from llmserve.cli import build_parser
from llmserve.operator.render import Images, desired_children
from llmserve.operator.spec import Spec
from llmserve.predictors.cli import DEFAULT_MAX_CONCURRENCY, predictor_command
from llmserve.predictors.protocol import APIError
from llmserve.predictors.triton import ModelInterface

GENERATE_CONFIG = {  # get_model_config(as_json=True)["config"] of an `llmserve build` generate model
    "name": "generate", "backend": "python", "max_batch_size": 32,
    "model_transaction_policy": {"decoupled": True},
    "input": [
        {"name": "text_input", "data_type": "TYPE_STRING", "dims": ["1"], "optional": True},
        {"name": "max_tokens", "data_type": "TYPE_INT32", "dims": ["1"], "optional": True},
        {"name": "stop", "data_type": "TYPE_STRING", "dims": ["-1"], "optional": True},
    ],
    "output": [{"name": "text_output", "data_type": "TYPE_STRING", "dims": ["1"]}],
    "parameters": {"context_length": {"string_value": "256"}},
}


def test_the_operator_sidecar_command_is_what_the_predictor_parses():
    spec = Spec.from_object({"metadata": {"name": "chat", "namespace": "ns", "uid": "u", "generation": 1},
                             "spec": {"model": {"name": "tiny-gpt", "repository": "pvc://m/r", "version": 3}}})
    deployment = next(c for c in desired_children(spec, Images(puller="p", predictor="q")) if c["kind"] == "Deployment")
    sidecar = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "predictor")
    assert sidecar["command"][0] == "llmserve"
    args = build_parser().parse_args(sidecar["command"][1:])
    assert (args.triton_grpc, args.http_port, args.model) == ("localhost:8001", 8080, "tiny-gpt")
    assert sidecar["command"] == predictor_command("localhost:8001", "tiny-gpt")


def test_flags_round_trip():
    argv = predictor_command("127.0.0.1:9", "m", http_port=9000, max_concurrency=3, request_timeout=2.5,
                             access_log=True)
    args = build_parser().parse_args(argv[1:])
    assert (args.http_port, args.max_concurrency, args.request_timeout, args.access_log) == (9000, 3, 2.5, True)
    assert "--access-log" not in predictor_command("h:1", "m", access_log=False)
    assert build_parser().parse_args(predictor_command("h:1", "m")[1:]).max_concurrency == DEFAULT_MAX_CONCURRENCY


@pytest.mark.parametrize("flags", [["--http-port", "0"], ["--http-port", "70000"], ["--max-concurrency", "0"],
                                   ["--request-timeout", "-1"], ["--max-tokens", "many"]])
def test_bad_flags_are_refused(flags, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predictor", "--triton-grpc", "h:1", "--model", "m", *flags])
    assert "error" in capsys.readouterr().err


def test_model_interface_from_triton_config():
    interface = ModelInterface.from_config(GENERATE_CONFIG)
    assert interface.task == "generate" and interface.decoupled and interface.context_length == 256
    assert interface.inputs["text_input"].datatype == "BYTES"
    assert interface.inputs["stop"].v2_metadata(batching=True) == {"name": "stop", "datatype": "BYTES",
                                                                   "shape": [-1, -1]}
    embedding = ModelInterface.from_config({"name": "e", "input": [{"name": "text", "data_type": "TYPE_STRING"}],
                                            "output": [{"name": "embedding", "data_type": "TYPE_FP32"}]})
    assert (embedding.task, embedding.decoupled, embedding.max_batch_size, embedding.context_length) == (
        "embedding", False, 0, None)


def test_input_tensors_take_the_config_shape_and_type():
    interface = ModelInterface.from_config(GENERATE_CONFIG)
    stop = interface.tensor("stop", [["\n", "END"]])
    assert (stop.name(), stop.shape(), stop.datatype()) == ("stop", [1, 2], "BYTES")
    max_tokens = interface.tensor("max_tokens", [[16]])
    assert (max_tokens.shape(), max_tokens.datatype()) == ([1, 1], "INT32")
    assert np.frombuffer(max_tokens._get_content(), dtype=np.int32).tolist() == [16]
    with pytest.raises(APIError) as missing:
        interface.tensor("seed", [[1]])
    assert missing.value.status == 400 and missing.value.param == "seed"
