"""Pure parts of model_repo/vllm/1/model.py (request translation, engine settings, logprob entries)
and of the vLLM build (engine args, config rendering, requirement unpinning). The model file is
imported outside Triton, as the build's gate does; vLLM itself is not needed."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from llmserve.artifacts.repository import SHIPPED_REPO
from llmserve.testbed.triton import unpinned_requirements


def _load_model_code():
    spec = importlib.util.spec_from_file_location("vllm_model_under_test", SHIPPED_REPO / "vllm" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


model = _load_model_code()


def test_defaults_are_greedy_and_short():
    assert model.sampling_settings() == {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0}


def test_tensor_inputs_and_extra_parameters_map_to_vllm_fields():
    extra = json.dumps({
        "top_k": 5, "n": 3, "logprobs": 2, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "logit_bias": {"42": 5},
    })
    settings = model.sampling_settings(max_tokens=8, temperature=0.7, top_p=0.9, seed=7,
                                       stop=["\n", ""], extra=extra)
    assert settings == {
        "max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "seed": 7, "stop": ["\n"], "top_k": 5, "n": 3,
        "logprobs": 2, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "structured_outputs": {"json": {"type": "object"}}, "logit_bias": {42: 5.0},
    }


@pytest.mark.parametrize("response_format, expected", [
    ({"type": "json_object"}, {"structured_outputs": {"json_object": True}}),
    ({"type": "text"}, {}),
])
def test_response_formats(response_format, expected):
    settings = model.sampling_settings(extra=json.dumps({"response_format": response_format}))
    assert {k: v for k, v in settings.items() if k == "structured_outputs"} == expected


def test_logprobs_zero_means_only_the_chosen_token_and_null_means_off():
    assert model.sampling_settings(extra='{"logprobs": 0}')["logprobs"] == 0
    assert "logprobs" not in model.sampling_settings(extra='{"logprobs": null}')


@pytest.mark.parametrize("extra, message", [
    ('{"best_of": 2}', "unsupported parameter: best_of"),
    ('{"tools": [], "best_of": 2}', "unsupported parameter: best_of, tools"),
    ('{"response_format": {"type": "grammar"}}', "unsupported parameter: response_format type 'grammar'"),
])
def test_what_vllm_cannot_do_is_an_unsupported_parameter(extra, message):
    with pytest.raises(model.UnsupportedParameter, match="^" + message):
        model.sampling_settings(extra=extra)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens must be in"),
    ({"temperature": -1.0}, "temperature must be in"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"extra": "[1]"}, "sampling_parameters must be a JSON object"),
    ({"extra": "{"}, "sampling_parameters must be a JSON object"),
    ({"extra": '{"n": 0}'}, "n must be in"),
    ({"extra": '{"n": 1.5}'}, "n must be an integer"),
    ({"extra": '{"logprobs": 21}'}, "logprobs must be in"),
    ({"extra": '{"top_k": true}'}, "top_k must be an integer"),
    ({"extra": '{"presence_penalty": 3}'}, "presence_penalty must be in"),
    ({"extra": '{"response_format": "json"}'}, "response_format must be an object"),
    ({"extra": '{"response_format": {"type": "json_schema", "json_schema": {}}}'}, "json_schema.schema"),
    ({"extra": '{"logit_bias": {"a": 1}}'}, "logit_bias keys must be token ids"),
])
def test_bad_values_are_invalid_arguments(kwargs, message):
    with pytest.raises(model.InvalidArgument, match="^invalid argument: .*" + message):
        model.sampling_settings(**kwargs)


def test_engine_args_parameter_overrides_engine_json_but_never_the_model(tmp_path):
    (tmp_path / "engine.json").write_text('{"dtype": "bfloat16", "max_model_len": 2048}')
    settings = model.engine_settings(tmp_path, '{"max_model_len": 512, "model": "/elsewhere"}')
    assert settings == {"dtype": "bfloat16", "max_model_len": 512,
                        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
                        "model": str(tmp_path), "tokenizer": str(tmp_path)}
    assert model.engine_settings(tmp_path, "")["max_model_len"] == 2048
    # Compact JSON is a default the service's settings may change.
    loose = model.engine_settings(tmp_path, '{"structured_outputs_config": {"disable_any_whitespace": false}}')
    assert loose["structured_outputs_config"] == {"disable_any_whitespace": False}


@pytest.mark.parametrize("parameter", ["[1]", "{"])
def test_engine_args_parameter_must_be_a_json_object(tmp_path, parameter):
    with pytest.raises(ValueError, match="engine_args"):
        model.engine_settings(tmp_path, parameter)


@dataclass
class _Logprob:
    logprob: float
    rank: int
    decoded_token: str


def test_logprob_entries_list_the_chosen_token_and_the_top_alternatives_by_rank():
    position = {7: _Logprob(-2.0, 3, "c"), 5: _Logprob(-0.1, 1, "a"), 6: _Logprob(-1.0, 2, "b")}
    assert model.logprob_entries([7], [position], 2) == [{
        "token": "c", "logprob": -2.0,
        "top_logprobs": [{"token": "a", "logprob": -0.1}, {"token": "b", "logprob": -1.0}],
    }]
    assert model.logprob_entries([5], [position], 0)[0]["top_logprobs"] == []


def test_vllm_config_is_the_shipped_one_renamed():
    from llmserve.artifacts.vllm_build import render_vllm_config, shipped_vllm_files

    template = shipped_vllm_files()[1].read_text()
    text = render_vllm_config(template, "chat", {"EXECUTION_ENV_PATH": "/env"})
    assert 'name: "chat"' in text and 'name: "vllm"' not in text
    assert text.endswith('parameters { key: "EXECUTION_ENV_PATH" value: { string_value: "/env" } }\n')
    assert "decoupled: true" in text and "max_batch_size: 0" in text


def test_default_engine_args_follow_the_variant_and_the_models_context():
    from llmserve.artifacts.vllm_build import default_engine_args

    args = default_engine_args(SimpleNamespace(max_position_embeddings=8192), "bf16")
    assert args["dtype"] == "bfloat16" and args["max_model_len"] == 8192
    assert args["enable_prefix_caching"] and args["enable_chunked_prefill"]


def test_local_torch_pins_become_pypi_pins_and_extras_are_dropped():
    assert unpinned_requirements([
        'torch==2.13.0+cpu; platform_machine == "x86_64"', "numpy", 'pytest; extra == "test"',
        "intel-openmp==2024.2.1",
    ]) == ['torch==2.13.0; platform_machine == "x86_64"', "numpy", "intel-openmp==2024.2.1"]


def test_client_shapes_tensors_for_models_with_and_without_a_batch_dimension():
    from llmserve.artifacts.client import generate_inputs

    batched = {t.name(): t.shape() for t in generate_inputs(prompt="x", stop=["a", "b"], max_tokens=3)}
    assert batched == {"text_input": [1, 1], "stop": [1, 2], "max_tokens": [1, 1]}
    flat = {t.name(): t.shape() for t in generate_inputs(prompt="x", stop=["a", "b"], max_tokens=3, batched=False,
                                                          sampling_parameters={"n": 2})}
    assert flat == {"text_input": [1], "stop": [2], "max_tokens": [1], "sampling_parameters": [1]}
