"""`fxq.explain`: one integer layer's dataflow, step by step, with this model's numbers and the
bit width of every step — worst case, and as observed on real data.

    print(fxq.explain(qmodel, "layer1.0.conv1"))           # text, one line per step
    fxq.explain(qmodel, "layer1.0.conv1", batch).check      # formula vs the executed graph
    print(fxq.explain(qmodel))                              # the whole network, one row per op
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tabulate import tabulate
from torch import fx

from fxq.config import QConfig, Rounding
from fxq.graphs import records
from fxq.graphs.graph import run_recording
from fxq.graphs.qmodules import Dequantize, Quantize
from fxq.graphs.records import IntRange, Observed
from fxq.integers import gemm, intmath, packing
from fxq.integers.affine import ActQParams
from fxq.integers.reference import reference_output
from fxq.ops.activations import QReLU, QRequantize
from fxq.ops.qlayer import QLayer
from passes.reconstruct import Reconstruction
from passes.record_stats import StatsRecorder, observe_on_demand


def unsigned_bits(hi: int) -> int:
    """The least b with ``hi ≤ 2^b − 1``."""
    return max(1, int(hi).bit_length())


def signed_bits(lo: int, hi: int) -> int:
    """The least b with ``−2^(b−1) ≤ lo`` and ``hi ≤ 2^(b−1) − 1`` (two's complement)."""
    return max(int(-lo - 1).bit_length() if lo < 0 else 0, int(hi).bit_length()) + 1


def bits_of(r: IntRange) -> int:
    """Bits that hold ``r``: unsigned when it has no negatives, two's complement otherwise."""
    return unsigned_bits(r.hi) if r.lo >= 0 else signed_bits(r.lo, r.hi)


@dataclass(frozen=True)
class Step:
    """One step of the dataflow: its value, storage, designed width and what data produced."""

    what: str
    dtype: str
    worst: IntRange            # every value the step can take, by construction
    observed: IntRange | None  # what calibration (or the given batch) produced
    note: str = ""

    @property
    def bits(self) -> int:
        return bits_of(self.worst)

    @property
    def observed_bits(self) -> int | None:
        return None if self.observed is None else bits_of(self.observed)

    def row(self, index: int) -> list:
        seen = "—" if self.observed is None else f"[{self.observed.lo}, {self.observed.hi}] ({self.observed_bits} b)"
        return [index, self.what, self.dtype, f"[{self.worst.lo}, {self.worst.hi}] ({self.bits} b)", seen, self.note]


@dataclass(frozen=True)
class Check:
    """The layer's formula recomputed from its integers in int64, against the executed graph."""

    elements: int
    mismatches: int

    def __str__(self) -> str:
        verdict = "exact match" if self.mismatches == 0 else f"{self.mismatches} MISMATCHES"
        return f"formula vs executed graph on the batch: {verdict} ({self.elements:,} output integers)"


HEADERS = ["#", "step", "dtype", "worst case (bits)", "observed (bits)", "how"]


@dataclass(frozen=True)
class LayerExplanation:
    layer: str
    summary: str
    steps: list[Step]
    formula: str
    check: Check | None = None
    source: str = "calibration samples"

    def _table(self, fmt: str) -> str:
        return tabulate([s.row(i + 1) for i, s in enumerate(self.steps)], headers=HEADERS, tablefmt=fmt)

    def __str__(self) -> str:
        parts = [f"{self.layer}: {self.summary}", f"(observed: {self.source})", self._table("simple"),
                 "", self.formula]
        return "\n".join(parts + ([str(self.check)] if self.check else []))

    def to_markdown(self) -> str:
        parts = [f"### `{self.layer}`", "", self.summary, "", f"Observed on the {self.source}.", "",
                 self._table("github"), "", "```", self.formula, "```"]
        return "\n".join(parts + (["", str(self.check)] if self.check else [])) + "\n"


@dataclass(frozen=True)
class NetworkExplanation:
    """One row per op of the quantized graph; the last column says whether it ran on integers."""

    rows: list[list] = field(default_factory=list)
    requantize: str = "fixed_point"
    backends: dict = field(default_factory=dict)  # layer → the `fxq.integers.gemm` backend of its last call
    learned: list = field(default_factory=list)  # one row per layer whose integers `passes.reconstruct` chose
    headers: tuple = ("op", "kind", "in scale", "out scale", "in bits", "weight bits",
                      "acc worst bits", "acc observed bits", "acc headroom", "out bits", "runs on")

    @property
    def integer_ops(self) -> int:
        return sum(row[-1] == "integers" for row in self.rows)

    @property
    def float_ops(self) -> int:
        return len(self.rows) - self.integer_ops

    @property
    def summary(self) -> str:
        total = max(len(self.rows), 1)
        arithmetic = ("onnxruntime's (float32 multipliers, ties to even): fxq.deploy is bit-exact"
                      if self.requantize == "onnxruntime"
                      else "fixed point (int32 multiplier and shift, ties away from zero)")
        used = [str(b) for b in self.backends.values() if b is not None]
        counts = ", ".join(f"{name} ×{used.count(name)}" for name in dict.fromkeys(sorted(used)))
        backends = (f"; accumulators (all exact): {counts} ({gemm.how_chosen()})" if used else "")
        return (f"{self.integer_ops} of {len(self.rows)} ops run on integers "
                f"({100 * self.integer_ops / total:.0f} %), {self.float_ops} in float; requantization: {arithmetic}"
                + backends)

    LEARNED_HEADERS = ("layer", "weights rounded away from nearest", "output error, weight rule",
                       "output error, learned", "change")

    def _learned(self, tablefmt: str) -> str:
        if not self.learned:
            return ""
        return ("\n\nLearned rounding and output ranges (passes.reconstruct; mean squared output error on the "
                "calibration images, after the layer's activation):\n"
                + tabulate(self.learned, headers=self.LEARNED_HEADERS, tablefmt=tablefmt))

    def __str__(self) -> str:
        return (tabulate(self.rows, headers=self.headers, tablefmt="simple") + "\n" + self.summary
                + self._learned("simple"))

    def to_markdown(self) -> str:
        return (tabulate(self.rows, headers=self.headers, tablefmt="github") + "\n\n" + self.summary
                + self._learned("github") + "\n")


def explain(qmodel: fx.GraphModule, layer: str | None = None, batch: torch.Tensor | None = None):
    """Explain ``layer`` of a quantized model (a conv or linear module path), or, with no layer,
    the whole network. With ``batch``, the observed ranges come from that batch and the layer's
    formula is recomputed in int64 and compared with the executed graph. Without ``batch``, the
    ranges are those of the first calibration samples (kept by calibration,
    `passes.calibrate.KEPT_SAMPLES`), run through the integer graph the first time an explanation
    asks for them: seconds on any model (not for a model read by `fxq.load`: it carries no data)."""
    if batch is None:
        observe_on_demand(qmodel)
    if layer is None:
        return _network(qmodel)
    node = _layer_node(qmodel, layer)
    seen = _run(qmodel, batch) if batch is not None else {n: records.get(n, Observed) for n in qmodel.graph.nodes}
    explanation = _layer(qmodel, node, seen, "given batch" if batch is not None else "calibration samples")
    if batch is None:
        return explanation
    return LayerExplanation(**{**explanation.__dict__, "check": _check(qmodel, node, batch)})


def _layer_node(qmodel: fx.GraphModule, layer: str) -> fx.Node:
    modules = dict(qmodel.named_modules())
    layers = [n for n in qmodel.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], QLayer)]
    for n in layers:
        if n.target == layer:
            return n
    raise ValueError(f"{layer!r} is not an integer conv/linear of this model; choose one of "
                     f"{[n.target for n in layers]}")


