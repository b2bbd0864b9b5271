"""The predictor's one connection to its Triton sidecar: gRPC through ``tritonclient.grpc.aio``.

Three rules keep the predictor honest about Triton's state:

- Every call has a deadline (``request_timeout`` for inference, ``health_timeout`` for readiness),
  so a wedged Triton yields an error, never a hung request.
- The channel retries connections at most a second apart (gRPC's default backoff grows to two
  minutes), so when the Triton container restarts, the predictor is back as soon as Triton is.
- Failures become ``APIError``s with the HTTP status a client can act on: Triton unreachable or
  the model not ready -> 503, a request Triton or the model rejects -> 400, a deadline -> 504.

Decoupled models (the generate model streams one response per text chunk) only accept the
bidirectional ``ModelStreamInfer`` RPC, so every generation opens one stream carrying one request;
cancelling that stream is how a client disconnect reaches the model (``request.is_cancelled()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import orjson
from google.protobuf import descriptor_pool
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from .protocol import APIError, Chunk, Usage


def _import_tritonclient_grpc() -> tuple[Any, Any]:
    """Import ``tritonclient.grpc`` with its protobuf descriptors in a pool of their own.

    kserve (``grpc_predict_v2.proto``) and tritonclient (``grpc_service.proto``) both generate
    the V2 messages in the protobuf package ``inference``; whichever is imported second fails
    with "duplicate symbol 'inference.ServerLiveRequest'" (kserve/kserve#3099,
    triton-inference-server/client#730). The generated modules register into
    ``descriptor_pool.Default()`` at import time, so for the duration of this import that default
    is a private pool; the predictor passes tensors between the two as numpy arrays. If
    tritonclient was imported earlier
    (a process without kserve, such as the test runner), the existing modules are reused.
    """
    default = descriptor_pool.Default
    private = descriptor_pool.DescriptorPool()
    descriptor_pool.Default = lambda: private
    try:
        import tritonclient.grpc
        import tritonclient.grpc._utils
        import tritonclient.grpc.aio
    finally:
        descriptor_pool.Default = default
    return tritonclient.grpc, tritonclient.grpc.aio


grpcclient, grpcaio = _import_tritonclient_grpc()
# tritonclient's own builder of a ModelInferRequest from InferInputs (what its clients send).
_inference_request = grpcclient._utils._get_inference_request

# tritonclient's own default message limit; embeddings of a large batch exceed gRPC's 4 MiB.
_MAX_MESSAGE = 2**31 - 1
# The parameter Triton sets on the last response of a streamed request.
FINAL_RESPONSE = "triton_final_response"
# How long a stream whose final response has arrived may take to end before it is cancelled.
CALL_END_GRACE = 5.0
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # V2 name: BYTES, INT32, FP32, ...
    dims: tuple[int, ...]  # without the batch dimension; -1 is variable
    optional: bool = False

    def v2_metadata(self, batching: bool) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": ([-1] if batching else []) + list(self.dims)}


@dataclass(frozen=True)
class ModelInterface:
    """What Triton says a loaded model takes and returns, read once from its model config."""

    name: str
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]
    max_batch_size: int
    decoupled: bool
    parameters: Mapping[str, str]  # the config's string parameters: model facts such as context_length

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelInterface:
        """Build from ``get_model_config(as_json=True)["config"]`` (protobuf JSON: int64 dims are
        strings, defaults are omitted)."""

        def specs(key: str) -> dict[str, TensorSpec]:
            return {
                t["name"]: TensorSpec(
                    name=t["name"],
                    datatype=_v2_datatype(t["data_type"]),
                    dims=tuple(int(d) for d in t.get("dims", [])),
                    optional=bool(t.get("optional", False)),
                )
                for t in config.get(key, [])
            }

        return cls(
            name=config["name"],
            inputs=specs("input"),
            outputs=specs("output"),
            max_batch_size=int(config.get("max_batch_size", 0)),
            decoupled=bool(config.get("model_transaction_policy", {}).get("decoupled", False)),
            parameters={k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()},
        )

    @property
    def context_length(self) -> int | None:
        """The context window the model declares (``llmserve build`` writes it), if any."""
        value = self.parameters.get("context_length", "")
        return int(value) if value.isdigit() else None

    @property
    def task(self) -> str | None:
        """Which OpenAI API the model's tensors fit (``model_repo/README.md`` defines them):
        ``generate`` (text_input -> text_output), ``embedding`` (text -> embedding), or None."""
        if "text_input" in self.inputs and "text_output" in self.outputs:
            return "generate"
        if "text" in self.inputs and "embedding" in self.outputs:
            return "embedding"
        return None

    def check_engine_parameters(self, engine_parameters: Mapping[str, Any]) -> None:
        """Refuse sampling fields the model has no input for (the ONNX ``generate`` model does
        not declare ``sampling_parameters``): a 400 naming them, before Triton is called."""
        if engine_parameters and "sampling_parameters" not in self.inputs:
            names = ", ".join(engine_parameters)
            raise APIError(400, f"unsupported parameter: {names} (model {self.name!r} runs on an engine without "
                                "them; the vLLM engine has them)",
                           param=next(iter(engine_parameters)), code="unsupported_parameter")

    def tensor(self, name: str, rows: Sequence[Sequence[Any]]) -> grpcclient.InferInput:
        """An input tensor holding ``rows`` (one sequence of values per batch row), shaped and
        typed as the model config declares. Raises ``APIError(400)`` for an input the model does
        not have, so a request using a feature the model lacks gets a clear answer."""
        spec = self.inputs.get(name)
        if spec is None:
            raise APIError(400, f"model {self.name!r} does not accept {name!r}", param=name, code="unsupported_parameter")
        if not self.max_batch_size and len(rows) != 1:
            raise APIError(400, f"model {self.name!r} does not batch; send one {name!r} at a time", param=name)
        width = len(rows[0])
        dims = [width if d == -1 else d for d in spec.dims]
        shape = ([len(rows)] if self.max_batch_size else []) + dims
        if spec.datatype == "BYTES":
            data = np.array([[_bytes(v) for v in row] for row in rows], dtype=np.object_)
        else:
            data = np.array(rows, dtype=triton_to_np_dtype(spec.datatype))
        tensor = grpcclient.InferInput(name, shape, spec.datatype)
        tensor.set_data_from_numpy(data.reshape(shape))
        return tensor


def _request(model: str, inputs: Sequence[grpcclient.InferInput], outputs: Sequence[str] | None,
             request_id: str) -> Any:
    requested = [grpcclient.InferRequestedOutput(name) for name in outputs] if outputs else None
    return _inference_request(model_name=model, inputs=inputs, model_version="", request_id=request_id,
                              outputs=requested, sequence_id=0, sequence_start=False, sequence_end=False,
                              priority=0, timeout=None, parameters=None)


_UNSUPPORTED = re.compile(r"unsupported parameter:\s*'?([A-Za-z_]+)")


def in_band_error(message: str) -> APIError:
    """A stream response's error. It carries only a message (the stream loses the status code),
    so the generate models' wording (model_repo/README.md) decides: "generation failed: ..." is
    the engine failing (500); "unsupported parameter: <name> ..." a field the engine cannot honour
    (400 naming it); anything else is what Triton or the model said about the request (400)."""
    if "generation failed:" in message:
        return APIError(500, message, code="generation_failed")
    unsupported = _UNSUPPORTED.search(message)
    if unsupported:
        return APIError(400, message, param=unsupported.group(1), code="unsupported_parameter")
    return APIError(400, message)


def _v2_datatype(config_type: str) -> str:
    """Model-config ``TYPE_FP32`` -> V2 ``FP32``; ``TYPE_STRING`` is V2's ``BYTES``."""
    name = config_type.removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def _bytes(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else value


def generate_chunk(result: grpcclient.InferResult) -> Chunk:
    """A generate model's response (model_repo/README.md) as a ``Chunk``."""

    def optional(name: str) -> Any:
        """An output a response may leave out: the vLLM model sends ``index`` only for n > 1,
        ``logprobs`` only when asked, ``finish_reason`` and ``prompt_tokens`` only in a choice's
        last response (the ONNX model sends every output in every response)."""
        array = result.as_numpy(name)
        return None if array is None or not array.size else array.reshape(-1)[0]

    finish, prompt_tokens = optional("finish_reason"), optional("prompt_tokens")
    index, logprobs = optional("index"), optional("logprobs")
    return Chunk(
        text=optional("text_output").decode("utf-8", "replace"),
        finish_reason=(finish.decode() or None) if finish is not None else None,
        usage=Usage(prompt_tokens=None if prompt_tokens is None else int(prompt_tokens),
                    completion_tokens=int(optional("completion_tokens"))),
        index=0 if index is None else int(index),
        logprobs=orjson.loads(logprobs) if logprobs else None,
    )


class Triton:
    """A lazily created ``tritonclient.grpc.aio`` client for one Triton address.

    The client is created on first use because grpc.aio channels belong to the event loop that
    creates them, and kserve's ``ModelServer`` starts its loop after the predictor is assembled.
    """

    def __init__(
        self,
        url: str,
        *,
        request_timeout: float,
        health_timeout: float = 2.0,
        ready_ttl: float = 1.0,
    ) -> None:
        self.url = url
        self.request_timeout = request_timeout
        self.health_timeout = health_timeout
        self.ready_ttl = ready_ttl
        self._client: grpcaio.InferenceServerClient | None = None
        self._interfaces: dict[str, ModelInterface] = {}
        self._ready_until: dict[str, float] = {}

    @property
    def client(self) -> grpcaio.InferenceServerClient:
        if self._client is None:
            self._client = grpcaio.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
        return self._client

    @property
    def _stub(self) -> Any:
        """The generated gRPC stub on the client's channel: inference calls go to it directly,
        skipping tritonclient's per-call wrapping (argument checks, a request iterator task for
        streams, a response wrapper per message)."""
        return self.client._client_stub

    async def ready(self, model: str, *, fresh: bool = False) -> bool:
        """Whether Triton has ``model`` loaded and ready. Never raises.

        A positive answer is reused for ``ready_ttl`` seconds (``fresh`` skips that) because
        kserve asks on every V2 request; a negative one is not cached, so the predictor is ready
        the moment Triton is. Any inference failure that says Triton is gone forgets the answer.
        """
        if not fresh and self._ready_until.get(model, 0.0) > time.monotonic():
            return True
        try:
            ready = await self.client.is_model_ready(model, client_timeout=self.health_timeout)
        except (InferenceServerException, grpc.RpcError):
            ready = False
        if ready:
            self._ready_until[model] = time.monotonic() + self.ready_ttl
        else:
            self._ready_until.pop(model, None)
        return ready

    async def interface(self, model: str) -> ModelInterface:
        """The model's tensor interface, read from Triton once (a pod serves one immutable
        version, so it cannot change while the predictor runs)."""
        found = self._interfaces.get(model)
        if found is None:
            try:
                config = await self.client.get_model_config(model, as_json=True, client_timeout=self.health_timeout)
            except (InferenceServerException, grpc.RpcError) as exc:
                raise self._error(exc, model, self.health_timeout) from None
            found = self._interfaces[model] = ModelInterface.from_config(config["config"])
        return found

    async def infer(
        self,
        model: str,
        inputs: Sequence[grpcclient.InferInput],
        *,
        outputs: Sequence[str] | None = None,
        request_id: str = "",
    ) -> grpcclient.InferResult:
        """One request, one response. Decoupled models are asked over a stream; one that answers
        with more than one response (a stream request) is refused."""
        interface = await self.interface(model)
        if interface.decoupled:
            results = [r async for r in self.stream(model, inputs, outputs=outputs, request_id=request_id)]
            if len(results) != 1:
                raise APIError(400, f"model {model!r} sent {len(results)} responses to one request; "
                                    "ask for a stream instead")
            return results[0]
        try:
            response = await self._stub.ModelInfer(_request(model, inputs, outputs, request_id),
                                                   timeout=self.request_timeout)
        except grpc.RpcError as exc:
            raise self._error(exc, model, self.request_timeout) from None
        return grpcclient.InferResult(response)

    async def stream(
        self,
        model: str,
        inputs: Sequence[grpcclient.InferInput],
        *,
        outputs: Sequence[str] | None = None,
        request_id: str = "",
    ) -> AsyncIterator[grpcclient.InferResult]:
        """The responses of a decoupled model to one request, as they arrive.

        Closing the iterator before the final response (the HTTP client went away) cancels the
        gRPC call, which Triton turns into a cancelled request the model sees and stops generating
        for. Closing it after the final response (the caller has all it needs) lets Triton end the
        call itself instead: a cancel racing Triton's own end of the call left the model
        referenced in Triton 2.51, which then waited its whole exit timeout (30 s) to unload on
        SIGTERM, as every pod termination would. The one request is written on the call directly
        (no request iterator, which grpc.aio drains in a task of its own), then the stream is
        half-closed so Triton ends it after the last response.
        """
        call = self._stub.ModelStreamInfer(timeout=self.request_timeout)
        final = False
        try:
            await call.write(_request(model, inputs, outputs, request_id))
            await call.done_writing()
            async for response in call:
                final = response.infer_response.parameters[FINAL_RESPONSE].bool_param
                if response.error_message:
                    raise in_band_error(response.error_message)
                yield grpcclient.InferResult(response.infer_response)
        except grpc.RpcError as exc:
            raise self._error(exc, model, self.request_timeout) from None
        finally:
            if final:  # Triton ends the call right after its final response
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(call.code(), CALL_END_GRACE)
            call.cancel()  # a no-op once the call has ended

    def _error(self, exc: InferenceServerException | grpc.RpcError, model: str, deadline: float) -> APIError:
        if isinstance(exc, grpc.RpcError):
            status, message = str(exc.code()), exc.details() or str(exc)
        else:
            status, message = exc.status() or "", exc.message() or str(exc)
        if status.endswith("UNAVAILABLE") or status.endswith("NOT_FOUND"):
            self._ready_until.pop(model, None)
            return APIError(503, f"Triton at {self.url} cannot serve model {model!r} now: {message}",
                            code="model_not_ready", headers={"Retry-After": "1"})
        if status.endswith("DEADLINE_EXCEEDED"):
            return APIError(504, f"Triton at {self.url} did not answer within {deadline:g}s", code="timeout")
        if status.endswith("INVALID_ARGUMENT"):
            return APIError(400, message)
        if status.endswith("CANCELLED"):
            return APIError(499, "the request was cancelled", code="cancelled")
        return APIError(502, f"Triton failed the request ({status or 'no status'}): {message}", code="upstream_error")

