"""Where does the error come from? Per-layer SQNR of a quantized model against its float model,
and layer sensitivity: accuracy with one layer quantized, or all but one.

    print(fxq.compare(model, qmodel, batch))

"Layer" here means a conv/linear: its weights, its input and its output quantized with exactly
the parameters ``qmodel`` uses. Its SQNR is measured where the next layer reads it: after the
clamp (ReLU, ReLU6) the integer model runs on its output, on the values that clamp keeps — a
conv feeding a ReLU is not charged for the negative values the ReLU drops.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from tabulate import tabulate
from torch import fx, nn

from fxq import distributed
from fxq.analysis import measure
from fxq.analysis import progress as bars
from fxq.config import QConfig
from fxq.graphs import outputs, records
from fxq.graphs.context import PassContext
from fxq.graphs.graph import replace_module
from fxq.graphs.outputs import sqnr_of_sums
from fxq.graphs.suffix import RECORD_BYTES, Runs, chunk_size
from fxq.integers.affine import ActQParams
from fxq.ops.activations import QClamp, QReLU
from fxq.ops.layers import QLayer
from passes.equalize import equalize
from passes.fold_bn import fold_bn
from passes.rewrite_layers import rewrite_layers
from passes.trace import trace


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σ r² / Σ (r − a)²)`` in dB (inf if equal)."""
    reference, approx = reference.detach().double(), approx.detach().double()
    return sqnr_of_sums(float((reference ** 2).sum()), float(((reference - approx) ** 2).sum()))


def folded_float(model: nn.Module, config: QConfig | None = None,
                 example: torch.Tensor | None = None) -> fx.GraphModule:
    """The float model as fxq sees it before quantizing with ``config``: traced, batch-norm folded
    and, if the config equalizes, cross-layer equalized (a copy; the same float function).
    ``example``, an input batch, lets a model whose code computes with sizes be traced as
    `fxq.quantize` traced it: with those sizes as constants."""
    ctx = None if example is None else PassContext(config or QConfig(), [example[:1]])
    gm = rewrite_layers(fold_bn(trace(model, ctx), None), ctx)
    if config is not None and config.cross_layer_equalization:
        gm = equalize(gm, PassContext(config, []))
    return gm


def integer_layers(qmodel: fx.GraphModule) -> dict[str, QLayer]:
    return {name: m for name, m in qmodel.named_modules() if isinstance(m, QLayer)}


def capture(gm: nn.Module, names, batch: torch.Tensor):
    """Each named submodule's (input, output) on ``batch``, and ``gm``'s output."""
    seen, handles = {}, []
    for name in names:
        def record(_, args, output, name=name):  # clone: an in-place ReLU would overwrite it
            seen[name] = (args[0].clone(), output.clone())
        handles.append(gm.get_submodule(name).register_forward_hook(record))
    with torch.no_grad():
        output = gm(batch)
    for handle in handles:
        handle.remove()
    return seen, output


def node_outputs(gm: fx.GraphModule, names, batch: torch.Tensor) -> tuple[dict, object]:
    """Each named node's output on ``batch`` (cloned: an in-place op downstream would overwrite
    it), and ``gm``'s output."""
    wanted, seen = set(names), {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if node.name in wanted and isinstance(value, torch.Tensor):
                seen[node.name] = value.clone()
            return value

    with torch.no_grad():
        output = Recorder(gm).run(batch)
    return seen, output


READ_THROUGH = (QReLU, QClamp)  # clamps at the layer's own scale: the next layer reads their output


def read_points(qmodel: fx.GraphModule, folded: fx.GraphModule) -> dict[str, fx.Node | None]:
    """Per conv/linear of ``qmodel``: the clamp node whose output the next layers read, where the
    layer's output feeds one alone and the float graph has it too; None: the layer's own output."""
    modules, float_nodes = dict(qmodel.named_modules()), {n.name for n in folded.graph.nodes}
    points = {}
    for node in qmodel.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], QLayer):
            continue
        users = list(node.users)
        clamp = users[0] if len(users) == 1 and users[0].op == "call_module" else None
        keep = clamp is not None and isinstance(modules[clamp.target], READ_THROUGH) and clamp.name in float_nodes
        points[node.target] = clamp if keep else None
    return points