def _run(qmodel: fx.GraphModule, batch: torch.Tensor) -> dict:
    recorder = StatsRecorder(qmodel)
    with torch.no_grad():
        recorder.run(batch)
    return recorder.seen


def _layer(qmodel, node: fx.Node, seen: dict, source: str) -> LayerExplanation:
    m: QLayer = qmodel.get_submodule(node.target)
    z_in, z_out = int(m.input_zero_point), int(m.output_zero_point)
    qmax_in = (1 << _bits_of_input(qmodel, node)) - 1
    qmax_out = (1 << m.output_bits) - 1
    k = m.weight[0].numel()
    w = m.weight.to(torch.int64)
    wmax = int(w.abs().max())
    in_seen = _observed(seen, node.args[0])
    out_seen = _observed(seen, node)
    acc_seen = seen.get(node).accumulator if seen.get(node) else None
    centered_seen = None if in_seen is None else IntRange(in_seen.lo - z_in, in_seen.hi - z_in)
    bias = IntRange.of(m.bias)
    bound = m.accumulator_bound
    multiplier = m.multiplier.to(torch.int64)
    shift = m.shift.to(torch.int64)
    real_m = m.input_scale * m.weight_scale / m.output_scale
    relu = next((u for u in node.users if u.op == "call_module"
                 and isinstance(qmodel.get_submodule(u.target), QReLU)), None)
    in_dtype, out_dtype = _dtype(_bits_of_input(qmodel, node)), _dtype(m.output_bits)
    acc_dtype = f"int{m.accumulator_bits}"
    accumulated = _how_accumulated(m)
    centred = IntRange(-z_in, qmax_in - z_in)
    steps = [
        Step("input I_q", in_dtype, IntRange(0, qmax_in), in_seen, f"s_I = {float(m.input_scale):.6g}, z_I = {z_in}"),
        Step("I_q − z_I", _signed_dtype(centred), centred, centered_seen, "centred: real 0 is 0"),
        Step("weight W_q", "int8", IntRange.of(m.weight), IntRange.of(m.weight),
             f"{_weight_bits(m)}-bit symmetric {_granularity(m)}, "
             f"s_W ∈ [{float(m.weight_scale.min()):.3g}, {float(m.weight_scale.max()):.3g}]"),
        Step("W_q·(I_q − z_I)", "int32", IntRange(-wmax * max(z_in, qmax_in - z_in), wmax * max(z_in, qmax_in - z_in)),
             None, "one product"),
        Step("bias b_q", "int32", bias, bias, "at scale s_I·s_W[c], zero point 0"),
        Step(f"acc = Σ_{k} W_q·(I_q − z_I) + b_q", acc_dtype, IntRange(-bound, bound), acc_seen,
             f"K = {k} terms; {accumulated}; "
             f"headroom {m.accumulator_bits - signed_bits(-bound, bound)} b of {acc_dtype}"),
        *(_runtime_steps(m, bound, acc_seen, out_dtype, out_seen) if m.requantize_as is Rounding.ONNXRUNTIME else [
            Step("acc · m", "int64", _times(IntRange(-bound, bound), int(multiplier.max())),
                 None if acc_seen is None else _times(acc_seen, int(multiplier.max())),
                 f"M = s_I·s_W/s_O ∈ [{float(real_m.min()):.3g}, {float(real_m.max()):.3g}] = m·2^(shift−31), "
                 f"m ∈ [{int(multiplier.min())}, {int(multiplier.max())}], "
                 f"shift ∈ [{int(shift.min())}, {int(shift.max())}]"),
            Step("O_q = clamp(z_O + round(·/2^(31−shift)))", out_dtype, IntRange(0, qmax_out), out_seen,
                 f"round half away from zero; z_O = {z_out}, s_O = {float(m.output_scale):.6g}")]),
    ]
    if relu is not None:
        steps.append(Step("ReLU: max(O_q, z_O)", out_dtype, IntRange(z_out, qmax_out), _observed(seen, relu),
                          "real 0 is z_O, so ReLU is a max with it"))
        steps.extend(_requantize_steps(qmodel, relu, seen))
    elif _placement(qmodel) == "post" and z_out == 0:
        steps.append(Step("ReLU: in the clamp above", out_dtype, IntRange(0, qmax_out), out_seen,
                          "placement post: z_O = 0, so clamping at 0 is the ReLU"))
    steps.append(_final_dequantize(qmodel))
    kind = m.kind
    summary = (f"integer {kind}, weight {tuple(m.weight.shape)} {_weight_bits(m)}-bit (int8), K = {k}; "
               f"output {m.output_bits}-bit at s_O = {float(m.output_scale):.6g}")
    formula = (f"O_q = clamp({z_out} + round(M[c] · (Σ W_q·(I_q − {z_in}) + b_q[c])), 0, {qmax_out})\n"
               f"M[c] = {float(m.input_scale):.6g} · s_W[c] / {float(m.output_scale):.6g} "
               f"= m[c] · 2^(shift[c] − 31), e.g. channel 0: m = {int(multiplier[0])}, shift = {int(shift[0])}")
    if m.requantize_as is Rounding.ONNXRUNTIME:
        formula = (f"O_q = clamp({z_out} + round_half_even(float32(acc[c]) · M[c]), 0, {qmax_out}),  "
                   f"acc[c] = Σ W_q·(I_q − {z_in}) + b_q[c]\n"
                   f"M[c] = float32(s_I·s_W[c]) / float32(s_O) in float32, as onnxruntime's QLinearConv/QGemm; "
                   f"e.g. channel 0: M = {float(m.runtime_multiplier[0]):.9g}")
    return LayerExplanation(node.target, summary, steps, formula, None, source)


