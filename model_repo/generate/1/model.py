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

The model is decoupled and batches continuously: execute() validates and queues requests; one
generation thread decodes all running requests in lock step and, between two steps, prefills the
newly arrived ones together (left-padded, explicit position ids) and joins them to the batch. Each
request is answered the moment it finishes and leaves the batch.

Where it runs: on CUDA when Triton gives it a GPU instance (KIND_GPU), with TensorRT first when the
config parameter `execution_providers` says `tensorrt,cuda`; on the CPU otherwise. The pulled
config's `engine_args` (JSON, from the LLMService's engineSettings) may lower the context window
(`max_model_len`) and the number of sequences decoded together (`max_num_seqs`).

Because Triton's own request statistics never see a decoupled model's generations, the model
publishes the engine metrics the canary analysis and autoscaling read (docs/engines.md#metrics),
with vLLM's names, through Triton's custom-metrics API (`EngineMetrics`).
"""

import collections
import json
import queue
import threading
import time
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
# The KV cache's memory budget unless engine_args sets vLLM's `kv_cache_memory_bytes`: the cache
# is dense and padded (every row as wide as the longest), so without a bound a few long prompts
# among many streams grew the model's process until the kernel killed it.
DEFAULT_KV_CACHE_BYTES = 2 << 30


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
    arrived: float = field(default_factory=time.monotonic)
    last_step_at: float | None = None  # when its latest token (or the first) was chosen

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)


class CausalLM:
    """The ONNX artifact plus its tokenizer; no Triton dependency."""

    def __init__(self, version_dir, session_options=None, providers=("CPUExecutionProvider",),
                 max_model_len=None, kv_cache_bytes=DEFAULT_KV_CACHE_BYTES):
        version_dir = Path(version_dir)
        self.meta = json.loads((version_dir / "artifact.json").read_text())
        self.session = ort.InferenceSession(
            str(version_dir / self.meta["onnx"]), session_options, providers=list(providers),
        )
        self.tokenizer = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
        self.eos = set(self.meta["eos_token_ids"])
        self.layers = self.meta["num_layers"]
        self.context_length = min(self.meta["context_length"], max_model_len or self.meta["context_length"])
        self.past_dtype = np.dtype(self.meta["past_dtype"])
        self.kv_cache_bytes = kv_cache_bytes

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
        try:
            prompt = env.from_string(template).render(
                messages=messages, add_generation_prompt=True,
                bos_token=self.meta.get("bos_token") or "",
                eos_token=self.meta.get("eos_token") or "",
            )
        except (jinja2.TemplateError, TypeError, KeyError) as exc:
            raise ValueError(f"messages do not fit the chat template: {exc}") from None
        return self.tokenizer.encode(prompt, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- the network ------------------------------------------------------------------------------

    def kv_bytes(self, positions):
        """Bytes of KV cache that `positions` cached positions (rows x width) take."""
        per_position = 2 * self.layers * self.meta["num_kv_heads"] * self.meta["head_dim"]
        return positions * per_position * self.past_dtype.itemsize

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
        need = self.kv_bytes(len(seq.prompt_ids) + min(seq.max_tokens, room))
        if need > self.kv_cache_bytes:
            raise ValueError(f"the prompt and max_tokens need {need} bytes of KV cache; the budget "
                             f"(kv_cache_memory_bytes) is {self.kv_cache_bytes}")
        if not (seq.temperature >= 0 and 0 < seq.top_p <= 1):
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        seq.max_tokens = min(seq.max_tokens, room)

    def generate(self, seqs, on_update=lambda seq: None):
        """Generate for all `seqs` together (what the accuracy gate runs)."""
        batch = Batch(self)
        batch.admit(list(seqs), on_update)
        while batch.seqs:
            batch.step(on_update)

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


class Batch:
    """Sequences decoding in lock step, with their KV cache left-padded to a common length.

    New sequences can join between any two steps (continuous batching): they are prefilled
    together, then their cache is left-padded or the running one is, and the rows are stacked.
    Finished rows leave at once, and cache columns no row attends to any more are dropped.
    `on_update(seq)` runs after each token of a sequence and once when it finishes (then
    `seq.finish_reason` is set).
    """

    def __init__(self, lm):
        self.lm = lm
        self.seqs = []
        self.past = self.mask = self.positions = None

    def fits(self, seqs):
        """Whether the running rows plus `seqs` stay within the KV budget until they finish: rows
        are left-padded to the longest, and no row grows past its prompt plus max_tokens."""
        rows = self.seqs + list(seqs)
        width = max(len(s.prompt_ids) + s.max_tokens for s in rows)
        return self.lm.kv_bytes(len(rows) * width) <= self.lm.kv_cache_bytes

    def admit(self, seqs, on_update):
        """Prefill `seqs`, choose their first token and add those still running."""
        if not seqs:
            return
        width = max(len(s.prompt_ids) for s in seqs)
        input_ids = np.zeros((len(seqs), width), np.int64)
        mask = np.zeros((len(seqs), width), np.int64)
        for row, seq in enumerate(seqs):
            input_ids[row, width - len(seq.prompt_ids):] = seq.prompt_ids
            mask[row, width - len(seq.prompt_ids):] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        logits, past = self.lm.forward(input_ids, mask, positions, self.lm.empty_past(len(seqs)),
                                       np.full((len(seqs), 1), width - 1, np.int64))
        keep = self._choose_all(seqs, logits, on_update)
        if not keep:
            return
        seqs, mask, positions = [seqs[r] for r in keep], mask[keep], positions[keep, -1:]
        past = [p[keep] for p in past]
        if not self.seqs:
            self.seqs, self.past, self.mask, self.positions = seqs, past, mask, positions
            return
        total = max(self.mask.shape[1], mask.shape[1])
        self.past = [np.concatenate([_pad_left(a, total, 2), _pad_left(b, total, 2)])
                     for a, b in zip(self.past, past)]
        self.mask = np.concatenate([_pad_left(self.mask, total, 1), _pad_left(mask, total, 1)])
        self.positions = np.concatenate([self.positions, positions])
        self.seqs = self.seqs + seqs

    def step(self, on_update):
        """One decode step for every running sequence."""
        if not self.seqs:
            return
        input_ids = np.array([[s.output_ids[-1]] for s in self.seqs], np.int64)
        self.mask = np.concatenate([self.mask, np.ones((len(self.seqs), 1), np.int64)], axis=1)
        self.positions = self.positions + 1
        logits, self.past = self.lm.forward(input_ids, self.mask, self.positions, self.past,
                                            np.zeros((len(self.seqs), 1), np.int64))
        keep = self._choose_all(self.seqs, logits, on_update)
        if len(keep) == len(self.seqs):
            return
        self.seqs = [self.seqs[r] for r in keep]
        if not self.seqs:
            self.past = self.mask = self.positions = None
            return
        self.mask, self.positions = self.mask[keep], self.positions[keep]
        first = int(np.argmax(self.mask.any(axis=0)))  # leading columns all rows ignore
        self.mask = self.mask[:, first:]
        self.past = [p[keep][:, :, first:] for p in self.past]

    def _choose_all(self, seqs, logits, on_update):
        """Advance every sequence by its chosen token; the rows still running."""
        keep = []
        for row, seq in enumerate(seqs):
            if seq.cancelled():
                seq.finish_reason = "cancelled"
            else:
                self.lm._advance(seq, _choose(logits[row, -1], seq))
            on_update(seq)
            if seq.finish_reason is None:
                keep.append(row)
        return keep


def _pad_left(array, length, axis):
    pad = [(0, 0)] * array.ndim
    pad[axis] = (length - array.shape[axis], 0)
    return np.pad(array, pad)


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


def execution_providers(instance_kind, device_id, config):
    """ONNX Runtime providers for this instance: CUDA on the instance's GPU (TensorRT first when the
    config parameter `execution_providers` lists it), the CPU otherwise and as the fallback."""
    if instance_kind != "GPU":
        return ["CPUExecutionProvider"]
    wanted = parameter(config, "execution_providers", "cuda").split(",")
    gpu = {"device_id": int(device_id)}
    named = {"tensorrt": ("TensorrtExecutionProvider", {**gpu, "trt_engine_cache_enable": True,
                                                        "trt_engine_cache_path": "/tmp/trt-cache"}),
             "cuda": ("CUDAExecutionProvider", gpu)}
    unknown = [name for name in wanted if name.strip() not in named]
    if unknown:
        raise ValueError(f"execution_providers: unknown {', '.join(unknown)} (use tensorrt and/or cuda)")
    return [named[name.strip()] for name in wanted] + ["CPUExecutionProvider"]


def parameter(config, key, default=None):
    """A string parameter of config.pbtxt (`parameters { key: ... value { string_value: ... } }`)."""
    return ((config.get("parameters") or {}).get(key) or {}).get("string_value") or default


class EngineMetrics:
    """The engine metrics every llmserve model publishes (names as vLLM's, docs/engines.md#metrics),
    labeled with the model and version, through Triton's custom-metrics API (port 8002)."""

    FINISH_REASONS = ("stop", "length", "abort")
    LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
    TOKEN_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]

    def __init__(self, model, version):
        self.labels = {"model": model, "version": version}
        family = pb_utils.MetricFamily
        self.families = []  # kept alive, and deleted after their metrics (Triton's rule)

        def metric(name, description, kind, buckets=None, **labels):
            fam = family(name=name, description=description, kind=kind)
            self.families.append(fam)
            kwargs = {"buckets": buckets} if buckets else {}
            return fam, fam.Metric(labels={**self.labels, **labels}, **kwargs)

        _, self.running = metric("vllm:num_requests_running", "Requests being generated", family.GAUGE)
        _, self.waiting = metric("vllm:num_requests_waiting", "Requests waiting to be admitted", family.GAUGE)
        _, self.kv_usage = metric("vllm:kv_cache_usage_perc", "KV cache usage, 0 to 1", family.GAUGE)
        success, first = metric("vllm:request_success_total", "Requests that finished", family.COUNTER,
                                finished_reason=self.FINISH_REASONS[0])
        self.success = {self.FINISH_REASONS[0]: first}
        for reason in self.FINISH_REASONS[1:]:  # every series exists from the start: increase() sees the first
            self.success[reason] = success.Metric(labels={**self.labels, "finished_reason": reason})
        _, self.failure = metric("llmserve:request_failure_total", "Requests that ended with an error",
                                 family.COUNTER)
        _, self.prompt_tokens = metric("vllm:prompt_tokens_total", "Prompt tokens processed", family.COUNTER)
        _, self.generation_tokens = metric("vllm:generation_tokens_total", "Tokens generated", family.COUNTER)
        _, self.ttft = metric("vllm:time_to_first_token_seconds", "Time to first token", family.HISTOGRAM,
                              self.LATENCY_BUCKETS)
        _, self.e2e = metric("vllm:e2e_request_latency_seconds", "Request latency, arrival to last token",
                             family.HISTOGRAM, self.LATENCY_BUCKETS)
        _, self.itl = metric("vllm:inter_token_latency_seconds", "Time between two tokens of a request",
                             family.HISTOGRAM, self.TOKEN_BUCKETS)

    def step(self, seq, now):
        """A sequence advanced by one step (its first token: time to first token)."""
        if seq.last_step_at is None:
            self.ttft.observe(now - seq.arrived)
        else:
            self.itl.observe(now - seq.last_step_at)
        seq.last_step_at = now

    def finished(self, seq, now):
        reason = "abort" if seq.finish_reason == "cancelled" else seq.finish_reason
        self.success[reason].increment(1)
        self.e2e.observe(now - seq.arrived)
        self.prompt_tokens.increment(len(seq.prompt_ids))
        self.generation_tokens.increment(len(seq.output_ids))

    def load(self, running, waiting, kv_usage):
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)

    def close(self):
        for name in ("running", "waiting", "kv_usage", "success", "failure", "prompt_tokens",
                     "generation_tokens", "ttft", "e2e", "itl"):
            delattr(self, name)
        self.families.clear()


