"""Triton python-backend model: text generation with an ONNX causal LM (KV cache) on ONNX Runtime.

`llmserve build` copies this file into every version it publishes, beside `model.onnx`,
`tokenizer.json` and `artifact.json`, so a version's code and weights are verified and rolled
back together. The builder's accuracy gate imports this same file (outside Triton, where
`triton_python_backend_utils` is absent) and runs `CausalLM` on the artifact, so the gate measures
exactly the generation path that will serve.

Requests (one row each; all inputs but one of text_input/messages are optional):
  text_input  BYTES  raw prompt          messages  BYTES  JSON chat messages (uses the chat template)
  max_tokens  INT32  default 16          temperature FP32  0 = greedy (default)
  top_p       FP32   default 1.0         seed      UINT64  seeded sampling is reproducible
  stop        BYTES[-1] stop sequences   stream    BOOL    one response per new text chunk
Responses: text_output (the whole text, or the new chunk when streaming), finish_reason
("stop" | "length" | "" while streaming), prompt_tokens, completion_tokens.

The model is decoupled: each execute() gets the dynamic batcher's batch of requests, prefills them
together (left-padded, explicit position ids), decodes them in lock step, answers each request the
moment it finishes and drops it from the batch.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported by the builder's accuracy gate, outside Triton
    pb_utils = None

DEFAULT_MAX_TOKENS = 16


@dataclass
class Sequence:
    """One request being generated."""

    prompt_ids: list
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list = field(default_factory=list)
    output_ids: list = field(default_factory=list)
    text: str = ""          # decoded output, stop-truncated once finished
    sent: int = 0           # characters of `text` already streamed
    finish_reason: str | None = None
    cancelled: Callable[[], bool] = lambda: False

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)


class CausalLM:
    """The ONNX artifact plus its tokenizer; no Triton dependency."""

    def __init__(self, version_dir, session_options=None):
        version_dir = Path(version_dir)
        self.meta = json.loads((version_dir / "artifact.json").read_text())
        self.session = ort.InferenceSession(
            str(version_dir / self.meta["onnx"]), session_options,
            providers=["CPUExecutionProvider"],
        )
        self.tokenizer = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
        self.eos = set(self.meta["eos_token_ids"])
        self.layers = self.meta["num_layers"]
        self.context_length = self.meta["context_length"]
        self.past_dtype = np.dtype(self.meta["past_dtype"])

    # -- tokenization -------------------------------------------------------------------------

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def encode_chat(self, messages):
        template = self.meta.get("chat_template")
        if not template:
            raise ValueError("this model has no chat template; send text_input")
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        prompt = env.from_string(template).render(
            messages=messages, add_generation_prompt=True,
            bos_token=self.meta.get("bos_token") or "", eos_token=self.meta.get("eos_token") or "",
        )
        return self.tokenizer.encode(prompt, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- the network ------------------------------------------------------------------------------

    def empty_past(self, batch):
        shape = (batch, self.meta["num_kv_heads"], 0, self.meta["head_dim"])
        return [np.zeros(shape, self.past_dtype) for _ in range(2 * self.layers)]

    def forward(self, input_ids, attention_mask, position_ids, past, logit_index):
        """One step: logits at `logit_index` positions [B, K, V] and the grown KV cache."""
        feeds = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
            "position_ids": position_ids.astype(np.int64),
            "logit_index": logit_index.astype(np.int64),
        }
        for i in range(self.layers):
            feeds[f"past_key_values.{i}.key"] = past[2 * i]
            feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
        logits, *present = self.session.run(None, feeds)
        return logits, present

    def check(self, seq):
        """Validate a request against the context window; clip max_tokens to what fits."""
        if not seq.prompt_ids:
            raise ValueError("the prompt is empty")
        room = self.context_length - len(seq.prompt_ids)
        if room < 1:
            raise ValueError(
                f"the prompt has {len(seq.prompt_ids)} tokens; the context window is "
                f"{self.context_length}"
            )
        if seq.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not (seq.temperature >= 0 and 0 < seq.top_p <= 1):
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        seq.max_tokens = min(seq.max_tokens, room)

    def generate(self, seqs, on_update=lambda seq: None):
        """Generate for all `seqs` together. `on_update(seq)` runs after every token of a
        sequence and once when it finishes (then `seq.finish_reason` is set)."""
        batch = list(seqs)
        width = max(len(s.prompt_ids) for s in batch)
        input_ids = np.zeros((len(batch), width), np.int64)
        mask = np.zeros((len(batch), width), np.int64)
        for row, seq in enumerate(batch):
            input_ids[row, width - len(seq.prompt_ids):] = seq.prompt_ids
            mask[row, width - len(seq.prompt_ids):] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        past = self.empty_past(len(batch))
        index = np.full((len(batch), 1), width - 1, np.int64)
        while batch:
            logits, past = self.forward(input_ids, mask, positions, past, index)
            keep = []
            for row, seq in enumerate(batch):
                if seq.cancelled():
                    seq.finish_reason = "cancelled"
                else:
                    self._advance(seq, _choose(logits[row, -1], seq))
                on_update(seq)
                if seq.finish_reason is None:
                    keep.append(row)
            if len(keep) < len(batch):
                batch = [batch[r] for r in keep]
                mask, positions = mask[keep], positions[keep]
                past = [p[keep] for p in past]
            input_ids = np.array([[s.output_ids[-1]] for s in batch], np.int64)
            mask = np.concatenate([mask, np.ones((len(batch), 1), np.int64)], axis=1)
            positions = positions[:, -1:] + 1
            index = np.zeros((len(batch), 1), np.int64)

    def _advance(self, seq, token):
        if token in self.eos:
            seq.finish_reason = "stop"
            return
        seq.output_ids.append(int(token))
        seq.text = self.decode(seq.output_ids)
        for stop in seq.stop:
            at = seq.text.find(stop)
            if at >= 0:
                seq.text, seq.finish_reason = seq.text[:at], "stop"
        if seq.finish_reason is None and len(seq.output_ids) >= seq.max_tokens:
            seq.finish_reason = "length"

    @staticmethod
    def streamable(seq):
        """How much of `seq.text` can be sent now: not a trailing partial UTF-8 character nor a
        suffix that may still grow into a stop sequence."""
        if seq.finish_reason is not None:
            return len(seq.text)
        end = len(seq.text.rstrip("\ufffd"))
        hold = max((k for stop in seq.stop for k in range(1, len(stop))
                    if seq.text[:end].endswith(stop[:k])), default=0)
        return end - hold


def _choose(logits, seq):
    if seq.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / seq.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    if seq.top_p < 1:
        cut = int(np.searchsorted(np.cumsum(probs[order]), seq.top_p)) + 1
        order = order[:cut]
    p = probs[order] / probs[order].sum()
    return int(order[seq.rng.choice(len(order), p=p)])


def _raise(message):
    raise ValueError(message)


class TritonPythonModel:
    def initialize(self, args):
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.lm = CausalLM(version_dir)

    def execute(self, requests):
        work = []
        for request in requests:
            sender = request.get_response_sender()
            try:
                seq, stream = self._parse(request)
                self.lm.check(seq)
            except (ValueError, TypeError) as exc:
                _send_error(sender, str(exc))
                continue
            seq.cancelled = request.is_cancelled
            work.append((seq, stream, sender))
        if not work:
            return None
        by_id = {id(seq): (stream, sender) for seq, stream, sender in work}

        def on_update(seq):
            stream, sender = by_id[id(seq)]
            if seq.finish_reason == "cancelled":
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            if stream:
                upto = self.lm.streamable(seq)
                chunk, seq.sent = seq.text[seq.sent:upto], max(seq.sent, upto)
                if chunk or seq.finish_reason:
                    _send(sender, seq, chunk)
            elif seq.finish_reason:
                _send(sender, seq, seq.text)

        try:
            self.lm.generate([seq for seq, _, _ in work], on_update)
        except Exception as exc:  # an ORT failure must still end every open request
            for seq, _, sender in work:
                if seq.finish_reason is None:
                    _send_error(sender, f"generation failed: {exc}")
        return None

    def _parse(self, request):
        def scalar(name, default):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                return default
            values = tensor.as_numpy().reshape(-1)
            if values.size != 1:
                raise ValueError(f"{name} must hold exactly one value per request")
            return values[0]

        text = scalar("text_input", None)
        messages = scalar("messages", None)
        if (text is None) == (messages is None):
            raise ValueError("send exactly one of text_input and messages")
        if text is not None:
            ids = self.lm.encode(_text(text))
        else:
            try:
                chat = json.loads(_text(messages))
            except ValueError:
                raise ValueError("messages must be a JSON list of {role, content}") from None
            ids = self.lm.encode_chat(chat)
        stop = pb_utils.get_input_tensor_by_name(request, "stop")
        stops = [] if stop is None else [_text(s) for s in stop.as_numpy().reshape(-1)]
        seed = scalar("seed", None)
        seq = Sequence(
            prompt_ids=ids,
            max_tokens=int(scalar("max_tokens", DEFAULT_MAX_TOKENS)),
            temperature=float(scalar("temperature", 0.0)),
            top_p=float(scalar("top_p", 1.0)),
            seed=None if seed is None else int(seed),
            stop=[s for s in stops if s],
        )
        return seq, bool(scalar("stream", False))

    def finalize(self):
        self.lm = None


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _send(sender, seq, text):
    final = seq.finish_reason is not None
    out = [
        pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=object)),
        pb_utils.Tensor("finish_reason",
                        np.array([[(seq.finish_reason or "").encode()]], dtype=object)),
        pb_utils.Tensor("prompt_tokens", np.array([[len(seq.prompt_ids)]], np.int32)),
        pb_utils.Tensor("completion_tokens", np.array([[len(seq.output_ids)]], np.int32)),
    ]
    flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
    sender.send(pb_utils.InferenceResponse(output_tensors=out), flags=flags)


def _send_error(sender, message):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    sender.send(pb_utils.InferenceResponse(error=error),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
