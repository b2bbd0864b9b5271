"""Triton python-backend model: causal-LM generation on vLLM's async engine (AsyncLLM).

vLLM does the serving work (continuous batching, paged KV cache within a memory budget, prefix
caching, chunked prefill, structured output); this file only translates between Triton's tensors
and vLLM's requests, streams the results back, aborts sequences whose client left, and publishes
vLLM's statistics through Triton's custom-metrics API (port 8002).

`llmserve build --engine vllm` copies this file into every version beside the Hugging Face files
(config.json, *.safetensors, tokenizer, generation config, chat template) and `engine.json`, the
version's default vLLM engine arguments. The config parameter `engine_args` (a JSON object, set by
`llmserve pull` from the LLMService) is merged over them. The builder's accuracy gate and the unit
tests import this file outside Triton: the pure helpers below need neither Triton nor vLLM.

Requests (all optional except one of text_input/messages; docs/engines.md has the full contract):
  text_input BYTES prompt | messages BYTES JSON chat messages (the version's chat template)
  max_tokens INT32 (16) | temperature FP32 (0 = greedy) | top_p FP32 | seed UINT64
  stop BYTES[-1] | stream BOOL
  sampling_parameters BYTES JSON {top_k, n, logprobs, presence_penalty, frequency_penalty,
      repetition_penalty, min_p, logit_bias, response_format}
Responses: text_output and completion_tokens (so far) always; index (choice) when n > 1; logprobs
(JSON) when asked for; finish_reason ("stop" | "length") and prompt_tokens in a choice's last
response only. Without streaming one response per choice; with streaming one per new chunk per
choice; the request's last response carries the FINAL flag. Every tensor a chunk carries costs the
stub, Triton and the predictor work per token and stream, so chunks carry only what changes.
"""

import asyncio
import json
import locale
import os
import queue
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported by the build's gate and the unit tests, outside Triton
    pb_utils = None

ENGINE_FILE = "engine.json"
DEFAULT_MAX_TOKENS = 16
MAX_CHOICES = 16
CANCEL_POLL_SECONDS = 0.5  # each check is a round trip to the Triton process
# vLLM's own bucket bounds for these histograms (vllm/v1/metrics/loggers.py), so dashboards and
# alerts written for vLLM read ours unchanged.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]


class InvalidArgument(ValueError):
    """The request is malformed or asks for something out of range: the client's fault."""


class UnsupportedParameter(ValueError):
    """The request asks for something this engine cannot do."""


# -- pure helpers: engine settings, request translation, output shaping ------------------------------


def engine_settings(version_dir, parameter):
    """vLLM engine arguments: the version's engine.json, then the config's `engine_args` JSON over
    it. `model` always names the version directory: the served weights are the verified ones."""
    path = Path(version_dir) / ENGINE_FILE
    settings = json.loads(path.read_text()) if path.is_file() else {}
    try:
        overrides = json.loads(parameter or "{}")
    except ValueError as exc:
        raise ValueError(f"config parameter engine_args is not JSON: {exc}") from None
    if not isinstance(overrides, dict):
        raise ValueError("config parameter engine_args must be a JSON object")
    overrides.pop("model", None)
    # Compact structured output by default: a JSON grammar that allows whitespace anywhere lets a
    # model pad with blanks until max_tokens and never close the object (seen with small models).
    # An engine setting in vLLM (xgrammar or guidance only), not a request field.
    compact_json = {"backend": "xgrammar", "disable_any_whitespace": True}
    return {"structured_outputs_config": compact_json, **settings, **overrides,
            "model": str(version_dir), "tokenizer": str(version_dir)}


def _number(name, value, low, high, *, integer=False, low_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            integer and not float(value).is_integer()):
        raise InvalidArgument(f"invalid argument: {name} must be {'an integer' if integer else 'a number'}")
    if value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise InvalidArgument(f"invalid argument: {name} must be in {bound}, got {value}")
    return int(value) if integer else float(value)


def _structured_output(response_format):
    """OpenAI's response_format as vLLM's structured-output fields (None: free text)."""
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise InvalidArgument("invalid argument: response_format must be an object with a type")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidArgument("invalid argument: response_format.json_schema.schema must be a JSON object")
        return {"json": schema}
    raise UnsupportedParameter(f"unsupported parameter: response_format type {kind!r} "
                               "(use text, json_object or json_schema)")


