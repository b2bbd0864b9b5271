"""Triton python-backend model: sentence embeddings with an ONNX encoder on ONNX Runtime.

`llmserve build` copies this file into every version it publishes, beside `model.onnx`,
`tokenizer.json` and `artifact.json`; its accuracy gate imports this same file (outside Triton)
and runs `Embedder` on the artifact, so the gate measures exactly what will serve.

Input `text` (BYTES, one string per row; a request may carry several rows). Outputs `embedding`
(FP32 [dim]; pooling and L2 normalization happen inside the ONNX graph) and `token_count`
(INT32, tokens the text used after truncation, for usage accounting). Every execute() tokenizes
and runs the whole dynamic batch at once.

It runs on CUDA when Triton gives it a GPU instance (KIND_GPU; TensorRT first when the config
parameter `execution_providers` is `tensorrt,cuda`), on the CPU otherwise, and publishes the
engine metrics of docs/engines.md#metrics that apply to embeddings (requests, latency, tokens).
"""

import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported by the builder's accuracy gate, outside Triton
    pb_utils = None


class Embedder:
    """The ONNX artifact plus its tokenizer; no Triton dependency."""

    def __init__(self, version_dir, session_options=None, providers=("CPUExecutionProvider",)):
        version_dir = Path(version_dir)
        self.meta = json.loads((version_dir / "artifact.json").read_text())
        self.session = ort.InferenceSession(
            str(version_dir / self.meta["onnx"]), session_options, providers=list(providers),
        )
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.tokenizer = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.meta["max_length"])
        self.tokenizer.enable_padding(pad_id=self.meta["pad_token_id"])

    def embed(self, texts):
        """Embeddings [N, dim] and token counts [N] of `texts`.

        Texts are run in groups of similar length: one long text padded into a batch of short
        ones would multiply the batch's work (attention grows with the padded length)."""
        encodings = self.tokenizer.encode_batch(list(texts))
        counts = np.array([sum(e.attention_mask) for e in encodings], np.int32)
        embeddings = np.zeros((len(texts), self.meta["embedding_dim"]), np.float32)
        for group in _length_groups(counts):
            width = int(counts[group].max())
            columns = {
                "input_ids": [encodings[i].ids[:width] for i in group],
                "attention_mask": [encodings[i].attention_mask[:width] for i in group],
                "token_type_ids": [encodings[i].type_ids[:width] for i in group],
            }
            feeds = {name: np.array(columns[name], np.int64) for name in self.inputs}
            (embeddings[group],) = self.session.run(["sentence_embedding"], feeds)
        return embeddings, counts


def _length_groups(counts, slack=2.0):
    """Indices grouped by ascending length so that no group pads beyond `slack` x its
    shortest member (+ a few tokens)."""
    order = np.argsort(counts, kind="stable")
    groups, start = [], 0
    for k in range(1, len(order) + 1):
        if k == len(order) or counts[order[k]] > slack * counts[order[start]] + 8:
            groups.append(order[start:k])
            start = k
    return groups


def gpu_providers(args, config):
    """ONNX Runtime providers: the instance's GPU for a KIND_GPU instance (TensorRT, then CUDA, when
    the parameter `execution_providers` lists tensorrt), else the CPU."""
    if args.get("model_instance_kind") != "GPU":
        return ["CPUExecutionProvider"]
    device = {"device_id": int(args.get("model_instance_device_id", 0))}
    wanted = ((config.get("parameters") or {}).get("execution_providers") or {}).get("string_value", "cuda")
    trt = [("TensorrtExecutionProvider", {**device, "trt_engine_cache_enable": True,
                                          "trt_engine_cache_path": "/tmp/trt-cache"})] if "tensorrt" in wanted else []
    return trt + [("CUDAExecutionProvider", device), "CPUExecutionProvider"]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.embedder = Embedder(Path(args["model_repository"]) / args["model_version"],
                                 providers=gpu_providers(args, config))
        labels = {"model": args["model_name"], "version": args["model_version"]}
        family = pb_utils.MetricFamily
        # The engine metrics that apply to embeddings (docs/engines.md#metrics); families are kept
        # alive with their metrics, which Triton wants deleted first (finalize).
        self.families = {
            "success": family("vllm:request_success_total", "Requests that finished", family.COUNTER),
            "failure": family("llmserve:request_failure_total", "Requests that ended with an error", family.COUNTER),
            "prompt": family("vllm:prompt_tokens_total", "Prompt tokens processed", family.COUNTER),
            "e2e": family("vllm:e2e_request_latency_seconds", "Request latency, arrival to last token",
                          family.HISTOGRAM),
        }
        self.metrics = {
            "success": self.families["success"].Metric(labels={**labels, "finished_reason": "stop"}),
            "failure": self.families["failure"].Metric(labels=labels),
            "prompt": self.families["prompt"].Metric(labels=labels),
            "e2e": self.families["e2e"].Metric(labels=labels, buckets=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                                       0.5, 1, 2.5, 5, 10]),
        }

    def execute(self, requests):
        started = time.monotonic()
        texts, rows = [], []
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
            rows.append(len(values))
            texts += [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]
        try:
            embeddings, counts = self.embedder.embed(texts)
        except Exception as exc:  # noqa: BLE001 - every request of the batch is told why
            self.metrics["failure"].increment(len(requests))
            # Answered, not raised: after execute() raised under concurrent requests, Triton 2.51
            # kept the model referenced, and on SIGTERM waited out its whole exit timeout. One
            # TritonError per response: a shared one crashed tritonserver (SIGSEGV).
            message = f"embedding failed: {type(exc).__name__}: {exc}"
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(message)) for _ in requests]
        self.metrics["success"].increment(len(requests))
        self.metrics["prompt"].increment(int(counts.sum()))
        for _ in requests:  # the whole batch answers at once: each request waited this long in it
            self.metrics["e2e"].observe(time.monotonic() - started)
        responses, start = [], 0
        for n in rows:
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("embedding", embeddings[start:start + n]),
                pb_utils.Tensor("token_count", counts[start:start + n].reshape(n, 1)),
            ]))
            start += n
        return responses

    def finalize(self):
        self.embedder = None
        self.metrics.clear()
        self.families.clear()