class TritonPythonModel:
    """execute() only validates and queues; one generation thread runs the continuous batch,
    admitting queued requests between decode steps and answering each as it finishes."""

    def initialize(self, args):
        version_dir = Path(args["model_repository"]) / args["model_version"]
        config = json.loads(args["model_config"])
        engine_args = json.loads(parameter(config, "engine_args", "{}"))
        providers = execution_providers(args.get("model_instance_kind"), args.get("model_instance_device_id", 0),
                                        config)
        self.lm = CausalLM(version_dir, providers=providers, max_model_len=engine_args.get("max_model_len"),
                           kv_cache_bytes=int(engine_args.get("kv_cache_memory_bytes") or DEFAULT_KV_CACHE_BYTES))
        self.max_running = max(1, int(engine_args.get("max_num_seqs") or config.get("max_batch_size", 0) or 1))
        self.metrics = EngineMetrics(args["model_name"], args["model_version"])
        self.pending = queue.Queue()
        self.clients = {}  # id(seq) -> (stream, sender), while generating
        self.worker = threading.Thread(target=self._loop, name="generate", daemon=True)
        self.worker.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                seq, stream = self._parse(request)
                self.lm.check(seq)
            except (ValueError, TypeError) as exc:
                self.metrics.failure.increment(1)
                _send_error(sender, str(exc))
                continue
            seq.cancelled = request.is_cancelled
            self.pending.put((seq, stream, sender))
        self.metrics.waiting.set(self.pending.qsize())
        return None

    def _loop(self):
        batch = Batch(self.lm)
        queued = collections.deque()  # (seq, stream, sender) in arrival order, not yet admitted
        while True:
            if not batch.seqs and not queued:
                queued.append(self.pending.get())  # idle: wait for work
            while True:
                try:
                    queued.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            if None in queued:  # finalize()
                return
            arrivals = []  # first come, first served: admission stops at the first that does not fit
            while queued and len(batch.seqs) + len(arrivals) < self.max_running and (
                    not batch.seqs and not arrivals or batch.fits([s for s, _, _ in arrivals] + [queued[0][0]])):
                arrivals.append(queued.popleft())
            for seq, stream, sender in arrivals:
                self.clients[id(seq)] = (stream, sender)
            try:
                batch.admit([seq for seq, _, _ in arrivals], self._on_update)
                batch.step(self._on_update)
            except Exception as exc:  # an ORT failure must still end every open request
                for seq in batch.seqs + [seq for seq, _, _ in arrivals]:
                    if id(seq) in self.clients:
                        self.metrics.failure.increment(1)
                        _send_error(self.clients.pop(id(seq))[1], f"generation failed: {exc}")
                batch = Batch(self.lm)
            self.metrics.load(len(batch.seqs), len(queued) + self.pending.qsize(), self._kv_usage(batch))

    def _kv_usage(self, batch):
        """The padded cache's share of the KV budget: vLLM's KV-cache usage, for a dense cache."""
        if batch.mask is None:
            return 0.0
        return min(1.0, self.lm.kv_bytes(batch.mask.size) / self.lm.kv_cache_bytes)

    def _on_update(self, seq):
        stream, sender = self.clients[id(seq)]
        now = time.monotonic()
        self.metrics.step(seq, now)
        if seq.finish_reason is not None:
            del self.clients[id(seq)]
            self.metrics.finished(seq, now)
        if seq.finish_reason == "cancelled":
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        elif stream:
            upto = self.lm.streamable(seq)
            chunk, seq.sent = seq.text[seq.sent:upto], max(seq.sent, upto)
            if chunk or seq.finish_reason:
                _send(sender, seq, chunk)
        elif seq.finish_reason:
            _send(sender, seq, seq.text)

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
        self.pending.put(None)
        self.worker.join(timeout=30)
        self.metrics.close()


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
