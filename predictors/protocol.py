"""The OpenAI wire protocol the predictor speaks: request models, error shape, response bodies.

Pure code (pydantic and orjson, no I/O), so request validation and response shapes are unit
tested without a server.

Why not kserve's own OpenAI types: every kserve release whose protobuf pin can share a venv with
``tritonclient[grpc]`` and ``onnx`` (kserve >= 0.17) defines ``kserve.protocol.rest.openai`` by
importing vLLM's protocol modules, and vLLM pins its own torch build plus CUDA kernels; the last
vLLM-free release (0.14) pins ``protobuf<5``. So the predictor keeps kserve's ``ModelServer``,
model registry, V2 endpoints and metrics, and defines the OpenAI request/response shapes here,
following OpenAI's API reference for the subset Triton models can serve.

Requests are validated strictly: JSON types must match (``"16"`` is not an integer), and unknown
fields are refused, as OpenAI does, instead of being silently ignored. Fields are normalized on the
way in (a single ``prompt``/``stop``/``input`` string becomes a list; message content parts become
one string) so the rest of the predictor handles one shape.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

# ---------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """A failure with an HTTP status, rendered as OpenAI's error object on ``/v1`` and as the V2
    protocol's ``{"error": message}`` on ``/v2`` (see ``llmserve.predictors.server``)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _error_type(status)
        self.code = code
        self.param = param
        self.headers = headers or {}

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def v2_body(self) -> dict[str, Any]:
        return {"error": self.message}


def _error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


# ---------------------------------------------------------------------------------------------
# Requests


def _as_list(value: Any) -> Any:
    """``"x"`` -> ``["x"]``; a list is left for the list validator to check its items."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError("expected a string or an array of strings")
    return value


def _message_text(content: Any) -> Any:
    """Chat content may be a string or a list of ``{"type": "text", "text": ...}`` parts; the
    model's chat template takes a string, so text parts are concatenated in order. Other part
    types (images, audio) cannot be served by a text model and are refused."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"only text content parts are supported, not {kind!r}")
        texts.append(part["text"])
    return "".join(texts)


