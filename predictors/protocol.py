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
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

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


class _Generation(_Strict):
    """Sampling fields shared by completions and chat completions. ``None`` means "the model's
    default" (for the shipped generate model: greedy decoding, top_p 1, no seed)."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: StringList | None = Field(default=None, max_length=4)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Generation):
    # One prompt per request: a list is accepted (clients send ["..."]) but must hold one string.
    prompt: Annotated[StringList, Field(min_length=1, max_length=1)]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | None, BeforeValidator(_message_text)] = None
    name: str | None = None


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    # OpenAI's newer name for max_tokens; both are accepted, at most one may be given.
    max_completion_tokens: int | None = Field(default=None, ge=1)


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


# ---------------------------------------------------------------------------------------------
# Responses


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0

    def body(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class CompletionFormat:
    """Bodies of ``/v1/completions``: one ``text_completion`` object, or its stream of chunks."""

    object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _body(self, choices: list[dict[str, Any]], usage: Usage | None, object: str | None = None) -> dict[str, Any]:
        body = {"id": self.id, "object": object or self.object, "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage.body()
        return body

    def response(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        return self._body([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}], usage)

    def first_chunk(self) -> dict[str, Any] | None:
        return None

    def chunk(self, text: str) -> dict[str, Any]:
        return self._body([{"index": 0, "text": text, "logprobs": None, "finish_reason": None}], None)

    def finish_chunk(self, finish_reason: str) -> dict[str, Any]:
        return self._body([{"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}], None)

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return self._body([], usage)


class ChatFormat(CompletionFormat):
    """Bodies of ``/v1/chat/completions``: a ``chat.completion``, or ``chat.completion.chunk``s
    that open with the assistant role and then carry content deltas."""

    object = "chat.completion"
    id_prefix = "chatcmpl-"

    def response(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        return self._body([{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}], usage)

    def _delta(self, delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._body([choice], None, object="chat.completion.chunk")

    def first_chunk(self) -> dict[str, Any]:
        return self._delta({"role": "assistant", "content": ""}, None)

    def chunk(self, text: str) -> dict[str, Any]:
        return self._delta({"content": text}, None)

    def finish_chunk(self, finish_reason: str) -> dict[str, Any]:
        return self._delta({}, finish_reason)

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
