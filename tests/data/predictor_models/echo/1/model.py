"""echo: the generate model's tensor interface without a network, for predictor tests.

The prompt (``text_input``, or the last message's content of ``messages``) is split into words;
the completion repeats those words, one word per token, until ``max_tokens`` or a ``stop``
sequence. Sampling inputs are accepted and ignored. Streaming sends one response per word.
Between tokens it sleeps ``delay_ms`` (config parameter) and checks ``request.is_cancelled()``.
It logs ``echo: request <id> started`` and, when Triton cancels it, ``echo: request <id>
cancelled``, so a test can see that a client disconnect reached the model.
"""

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"])["parameters"]
        self.delay = int(parameters["delay_ms"]["string_value"]) / 1000
        self.context_length = int(parameters["context_length"]["string_value"])
        self.log = pb_utils.Logger

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._generate(request, sender)
            except ValueError as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                sender.send(pb_utils.InferenceResponse(error=error),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def _generate(self, request, sender):
        text, messages = _value(request, "text_input"), _value(request, "messages")
        if (text is None) == (messages is None):
            raise ValueError("send exactly one of text_input and messages")
        prompt = text.decode() if text is not None else json.loads(messages)[-1]["content"]
        words = prompt.split()
        if not words:
            raise ValueError("the prompt is empty")
        if len(words) >= self.context_length:
            raise ValueError(f"the prompt has {len(words)} tokens; the context window is {self.context_length}")
        max_tokens = min(int(_value(request, "max_tokens", 16)), self.context_length - len(words))
        stop_tensor = pb_utils.get_input_tensor_by_name(request, "stop")
        stops = [] if stop_tensor is None else [s.decode() for s in stop_tensor.as_numpy().reshape(-1)]
        stream = bool(_value(request, "stream", False))
        self.log.log_info(f"echo: request {request.request_id()} started")
        output, finish = "", None
        for count in range(1, max_tokens + 1):
            if self.delay:
                time.sleep(self.delay)
            if request.is_cancelled():
                self.log.log_info(f"echo: request {request.request_id()} cancelled")
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            chunk = (" " if output else "") + words[(count - 1) % len(words)]
            if any(stop in output + chunk for stop in stops):
                chunk, finish = "", "stop"
                count -= 1
            elif count == max_tokens:
                finish = "length"
            output += chunk
            if stream or finish:
                _send(sender, chunk if stream else output, finish, len(words), count)
            if finish:
                return


def _value(request, name, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy().reshape(-1)[0]


def _send(sender, text, finish, prompt_tokens, completion_tokens):
    outputs = [
        pb_utils.Tensor("text_output", np.array([[text.encode()]], dtype=object)),
        pb_utils.Tensor("finish_reason", np.array([[(finish or "").encode()]], dtype=object)),
        pb_utils.Tensor("prompt_tokens", np.array([[prompt_tokens]], np.int32)),
        pb_utils.Tensor("completion_tokens", np.array([[completion_tokens]], np.int32)),
    ]
    flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if finish else 0
    sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=flags)