def _logit_bias(value):
    if not isinstance(value, dict):
        raise InvalidArgument("invalid argument: logit_bias must map token ids to biases")
    try:
        return {int(k): _number("logit_bias value", v, -100, 100) for k, v in value.items()}
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InvalidArgument):
            raise
        raise InvalidArgument("invalid argument: logit_bias keys must be token ids") from None


# sampling_parameters keys -> (SamplingParams field, check). Anything else is unsupported.
_EXTRA_PARAMETERS = {
    "top_k": ("top_k", lambda v: _number("top_k", v, -1, 1 << 20, integer=True)),
    "n": ("n", lambda v: _number("n", v, 1, MAX_CHOICES, integer=True)),
    "logprobs": ("logprobs", lambda v: None if v is None else _number("logprobs", v, 0, 20, integer=True)),
    "presence_penalty": ("presence_penalty", lambda v: _number("presence_penalty", v, -2, 2)),
    "frequency_penalty": ("frequency_penalty", lambda v: _number("frequency_penalty", v, -2, 2)),
    "repetition_penalty": ("repetition_penalty",
                           lambda v: _number("repetition_penalty", v, 0, 2, low_open=True)),
    "min_p": ("min_p", lambda v: _number("min_p", v, 0, 1)),
    "logit_bias": ("logit_bias", _logit_bias),
    "response_format": ("structured_outputs", _structured_output),
}


def sampling_settings(*, max_tokens=None, temperature=None, top_p=None, seed=None, stop=(),
                      extra=None):
    """Keyword arguments for vLLM's SamplingParams from the request's inputs (plain values) and
    its `sampling_parameters` JSON text. Raises InvalidArgument / UnsupportedParameter."""
    settings = {
        "max_tokens": DEFAULT_MAX_TOKENS if max_tokens is None else _number(
            "max_tokens", max_tokens, 1, 1 << 30, integer=True),
        "temperature": 0.0 if temperature is None else _number("temperature", temperature, 0, 2),
        "top_p": 1.0 if top_p is None else _number("top_p", top_p, 0, 1, low_open=True),
        "seed": None if seed is None else int(seed),
        "stop": [s for s in stop if s] or None,
    }
    if extra:
        try:
            extra = json.loads(extra)
        except ValueError:
            raise InvalidArgument("invalid argument: sampling_parameters must be a JSON object") from None
        if not isinstance(extra, dict):
            raise InvalidArgument("invalid argument: sampling_parameters must be a JSON object")
        unknown = sorted(set(extra) - set(_EXTRA_PARAMETERS))
        if unknown:
            raise UnsupportedParameter(f"unsupported parameter: {', '.join(unknown)}")
        for key, value in extra.items():
            name, check = _EXTRA_PARAMETERS[key]
            if value is not None or key == "logprobs":
                settings[name] = check(value)
    return {k: v for k, v in settings.items() if v is not None}


def logprob_entries(token_ids, logprobs, top_n):
    """The chunk's tokens as OpenAI-style logprob entries: each chosen token with its logprob and
    the `top_n` most likely alternatives. `logprobs` is vLLM's per-position {token_id: Logprob}."""
    entries = []
    for token_id, candidates in zip(token_ids, logprobs):
        chosen = candidates[token_id]
        ranked = sorted(candidates.values(), key=lambda c: c.rank if c.rank is not None else 0)
        entries.append({
            "token": chosen.decoded_token or "",
            "logprob": float(chosen.logprob),
            "top_logprobs": [{"token": c.decoded_token or "", "logprob": float(c.logprob)}
                             for c in ranked[:top_n]],
        })
    return entries


@dataclass
class Choice:
    """What has been sent for one choice of one request."""

    completion_tokens: int = 0
    finished: bool = False


@dataclass
class Job:
    """One request on its way through the engine."""

    request_id: str
    prompt: dict
    sampling: dict
    stream: bool
    chat: bool
    choices: dict = field(default_factory=dict)


# -- Triton --------------------------------------------------------------------------------------


def use_utf8_locale():
    """The stub's embedded interpreter starts in the C locale, where torch and vLLM read their
    template and config files as ASCII; switch this process and the engine's child processes to
    UTF-8 before importing them."""
    for name in ("C.UTF-8", "en_US.UTF-8"):
        try:
            locale.setlocale(locale.LC_ALL, name)
        except locale.Error:
            continue
        os.environ["LC_ALL"] = os.environ["LANG"] = name
        break
    os.environ["PYTHONUTF8"] = "1"
    os.environ["PYTHONIOENCODING"] = "utf-8"


