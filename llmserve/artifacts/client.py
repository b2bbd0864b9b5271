"""Minimal `tritonclient` calls for the shipped models: used by the tests, the benchmark and as
the reference for the tensor interface (see docs/artifacts.md).

The generate model is decoupled, so it is called over a gRPC stream (a stream can carry many
concurrent requests, told apart by request id); the embedding model over plain HTTP or gRPC.
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
    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    chunks: list[str] = field(default_factory=list)
    error: str | None = None


def generate_inputs(prompt: str | None = None, messages: list[dict] | None = None,
                    stop: list[str] | None = None, **params) -> list[grpcclient.InferInput]:
    """Input tensors of one generate request; `params` are max_tokens, temperature, top_p,
    seed and stream. Unset inputs are left out and take the model's defaults."""
    inputs = []

    def add(name, dtype, array):
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)

    if prompt is not None:
        add("text_input", "BYTES", np.array([[prompt.encode()]], dtype=object))
    if messages is not None:
        add("messages", "BYTES", np.array([[json.dumps(messages).encode()]], dtype=object))
    if stop:
        add("stop", "BYTES", np.array([[s.encode() for s in stop]], dtype=object))
    for name, value in params.items():
        if value is not None:
            dtype, np_type = _GENERATE_INPUTS[name]
            add(name, dtype, np.array([[value]], dtype=np_type))
    return inputs


def generate(grpc_url: str, model: str, requests: list[dict], timeout: float = 300) -> list[Generation]:
    """Send every request (keyword arguments of `generate_inputs`) at once over one stream, so
    the server can batch them, and wait for all the answers."""
    client = grpcclient.InferenceServerClient(grpc_url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    ids = [uuid.uuid4().hex for _ in requests]
    results = {rid: Generation() for rid in ids}
    try:
        for rid, request in zip(ids, requests):
            client.async_stream_infer(model, generate_inputs(**request), request_id=rid)
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
            rid = result.get_response().id
            gen = results[rid]
            chunk = result.as_numpy("text_output")[0][0].decode()
            gen.chunks.append(chunk)
            gen.finish_reason = result.as_numpy("finish_reason")[0][0].decode()
            gen.prompt_tokens = int(result.as_numpy("prompt_tokens")[0][0])
            gen.completion_tokens = int(result.as_numpy("completion_tokens")[0][0])
            if gen.finish_reason:
                gen.text = "".join(gen.chunks)
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
