"""Compression methods on a tiny random Llama (CPU, seconds), method parameters, lineage and the
ONNX weight-only scheme."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmserve.compress import lineage, onnx_quant
from llmserve.compress.methods import (
    METHODS,
    Context,
    MethodError,
    cpu_threads,
    distill_loss,
    eta_line,
    fake_quantize,
    parse,
    training_batch,
)


class _ByteTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [b % 64 for b in text.encode()]}


@pytest.fixture
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def ctx(model):
    return Context(teacher=model, tokenizer=_ByteTokenizer(), train_text="some calibration text " * 200,
                   progress=lambda _msg: None)


def test_symmetric_int8_error_is_within_half_a_step():
    w = torch.randn(8, 64)
    q = fake_quantize(w, bits=8, block_size=32, symmetric=True)
    step = w.reshape(8, 2, 32).abs().amax(-1) / 127
    assert ((q - w).reshape(8, 2, 32).abs() <= step[..., None] / 2 + 1e-6).all()


def test_asymmetric_int4_uses_at_most_16_levels_per_block():
    w = torch.randn(4, 32)
    q = fake_quantize(w, bits=4, block_size=32, symmetric=False)
    assert all(len(torch.unique(row)) <= 16 for row in q)
    assert torch.allclose(fake_quantize(q, 4, 32, False), q, atol=1e-6)  # on the grid: unchanged


def _q4_1_weights(out_dim: int, in_dim: int) -> torch.Tensor:
    """Weights de-quantized from llama.cpp's Q4_1: per block of 32 inputs, d * q + m with q in
    0..15 (both ends used) and a free minimum m."""
    gen = torch.Generator().manual_seed(1)
    blocks = in_dim // 32
    q = torch.randint(0, 16, (out_dim, blocks, 32), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15
    d = torch.rand(out_dim, blocks, 1, generator=gen) * 0.01 + 0.001
    m = torch.randn(out_dim, blocks, 1, generator=gen) * 0.05
    return (d * q + m).reshape(out_dim, in_dim)


def test_float_zero_points_reproduce_a_q4_1_grid_that_integer_ones_round_again():
    w = _q4_1_weights(16, 64)
    exact = fake_quantize(w, bits=4, block_size=32, symmetric=False, zero_point="float")
    assert (exact - w).abs().max() < 1e-6
    rounded = fake_quantize(w, bits=4, block_size=32, symmetric=False)
    assert (rounded - w).abs().max() > 1e-4


def test_float_zero_point_needs_an_asymmetric_grid(model, ctx):
    _, params = parse("quantize-int4:zero_point=float,symmetric=true")
    with pytest.raises(MethodError, match="zero_point=float needs symmetric=false"):
        METHODS["quantize-int4"].run(model, params, ctx)
    with pytest.raises(MethodError, match="zero_point must be int or float, not 'half'"):
        parse("quantize-int4:zero_point=half")


@pytest.mark.parametrize("zero_point", ["int", "float"])
def test_matmulnbits_build_computes_what_the_gate_measured(tmp_path, zero_point):
    """The ONNX build of a quantized MatMul gives what the fake-quantized PyTorch weight gives,
    so the compression gate measured the served model."""
    import numpy as np
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    weight = torch.randn(48, 64) * 0.05  # torch layout [out, in]; ONNX MatMul takes [in, out]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 48])],
        [numpy_helper.from_array(weight.T.numpy().copy(), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "f.onnx")
    spec = {"bits": 4, "block_size": 32, "symmetric": False, "zero_point": zero_point, "keep": ""}
    done = onnx_quant.quantize(tmp_path / "f.onnx", tmp_path / "q.onnx", spec, vocab_size=10_000)
    assert done["matmulnbits_nodes"] == 1
    x = torch.randn(5, 64)
    session = onnxruntime.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    served = session.run(None, {"x": x.numpy()})[0]
    expected = x @ fake_quantize(weight, 4, 32, False, zero_point).T
    assert np.abs(served - expected.numpy()).max() < 1e-4


def test_block_size_must_divide_the_input():
    with pytest.raises(MethodError, match="not a multiple of block_size"):
        fake_quantize(torch.randn(4, 48), 8, 32, True)


def test_parse_applies_defaults_and_types():
    name, params = parse("distill:steps=5,alpha=0.3")
    assert name == "distill" and params["steps"] == 5 and params["alpha"] == 0.3
    assert params["temperature"] == METHODS["distill"].defaults["temperature"]
    assert parse("quantize-int8:symmetric=false")[1]["symmetric"] is False
    with pytest.raises(MethodError, match="unknown method 'zip'"):
        parse("zip")
    with pytest.raises(MethodError, match="score must be magnitude or wanda, not 'random'"):
        parse("prune-2of4:score=random")
    with pytest.raises(MethodError, match="unknown parameter 'bits=3'.*block_size=32"):
        parse("quantize-int4:bits=3")
    with pytest.raises(MethodError, match="steps='many' is not a int"):
        parse("distill:steps=many")


def test_two_of_four_zeroes_half_of_every_group(model, ctx):
    METHODS["prune-2of4"].run(model, {"score": "magnitude"}, ctx)
    w = model.model.layers[0].mlp.down_proj.weight.reshape(-1, 4)
    assert ((w == 0).sum(-1) >= 2).all()
    assert model.lm_head.weight.ne(0).all()  # the head is not pruned


def test_drop_layers_makes_a_smaller_model_that_runs(model, ctx):
    smaller = METHODS["drop-layers"].run(model, {"count": 0, "layers": "1"}, ctx)
    assert smaller.config.num_hidden_layers == 2 and len(smaller.model.layers) == 2
    assert torch.equal(smaller.model.layers[1].mlp.up_proj.weight, model.model.layers[2].mlp.up_proj.weight)
    assert smaller(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)
    with pytest.raises(MethodError, match="count must be between 1 and 2"):
        METHODS["drop-layers"].run(model, {"count": 3, "layers": ""}, ctx)
    with pytest.raises(MethodError, match="layers 0..2"):
        METHODS["drop-layers"].run(model, {"count": 1, "layers": "7"}, ctx)


def test_narrow_mlp_keeps_the_chosen_width(model, ctx):
    narrow = METHODS["narrow-mlp"].run(model, {"keep": 0.5, "multiple": 16}, ctx)
    assert narrow.config.intermediate_size == 32
    assert narrow.model.layers[0].mlp.down_proj.weight.shape == (32, 32)
    assert narrow(input_ids=torch.tensor([[1, 2]])).logits.shape == (1, 2, 64)


def test_a_model_without_llama_layers_is_refused(ctx):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    with pytest.raises(MethodError, match="not a Llama-style decoder"):
        METHODS["prune-2of4"].run(gpt2, {"score": "magnitude"}, ctx)


def test_distill_loss_is_cross_entropy_when_alpha_is_zero_and_zero_kl_on_itself():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1))
    assert torch.allclose(distill_loss(logits, logits, targets, 2.0, 0.0), ce)
    assert distill_loss(logits, logits, targets, 2.0, 1.0).abs() < 1e-5


def test_training_batch_takes_whole_windows_of_the_stream():
    ids = torch.arange(10)
    batch = training_batch(ids, 4, 50, torch.Generator().manual_seed(0))
    assert batch.shape == (50, 4)
    assert (batch[:, 1:] - batch[:, :-1] == 1).all()  # consecutive tokens
    assert batch.min() >= 0 and batch.max() == 9  # the last window is reachable, none runs off


def test_eta_line_reports_pace_and_time_left():
    assert eta_line(10, 100, 1.23456, 20.0) == (
        "distill: step 10/100 loss 1.2346 (2.00 s/step, 20s elapsed, ~180s left)")


def test_cpu_threads_is_at_least_one():
    assert cpu_threads() >= 1


@pytest.mark.parametrize("bf16", [False, True])
def test_distill_trains_the_student_but_not_the_tied_embeddings(model, ctx, bf16):
    student = METHODS["drop-layers"].run(model, {"count": 0, "layers": "1"}, ctx)
    embeddings = student.get_input_embeddings().weight.detach().clone()
    mlp = student.model.layers[0].mlp.up_proj.weight.detach().clone()
    _, params = parse(f"distill:steps=2,batch=2,seq_len=16,lr=1e-2,bf16={bf16}")
    trained = METHODS["distill"].run(student, params, ctx)
    assert torch.equal(trained.get_input_embeddings().weight, embeddings)
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, mlp)
    assert trained.get_input_embeddings().weight.requires_grad  # restored after training
    assert next(trained.parameters()).dtype == torch.float32  # master weights stay fp32


def test_lineage_chain_keeps_the_first_teacher():
    first = lineage.extend(None, {"path": "/t", "sha256": "a" * 64},
                           [{"name": "drop-layers", "params": {"count": 2}}])
    second = lineage.extend(first, {"path": "/s", "sha256": "b" * 64},
                            [{"name": "distill", "params": {"steps": 9}}])
    assert second["teacher"] == {"path": "/t", "sha256": "a" * 64}
    assert lineage.method_names(second) == ["drop-layers", "distill"]
    assert lineage.summary(second) == "teacher aaaaaaaaaaaa: drop-layers(count=2) -> distill(steps=9)"


def test_onnx_scheme_follows_the_lineage():
    compressed = {"methods": [{"name": "quantize-int4", "params": {"block_size": 64, "symmetric": True,
                                                                   "keep": "lm_head+down_proj"}}]}
    assert onnx_quant.scheme("w4", compressed) == {"bits": 4, "block_size": 64, "symmetric": True,
                                                   "zero_point": "int", "keep": "lm_head+down_proj"}
    assert onnx_quant.scheme("w8", None) == {"bits": 8, **onnx_quant.DEFAULTS[8]}
    with pytest.raises(onnx_quant.QuantizeError, match="compressed with quantize-int4"):
        onnx_quant.scheme("w8", compressed)


def test_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    from llmserve.cli import main

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    out = str(tmp_path / "out")
    assert main(["compress", str(tmp_path / "src"), "--out", out, "--method", "zip"]) == 1
    assert "unknown method 'zip'" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "src"), "--out", out, "--method", "distill"]) == 1
    assert "distillation alone" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "nowhere"), "--out", out, "--method", "prune-2of4"]) == 1
    assert "not a Hugging Face model directory" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "src"), "--out", out, "--method", "prune-2of4",
                 "--positions", "100"]) == 1
    assert "--positions must be at least 2000" in capsys.readouterr().err


def test_training_runs_on_a_gpu_when_the_process_was_given_one(monkeypatch):
    from llmserve.compress.methods import training_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device().type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_device().type == "cuda"
