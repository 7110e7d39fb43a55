"""`fxq.deploy`: a quantized model exported to ONNX (`fxq.deployment.onnx_export`) and run by onnxruntime or
OpenVINO, float in, float out, with what it guarantees about matching fxq's own executor (`Deployed`)."""
from __future__ import annotations

import io

import torch
from torch import fx, nn

from fxq.config import RUNTIMES, QConfig
from fxq.deployment import float_tables, runtimes, saturation
from fxq.deployment.onnx_export import Slot, export_onnx, fill, layer_bounds, output_structure
from fxq.deployment.saturation import WeightFormat
from fxq.graphs import records


class Deployed(nn.Module):
    """float in, float out: a quantized model exported to ONNX and run by ``runtime`` (onnxruntime's
    session or OpenVINO's compiled model, on the CPU).

    ``bit_exact``: its outputs equal the quantized model's bit for bit — onnxruntime runs the model,
    the model computes onnxruntime's arithmetic (``QConfig(requantize="onnxruntime")``) and no layer
    runs a kernel that saturates on this machine. ``formats``: each layer's weight format;
    ``saturating``: whether the runtime's U8S8 kernels add products in saturating 16-bit pairs on this
    machine; ``float_ops``: the ops that run in float between integers; ``float_tables``: the lookup
    tables run as their function's float ops, each checked to give the table (`fxq.deployment.float_tables`)."""

    def __init__(self, model_bytes: bytes, threads: int, bit_exact: bool,
                 formats: dict[str, WeightFormat] | None = None, saturating: bool = False,
                 float_ops: list[str] | None = None, structure=Slot(0), runtime: str = "onnxruntime",
                 float_tables: list[str] = ()):
        super().__init__()
        self.structure = structure  # what the model returns (`output_structure`)
        self.float_ops = list(float_ops or [])
        self.model_bytes, self.threads, self.runtime = model_bytes, threads, runtime
        self.bit_exact = bit_exact
        self.formats, self.saturating = dict(formats or {}), saturating
        self.float_tables = list(float_tables)
        self._session = None

    @property
    def weight_format(self) -> str:
        """The weight formats in one phrase: ``"u8s8"``, ``"u8u8"`` or ``"u8s8 ×17, u8u8 ×4"``."""
        counts = {f.value: list(self.formats.values()).count(f) for f in WeightFormat if f in self.formats.values()}
        return next(iter(counts)) if len(counts) == 1 else ", ".join(f"{k} ×{v}" for k, v in counts.items())

    def session(self):
        """The runtime's loaded model: a function of a float32 array to the list of output arrays."""
        if self._session is None:
            self._session = runtimes.LOADERS[self.runtime](self.model_bytes, self.threads)
        return self._session

    def forward(self, x: torch.Tensor):
        """The model's outputs, in the tuples, lists and dicts the model returns them in."""
        results = self.session()(x.detach().to(torch.float32).contiguous().numpy())
        return fill(self.structure, [torch.from_numpy(r) for r in results])

    def __getstate__(self):
        return {**self.__dict__, "_session": None}  # a session does not pickle; it is made again

    def extra_repr(self) -> str:
        kernels = "saturating U8S8 kernels (no VNNI)" if self.saturating else "exact U8S8 kernels"
        if self.runtime == "openvino":
            return (f"OpenVINO ({kernels}), weights {self.weight_format}, {len(self.model_bytes) / 1e6:.2f} MB model, "
                    f"{self.threads} threads, {OPENVINO_AGREEMENT}")
        if self.bit_exact:
            agreement = "bit-exact with fxq's executor"
        elif self.saturating and any(f is WeightFormat.U8S8 for f in self.formats.values()):
            agreement = ("NOT exact: U8S8 layers that can saturate on this CPU's onnxruntime "
                         "(deploy with weights='auto' or 'exact')")
        elif self.float_ops:
            agreement = (f"{len(self.float_ops)} float op(s) run on onnxruntime's float kernels: their "
                         "outputs may land a step from fxq's executor")
        else:
            agreement = ("within a few output steps of fxq's executor "
                         "(QConfig(requantize='onnxruntime') makes it bit-exact)")
        return (f"onnxruntime ({kernels}), weights {self.weight_format}, {len(self.model_bytes) / 1e6:.2f} MB "
                f"model, {self.threads} threads, {agreement}")


