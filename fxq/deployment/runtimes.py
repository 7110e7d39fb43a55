"""The runtimes `fxq.deploy` loads an exported model into: each a function of the model's bytes and a
thread count to a function of the input array to the list of output arrays."""
from __future__ import annotations

import io

# onnxruntime optimizers that would change fxq's arithmetic: WeightBiasQuantization rounds the
# float weights of a conv kept in float between DequantizeLinear and QuantizeLinear to int8 (a
# float island 1–11 output steps off); unknown names are ignored by older onnxruntimes
KEEP_FLOAT = ["WeightBiasQuantization"]


def onnxruntime(model_bytes: bytes, threads: int):
    """onnxruntime's CPU provider with ``threads`` threads and none of its optimizers that change
    the arithmetic."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=KEEP_FLOAT)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def openvino(model_bytes: bytes, threads: int):
    """OpenVINO's CPU plugin with ``threads`` threads, in float32 where the graph is float: its
    default on CPUs with bfloat16 arithmetic (AVX-512 BF16, AMX) would round fxq's float values between
    integer ops to 8 bits of mantissa."""
    try:
        import openvino as ov
    except ImportError:
        raise ImportError("runtime='openvino' needs OpenVINO: pip install 'fxq[openvino]' (or pip install "
                          "openvino), or deploy with runtime='onnxruntime'") from None
    core = ov.Core()
    return OpenVINOModel(core.compile_model(core.read_model(io.BytesIO(model_bytes)), "CPU",
                                            {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}))


class OpenVINOModel:
    def __init__(self, compiled):
        self.compiled, self.request = compiled, compiled.create_infer_request()

    def __call__(self, x):
        # copies: the request reuses its output memory on the next call
        return [result.copy() for result in self.request.infer({0: x}).to_tuple()]


LOADERS = {"onnxruntime": onnxruntime, "openvino": openvino}
