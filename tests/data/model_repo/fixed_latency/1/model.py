"""fixed_latency: echoes INPUT0 after SERVICE_SECONDS (config parameter) of "compute".

One instance serves one request at a time, so the time a request spends queued grows with the
number of concurrent clients while the compute time stays put: Triton's queue/compute ratio then
measures offered load, the signal the autoscaler scales on.
"""

import json
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"]).get("parameters", {})
        self.seconds = float(parameters["SERVICE_SECONDS"]["string_value"])

    def execute(self, requests):
        responses = []
        for request in requests:
            time.sleep(self.seconds)
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", data)]))
        return responses