def power_sums(folded: fx.GraphModule, qmodel: fx.GraphModule, batch: torch.Tensor):
    """Per conv/linear: float64 ``[Σ r², Σ (r − cumulative)², Σ (r − isolated)²]`` over ``batch``
    (``r`` the float layer's output where the next layer reads it: after its clamp, see the
    module docstring and :func:`compare`), ``qmodel``'s output and the float model's. Sums, so
    that batches and ranks add up to the SQNR of all of them."""
    layers = integer_layers(qmodel)
    if not layers:  # a deployed model: its outputs alone
        with torch.no_grad():
            return {}, qmodel(batch), folded(batch)
    points = read_points(qmodel, folded)
    float_nodes, int_nodes = _module_nodes(folded), _module_nodes(qmodel)
    read = {name: points[name].name if points[name] is not None else None for name in layers}
    float_seen, float_output = node_outputs(folded, [float_nodes[n].args[0].name for n in layers]
                                            + [read[n] or float_nodes[n].name for n in layers], batch)
    int_seen, output = node_outputs(qmodel, [read[n] or int_nodes[n].name for n in layers], batch)
    sums = {}
    with torch.no_grad():
        for name, m in layers.items():
            alone = m(m.input_qparams.quantize(float_seen[float_nodes[name].args[0].name]))  # isolated
            qp = m.output_qparams
            if points[name] is not None:
                alone = qmodel.get_submodule(points[name].target)(alone)
                qp = records.get(points[name], ActQParams) or qp
            r = float_seen[read[name] or float_nodes[name].name].double()
            cumulative = qp.dequantize(int_seen[read[name] or int_nodes[name].name]).double()
            isolated = qp.dequantize(alone).double()
            sums[name] = torch.stack([(r ** 2).sum(), ((r - cumulative) ** 2).sum(), ((r - isolated) ** 2).sum()])
    return sums, output, float_output


