"""The kserve model that stands for one Triton model: V2 inference, readiness, and the text
generation and embedding calls the OpenAI endpoints make.

kserve's ``ModelServer`` owns the model registry, the V2 REST endpoints, ``/metrics`` and the
process lifecycle; ``TritonModel`` plugs Triton in behind them. Its ``healthy()`` is Triton's
readiness of the model, so kserve's ``/v2/models/<name>/ready`` and the V2 inference path follow
Triton, and ``TritonDataPlane`` makes the server-wide ``/v2/health/ready`` (the pod's readiness
probe) do the same.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from kserve import InferOutput, InferRequest, InferResponse, Model
from kserve.protocol.dataplane import DataPlane

from .metrics import Admission, RequestRecord
from .protocol import APIError, Chunk, Generation, Usage
from .triton import ModelInterface, Triton, generate_chunk, grpcclient


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # [n, dim] float32
    usage: Usage


class TritonModel(Model):
    """A model served by Triton, registered with kserve under the same name."""

    def __init__(self, name: str, triton: Triton, admission: Admission, max_tokens: int) -> None:
        super().__init__(name)
        self.triton = triton
        self.admission = admission
        self.max_tokens = max_tokens
        # Registered and callable from the start; whether it can answer is Triton's to say
        # (healthy()). kserve only registers models that are ready when the server starts.
        self.ready = True

    async def healthy(self) -> bool:
        return await self.triton.ready(self.name)

    async def interface(self) -> ModelInterface:
        return await self.triton.interface(self.name)

    async def token_budget(self) -> int:
        """The most completion tokens a request may ask for: ``--max-tokens``, and less than the
        model's context window when its config declares one (a prompt takes at least a token)."""
        context_length = (await self.interface()).context_length
        return min(self.max_tokens, context_length - 1) if context_length else self.max_tokens

    async def get_input_types(self) -> list[dict[str, Any]]:
        interface = await self.interface()
        return [t.v2_metadata(bool(interface.max_batch_size)) for t in interface.inputs.values()]

    async def get_output_types(self) -> list[dict[str, Any]]:
        interface = await self.interface()
        return [t.v2_metadata(bool(interface.max_batch_size)) for t in interface.outputs.values()]

    async def predict(self, payload: Any, headers: Mapping[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        """V2 inference: the decoded request goes to Triton tensor for tensor."""
        if not isinstance(payload, InferRequest):
            raise APIError(400, "this predictor serves the V2 protocol: POST /v2/models/<model>/infer")
        record = RequestRecord(self.name, "v2.infer")
        try:
            with self.admission.acquire():
                inputs = []
                for tensor in payload.inputs:
                    infer_input = grpcclient.InferInput(tensor.name, list(tensor.shape), tensor.datatype)
                    infer_input.set_data_from_numpy(tensor.as_numpy())
                    inputs.append(infer_input)
                requested = [o.name for o in payload.request_outputs or []]
                result = await self.triton.infer(self.name, inputs, outputs=requested, request_id=payload.id or "")
        except BaseException as exc:
            record.fail(exc)
            raise
        record.finish(200)
        response = result.get_response()
        outputs = [InferOutput(o.name, list(o.shape), o.datatype, data=result.as_numpy(o.name))
                   for o in response.outputs]
        # Honour the client's binary-output request (tritonclient.http makes it by default): raw
        # tensor bytes skip FastAPI's per-element JSON encoding of a large output.
        return InferResponse(response_id=response.id, model_name=self.name, model_version=response.model_version,
                             infer_outputs=outputs, use_binary_outputs=payload.use_binary_outputs,
                             requested_outputs=payload.request_outputs)

    async def _generate_inputs(self, fields: Mapping[str, Any], engine_parameters: Mapping[str, Any]) -> list[Any]:
        interface = await self.interface()
        if interface.task != "generate":
            raise APIError(400, f"model {self.name!r} is not a text generation model", param="model",
                           code="model_not_supported")
        inputs = [
            interface.tensor(name, [value if isinstance(value, list) else [value]])
            for name, value in fields.items()
            if value is not None and value != []
        ]
        if engine_parameters:
            interface.check_engine_parameters(engine_parameters)
            inputs.append(interface.tensor("sampling_parameters", [[orjson.dumps(engine_parameters)]]))
        return inputs

    async def generate(self, fields: Mapping[str, Any], engine_parameters: Mapping[str, Any],
                       request_id: str) -> Generation:
        """One complete generation of ``n`` choices. ``fields`` are the generate model's own
        inputs (``None`` means the model's default and is not sent); ``engine_parameters`` the
        rest (``protocol.engine_parameters``), sent only when not empty."""
        inputs = await self._generate_inputs({**fields, "stream": False}, engine_parameters)
        generation = Generation(engine_parameters.get("n", 1))
        async for result in self.triton.stream(self.name, inputs, request_id=request_id):
            generation.add(generate_chunk(result))
        return generation

    async def stream(self, fields: Mapping[str, Any], engine_parameters: Mapping[str, Any],
                     request_id: str) -> AsyncIterator[Chunk]:
        """The generation as text chunks, as the model produces them (choices interleave)."""
        inputs = await self._generate_inputs({**fields, "stream": True}, engine_parameters)
        async for result in self.triton.stream(self.name, inputs, request_id=request_id):
            yield generate_chunk(result)

    async def embed(self, texts: list[str]) -> Embeddings:
        """Embeddings of ``texts``, one batch row each, in one Triton request."""
        interface = await self.interface()
        if interface.task != "embedding":
            raise APIError(400, f"model {self.name!r} is not an embedding model", param="model",
                           code="model_not_supported")
        result = await self.triton.infer(self.name, [interface.tensor("text", [[t] for t in texts])],
                                         outputs=["embedding", "token_count"])
        vectors = result.as_numpy("embedding").reshape(len(texts), -1)
        return Embeddings(vectors=vectors, usage=Usage(prompt_tokens=int(result.as_numpy("token_count").sum())))


class TritonDataPlane(DataPlane):
    """kserve's data plane with a server readiness that is Triton's.

    kserve's own ``ready()`` is always true for a predictor; ours is true only while Triton has
    every registered model ready, asked fresh on each probe.
    """

    async def ready(self) -> bool:
        models = [m for m in self.model_registry.get_models().values() if isinstance(m, TritonModel)]
        for model in models:
            if not await model.triton.ready(model.name, fresh=True):
                return False
        return bool(models)
