"""Minimal `tritonclient` calls for the shipped models: used by the tests, the benchmark and as
the reference for the tensor interface (see docs/artifacts.md).

The generate and vllm models are decoupled, so they are called over a gRPC stream (a stream can
carry many concurrent requests, told apart by request id); the embedding model over plain HTTP or
gRPC. The generate model batches (a leading batch dimension on every tensor), the vllm model does
not (vLLM batches itself): `generate` reads the model's config to shape its tensors.
"""

from __future__ import annotations

import json
import queue
import uuid
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

_GENERATE_INPUTS = {  # name -> (Triton type, numpy type)
    "max_tokens": ("INT32", np.int32),
    "temperature": ("FP32", np.float32),
    "top_p": ("FP32", np.float32),
    "seed": ("UINT64", np.uint64),
    "stream": ("BOOL", np.bool_),
}


@dataclass
class Generation:
    """One request's answer: choice 0 in the top-level fields; every choice's text in `choices`
    (n > 1, vllm model) and choice 0's logprob entries in `logprobs` (when asked for)."""

    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    chunks: list[str] = field(default_factory=list)
    error: str | None = None
    choices: list[str] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)


def generate_inputs(prompt: str | None = None, messages: list[dict] | None = None,
                    stop: list[str] | None = None, sampling_parameters: dict | None = None,
                    batched: bool = True, **params) -> list[grpcclient.InferInput]:
    """Input tensors of one generate request; `params` are max_tokens, temperature, top_p,
    seed and stream, `sampling_parameters` the vllm model's JSON of the other OpenAI fields.
    Unset inputs are left out and take the model's defaults. `batched`: the model has a batch
    dimension (max_batch_size > 0)."""
    inputs = []

    def add(name, dtype, values, np_type=object):
        array = np.array([values] if batched else values, dtype=np_type)
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)

    if prompt is not None:
        add("text_input", "BYTES", [prompt.encode()])
    if messages is not None:
        add("messages", "BYTES", [json.dumps(messages).encode()])
    if stop:
        add("stop", "BYTES", [s.encode() for s in stop])
    if sampling_parameters:
        add("sampling_parameters", "BYTES", [json.dumps(sampling_parameters).encode()])
    for name, value in params.items():
        if value is not None:
            dtype, np_type = _GENERATE_INPUTS[name]
            add(name, dtype, [value], np_type)
    return inputs


def generate(grpc_url: str, model: str, requests: list[dict], timeout: float = 300) -> list[Generation]:
    """Send every request (keyword arguments of `generate_inputs`) at once over one stream, so
    the server can batch them, and wait for all the answers."""
    client = grpcclient.InferenceServerClient(grpc_url)
    batched = bool(client.get_model_config(model, as_json=True)["config"].get("max_batch_size"))
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    ids = [uuid.uuid4().hex for _ in requests]
    results = {rid: Generation() for rid in ids}
    chunks: dict[str, dict[int, list[str]]] = {rid: {} for rid in ids}
    try:
        for rid, request in zip(ids, requests):
            client.async_stream_infer(model, generate_inputs(**request, batched=batched), request_id=rid)
        pending = set(ids)
        while pending:
            result, error = answers.get(timeout=timeout)
            if error is not None:
                # Errors carry no request id on the stream; requests are answered in order of
                # failure, which for validation errors is the order they were sent.
                rid = next(r for r in ids if r in pending)
                results[rid].error = str(error)
                pending.discard(rid)
                continue
            response = result.get_response()
            rid, gen = response.id, results[response.id]

            def scalar(name):
                values = result.as_numpy(name)
                return None if values is None else values.reshape(-1)[0]

            # The vLLM model leaves out what a chunk does not change: index for n = 1, logprobs
            # unless asked, finish_reason and prompt_tokens until a choice's last response.
            index = int(scalar("index") or 0)
            chunks[rid].setdefault(index, []).append(scalar("text_output").decode())
            if scalar("prompt_tokens") is not None:
                gen.prompt_tokens = int(scalar("prompt_tokens"))
            if index == 0:
                if scalar("finish_reason") is not None:
                    gen.finish_reason = scalar("finish_reason").decode()
                gen.completion_tokens = int(scalar("completion_tokens"))
                entries = scalar("logprobs")
                gen.logprobs += json.loads(entries) if entries else []
            # The model flags the request's last response final (the generate model's is the
            # one with a finish reason).
            if response.parameters["triton_final_response"].bool_param:
                gen.chunks = chunks[rid][0]
                gen.choices = ["".join(chunks[rid][i]) for i in sorted(chunks[rid])]
                gen.text = gen.choices[0]
                pending.discard(rid)
    finally:
        client.stop_stream()
        client.close()
    return [results[rid] for rid in ids]


def embed(http: str | httpclient.InferenceServerClient, model: str,
          texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings [N, dim] and token counts [N] of `texts`, in one request. `http` is a server
    address or a client to reuse (the benchmark reuses one per thread)."""
    owned = isinstance(http, str)
    conn = httpclient.InferenceServerClient(http) if owned else http
    try:
        tensor = httpclient.InferInput("text", [len(texts), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
        result = conn.infer(model, [tensor])
        return result.as_numpy("embedding"), result.as_numpy("token_count").reshape(-1)
    finally:
        if owned:
            conn.close()
