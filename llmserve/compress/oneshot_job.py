"""The llmcompressor side of `llmserve compress --method w8a8|w4a16|w8a8-fp8|sparsegpt-2of4` and of
`llmserve build --engine vllm` for such a model, run as a script in the compression environment
(~/.cache/llmserve/engine-compress: llmcompressor, which has neither llmserve nor the build
venv's torch/transformers):

    <compress python> oneshot_job.py REQUEST.json

mode "oneshot": load `source` (fp32), run llmcompressor's `oneshot` with the recipe on the given
calibration token ids, write the held-out windows' logits of the quantized model (fake-quantized
weights and activations, as compressed-tensors emulates them in PyTorch) to `logits_dir`, then
save the compressed-tensors Hugging Face directory to `out` (SPARSE_2_4: an ordinary dense one,
zeros included, which every engine loads as it is).
mode "reference": load a compressed-tensors directory de-compressed and answer the build gate's
questions (argmax next token and its probability per position, greedy continuations) like the PyTorch reference of
an ordinary build.
"""

import json
import sys
import time
from pathlib import Path


def log(message: str) -> None:
    print(f"[oneshot] {message}", file=sys.stderr, flush=True)


def recipe(request: dict):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    scheme, ignore = request["scheme"], request["ignore"]
    if scheme == "W8A8":
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=request["smoothing_strength"]),
                GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore,
                             dampening_frac=request["dampening"])]
    if scheme == "W4A16":
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=request["symmetric"],
                                   strategy="group", group_size=request["group_size"])
        return [GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"],
                                                                          weights=weights)},
                             ignore=ignore, dampening_frac=request["dampening"])]
    if scheme == "SPARSE_2_4":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return [SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=ignore,
                                  dampening_frac=request["dampening"])]
    if scheme == "FP8_DYNAMIC":
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=ignore)]
    raise SystemExit(f"unknown scheme {scheme}")


def oneshot_mode(request: dict) -> None:
    import numpy as np
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(request["source"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(request["source"])
    calibration = Dataset.from_dict({"input_ids": request["calibration"],
                                     "attention_mask": [[1] * len(ids) for ids in request["calibration"]]})
    start = time.monotonic()
    log(f"{request['scheme']} on {len(request['calibration'])} calibration sequences")
    oneshot(model=model, dataset=calibration, recipe=recipe(request),
            max_seq_length=max(len(ids) for ids in request["calibration"]),
            num_calibration_samples=len(request["calibration"]))
    log(f"oneshot done ({time.monotonic() - start:.0f}s)")
    logits_dir = Path(request["logits_dir"])
    model.eval()
    with torch.no_grad():
        for i, ids in enumerate(request["gate_windows"]):
            logits = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
            np.save(logits_dir / f"{i}.npy", logits)
            log(f"gate logits: window {i + 1}/{len(request['gate_windows'])}")
    from importlib.metadata import version

    (logits_dir / "tools.json").write_text(json.dumps(
        {name: version(name) for name in ("llmcompressor", "compressed-tensors")}))
    if request["scheme"] == "SPARSE_2_4":
        save_dense(model, request["out"])
    else:
        model.save_pretrained(request["out"], save_compressed=True)
    tokenizer.save_pretrained(request["out"])
    log(f"saved {request['out']}")


def save_dense(model, out: str) -> None:
    """The pruned model as a plain Hugging Face checkpoint: no compressed-tensors config, so the
    build venv (no compressed-tensors), ONNX export and vLLM's dense path all load it."""
    model.save_pretrained(out, save_compressed=False)
    config_path = Path(out) / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config.pop("sparsity_config", None)
    config_path.write_text(json.dumps(config, indent=2))


def reference_mode(request: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(
        request["model_dir"], dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    eos_ids = request["eos_ids"]
    with torch.no_grad():
        top1 = [model(input_ids=torch.tensor([ids])).logits[0].softmax(-1).max(-1)
                for ids in request["teacher_forced"]]
        next_tokens = [t.indices.tolist() for t in top1]
        confidence = [[round(p, 4) for p in t.values.tolist()] for t in top1]
        greedy = []
        for ids in request["greedy"]:
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=request["max_new_tokens"], do_sample=False,
                                 eos_token_id=eos_ids or None, pad_token_id=(eos_ids or [0])[0])
            greedy.append([t for t in out[0, len(ids):].tolist() if t not in eos_ids])
    Path(request["result"]).write_text(json.dumps({"next_tokens": next_tokens, "confidence": confidence,
                                                   "greedy": greedy}))


def main(request_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    {"oneshot": oneshot_mode, "reference": reference_mode}[request["mode"]](request)


if __name__ == "__main__":
    main(sys.argv[1])