def _runtime_steps(m: QLayer, bound: int, acc_seen, out_dtype: str, out_seen) -> list[Step]:
    """Formula (2) as `QConfig.requantize="onnxruntime"` computes it: what onnxruntime runs."""
    largest = float(m.runtime_multiplier.max())
    return [
        Step("float32(acc) · M", "float32", IntRange(round(-bound * largest), round(bound * largest)),
             None if acc_seen is None else IntRange(round(acc_seen.lo * largest), round(acc_seen.hi * largest)),
             f"M = float32(s_I·s_W)/float32(s_O) ∈ [{float(m.runtime_multiplier.min()):.3g}, {largest:.3g}], "
             "one float32 multiply (onnxruntime's MLAS requantization)"),
        Step("O_q = clamp(z_O + round(·))", out_dtype, IntRange(0, (1 << m.output_bits) - 1), out_seen,
             f"round half to even; z_O = {int(m.output_zero_point)}, s_O = {float(m.output_scale):.6g}"),
    ]


def _how_accumulated(m: QLayer) -> str:
    """How the executed graph formed the accumulator: the backend `fxq.integers.gemm` chose here."""
    backend = m.backend
    if backend is None:
        return "not run yet in this process (the backend is chosen at the first call), exact"
    if backend is gemm.Backend.INTEGER and getattr(m, "depthwise", False):
        kernel = "k_h·k_w multiply-adds of shifted maps in int32"
    elif backend is gemm.Backend.INTEGER:
        kernel = "int8 GEMM (torch._int_mm)" + (f" per group ({m.groups})" if m.groups > 1 else "")
    elif backend is gemm.Backend.FLOAT32:
        chunks = len(m.float32_chunks)
        kernel = (f"float32 {m.operation} on I_q − z_I in {chunks} "
                  f"chunk{'s' * (chunks > 1)} of input channels, every partial sum ≤ 2^24")
    else:
        kernel = f"float64 {m.operation} on integers < 2^53"
    return f"{kernel}, exact ({backend} backend, {gemm.how_chosen()})"