# what OpenVINO's int8 pipeline does with fxq's graph (`python -m scripts.deploy_runtimes` measures it)
OPENVINO_AGREEMENT = ("NOT exact: OpenVINO requantizes in its own float arithmetic, so outputs land a step or "
                      "more from fxq's executor")


def float_ops(qmodel: fx.GraphModule) -> list[str]:
    """The float ops between integers (each one's output is quantized again inside the graph):
    onnxruntime's float kernels may round them differently from torch's."""
    inner = {name for name, m in qmodel.named_modules() if type(m).__name__ == "Quantize" and m.sample_shape is None}
    return [n.args[0].name for n in qmodel.graph.nodes
            if n.op == "call_module" and n.target in inner and isinstance(n.args[0], fx.Node)]


def deploy(qmodel: fx.GraphModule, example_input: torch.Tensor | None = None, threads: int = 2,
           weights: str = "auto", runtime: str = "onnxruntime") -> Deployed:
    """``qmodel`` exported (`export_onnx`) and loaded into ``runtime`` — ``"onnxruntime"`` or
    ``"openvino"`` (an optional dependency, ``fxq[openvino]``) — with ``threads`` threads; with
    ``example_input``, runs it once (so the first real call is not the slow one).

    On onnxruntime, the lookup tables whose function its float ops compute exactly on this machine
    (Hardswish, Hardsigmoid, Sigmoid, SiLU: checked on every input integer) run as those ops, several
    times faster than a Gather in the table; the rest are Gathers (``deployed.float_tables`` names the
    former).

    OpenVINO reads the same file and runs its integers with its own int8 kernels, faster on many
    models at batch 32 (README, "A second runtime"), but requantizes in its own float arithmetic: its outputs are
    never ``bit_exact`` (a step or more from fxq's executor on some values; the same class on the
    suite's images).

    ``weights`` picks each layer's weight format (`fxq.deployment.saturation`): by default U8S8 (int8
    weights, the fastest kernels) where the runtime deployed to adds products exactly on this
    machine (each runtime is probed: OpenVINO's oneDNN and onnxruntime's MLAS both saturate without
    VNNI), and where it saturates U8S8 only for layers that cannot saturate, U8U8 for the rest
    (which OpenVINO runs in float32: ``QConfig(pair_safe=True)`` keeps its int8 kernels there).
    It computes exactly what ``qmodel`` does when ``qmodel`` computes onnxruntime's arithmetic
    (``QConfig.requantize="onnxruntime"``, the default up to 8-bit activations), no layer can
    saturate and no op runs in float (``deployed.bit_exact``); otherwise convs, linears and adds
    may land a step or two apart (onnxruntime requantizes in float32, ``requantize="fixed_point"``
    in fixed point), and so may the output of a float op (onnxruntime's float kernels round their
    own way)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r}: fxq deploys to {' or '.join(map(repr, RUNTIMES))}")
    tables = float_tables.exact_on_onnxruntime(qmodel, lambda m: runtimes.onnxruntime(m, threads)) \
        if runtime == "onnxruntime" else set()
    buffer = io.BytesIO()
    export_onnx(qmodel, buffer, weights, tables, runtime)
    config = records.get(qmodel, QConfig)
    bounds = layer_bounds(qmodel)
    formats = saturation.layer_formats(bounds, weights, runtime)
    saturating = saturation.runtime_saturates(runtime)
    exact_kernels = not saturating or all(f is WeightFormat.U8U8 or saturation.pair_safe(*bounds[name])
                                          for name, f in formats.items())
    runtime_arithmetic = config is not None and config.requantize == "onnxruntime"
    floating = float_ops(qmodel)
    exact = runtime == "onnxruntime" and runtime_arithmetic and exact_kernels and not floating
    deployed = Deployed(buffer.getvalue(), threads, exact, formats, saturating, floating, output_structure(qmodel),
                        runtime, sorted(tables))
    if example_input is not None:
        deployed(example_input)
    return deployed
