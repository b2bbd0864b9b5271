"""The pure parts of the compressed-tensors methods (llmcompressor runs in its own environment;
the end-to-end path is tests/integration/test_compression_vllm.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from llmserve.compress import gate, oneshot
from llmserve.compress.methods import METHODS, parse
from llmserve.compress.pipeline import check_oneshot_last

SMOLLM2 = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_attention_heads=9, head_dim=64)


def test_group_size_must_divide_every_input_and_the_error_names_one_that_fits():
    inputs = oneshot.linear_input_sizes(SMOLLM2)
    assert inputs["down_proj"] == 1536 and inputs["o_proj"] == 576
    with pytest.raises(ValueError, match=r"group_size 128 does not divide .*q_proj \(576\).*group_size=64 fits"):
        oneshot.check_group_size(128, inputs)
    oneshot.check_group_size(64, inputs)
    with pytest.raises(ValueError, match="even"):
        oneshot.check_group_size(7, inputs)


def test_head_dim_defaults_to_hidden_over_heads():
    config = SimpleNamespace(hidden_size=256, intermediate_size=512, num_attention_heads=4)
    assert oneshot.linear_input_sizes(config)["o_proj"] == 256


def test_job_requests_carry_the_scheme_and_its_parameters():
    _, w8 = parse("w8a8:smoothing_strength=0.5")
    assert oneshot.job_request("w8a8", w8) == {"scheme": "W8A8", "ignore": ["re:.*lm_head.*"],
                                               "smoothing_strength": 0.5, "dampening": 0.01}
    _, w4 = parse("w4a16:group_size=64,keep=lm_head+down_proj")
    assert oneshot.job_request("w4a16", w4) == {"scheme": "W4A16", "ignore": ["re:.*lm_head.*", "re:.*down_proj.*"],
                                                "group_size": 64, "symmetric": True, "dampening": 0.01}
    _, sparse = parse("sparsegpt-2of4:dampening=0.05")
    assert oneshot.job_request("sparsegpt-2of4", sparse) == {"scheme": "SPARSE_2_4", "ignore": ["re:.*lm_head.*"],
                                                             "dampening": 0.05}


def test_compressed_tensors_methods_are_gated_as_8_and_4_bit():
    assert gate.family_of(["w8a8"]).family == "quantization-8bit"
    assert gate.family_of(["w4a16"]).family == "quantization-4bit"
    assert gate.family_of(["narrow-mlp", "distill", "w8a8"]).family == "structured"
    assert gate.family_of(["sparsegpt-2of4"]).family == "sparsity"
    assert all(METHODS[m].oneshot for m in oneshot.SCHEMES)


def test_a_compressed_tensors_method_must_come_last_and_alone():
    check_oneshot_last(["narrow-mlp", "distill", "w4a16"])
    with pytest.raises(ValueError, match="last method"):
        check_oneshot_last(["w8a8", "distill"])
    with pytest.raises(ValueError, match="last method"):
        check_oneshot_last(["w8a8", "w4a16"])


def _config(weights: dict, activations: dict | None = None) -> dict:
    return {"quantization_config": {"quant_method": "compressed-tensors", "format": "int-quantized",
                                    "config_groups": {"group_0": {"weights": weights,
                                                                  "input_activations": activations}}}}


def test_int_formats_run_on_cpus_and_float_formats_need_a_gpu_and_activation_quantization_is_named():
    assert oneshot.quantization_format({}) is None
    w8a8 = oneshot.quantization_format(_config({"num_bits": 8, "type": "int"},
                                               {"num_bits": 8, "type": "int", "dynamic": True}))
    assert w8a8 == {"scheme": "int-quantized", "gpu_only": False, "activations": True, "reason": "int8"}
    w4 = oneshot.quantization_format(_config({"num_bits": 4, "type": "int"}))
    assert not w4["gpu_only"] and w4["reason"] == "int4" and not w4["activations"]
    fp8 = oneshot.quantization_format(_config({"num_bits": 8, "type": "float"},
                                              {"num_bits": 8, "type": "float", "dynamic": True}))
    assert fp8["gpu_only"] and "FP8" in fp8["reason"]
    assert oneshot.quantization_format({"quantization_config": {"quant_method": "awq"}})["gpu_only"]


def test_saved_logits_answer_by_window(tmp_path):
    windows = [[1, 2, 3], [4, 5, 6]]
    for i in range(2):
        np.save(tmp_path / f"{i}.npy", np.full((3, 4), i, dtype=np.float32))
    candidate = oneshot.window_logits(tmp_path, windows)
    assert candidate([4, 5, 6])[0, 0] == 1 and candidate([1, 2, 3])[0, 0] == 0


def test_missing_environment_names_the_setup_step(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMSERVE_COMPRESS_PYTHON", str(tmp_path / "none" / "python"))
    with pytest.raises(oneshot.OneshotError, match="hack/setup.sh"):
        oneshot.compress_python()