StringList = Annotated[list[str], BeforeValidator(_as_list)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class JSONSchemaFormat(_Strict):
    """``response_format.json_schema``: OpenAI's named JSON Schema for structured output."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("'json_schema' is required with type 'json_schema' and allowed only with it")
        return self


class _Generation(_Strict):
    """Sampling fields shared by completions and chat completions. ``None`` means "the model's
    default" (greedy decoding for the shipped models unless a temperature is given).

    ``temperature``, ``top_p``, ``seed``, ``stop`` and ``max_tokens`` are tensors of their own
    in every generate model; the rest (``engine_parameters``) travel as one JSON tensor that only
    the vLLM model declares (docs/engines.md). ``top_k`` is an extension (vLLM's own server takes
    it too); ``response_format`` is accepted on completions as well, like vLLM's server.
    """

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: StringList | None = Field(default=None, max_length=4)
    n: int = Field(default=1, ge=1, le=128)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def logprob_count(self) -> int | None:
        """Alternatives per token to report (0: only the chosen token's), None: no logprobs."""
        return None


class CompletionRequest(_Generation):
    # One prompt per request: a list is accepted (clients send ["..."]) but must hold one string.
    prompt: Annotated[StringList, Field(min_length=1, max_length=1)]
    logprobs: int | None = Field(default=None, ge=0, le=5)

    @property
    def logprob_count(self) -> int | None:
        return self.logprobs


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | None, BeforeValidator(_message_text)] = None
    name: str | None = None


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    # OpenAI's newer name for max_tokens; both are accepted, at most one may be given.
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @property
    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class EmbeddingRequest(_Strict):
    model: str
    input: Annotated[StringList, Field(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


Request = TypeVar("Request", bound=BaseModel)


def parse_request(model: type[Request], body: bytes) -> Request:
    """Validate a JSON body, turning the first problem into a 400 in OpenAI's error shape."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _validation_error(exc: ValidationError) -> APIError:
    error = exc.errors(include_url=False)[0]
    kind, message = error["type"], error["msg"]
    if kind == "json_invalid":
        return APIError(400, f"We could not parse the JSON body of your request: {message}", code="invalid_json")
    if kind == "model_type":  # the body is valid JSON but not an object
        return APIError(400, "The request body must be a JSON object", code="invalid_json")
    param = _param(error["loc"])
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'", param=param, code="missing_required_parameter")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unsupported_parameter")
    message = message.removeprefix("Value error, ")
    return APIError(400, f"Invalid value for '{param}': {message}", param=param, code="invalid_value")


def _param(loc: Sequence[int | str]) -> str:
    """``("messages", 0, "content")`` -> ``"messages[0].content"``, OpenAI's notation."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def check_not_empty(values: Sequence[str], param: str) -> None:
    """An empty prompt or input has nothing to condition on; refuse it before it reaches Triton."""
    for index, value in enumerate(values):
        if not value:
            where = param if len(values) == 1 else f"{param}[{index}]"
            raise APIError(400, f"'{where}' must not be empty", param=where, code="invalid_value")


def chat_messages(request: ChatCompletionRequest) -> list[dict[str, str]]:
    """The messages as the model's chat template expects them: ``{"role", "content"}`` strings.

    ``developer`` is OpenAI's new name for ``system``; open chat templates only know ``system``.
    """
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.content or ""}
        for m in request.messages
    ]
    if not any(m["content"] for m in messages):
        raise APIError(400, "'messages' must contain some text", param="messages", code="invalid_value")
    return messages


def requested_max_tokens(request: CompletionRequest | ChatCompletionRequest, default: int, limit: int) -> int:
    """The completion budget: the request's, else ``default``; above ``limit`` is refused.

    ``limit`` is the predictor's ``--max-tokens`` (the model's context window unless set lower):
    a request cannot ask for more new tokens than the model can ever hold.
    """
    asked = request.max_tokens
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        if asked is not None:
            raise APIError(400, "Give either 'max_tokens' or 'max_completion_tokens', not both",
                           param="max_completion_tokens", code="invalid_value")
        asked = request.max_completion_tokens
    if asked is None:
        return min(default, limit)
    if asked > limit:
        param = "max_tokens" if request.max_tokens is not None else "max_completion_tokens"
        raise APIError(400, f"{param} is too large: {asked}. This model supports at most {limit} completion tokens.",
                       param=param, code="context_length_exceeded")
    return asked


def engine_parameters(request: CompletionRequest | ChatCompletionRequest) -> dict[str, Any]:
    """The contract's ``sampling_parameters`` JSON object: the fields without a tensor of their
    own, only those that change the result (``n: 1``, zero penalties, ``top_k`` -1/0 and
    ``response_format: text`` are every engine's default, so a model without the tensor serves
    them). Empty for a plain request, which then carries no extra tensor."""
    extras: dict[str, Any] = {}
    if request.top_k is not None and request.top_k > 0:
        extras["top_k"] = request.top_k
    if request.n != 1:
        extras["n"] = request.n
    if isinstance(request, ChatCompletionRequest) and request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "'top_logprobs' requires 'logprobs' to be true", param="top_logprobs",
                       code="invalid_value")
    if request.logprob_count is not None:
        extras["logprobs"] = request.logprob_count
    if request.presence_penalty:
        extras["presence_penalty"] = request.presence_penalty
    if request.frequency_penalty:
        extras["frequency_penalty"] = request.frequency_penalty
    if request.response_format is not None and request.response_format.type != "text":
        extras["response_format"] = request.response_format.model_dump(by_alias=True, exclude_none=True)
    return extras