class TritonCalls:
    """One thread that makes this process's calls into Triton, in the order they were queued.

    Sending a response and updating a metric are each a round trip to the Triton process (shared
    memory and a wait for its answer). Made on the engine's event loop, they would hold up vLLM's
    output handling (detokenizing, the next step's outputs) once per token and stream; queued here
    the loop only enqueues, and the round trips overlap with its work. One thread keeps each
    request's responses in order, the final flag last.
    """

    def __init__(self):
        self.calls = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="triton-calls", daemon=True)
        self.thread.start()

    def put(self, call, *args, **kwargs):
        self.calls.put((call, args, kwargs))

    def _run(self):
        while (item := self.calls.get()) is not None:
            call, args, kwargs = item
            try:
                call(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a client gone mid-stream must not stop the others
                pb_utils.Logger.log_warn(f"{getattr(call, '__qualname__', call)} failed: {exc}")

    def close(self, timeout=30):
        self.calls.put(None)
        self.thread.join(timeout=timeout)


class TritonPythonModel:
    """execute() parses and hands each request to a coroutine on the engine's event loop (its own
    thread); the coroutine streams vLLM's outputs back through the request's response sender. A
    watcher task cancels the coroutine of any request Triton reports as cancelled, which aborts the
    sequence inside vLLM and frees its KV blocks."""

    def initialize(self, args):
        use_utf8_locale()
        config = json.loads(args["model_config"])
        parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        settings = engine_settings(version_dir, parameters.get("engine_args"))
        if args.get("model_instance_kind") == "CPU":
            # vLLM's CPU build keeps one core for the serving process by default: on a small pod
            # that halves generation. Triton's own threads are idle while vLLM computes.
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.calls = TritonCalls()
        self.metrics = EngineMetrics(args["model_name"], args["model_version"], self.calls)
        from vllm.config import StructuredOutputsConfig

        if isinstance(settings.get("structured_outputs_config"), dict):
            settings["structured_outputs_config"] = StructuredOutputsConfig(**settings["structured_outputs_config"])
        try:
            engine_args = AsyncEngineArgs(**settings)
        except TypeError as exc:
            raise pb_utils.TritonModelException(f"invalid engine_args: {exc}") from None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vllm-loop", daemon=True)
        self.thread.start()

        async def start():
            return AsyncLLM.from_engine_args(engine_args, stat_loggers=[self.metrics.stat_logger()])

        self.engine = asyncio.run_coroutine_threadsafe(start(), self.loop).result()
        self.tokenizer = self.engine.get_tokenizer()
        self.running = {}  # request id -> (triton request, asyncio task)
        self.watcher = asyncio.run_coroutine_threadsafe(self._watch_cancellations(), self.loop)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                job = self._parse(request)
            except ValueError as exc:
                self.metrics.failure()
                self.calls.put(_send_error, sender, str(exc))
                continue
            asyncio.run_coroutine_threadsafe(self._start(job, request, sender), self.loop)
        return None

    async def _start(self, job, request, sender):
        task = asyncio.ensure_future(self._generate(job, sender))
        self.running[job.request_id] = (request, task)

        def done(task):
            self.running.pop(job.request_id, None)
            if task.cancelled():  # cancelled before it started: Triton still needs the final flag
                self.metrics.finished("abort")
                self._end(job, sender.send, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

        task.add_done_callback(done)

    def _end(self, job, call, *args, **kwargs):
        """Queue the call that sends a request's final response, after taking the request out of
        `running` (both on the loop): Triton frees a request once its final response is sent, and
        a cancellation check queued behind that send would crash the server. Checks queued
        earlier run earlier (one FIFO thread); later ones no longer see the request."""
        self.running.pop(job.request_id, None)
        self.calls.put(call, *args, **kwargs)

    async def _watch_cancellations(self):
        while True:
            await asyncio.sleep(CANCEL_POLL_SECONDS)
            self.calls.put(self._cancel_abandoned, list(self.running.values()))

    def _cancel_abandoned(self, running):
        """On the calls thread (each check is a round trip to Triton): cancel, on the loop, the
        task of every request whose client left; vLLM's generate() aborts the sequence then."""
        for request, task in running:
            if not task.done() and request.is_cancelled():
                self.loop.call_soon_threadsafe(task.cancel)

    async def _generate(self, job, sender):
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

        sampling = dict(job.sampling)
        if "structured_outputs" in sampling:
            sampling["structured_outputs"] = StructuredOutputsParams(**sampling["structured_outputs"])
        kind = RequestOutputKind.DELTA if job.stream else RequestOutputKind.FINAL_ONLY
        top_n = sampling.get("logprobs")
        try:
            params = SamplingParams(**sampling, output_kind=kind)
            tokenization = {"add_special_tokens": False} if job.chat else None
            async for output in self.engine.generate(job.prompt, params, job.request_id,
                                                     tokenization_kwargs=tokenization):
                responses = [self._response(job, output, choice, top_n) for choice in output.outputs]
                responses = [r for r in responses if r is not None]
                for i, response in enumerate(responses):
                    if output.finished and i == len(responses) - 1:
                        self._end(job, sender.send, response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    else:
                        self.calls.put(sender.send, response, flags=0)
                if output.finished and not responses:
                    self._end(job, sender.send, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except asyncio.CancelledError:
            # vLLM reports no statistics for a request its caller aborts: count it here.
            self.metrics.finished("abort")
            self._end(job, sender.send, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)  # the client is gone
        except Exception as exc:  # noqa: BLE001 - every request must end with a response
            message = str(exc) or type(exc).__name__
            self.metrics.failure()
            kind = "invalid argument" if _is_client_error(exc) else "generation failed"
            self._end(job, _send_error, sender, f"{kind}: {message}")

    def _response(self, job, output, completion, top_n):
        state = job.choices.setdefault(completion.index, Choice())
        if state.finished:
            return None
        state.completion_tokens += len(completion.token_ids)
        state.finished = completion.finish_reason is not None
        finish = {"stop": "stop", "length": "length"}.get(completion.finish_reason or "", "")
        if state.finished and not finish:
            finish = "stop"
        tensors = {
            "text_output": np.array([completion.text.encode("utf-8")], dtype=object),
            "completion_tokens": np.array([state.completion_tokens], np.int32),
        }
        if job.sampling.get("n", 1) > 1:
            tensors["index"] = np.array([completion.index], np.int32)
        if top_n is not None and completion.logprobs:
            entries = logprob_entries(completion.token_ids, completion.logprobs, top_n)
            tensors["logprobs"] = np.array([json.dumps(entries).encode()], dtype=object)
        if state.finished:
            tensors["finish_reason"] = np.array([finish.encode()], dtype=object)
            tensors["prompt_tokens"] = np.array([len(output.prompt_token_ids or ())], np.int32)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(name, value) for name, value in tensors.items()])

    def _parse(self, request):
        def value(name):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                return None
            values = tensor.as_numpy().reshape(-1)
            if values.size != 1:
                raise InvalidArgument(f"invalid argument: {name} must hold exactly one value")
            return values[0].item() if isinstance(values[0], np.generic) else values[0]

        text, messages = value("text_input"), value("messages")
        if (text is None) == (messages is None):
            raise InvalidArgument("invalid argument: send exactly one of text_input and messages")
        stop = pb_utils.get_input_tensor_by_name(request, "stop")
        sampling = sampling_settings(
            max_tokens=value("max_tokens"), temperature=value("temperature"), top_p=value("top_p"),
            seed=value("seed"), stop=[] if stop is None else [_text(s) for s in stop.as_numpy().reshape(-1)],
            extra=_text(value("sampling_parameters") or b""),
        )
        if messages is not None:
            prompt = {"prompt": self._chat_prompt(_text(messages))}
        else:
            prompt = {"prompt": _text(text)}
        return Job(request_id=uuid.uuid4().hex, prompt=prompt, sampling=sampling,
                   stream=bool(value("stream")), chat=messages is not None)

    def _chat_prompt(self, messages):
        try:
            chat = json.loads(messages)
        except ValueError:
            raise InvalidArgument("invalid argument: messages must be a JSON list of {role, content}") from None
        if not isinstance(chat, list) or not all(isinstance(m, dict) for m in chat):
            raise InvalidArgument("invalid argument: messages must be a JSON list of {role, content}")
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidArgument("invalid argument: this model has no chat template; send text_input")
        try:
            return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - jinja errors: the messages do not fit the template
            raise InvalidArgument(f"invalid argument: messages do not fit the chat template: {exc}") from None

    def finalize(self):
        for _, task in list(self.running.values()):
            self.loop.call_soon_threadsafe(task.cancel)
        self.watcher.cancel()
        self.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.calls.close()


def _is_client_error(exc):
    from vllm.exceptions import VLLMClientError

    return isinstance(exc, (ValueError, VLLMClientError))


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _send_error(sender, message):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    if not message.startswith(("invalid argument:", "unsupported parameter:")):
        code = getattr(pb_utils.TritonError, "INTERNAL", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    sender.send(pb_utils.InferenceResponse(error=error),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


# -- metrics -------------------------------------------------------------------------------------


class EngineMetrics:
    """vLLM's serving metrics under vLLM's names, published through Triton's metrics endpoint.

    vLLM reports them to stat loggers on its output loop: scheduler state after every step and,
    per step, the tokens, first-token and inter-token latencies and the finished requests.
    """

    def __init__(self, model, version, calls):
        self.calls = calls  # every update is a round trip to Triton: made on the calls thread
        self.labels = {"model": model, "version": str(version)}
        family = pb_utils.MetricFamily
        self.families = []  # a family must outlive its metrics

        def metric(name, text, kind, **buckets):
            self.families.append(family(name, text, kind))
            return self.families[-1].Metric(labels=self.labels, **buckets)

        def gauge(name, text):
            return metric(name, text, family.GAUGE)

        def counter(name, text):
            return metric(name, text, family.COUNTER)

        def histogram(name, text, buckets):
            return metric(name, text, family.HISTOGRAM, buckets=buckets)

        self.running = gauge("vllm:num_requests_running", "Requests being generated")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1)")
        self.prompt_tokens = counter("vllm:prompt_tokens_total", "Prompt tokens processed")
        self.generation_tokens = counter("vllm:generation_tokens_total", "Tokens generated")
        # Every request that ends with an error, as Triton's nv_inference_request_failure counts:
        # what reaches the model past the predictor's checks fails because of this revision
        # (a prompt over its max_model_len, messages its chat template refuses, an engine error).
        self.failures = counter("llmserve:request_failure_total", "Requests that ended with an error")
        self.success_family = family("vllm:request_success_total", "Requests finished",
                                     family.COUNTER)
        self.success = {}  # finished_reason -> Metric
        self.load = (0, 0, 0.0)  # running, waiting, KV usage last published
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token",
                              TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between two tokens",
                             ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to end",
                             E2E_BUCKETS)

    def failure(self):
        self.calls.put(self.failures.increment, 1)

    def record(self, scheduler_stats, iteration_stats):
        if scheduler_stats is not None:
            # Every metric call is a round trip to the Triton process: set gauges on change only.
            load = (scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs,
                    scheduler_stats.kv_cache_usage)
            for gauge, value, last in zip((self.running, self.waiting, self.kv_usage), load, self.load):
                if value != last:
                    self.calls.put(gauge.set, value)
            self.load = load
        if iteration_stats is None:
            return
        if iteration_stats.num_prompt_tokens:
            self.calls.put(self.prompt_tokens.increment, iteration_stats.num_prompt_tokens)
        if iteration_stats.num_generation_tokens:
            self.calls.put(self.generation_tokens.increment, iteration_stats.num_generation_tokens)
        for seconds in iteration_stats.time_to_first_tokens_iter:
            self.calls.put(self.ttft.observe, seconds)
        for seconds in iteration_stats.inter_token_latencies_iter:
            self.calls.put(self.itl.observe, seconds)
        for finished in iteration_stats.finished_requests:
            self.finished(str(finished.finish_reason))
            self.calls.put(self.e2e.observe, finished.e2e_latency)

    def finished(self, reason):
        self.calls.put(self._count_success, reason)

    def _count_success(self, reason):  # on the calls thread: creating a metric is a round trip too
        if reason not in self.success:
            self.success[reason] = self.success_family.Metric(
                labels={**self.labels, "finished_reason": reason})
        self.success[reason].increment(1)

    def stat_logger(self):
        """A vLLM stat-logger factory feeding this object."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        metrics = self

        class TritonStatLogger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index=0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
                metrics.record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self):
                pass

        return TritonStatLogger