def _times(r: IntRange, factor: int) -> IntRange:
    return IntRange(r.lo * factor, r.hi * factor)


def _observed(seen: dict, node) -> IntRange | None:
    record = seen.get(node) if isinstance(node, fx.Node) else None
    return None if record is None else record.output


def _dtype(bits: int) -> str:
    return str(intmath.storage_dtype(bits)).removeprefix("torch.")


def _signed_dtype(r: IntRange) -> str:
    return "int16" if signed_bits(r.lo, r.hi) <= 16 else "int32"


def _granularity(m: QLayer) -> str:
    return "per tensor" if m.weight_scale.unique().numel() == 1 else "per channel"


def _weight_bits(m: QLayer) -> int:
    """The width the layer's weights were quantized to (the narrowest symmetric range holding them)."""
    return packing.signed_width(m.weight)


def _placement(qmodel: fx.GraphModule) -> str | None:
    config = records.get(qmodel, QConfig)
    return None if config is None else config.placement


def _requantize_steps(qmodel: fx.GraphModule, relu: fx.Node, seen: dict) -> list[Step]:
    """Placement "both": the second quantization, after the ReLU."""
    after = next((u for u in relu.users if u.op == "call_module"
                  and isinstance(qmodel.get_submodule(u.target), QRequantize)), None)
    if after is None:
        return []
    op: QRequantize = qmodel.get_submodule(after.target)
    qp = records.get(after, ActQParams)
    return [Step("requantize: clamp(z₂ + round(M₂·(q − z_O)))", _dtype(qp.bits), IntRange(0, qp.qmax),
                 _observed(seen, after), f"placement both: M₂ = s_O/s₂, z₂ = {int(op.output_zero_point)}, "
                 f"s₂ = {qp.scale:.6g}; a {1 << op.input_bits}-entry table")]


