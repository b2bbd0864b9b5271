"""`llmserve compress` end to end on the tiny test LM, every method: compress -> gate against the
original teacher -> `llmserve build` -> the real tritonserver -> an answer through the predictor;
the gate refusing an over-pruned model (drop-layers, which no two-layer model survives); lineage
surviving into the manifest. The compressed-tensors
methods (w8a8, w4a16: llmcompressor in the compression environment) go the same way on the vLLM
engine: the checkpoint is published as is and served by vLLM's CPU build.

The corpus (fixture `zen_corpus`) is the tiny LM's own training text (the Zen of Python, from the
stdlib's `this`), in paragraphs, so the teacher is confident enough for the gate to judge (on the
Python reference it knows almost nothing).
"""

from __future__ import annotations

import json

import openai
import pytest
from transformers import AutoModelForCausalLM

from fixtures.predictor import TESTBED_VLLM_ENGINE_ARGS, _serve
from llmserve.artifacts.build import BuildRequest, build
from llmserve.artifacts.manifest import Serving, pull
from llmserve.artifacts.testmodels import BuiltModel
from llmserve.compress.lineage import LINEAGE_FILE
from llmserve.compress.pipeline import CompressError, CompressRequest, compress
from llmserve.testbed.local_predictor import LocalPredictor
from llmserve.testbed.triton import TritonServer

pytestmark = [pytest.mark.triton, pytest.mark.slow]


def _is_2_of_4(weight) -> bool:
    """At least two zeros in every group of four consecutive input weights."""
    return bool(((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) >= 2).all())


# The methods for the ONNX engine, each the way a user runs it, into one repository: model name ->
# (methods, ONNX build variant). The tiny LM's gate refuses drop-layers (below) and Wanda's 2:4
# (mean KL 0.41 > 0.15), as it should: SparseGPT's repaired 2:4 model passes.
ONNX_METHODS = {
    "tiny-int8": (["quantize-int8"], "w8"),
    "tiny-int4": (["quantize-int4:block_size=32,zero_point=float"], "w4"),
    "tiny-sparsegpt": (["sparsegpt-2of4:samples=16,seq_len=64"], "fp32"),  # llmcompressor; dense, zeros kept
    "tiny-student": (["narrow-mlp:keep=0.75", "distill:steps=10,batch=4,seq_len=64"], "fp32"),
}


def test_every_onnx_method_compresses_builds_serves_and_keeps_its_lineage(tiny_lm_source, zen_corpus, tmp_path):
    repo, versions = tmp_path / "repo", {}
    for name, (methods, variant) in ONNX_METHODS.items():
        out = tmp_path / name
        lineage = compress(CompressRequest(source=tiny_lm_source, out=out, corpus=str(zen_corpus), methods=methods))
        assert lineage["gate"]["passed"] and lineage["gate"]["metrics"]["positions"] >= 2000, name
        assert lineage["teacher"]["path"] == str(tiny_lm_source.resolve())
        assert json.loads((out / LINEAGE_FILE).read_text()) == lineage
        assert "quantization_config" not in json.loads((out / "config.json").read_text())  # plain checkpoints
        if methods[0].startswith("sparsegpt-2of4"):
            model = AutoModelForCausalLM.from_pretrained(out)
            assert all(_is_2_of_4(model.get_submodule(f"model.layers.{i}.mlp.down_proj").weight)
                       for i in range(model.config.num_hidden_layers)), name

        result = build(BuildRequest(source=out, repo=repo, model=name, kind="generate", variant=variant))
        manifest = json.loads((result.path / "manifest.json").read_text())
        assert manifest["lineage"] == lineage and manifest["variant"] == variant
        assert (b"MatMulNBits" in (result.path / "model.onnx").read_bytes()) == (variant in ("w8", "w4"))
        versions[name] = result.version

    with TritonServer(repo, versions) as triton:
        for name in versions:
            with LocalPredictor(triton.grpc_url, name) as predictor:
                client = openai.OpenAI(base_url=predictor.openai_base_url, api_key="unused", max_retries=0,
                                       timeout=60)
                answer = client.completions.create(model=name, prompt="Beautiful is better than", max_tokens=8)
            assert answer.usage.completion_tokens == 8 and answer.choices[0].text, name


def test_gate_refuses_an_over_pruned_model(tiny_lm_source, zen_corpus, tmp_path):
    out = tmp_path / "half"
    with pytest.raises(CompressError) as refused:
        compress(CompressRequest(source=tiny_lm_source, out=out, corpus=str(zen_corpus),
                                 methods=["drop-layers:count=1"]))
    message = str(refused.value)
    assert "gate (structured) refused" in message
    assert "mean_kl" in message and "> 0.35" in message
    assert not out.exists()


def test_chained_compression_keeps_the_original_teacher(tiny_lm_source, zen_corpus, tmp_path):
    narrow = compress(CompressRequest(source=tiny_lm_source, out=tmp_path / "narrow",
                                      corpus=str(zen_corpus), methods=["narrow-mlp:keep=0.75"]))
    student = compress(CompressRequest(source=tmp_path / "narrow", out=tmp_path / "student",
                                       corpus=str(zen_corpus),
                                       methods=["distill:steps=20,batch=4,seq_len=64"]))
    assert student["teacher"] == narrow["teacher"]
    assert student["source"]["path"] == str((tmp_path / "narrow").resolve())
    assert [m["name"] for m in student["methods"]] == ["narrow-mlp", "distill"]
    assert student["gate"]["thresholds"]["family"] == "structured"


# Two vLLM engine starts (the build's gate, then Triton) plus llmcompressor: minutes each on a
# loaded 2-core machine, more than the suite's default 900 s.
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("method", ["w8a8", "w4a16"])
def test_compressed_tensors_model_builds_for_vllm_and_serves(method, tiny_lm_source, zen_corpus, tmp_path):
    out = tmp_path / f"tiny-{method}"
    lineage = compress(CompressRequest(source=tiny_lm_source, out=out, corpus=str(zen_corpus),
                                       methods=[f"{method}:samples=16,seq_len=128"]))
    assert lineage["gate"]["passed"] and [m["name"] for m in lineage["methods"]] == [method]
    assert "llmcompressor" in lineage["tools"]
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors"

    name = f"tiny-{method}"
    result = build(BuildRequest(source=out, repo=tmp_path / "repo", model=name, kind="generate",
                                variant="bf16", engine="vllm"))
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["lineage"] == lineage and manifest["accuracy"]["passed"]
    # published as is: the same quantized tensors, not a bf16 re-save
    assert (result.path / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert json.loads((result.path / "config.json").read_text())["quantization_config"] == quant

    served = tmp_path / "served"
    pull(tmp_path / "repo", name, result.version, served,
         serving=Serving(engine="vllm", instance_kind="KIND_CPU", engine_args=TESTBED_VLLM_ENGINE_ARGS))
    with _serve(BuiltModel(served, name, result.version, out), startup_timeout=600) as service:
        client = openai.OpenAI(base_url=service.predictor.openai_base_url, api_key="unused",
                               max_retries=0, timeout=120)
        answer = client.completions.create(model=name, prompt="Beautiful is better than", max_tokens=8)
    assert answer.usage.completion_tokens == 8 and answer.choices[0].text


def test_gpu_only_format_is_refused_on_this_cpu(tiny_lm_source, zen_corpus, tmp_path):
    with pytest.raises(CompressError, match="w8a8-fp8 is GPU-only"):
        compress(CompressRequest(source=tiny_lm_source, out=tmp_path / "fp8", corpus=str(zen_corpus),
                                 methods=["w8a8-fp8"]))