def _module_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Each called submodule's (first) node, by the submodule's name."""
    nodes = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            nodes.setdefault(node.target, node)
    return nodes


@dataclass(frozen=True)
class Comparison:
    """Per layer: SQNR with the whole network quantized, and with only that layer quantized."""

    rows: list[tuple[str, float, float]]

    def _table(self, fmt: str) -> str:
        return tabulate([(n, f"{c:.1f}", f"{i:.1f}") for n, c, i in self.rows],
                        headers=["layer", "cumulative SQNR dB", "isolated SQNR dB"], tablefmt=fmt)

    def __str__(self) -> str:
        return self._table("simple")

    def to_markdown(self) -> str:
        return self._table("github") + "\n"

    @classmethod
    def of(cls, sums: dict) -> "Comparison":
        """From :func:`power_sums` (summed over any number of batches)."""
        return cls([(name, sqnr_of_sums(float(s[0]), float(s[1])), sqnr_of_sums(float(s[0]), float(s[2])))
                    for name, s in sums.items()])


def compare(model: nn.Module, qmodel: fx.GraphModule, batch: torch.Tensor) -> Comparison:
    """SQNR of each conv/linear output of ``qmodel`` against ``model``, where the next layer reads
    it (after the ReLU/clamp that alone consumes it, if any: the module docstring).

    cumulative: the integer network end to end, so errors of all earlier layers are included.
    isolated: the float network's own input to the layer, quantized, through this one integer
    layer (and its clamp): the error this layer adds by itself. (`fxq.evaluate` does the same
    over a loader.)
    """
    sums, _, _ = power_sums(folded_float(model, example=batch), qmodel, batch)
    return Comparison.of(sums)


def _snap_to_grid(qparams):
    return qparams.snap


def with_quantized_layers(folded: fx.GraphModule, qmodel: fx.GraphModule, names) -> fx.GraphModule:
    """A copy of the folded float model in which the named layers run as ``qmodel`` runs them
    (:func:`quantized_layer`)."""
    gm = copy.deepcopy(folded)
    layers = integer_layers(qmodel)
    for name in names:
        replace_module(gm, name, quantized_layer(folded.get_submodule(name), layers[name]))
    return gm


def quantized_layer(layer: nn.Module, m: QLayer) -> nn.Module:
    """A copy of the folded float ``layer`` that runs as the integer layer ``m``: dequantized
    integer weights and bias, input and output snapped to its grid with its parameters."""
    layer = copy.deepcopy(layer)
    shape = (-1,) + (1,) * (m.weight.dim() - 1)
    layer.weight.data = (m.weight.double() * m.weight_scale.reshape(shape)).float()
    layer.bias = nn.Parameter((m.bias.double() * m.input_scale * m.weight_scale).float())
    quantize_in, quantize_out = _snap_to_grid(m.input_qparams), _snap_to_grid(m.output_qparams)
    layer.register_forward_pre_hook(lambda _, args, f=quantize_in: (f(args[0]),))
    layer.register_forward_hook(lambda _, args, out, f=quantize_out: f(out))
    return layer


@dataclass(frozen=True)
class Sensitivity:
    """Accuracy with only one layer quantized, and with every layer but that one quantized. A
    model without classifier logits (a detector, a segmenter) is measured by its outputs' class
    agreement with the float model instead (``measure``)."""

    float_accuracy: float
    all_quantized: float
    rows: list[tuple[str, float, float]]  # (layer, only this layer, all but this layer)
    images: int = 0  # how many test images (of every rank) it was measured on
    measure: str = "accuracy"  # or AGREEMENT

    def ranked(self) -> list[tuple[str, float, float]]:
        """Layers by the accuracy lost when only they are quantized, worst first."""
        return sorted(self.rows, key=lambda r: r[1])

    def to_markdown(self) -> str:
        rows = [(n, f"{o:.2f} ({o - self.float_accuracy:+.2f})", f"{a:.2f} ({a - self.all_quantized:+.2f})")
                for n, o, a in self.rows]
        return tabulate(rows, headers=["layer", "only this layer quantized (vs float)",
                                       "all but this layer (vs all quantized)"], tablefmt="github") + "\n"


def sensitivity(model: nn.Module, qmodel: fx.GraphModule, images: torch.Tensor,
                labels: torch.Tensor, progress: bool = False) -> Sensitivity:
    """Quantize one layer at a time (the rest float), and all layers but one, as ``qmodel`` does.
    ``progress``: a bar over the layers. In a process group, each rank passes its shard of the
    images; they are gathered to every rank, the layers divided among the ranks, and every rank
    returns the whole study.

    Each study changes one layer of the float model (or of the all-quantized one): the values
    before that layer are read from one recorded run (`fxq.graphs.suffix.Runs`), not computed again."""
    images, labels = distributed.concat(images), distributed.concat(labels)
    folded = folded_float(model, records.get(qmodel, QConfig), images)
    layers = integer_layers(qmodel)
    quantized = with_quantized_layers(folded, qmodel, list(layers))
    mine = distributed.mine(list(layers))
    alone = {name: quantized_layer(folded.get_submodule(name), layers[name]) for name in mine}
    size = chunk_size(folded, images, RECORD_BYTES // 2)  # two records at a time
    keys = ["float", "all"] + [(name, study) for name in mine for study in (0, 1)]
    totals = {key: torch.zeros(2, dtype=torch.float64) for key in keys}
    classifier = False
    with bars.bar(len(mine) * -(-len(images) // size), "sensitivity, layer by layer", "layer", progress) as bar:
        for chunk, target in zip(images.split(size), labels.split(size)):
            float_runs, quantized_runs = Runs(folded, chunk), Runs(quantized, chunk)
            score = _scorer(float_runs.output, target)
            classifier = outputs.logits(float_runs.output) is not None
            totals["float"] += score(float_runs.output)
            totals["all"] += score(quantized_runs.output)
            for name in mine:
                totals[name, 0] += score(float_runs.with_module(name, alone[name]))
                totals[name, 1] += score(quantized_runs.with_module(name, folded.get_submodule(name)))
                bar.update(1)
    done = distributed.collected({name: (_percent(totals[name, 0]), _percent(totals[name, 1])) for name in mine})
    rows = [(name, *done[name]) for name in layers]
    return Sensitivity(_percent(totals["float"]), _percent(totals["all"]), rows, len(labels),
                       "accuracy" if classifier else AGREEMENT)


AGREEMENT = "same class as float"  # the share of output positions whose largest channel is the float model's


def _scorer(reference, labels: torch.Tensor):
    """``output → [hits, total]``: top-1 hits on ``labels`` for a classifier, else the positions of
    every multi-channel output whose largest channel is ``reference``'s."""
    if outputs.logits(reference) is not None:
        return lambda out: torch.tensor([measure.correct(outputs.logits(out), labels), len(labels)],
                                        dtype=torch.float64)

    def agreement(out) -> torch.Tensor:
        totals = sum(outputs.sums(reference, out).values())
        if totals[3] == 0:
            raise ValueError("the model returns no classifier logits and no output of several channels: there "
                             "is no class to agree on, so layer sensitivity is not measured (compare SQNR with "
                             "fxq.compare)")
        return totals[2:]
    return agreement


def _percent(counts: torch.Tensor) -> float:
    return 100.0 * float(counts[0]) / float(counts[1])
