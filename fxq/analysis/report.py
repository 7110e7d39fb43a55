"""`fxq report`: one page (``index.html``, plots embedded) and the same as ``report.md``.

What it holds: float vs quantized (accuracy, size, latency), every op's bits, scales, accumulator
headroom and SQNR, the worst layers' weight and activation histograms with each range rule's
clipping drawn, the per-layer sensitivity, what stayed in float and why, and the config.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tabulate import tabulate
from torch import fx, nn

from fxq import distributed
from fxq.analysis import plots
from fxq.analysis.comparison import Sensitivity, capture, compare, folded_float, sensitivity, sqnr_db
from fxq.analysis.explanation import explain
from fxq.config import ACT_RANGES, AUTO_FIELDS, WEIGHT_RANGES, QConfig, defaults_for
from fxq.graphs import records
from fxq.integers import packing
from fxq.integers.observers import InputGram, make_observer
from fxq.integers.weight_ranges import quantize_weights

SQNR_IMAGES = 256       # test images each layer's SQNR is measured on
HISTOGRAM_IMAGES = 256  # calibration images the worst layers' histograms are drawn from


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list]


@dataclass(frozen=True)
class Figure:
    name: str
    png: bytes
    caption: str


def write_report(out: Path, qmodel: fx.GraphModule, model: nn.Module, data, measured,
                 sensitivity_images: int, worst: int, source: str) -> Path:
    """Write ``out/index.html``, ``out/report.md`` and ``out/img/*.png``; returns the HTML's path.

    ``data``: a `fxq.cli.inputs.Data`; ``measured``: `fxq.cli.measurements.measure_rows`'s table."""
    images, labels = data.tensors(sensitivity_images, shard=True)  # gathered, the layers divided among ranks
    try:
        study = sensitivity(model, qmodel, images, labels, progress=True)  # a collective: every rank takes part
    except ValueError as why:  # no measure to take (a one-channel image-to-image model)
        study = str(why)
    if distributed.rank() != 0:  # under torchrun rank 0 alone writes the report
        return out / "index.html"
    config = records.get(qmodel, QConfig) or QConfig()
    records.put(qmodel, records.StatsSource(data.calibration(HISTOGRAM_IMAGES, shard=False)))  # observed accumulators
    sample, _ = data.tensors(SQNR_IMAGES)
    comparison = {name: (c, i) for name, c, i in compare(model, qmodel, sample).rows}
    if isinstance(study, Sensitivity):  # what quantizing a layer alone costs, measured
        worst_layers, basis = [name for name, _, _ in study.ranked()[:worst]], "that lose the most when quantized alone"
    else:
        worst_layers, basis = sorted(comparison, key=lambda name: comparison[name][1])[:worst], \
            "with the lowest isolated SQNR"
    sections = [
        ("Float vs quantized", _summary(measured.rows, measured.reference_problems)),
        ("Every op: bits, scales, accumulator headroom, error", _layers(qmodel, comparison)),
        ("The worst layers: where the range rules clip", _worst(qmodel, model, config, data, worst_layers, basis)),
        ("Sensitivity: one layer at a time", _sensitivity(study)),
        ("What runs in float, and why", _float_ops(qmodel)),
        ("The config", _config(config)),
    ]
    title = f"fxq report: {source}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "img").mkdir(exist_ok=True)
    (out / "report.md").write_text(_markdown(title, sections, out))
    (out / "index.html").write_text(_html(title, sections))
    return out / "index.html"


def _summary(rows: list[dict], reference_problems: list[str]) -> list:
    headers = list(rows[0])
    problems = ["The float row is no reference, so nothing is compared with it (—): " + "; ".join(reference_problems)
                + "."] if reference_problems else []
    return [Table(headers, [[r[h] if r[h] is not None else "" for h in headers] for r in rows]), *problems,
            Figure("summary", plots.summary(rows), "How well each model does on the test images (accuracy, or for a "
                   "model without classifier logits its outputs against float), saved size and batch-1 latency.")]


def _layers(qmodel: fx.GraphModule, comparison: dict) -> list:
    network = explain(qmodel)
    headers = [*network.headers[:-1], "SQNR dB cumulative", "SQNR dB isolated", network.headers[-1]]
    rows = []
    for row in network.rows:
        c, i = comparison.get(row[0], ("", ""))
        rows.append([*row[:-1], c if c == "" else f"{c:.1f}", i if i == "" else f"{i:.1f}", row[-1]])
    names = list(comparison)
    return [network.summary + ". Acc worst bits: what the accumulator can reach by construction; headroom: "
            "int32 bits to spare. SQNR (dB) of each conv/linear output against the float network, where the "
            "next layer reads it (after its ReLU/clamp, on the values kept): "
            "cumulative with everything before it quantized, isolated with only this layer "
            f"({SQNR_IMAGES} test images).",
            Table(headers, rows),
            Figure("sqnr", plots.sqnr(names, [comparison[n][0] for n in names], [comparison[n][1] for n in names]),
                   "Per-layer SQNR: a drop in the isolated line is a layer's own rounding; the cumulative line "
                   "carries every earlier layer's error too.")]


def _worst(qmodel, model, config: QConfig, data, names: list[str], basis: str) -> list:
    batches = list(data.calibration(HISTOGRAM_IMAGES, shard=False))
    folded = folded_float(model, config, _images(batches[0]))
    captured = _capture(folded, names, batches)
    blocks = [f"The {len(names)} layers {basis}. Each histogram has the range every rule "
              "would choose drawn as dashed lines; the thick line is the range the model uses."]
    for name in names:
        layer, qlayer = folded.get_submodule(name), qmodel.get_submodule(name)
        inputs, outputs = captured[name]
        blocks += _weight_clipping(name, layer, qlayer, inputs, config)
        blocks += _activation_clipping(name, outputs, qlayer, config)
    return blocks


def _images(item) -> torch.Tensor:
    return item[0] if isinstance(item, (tuple, list)) else item


def _capture(folded: fx.GraphModule, names: list[str], batches) -> dict:
    """Each named layer's (input, output) over every batch."""
    seen = [capture(folded, names, _images(item))[0] for item in batches]
    return {name: (torch.cat([s[name][0] for s in seen]), torch.cat([s[name][1] for s in seen])) for name in names}


def _weight_clipping(name: str, layer: nn.Module, qlayer: nn.Module, inputs: torch.Tensor, config: QConfig) -> list:
    bits, per_channel = packing.signed_width(qlayer.weight), config.per_channel
    qmax = 2 ** (bits - 1) - 1
    gram = InputGram(layer, name)
    gram(inputs)
    w = layer.weight.detach()
    channel = int(w.reshape(w.shape[0], -1).abs().amax(1).argmax())  # the widest channel
    clips, rows = {}, []
    for rule in WEIGHT_RANGES:
        q = quantize_weights(w, bits, per_channel, rule, gram.gram_matrix)
        w_hat = q.weight.double() * q.scales.reshape(-1, *[1] * (w.dim() - 1))
        t = float(q.scales[channel]) * qmax
        clips[rule] = (-t, t)
        rows.append([rule, f"±{t:.4g}", f"{sqnr_db(w.double(), w_hat):.1f}"])
    used = float(qlayer.weight_scale[channel]) * qmax
    clips["used by the model"] = (-used, used)
    png = plots.histogram_with_clipping(w[channel], clips, f"{name}: weights of output channel {channel} "
                                        f"(the widest), {bits}-bit", "weight (batch norm folded)")
    return [Figure(f"{name}_weights", png, f"{name}: weight histogram, each weight rule's clipping"),
            Table(["weight rule", f"clip (channel {channel})", "weight SQNR dB (whole layer)"], rows)]


def _activation_clipping(name: str, values: torch.Tensor, qlayer: nn.Module, config: QConfig) -> list:
    bits = int(qlayer.output_bits)
    clips, rows = {}, []
    for rule in ACT_RANGES:
        observer = make_observer(config.replace(act_range=rule, act_bits=bits), f"{name} output")
        for chunk in values.split(64):
            observer(chunk)
        qp = observer.qparams()
        clips[rule] = observer.range(bits)
        rows.append([rule, f"[{clips[rule][0]:.4g}, {clips[rule][1]:.4g}]",
                     f"{sqnr_db(values, qp.dequantize(qp.quantize(values))):.1f}"])
    qp = qlayer.output_qparams
    clips["used by the model"] = (qp.scale * -qp.zero_point, qp.scale * ((1 << qp.bits) - 1 - qp.zero_point))
    png = plots.histogram_with_clipping(values, clips, f"{name}: output before its activation, {bits}-bit, "
                                        f"{values.shape[0]} calibration images", "value")
    return [Figure(f"{name}_activations", png, f"{name}: output histogram, each activation rule's range"),
            Table(["activation rule", "range", "SQNR dB"], rows)]


def _sensitivity(result) -> list:
    if isinstance(result, str):
        return [f"Not measured: {result}."]
    unit = "% same class as float" if result.measure != "accuracy" else "%"
    names = [n for n, _, _ in result.rows]
    png = plots.sensitivity(names, [o - result.float_accuracy for _, o, _ in result.rows],
                            [a - result.all_quantized for _, _, a in result.rows])
    ranked = ", ".join(f"{n} ({o - result.float_accuracy:+.2f})" for n, o, _ in result.ranked()[:3])
    return [f"On {result.images} test images, {result.measure}: float {result.float_accuracy:.2f} {unit}, every "
            f"layer quantized {result.all_quantized:.2f} {unit} (weights and activations on the model's grids, in "
            f"float arithmetic). Most sensitive alone: {ranked}.",
            Figure("sensitivity", png, f"Red: the {result.measure} lost with only this layer quantized. Green: "
                   f"the {result.measure} regained by keeping only this layer in float."),
            Table(["layer", f"only this layer quantized ({unit})", f"all but this layer ({unit})"],
                  [[n, f"{o:.2f}", f"{a:.2f}"] for n, o, a in result.rows])]


def _float_ops(qmodel: fx.GraphModule) -> list:
    kept = [(n, records.get(n, records.FloatOp)) for n in qmodel.graph.nodes if records.has(n, records.FloatOp)]
    if not kept:
        return ["Nothing: every op of the model runs on integers."]
    return [f"{len(kept)} op(s) run in float, between a dequantize of their integer inputs and a quantize "
            "of their output:",
            Table(["op", "what", "why"], [[n.name, str(n.target), f.reason] for n, f in kept])]


def _config(config: QConfig) -> list:
    rows = [[f.name, repr(getattr(config, f.name)), _origin(config, f)] for f in fields(config) if f.init]
    return ["`fxq.QConfig` as the model was quantized with it (`fxq quantize --config` reads these fields "
            "from TOML).", Table(["field", "value", ""], rows)]


def _markdown(title: str, sections, out: Path) -> str:
    lines = [f"# {title}", ""]
    for heading, blocks in sections:
        lines += [f"## {heading}", ""]
        for block in blocks:
            if isinstance(block, Table):
                lines += [tabulate(block.rows, headers=block.headers, tablefmt="github"), ""]
            elif isinstance(block, Figure):
                file = _file_name(block.name)
                (out / "img" / file).write_bytes(block.png)
                lines += [f"![{block.caption}](img/{file})", ""]
            else:
                lines += [block, ""]
    return "\n".join(lines)


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) + ".png"


STYLE = """body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:12px}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
td:first-child,th:first-child{text-align:left}tr:nth-child(even){background:#f7f7f7}
figure{margin:1em 0}img{max-width:100%}figcaption{color:#555;font-size:12px}code{background:#f2f2f2}"""


def _html(title: str, sections) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for heading, blocks in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for block in blocks:
            if isinstance(block, Table):
                parts.append(tabulate(block.rows, headers=block.headers, tablefmt="html"))
            elif isinstance(block, Figure):
                data = base64.b64encode(block.png).decode()
                parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(block.caption)}'>"
                             f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")
            else:
                parts.append(f"<p>{html.escape(block)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _origin(config: QConfig, field) -> str:
    """Where a field's value came from: the defaults for the widths, QConfig's default, or the user."""
    widths = f"W{config.weight_bits}A{config.act_bits}"
    if field.name in config._auto:
        return f"default for {widths}"
    default = defaults_for(config.weight_bits, config.act_bits, config.per_channel).get(field.name, field.default)
    if getattr(config, field.name) == default:
        return "default"
    return f"set (default {default!r}" + (f" for {widths})" if field.name in AUTO_FIELDS else ")")