def _bits_of_input(qmodel, node: fx.Node) -> int:
    """The activation bits of the layer's input value (the producer's config)."""
    return records.get(node.args[0], ActQParams).bits


def _final_dequantize(qmodel) -> Step:
    output = next(n for n in qmodel.graph.nodes if n.op == "output")
    logits = output.all_input_nodes[0]
    qp = qmodel.get_submodule(logits.target).qparams  # the Dequantize the network ends with
    return Step("logits: s·(q − z) at the end", "float32", IntRange(0, qp.qmax), None,
                f"the network dequantizes once: s = {qp.scale:.6g}, z = {qp.zero_point}")


def _check(qmodel: fx.GraphModule, node: fx.Node, batch: torch.Tensor) -> Check:
    values = {}

    def keep(n: fx.Node, value) -> None:
        if n is node or n is node.args[0]:  # the layer's input and output integers
            values[n] = value

    run_recording(qmodel, batch, keep)
    m: QLayer = qmodel.get_submodule(node.target)
    expected = reference_output(m, values[node.args[0]])
    got = values[node].to(torch.int64)
    return Check(got.numel(), int((got != expected).sum()))


def _network(qmodel: fx.GraphModule) -> NetworkExplanation:
    modules = dict(qmodel.named_modules())
    rows = []
    for node in qmodel.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        kept = records.get(node, records.FloatOp)
        if kept is not None:
            rows.append([_name(node), _kind(node, module)] + [""] * 8 + [f"float: {kept.reason}"])
            continue
        qp = records.get(node, ActQParams)
        if qp is None or node.op == "placeholder" or isinstance(module, (Quantize, Dequantize)):
            continue
        inputs = [a for a in node.all_input_nodes if records.has(a, ActQParams)]
        in_scale = ", ".join(f"{records.get(a, ActQParams).scale:.4g}" for a in inputs) or "float"
        in_bits = ", ".join(str(records.get(a, ActQParams).bits) for a in inputs) or "32 (float)"
        row = [_name(node), _kind(node, module), in_scale, f"{qp.scale:.4g}", in_bits, "", "", "", "",
               qp.bits, "integers"]
        if isinstance(module, QLayer):
            bound = module.accumulator_bound
            worst = signed_bits(-bound, bound)
            stats = records.get(node, Observed)
            observed = bits_of(stats.accumulator) if stats and stats.accumulator else "—"
            row[5:9] = [bits_of(IntRange.of(module.weight)), worst, observed, module.accumulator_bits - worst]
        rows.append(row)
    config = records.get(qmodel, QConfig)
    backends = {name: m.backend for name, m in modules.items() if isinstance(m, QLayer)}
    return NetworkExplanation(rows, "fixed_point" if config is None else config.requantize, backends,
                              _learned_rows(qmodel))


def _learned_rows(qmodel: fx.GraphModule) -> list[list]:
    rows = []
    for node in qmodel.graph.nodes:
        r = records.get(node, Reconstruction)
        if r is not None:
            change = (f"{100 * (r.error_after / r.error_before - 1):+.1f} %" if r.error_before > 0 else "—")
            rows.append([_name(node), f"{r.flipped} of {r.weights} ({100 * r.flipped / r.weights:.1f} %)",
                         f"{r.error_before:.4g}", f"{r.error_after:.4g}", change])
    return rows


def _name(node: fx.Node) -> str:
    return node.target if node.op == "call_module" else node.name


def _kind(node: fx.Node, module) -> str:
    if module is not None:
        return type(module).__name__
    return getattr(node.target, "__name__", str(node.target))
