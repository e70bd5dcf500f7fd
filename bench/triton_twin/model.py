"""A Triton Python-backend twin of the exported model: the same model.onnx, run with ONNX Runtime.

PyPI's tritonserver (the nvidia-pytriton wheel) carries the Python backend only, not the onnxruntime
one that `diffad export-triton` configures; this twin lets the tests run a real Triton over the real
graph with the exported config (backend swapped). Tensors cross by DLPack: the backend stub's NumPy
bridge predates NumPy 2's ABI and returns empty arrays under it.
"""

import json
import os
import sys

# The stub runs the system's libpython in isolated mode (PYTHONPATH is ignored): the test names the
# virtual environment's site-packages in TWIN_PYTHONPATH, before triton_python_backend_utils needs NumPy.
sys.path[:0] = [p for p in os.environ.get("TWIN_PYTHONPATH", "").split(os.pathsep) if p]

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.outputs = [o["name"] for o in config["output"]]
        self.input = config["input"][0]["name"]
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        parameters = config.get("parameters", {})
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("twin_threads", {}).get("string_value", "0"))  # 0: ORT's
        options.inter_op_num_threads = 1  # as the service's own ONNX Runtime backend
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        # A slow twin lets a test fill Triton's queue.
        self.delay_s = float(parameters.get("twin_delay_s", {}).get("string_value", "0"))

    def execute(self, requests):
        arrays = [np.from_dlpack(pb_utils.get_input_tensor_by_name(r, self.input)) for r in requests]
        if self.delay_s:
            import time

            time.sleep(self.delay_s)
        results = self.session.run(self.outputs, {self.input: np.concatenate(arrays)})
        responses, start = [], 0
        for array in arrays:
            rows = slice(start, start + len(array))
            tensors = [pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(result[rows]))
                       for name, result in zip(self.outputs, results, strict=True)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += len(array)
        return responses
