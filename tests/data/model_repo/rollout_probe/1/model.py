"""rollout_probe: echoes INPUT0; each version is a release that is good or bad in its own way.

The canary analysis reads Triton's own request metrics, so a bad version has to be bad where
Triton counts it: a slow answer raises ``nv_inference_request_summary_us``, and a failure raises
``nv_inference_request_failure`` only when ``execute`` raises (Triton 2.51 counts a python-backend
response that merely carries an error as a success; raising under concurrent requests also leaves
Triton 2.51 holding the model, so a failing version's server waits out its 30-s exit timeout at
teardown, see docs/rollout.md). The repository holds only version 1; the rollout
tests stage versions 2-5 as copies of this file, and each copy picks its behaviour from the
version Triton loaded it as:

1, 2  good
3     fails every third request (33% errors)
4     answers correctly but takes 300 ms
5     fails every request
"""

import time

import numpy as np
import triton_python_backend_utils as pb_utils

FAIL_EVERY = {3: 3, 5: 1}
DELAY_SECONDS = {4: 0.3}


class TritonPythonModel:
    def initialize(self, args):
        self.version = int(args["model_version"])
        self.served = 0

    def execute(self, requests):
        responses = []
        for request in requests:
            self.served += 1
            time.sleep(DELAY_SECONDS.get(self.version, 0))
            every = FAIL_EVERY.get(self.version)
            if every and self.served % every == 0:
                raise pb_utils.TritonModelException(f"rollout_probe v{self.version} fails request {self.served} on purpose")
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", data.astype(np.float32))]))
        return responses
