"""add_sub, version 1: element-wise sum and difference of two FP32 vectors.

It imports numpy on purpose: a python-backend model that can import the venv's packages proves
the stub runs inside the llmserve venv, not just the stub's bare interpreter.
"""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("OUTPUT0", np.add(a, b).astype(np.float32)),
                        pb_utils.Tensor("OUTPUT1", np.subtract(a, b).astype(np.float32)),
                    ]
                )
            )
        return responses