# ---------------------------------------------------------------------------------------------
# Responses


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0

    def body(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass(frozen=True)
class Chunk:
    """One response of a generate model (model_repo/README.md): the whole text of choice
    ``index``, or its next piece when streaming, with that choice's token counts so far (the
    prompt's only in a choice's last response: ``usage.prompt_tokens`` is None before) and the
    log probabilities of this piece's tokens (``[{"token", "logprob", "top_logprobs"}]``)."""

    text: str
    finish_reason: str | None  # None until the choice's last response
    usage: Usage
    index: int = 0
    logprobs: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    finish_reason: str
    logprobs: list[dict[str, Any]] | None


class Generation:
    """The ``n`` choices of one generation, assembled from the model's responses in arrival order
    (choices interleave; the pieces of one choice concatenate)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._texts: dict[int, list[str]] = {}
        self._logprobs: dict[int, list[dict[str, Any]]] = {}
        self._finished: dict[int, str] = {}
        self._completion_tokens: dict[int, int] = {}
        self._prompt_tokens = 0

    def add(self, chunk: Chunk) -> None:
        self._texts.setdefault(chunk.index, []).append(chunk.text)
        if chunk.logprobs:
            self._logprobs.setdefault(chunk.index, []).extend(chunk.logprobs)
        if chunk.finish_reason is not None:
            self._finished[chunk.index] = chunk.finish_reason
        self._completion_tokens[chunk.index] = chunk.usage.completion_tokens
        if chunk.usage.prompt_tokens is not None:  # a choice's last response carries it
            self._prompt_tokens = chunk.usage.prompt_tokens

    @property
    def done(self) -> bool:
        return len(self._finished) >= self.n

    @property
    def usage(self) -> Usage:
        """Prompt tokens once, completion tokens summed over the choices (OpenAI's counting)."""
        return Usage(self._prompt_tokens, sum(self._completion_tokens.values()))

    def choices(self) -> list[Choice]:
        return [Choice(index, "".join(self._texts.get(index, ())), self._finished.get(index, "stop"),
                       self._logprobs.get(index, []))
                for index in range(self.n)]


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", "replace"))


class CompletionFormat:
    """Bodies of ``/v1/completions``: one ``text_completion`` object, or its stream of chunks.

    ``logprobs`` is the request's (None: not asked, and every ``logprobs`` field is null); the
    legacy shape's ``text_offset`` counts characters of each choice's text, across chunks.
    """

    object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, model: str, logprobs: int | None = None) -> None:
        self.model = model
        self.logprobs = logprobs
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._offsets: dict[int, int] = {}

    def _body(self, choices: list[dict[str, Any]], usage: Usage | None, object: str | None = None) -> dict[str, Any]:
        body = {"id": self.id, "object": object or self.object, "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage.body()
        return body

    def _logprobs(self, index: int, entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        entries = entries or []
        offsets, at = [], self._offsets.get(index, 0)
        for entry in entries:
            offsets.append(at)
            at += len(entry["token"])
        self._offsets[index] = at
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs") or ()} for e in entries],
                "text_offset": offsets}

    def response(self, choices: list[Choice], usage: Usage) -> dict[str, Any]:
        return self._body([{"index": c.index, "text": c.text, "logprobs": self._logprobs(c.index, c.logprobs),
                            "finish_reason": c.finish_reason} for c in choices], usage)

    def first_chunks(self, n: int) -> list[dict[str, Any]]:
        return []

    def chunk(self, index: int, text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return self._body([{"index": index, "text": text, "logprobs": self._logprobs(index, logprobs),
                            "finish_reason": None}], None)

    def finish_chunk(self, index: int, finish_reason: str) -> dict[str, Any]:
        return self._body([{"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason}], None)

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return self._body([], usage)


class ChatFormat(CompletionFormat):
    """Bodies of ``/v1/chat/completions``: a ``chat.completion``, or ``chat.completion.chunk``s
    that open each choice with the assistant role and then carry content deltas."""

    object = "chat.completion"
    id_prefix = "chatcmpl-"

    def _logprobs(self, index: int, entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        content = [{"token": e["token"], "logprob": e["logprob"], "bytes": _token_bytes(e["token"]),
                    "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": _token_bytes(t["token"])}
                                     for t in e.get("top_logprobs") or ()]}
                   for e in entries or ()]
        return {"content": content, "refusal": None}

    def response(self, choices: list[Choice], usage: Usage) -> dict[str, Any]:
        return self._body([{"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": self._logprobs(c.index, c.logprobs), "finish_reason": c.finish_reason}
                           for c in choices], usage)

    def _delta(self, index: int, delta: dict[str, str], finish_reason: str | None,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._body([choice], None, object="chat.completion.chunk")

    def first_chunks(self, n: int) -> list[dict[str, Any]]:
        return [self._delta(index, {"role": "assistant", "content": ""}, None) for index in range(n)]

    def chunk(self, index: int, text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return self._delta(index, {"content": text}, None, self._logprobs(index, logprobs))

    def finish_chunk(self, index: int, finish_reason: str) -> dict[str, Any]:
        return self._delta(index, {}, finish_reason)

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return self._body([], usage, object="chat.completion.chunk")


def embedding_response(model: str, vectors: np.ndarray, usage: Usage, encoding_format: str) -> dict[str, Any]:
    """``/v1/embeddings`` body. ``base64`` is little-endian float32 bytes, which the official
    client requests by default and decodes itself."""
    if encoding_format == "base64":
        rows: list[Any] = [base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
    else:
        rows = list(np.asarray(vectors, dtype=np.float32))
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
        "model": model,
        "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens},
    }


def models_response(names: Sequence[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(name, created) for name in names]}


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "llmserve"}


def to_json(body: Any) -> bytes:
    """orjson with numpy support: embedding rows serialize without a Python float per element."""
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def sse_event(body: Any) -> bytes:
    """One server-sent event, as OpenAI streams them: ``data: <json>`` and a blank line."""
    return b"data: " + to_json(body) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
