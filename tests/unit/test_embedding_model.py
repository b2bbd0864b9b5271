"""model_repo/embedding/1/model.py outside Triton: what execute() answers when the engine fails."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np

from llmserve.artifacts.repository import SHIPPED_REPO


def _load_model_code():
    spec = importlib.util.spec_from_file_location("embedding_model_under_test",
                                                  SHIPPED_REPO / "embedding" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Counter:
    def __init__(self):
        self.value = 0

    def increment(self, by):
        self.value += by


def _triton_utils():
    """The few parts of Triton's `triton_python_backend_utils` execute() touches."""
    class TritonError(Exception):
        pass

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.output_tensors, self.error = output_tensors, error

    def get_input_tensor_by_name(request, name):
        return SimpleNamespace(as_numpy=lambda: request[name])

    return SimpleNamespace(TritonError=TritonError, InferenceResponse=InferenceResponse,
                           get_input_tensor_by_name=get_input_tensor_by_name)


def test_a_failing_engine_answers_every_request_with_the_error_instead_of_raising(monkeypatch):
    """Raising from execute() under concurrent requests left Triton 2.51 holding the model: on
    SIGTERM it waited its whole 30-s exit timeout. An error response per request does not, and the
    failures still count in the engine metric the canary analysis reads."""
    model = _load_model_code()
    monkeypatch.setattr(model, "pb_utils", _triton_utils())

    def embed(texts):
        raise RuntimeError("out of device memory")

    instance = model.TritonPythonModel()
    instance.embedder = SimpleNamespace(embed=embed)
    instance.metrics = {"failure": _Counter(), "success": _Counter()}
    requests = [{"text": np.array([b"a", b"b"], dtype=object)}, {"text": np.array([b"c"], dtype=object)}]

    responses = instance.execute(requests)

    assert [str(r.error) for r in responses] == ["embedding failed: RuntimeError: out of device memory"] * 2
    assert responses[0].error is not responses[1].error  # a shared one crashed tritonserver
    assert (instance.metrics["failure"].value, instance.metrics["success"].value) == (2, 0)
