"""OpenAI-compatible endpoints on kserve's FastAPI app, in front of ``TritonModel``s.

``/v1/completions`` and ``/v1/chat/completions`` (JSON or server-sent events), ``/v1/embeddings``,
``/v1/models`` and ``/v1/models/<id>``. (Why these routes are ours and not
``kserve.protocol.rest.openai``: see ``llmserve.predictors.protocol``.)

Each request: parse and validate the body (400s in OpenAI's error shape), find the model in
kserve's registry (404), take a concurrency slot (429), then call Triton while watching for the
client to disconnect. A disconnect cancels the Triton call; for streams Starlette notices it and
closing our generator cancels the gRPC stream. Streams wait for the model's first chunk before
answering, so a request the model rejects gets a real HTTP error status, not a 200 with an
error event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from kserve.model_repository import ModelRepository
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from .metrics import RequestRecord
from .model import TritonModel
from .protocol import (
    SSE_DONE, APIError, ChatCompletionRequest, ChatFormat, Chunk, CompletionFormat, CompletionRequest,
    EmbeddingRequest, Generation, chat_messages, check_not_empty, embedding_response, engine_parameters, model_card,
    models_response, parse_request, requested_max_tokens, sse_event, to_json,
)

T = TypeVar("T")

# OpenAI's default for /v1/completions; chat requests default to the model's whole token budget.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class OpenAIEndpoints:
    def __init__(self, registry: ModelRepository) -> None:
        self.registry = registry
        self.created = int(time.time())

    def router(self) -> APIRouter:
        router = APIRouter(prefix="/v1", tags=["OpenAI"])
        router.add_api_route("/completions", self.completions, methods=["POST"])
        router.add_api_route("/chat/completions", self.chat_completions, methods=["POST"])
        router.add_api_route("/embeddings", self.embeddings, methods=["POST"])
        router.add_api_route("/models", self.models, methods=["GET"])
        router.add_api_route("/models/{model_id}", self.model, methods=["GET"])
        return router

    def lean_routes(self) -> dict[tuple[str, str], Callable[[Request], Awaitable[Response]]]:
        """The routes of ``router()`` without a path parameter, by (method, path), for
        ``llmserve.predictors.server.LeanV1``."""
        async def models(_: Request) -> Response:
            return await self.models()

        return {("POST", "/v1/completions"): self.completions, ("POST", "/v1/chat/completions"): self.chat_completions,
                ("POST", "/v1/embeddings"): self.embeddings, ("GET", "/v1/models"): models}

    def _model(self, name: str) -> TritonModel:
        model = self.registry.get_model(name)
        if not isinstance(model, TritonModel):
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return model

    async def models(self) -> Response:
        names = [n for n, m in self.registry.get_models().items() if isinstance(m, TritonModel)]
        return _json(models_response(names, self.created))

    async def model(self, model_id: str) -> Response:
        return _json(model_card(self._model(model_id).name, self.created))

    async def completions(self, request: Request) -> Response:
        body = parse_request(CompletionRequest, await request.body())
        check_not_empty(body.prompt, "prompt")
        model = self._model(body.model)
        return await self._generate(request, model, body, {"text_input": body.prompt[0]},
                                    COMPLETIONS_DEFAULT_MAX_TOKENS, CompletionFormat(model.name, body.logprob_count),
                                    "completions")

    async def chat_completions(self, request: Request) -> Response:
        body = parse_request(ChatCompletionRequest, await request.body())
        messages = chat_messages(body)
        model = self._model(body.model)
        return await self._generate(request, model, body, {"messages": to_json(messages)},
                                    None, ChatFormat(model.name, body.logprob_count), "chat.completions")

    async def embeddings(self, request: Request) -> Response:
        body = parse_request(EmbeddingRequest, await request.body())
        check_not_empty(body.input, "input")
        model = self._model(body.model)
        record = RequestRecord(model.name, "embeddings")
        try:
            with model.admission.acquire():
                result = await _unless_disconnected(request, model.embed(body.input))
        except BaseException as exc:
            record.fail(exc)
            raise
        record.finish(200, result.usage)
        return _json(embedding_response(model.name, result.vectors, result.usage, body.encoding_format))

    async def _generate(self, request: Request, model: TritonModel, body: CompletionRequest | ChatCompletionRequest,
                        prompt: dict[str, Any], default_max_tokens: int | None, fmt: CompletionFormat,
                        endpoint: str) -> Response:
        """Generate for a validated request; ``prompt`` is the model input holding the prompt, and
        ``default_max_tokens`` the budget when the request names none (None: the whole budget)."""
        record = RequestRecord(model.name, endpoint)
        try:
            extras = engine_parameters(body)
            budget = await model.token_budget()
            max_tokens = requested_max_tokens(body, default_max_tokens or budget, budget)
            fields = {**prompt, "max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                      "seed": body.seed, "stop": body.stop}
            slot = model.admission.acquire()
        except BaseException as exc:
            record.fail(exc)
            raise
        if not body.stream:
            try:
                with slot:
                    result = await _unless_disconnected(request, model.generate(fields, extras, fmt.id))
            except BaseException as exc:
                record.fail(exc)
                raise
            record.finish(200, result.usage)
            return _json(fmt.response(result.choices(), result.usage))

        chunks = model.stream(fields, extras, fmt.id)
        try:
            first = await _unless_disconnected(request, anext(chunks))
        except BaseException as exc:
            slot.release()
            await chunks.aclose()
            record.fail(exc)
            raise
        record.first_token()

        async def close() -> None:
            """Idempotent end of the stream: also run as the response's background task, because
            a client that leaves before the body starts means ``_events`` never runs."""
            record.finish(499)  # a no-op once the stream recorded its own outcome
            slot.release()
            await chunks.aclose()

        return StreamingResponse(_events(first, chunks, fmt, body.n, body.include_usage, record, close),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(close))


async def _events(first: Chunk, chunks: AsyncIterator[Chunk], fmt: CompletionFormat, n: int, include_usage: bool,
                  record: RequestRecord, close: Callable[[], Awaitable[None]]) -> AsyncIterator[bytes]:
    """The SSE body of a stream whose first chunk has arrived.

    Choices interleave (``index``); the stream ends when all ``n`` have finished (or the model
    ends it). When the client disconnects, Starlette cancels this generator at its current
    ``await``: the ``finally`` closes ``chunks``, which cancels the gRPC stream and so the request
    in Triton. An error after the first chunk can only be reported in the stream, as an ``error``
    event (the official client raises it), followed by no ``[DONE]``.
    """
    generation = Generation(n)
    try:
        for opening in fmt.first_chunks(n):
            yield sse_event(opening)
        chunk: Chunk | None = first
        while chunk is not None:
            generation.add(chunk)
            if chunk.text or chunk.logprobs:
                yield sse_event(fmt.chunk(chunk.index, chunk.text, chunk.logprobs))
            if chunk.finish_reason is not None:
                yield sse_event(fmt.finish_chunk(chunk.index, chunk.finish_reason))
                if generation.done:
                    break
            chunk = await anext(chunks, None)
        if include_usage:
            yield sse_event(fmt.usage_chunk(generation.usage))
        yield SSE_DONE
        record.finish(200, generation.usage)
    except APIError as exc:
        record.fail(exc)
        yield sse_event(exc.openai_body())
    except Exception as exc:
        record.fail(exc)
        raise
    finally:
        # Still unrecorded here: the client went away (cancellation or generator close).
        record.finish(499, generation.usage)
        await close()


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first; then cancel it and raise 499.

    Cancelling ``work`` cancels the gRPC call it waits on, which is how a client that gives up
    before its answer is ready stops the work in Triton. The body has been read already, so the
    next ASGI message can only be ``http.disconnect``. ``work`` runs in the request's own task;
    one watcher task cancels that task when the client leaves (cheaper than a second task and
    ``asyncio.wait``, on every request).
    """
    handler = asyncio.current_task()
    assert handler is not None
    left = False

    async def watch() -> None:
        nonlocal left
        await _disconnected(request)
        left = True
        handler.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not left:
            raise  # cancelled from outside (server shutdown): not ours to turn into a 499
        handler.uncancel()
        raise APIError(499, "the client closed the connection", code="client_closed_request") from None
    finally:
        watcher.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _json(body: Any) -> Response:
    return Response(to_json(body), media_type="application/json")
