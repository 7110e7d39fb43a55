"""`fxq.search_bits`: per-layer weight widths under an average-bits budget.

    result = fxq.search_bits(model, loader, avg_weight_bits=5.0)
    qmodel = fxq.quantize(model, loader, result.config, overrides=result.overrides)
    print(result.to_markdown()); result.plot("bits.png")

How: trace and calibrate once (`fxq.api.Calibrated`), and from that quantize the whole network
once per candidate width; for every layer and width, estimate the output error when only that
layer runs quantized at that width (`fxq.analysis.comparison.quantized_layer`: its integers, its
grids, the rest float): measured to the logits at the narrowest and widest width, interpolated
between by the layer's own output error (`_layer_errors`), on a subset of the calibration inputs whose
values before each layer are read from one recorded float run (`fxq.graphs.suffix`). Treating
the errors as additive, start every layer at the widest candidate and repeatedly narrow the
layer whose next step down costs the least error per weight bit saved, until the
parameter-weighted average width meets the budget. Each budget on the curve is then quantized
for real (each layer's integers at each width chosen once) and measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from tabulate import tabulate
from torch import fx, nn

from fxq import distributed
from fxq.analysis import measure
from fxq.analysis import progress as bars
from fxq.analysis.comparison import folded_float, integer_layers, quantized_layer
from fxq.api import Calibrated
from fxq.config import MAX_BITS, MIN_BITS, QConfig
from fxq.graphs import records
from fxq.graphs.suffix import Runs, chunk_size
from passes.calibrate import batch_input

CANDIDATES = (2, 3, 4, 5, 6, 8)
# How many inputs the layer errors are measured on (`scoring_inputs`): 512 images at 32×32 RGB,
# fewer at larger sizes, where each image holds more positions (and costs more to run). On four
# differently trained 28×28 models, allocations from the first 32 or 64 images scored within
# ±0.1 points of those from 512 (the note of issue 30).
SCORED_VALUES, MIN_SCORED = 512 * 3 * 32 * 32, 32


@dataclass(frozen=True)
class CurvePoint:
    """One budget, quantized and measured."""

    budget: float
    avg_weight_bits: float
    weight_bytes: int        # every weight at its width, densely packed
    accuracy: float          # % on the loader's labels (or top-1 agreement with float)
    bits: dict[str, int]


@dataclass(frozen=True)
class BitSearch:
    """The chosen widths for the requested budget, and the measured size/accuracy curve."""

    bits: dict[str, int]
    overrides: dict[str, QConfig]
    avg_weight_bits: float
    float_accuracy: float
    float_bytes: int
    errors: dict[str, dict[int, float]]  # layer → width → output error with only it quantized
    curve: list[CurvePoint]
    metric: str
    config: QConfig  # the config for everything but the weight widths: quantize with it too

    def to_markdown(self) -> str:
        rows = [("float", "32", f"{self.float_bytes / 2**20:.2f}", "1.000", f"{self.float_accuracy:.2f}", "")]
        for p in self.curve:
            rows.append((f"{p.budget:g}", f"{p.avg_weight_bits:.2f}", f"{p.weight_bytes / 2**20:.2f}",
                         f"{p.weight_bytes / self.float_bytes:.3f}", f"{p.accuracy:.2f}",
                         " ".join(f"{b}" for b in p.bits.values())))
        return tabulate(rows, headers=["budget (bits)", "avg weight bits", "weights (MiB)", "× float",
                                       self.metric, "per-layer bits, in graph order"],
                        tablefmt="github") + "\n"

    def plot(self, path: str) -> None:
        """Accuracy against weight size, one point per budget (needs matplotlib)."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError("BitSearch.plot needs matplotlib: pip install matplotlib") from error
        fig, ax = plt.subplots(figsize=(5, 3.5))
        sizes = [p.weight_bytes / 2**20 for p in self.curve]
        ax.plot(sizes, [p.accuracy for p in self.curve], "o-", label="fxq.search_bits")
        for p, x in zip(self.curve, sizes):
            ax.annotate(f"{p.avg_weight_bits:.1f} b", (x, p.accuracy), fontsize=7,
                        textcoords="offset points", xytext=(3, -9))
        ax.axhline(self.float_accuracy, color="grey", ls="--", lw=1, label="float")
        ax.set_xlabel("weight size (MiB, packed)")
        ax.set_ylabel(self.metric)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def search_bits(model: nn.Module, loader: Iterable, avg_weight_bits: float = 5.0,
                config: QConfig | None = None, candidates: Sequence[int] = CANDIDATES,
                curve_budgets: Sequence[float] | None = None,
                eval_loader: Iterable | None = None, progress: bool = False) -> BitSearch:
    """Choose each conv/linear layer's weight width so that the parameter-weighted average is at
    most ``avg_weight_bits``, losing the least output accuracy; measure the size/accuracy curve.

    ``loader`` calibrates every model and measures the per-layer errors; the curve is measured on
    ``eval_loader`` (default: ``loader``), whose items ``(images, labels)`` give accuracy and bare
    image batches the top-1 agreement with the float model. ``config`` sets everything but
    the weight widths (activations, methods; defaults follow each width). ``curve_budgets``
    (default: each candidate width, and the budget) are quantized and measured for the curve.
    Use the result as ``fxq.quantize(model, loader, result.config, overrides=result.overrides)``.
    Widths and the curve are measured with the weight rules; unless ``config`` says otherwise,
    that quantize then learns the rounding of every layer below 8 bits (``QConfig.reconstruct``),
    which the curve does not include.
    ``progress``: show a bar for each phase (quantizing per width, per-layer errors, the curve).
    """
    steps = bars.items if progress else (lambda items, desc: items)
    config = QConfig() if config is None else config
    if "keep_first_last_8bit" in config._auto:  # the search itself decides every layer's width
        config = config.replace(keep_first_last_8bit=False)
    candidates = _check(avg_weight_bits, candidates)
    # every width and budget is scored with the weight rules: learning each candidate's rounding
    # would cost minutes per width; the model quantized from the result learns its own
    scoring = config.replace(reconstruct=False) if "reconstruct" in config._auto else config
    batches = list(loader)
    if int(distributed.reduce_sum(torch.tensor(len(batches)))) == 0:  # a rank's shard may be empty
        raise ValueError("search_bits got an empty loader: pass calibration batches (images, labels)")
    shared = Calibrated(model, batches, _asking_most(scoring, candidates))
    per_width = {b: shared.quantize(scoring.with_bits(weight_bits=b))
                 for b in steps(candidates, "quantizing at each width")}
    widest = per_width[candidates[-1]]
    params = {name: layer.weight.numel() for name, layer in integer_layers(widest).items()}
    errors = _layer_errors(model, per_width, batches, steps)
    evaluation = batches if eval_loader is None else list(eval_loader)
    folded = folded_float(model, example=batch_input(evaluation[0], 0) if evaluation else None)
    references = _references(folded, evaluation)
    metric = "accuracy (%)" if references[1] is not None else "top-1 agreement with float (%)"
    budgets = sorted(set(curve_budgets or [*candidates, avg_weight_bits]), reverse=True)
    curve = []
    for budget in steps(budgets, "measuring the curve"):
        bits = allocate(errors, params, budget, candidates)
        qmodel = shared.quantize(scoring, overrides=_overrides(bits, scoring))
        curve.append(CurvePoint(budget, _average(bits, params), _packed_bytes(bits, params),
                                _score(qmodel, evaluation, references), bits))
    bits = allocate(errors, params, avg_weight_bits, candidates)
    float_bytes = 4 * sum(params.values())
    return BitSearch(bits, _overrides(bits, config), _average(bits, params),
                     _score(folded, evaluation, references), float_bytes, errors, curve, metric,
                     config)


def _asking_most(config: QConfig, candidates: Sequence[int]) -> QConfig:
    """``config`` at the narrowest width, recording every input statistic some width's rules
    need: the one calibration every candidate is quantized from."""
    widths = [config.with_bits(weight_bits=b) for b in candidates]
    aware = any(c.weight_range == "output_aware" for c in widths)
    return widths[0].replace(weight_range="output_aware" if aware else widths[0].weight_range,
                             bias_correction=any(c.bias_correction for c in widths))


def allocate(errors: dict[str, dict[int, float]], params: dict[str, int], budget: float,
             candidates: Sequence[int]) -> dict[str, int]:
    """Greedy: from the widest width everywhere, narrow the layer with the least added error per
    weight bit saved until the parameter-weighted average width is ≤ ``budget``."""
    candidates = sorted(candidates)
    bits = {name: candidates[-1] for name in params}
    total = sum(params.values())
    while _average(bits, params) > budget + 1e-9:
        best, best_cost = None, None
        for name, b in bits.items():
            index = candidates.index(b)
            if index == 0:
                continue
            narrower = candidates[index - 1]
            saved = params[name] * (b - narrower) / total
            cost = max(errors[name][narrower] - errors[name][b], 0.0) / saved
            if best_cost is None or cost < best_cost:
                best, best_cost = (name, narrower), cost
        if best is None:
            break  # every layer is at the narrowest width
        bits[best[0]] = best[1]
    return bits


def _check(budget: float, candidates: Sequence[int]) -> list[int]:
    candidates = sorted(set(candidates))
    if not candidates or any(not MIN_BITS <= b <= MAX_BITS for b in candidates):
        raise ValueError(f"candidates={candidates}: use widths from {MIN_BITS} to {MAX_BITS}")
    if not candidates[0] <= budget <= candidates[-1]:
        raise ValueError(f"avg_weight_bits={budget} is outside the candidate widths "
                         f"[{candidates[0]}, {candidates[-1]}]: no assignment can meet it")
    return candidates


def _layer_errors(model: nn.Module, per_width: dict[int, fx.GraphModule], batches,
                  steps) -> dict[str, dict[int, float]]:
    """Mean squared logit error (relative to the logits' mean square) with one layer quantized,
    for every layer and width, on `scoring_inputs`.

    Measured to the logits at the narrowest and the widest width; between them, interpolated
    linearly in the layer's own output error ``‖y_b − y‖²`` (``y`` the float layer's output,
    ``y_b`` the layer quantized at width ``b``, on the same inputs), which only the layer itself
    runs again to measure. What a layer's error does to the rest of the network is so measured
    twice per layer, not once per width. Chosen against measuring every width to the logits on
    four differently trained models (a ResNet-18, MobileNetV2/V3, an Inception net; budgets 3, 4
    and 5 of widths 2–8; test accuracy of each allocation): +0.07 points on average, −0.14 at
    worst (the note of issue 30), where one measured width scaled by the output error lost up to
    1.9 points (the Inception net at 3 bits).
    A config that folds the float model otherwise (cross-layer equalization at some widths)
    is measured as its own group. In a process group every rank measures its share of the layers
    (`fxq.distributed.mine`) on every rank's inputs.
    """
    inputs = scoring_inputs(batches)
    groups: dict[bool, list[int]] = {}
    for width, qmodel in sorted(per_width.items()):
        groups.setdefault(records.get(qmodel, QConfig).cross_layer_equalization, []).append(width)
    errors: dict[str, dict[int, float]] = {}
    for widths in groups.values():
        ends = sorted({widths[0], widths[-1]})
        folded = folded_float(model, records.get(per_width[ends[0]], QConfig), inputs)
        names = distributed.mine(list(integer_layers(per_width[ends[0]])))
        layers = {w: {name: quantized_layer(folded.get_submodule(name), m)
                      for name, m in integer_layers(per_width[w]).items() if name in names} for w in widths}
        local = {name: dict.fromkeys(widths, 0.0) for name in names}
        measured = {name: dict.fromkeys(ends, 0.0) for name in names}
        power = 0.0
        for part in inputs.split(chunk_size(folded, inputs)):
            runs = Runs(folded, part)  # each layer's run reuses the values before it
            power += float(runs.output.double().pow(2).sum())
            for name in steps(names, f"error of each layer (measured at {' and '.join(map(str, ends))} bits)"):
                for width in ends:
                    measured[name][width] += _squared(runs.with_module(name, layers[width][name]), runs.output)
                with torch.no_grad():
                    for width in widths:
                        local[name][width] += sum(_squared(layers[width][name](x), y) for x, y in runs.calls(name))
        for name in names:
            errors[name] = _interpolated({w: e / power for w, e in measured[name].items()}, local[name])
    gathered = distributed.collected(errors)
    return {name: dict(sorted(gathered[name].items())) for name in integer_layers(next(iter(per_width.values())))}


def _interpolated(measured: dict[int, float], local: dict[int, float]) -> dict[int, float]:
    """Each width's error, linear in its local error through the (one or two) ``measured`` widths."""
    (low, e_low), (high, e_high) = min(measured.items()), max(measured.items())
    span = local[low] - local[high]
    slope = (e_low - e_high) / span if span else 0.0
    return {w: measured.get(w, max(e_high + slope * (local[w] - local[high]), 0.0)) for w in local}


def scoring_inputs(batches) -> torch.Tensor:
    """The inputs the layer errors are measured on: the first ``SCORED_VALUES`` input values'
    worth of images (512 at 32×32 RGB, 128 at 64×64, 32 at 224×224), at least ``MIN_SCORED`` and
    at most 512.
    In a process group: every rank's, in rank order, cut so."""
    local = torch.cat([batch_input(item, i) for i, item in enumerate(batches)])[:512] if batches else None
    inputs = distributed.concat(local)
    count = min(512, max(MIN_SCORED, SCORED_VALUES // max(1, inputs[0].numel())))
    return inputs[:count]


def _squared(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().pow(2).sum())


def _references(folded: fx.GraphModule, batches) -> tuple[list, list | None]:
    """Per batch: the float top-1, and the labels if the loader has them (on every rank)."""
    labelled = all(isinstance(item, (tuple, list)) and len(item) > 1 for item in batches)
    labelled = bool(distributed.reduce_min(torch.tensor(int(labelled))))
    with torch.no_grad():
        top1 = [folded(batch_input(item, i)).argmax(1) for i, item in enumerate(batches)]
    return top1, [item[1] for item in batches] if labelled else None


def _score(gm: nn.Module, batches, references) -> float:
    top1, labels = references
    targets = labels if labels is not None else top1
    hits, total = measure.top1_hits(gm, ((batch_input(item, i), target)
                                        for i, (item, target) in enumerate(zip(batches, targets))))
    hits, total = distributed.reduce_sum(torch.tensor([hits, total])).tolist()
    return 100.0 * hits / total


def _overrides(bits: dict[str, int], config: QConfig) -> dict[str, QConfig]:
    return {name: config.with_bits(weight_bits=b) for name, b in bits.items()}


def _average(bits: dict[str, int], params: dict[str, int]) -> float:
    return sum(bits[n] * params[n] for n in bits) / sum(params.values())


def _packed_bytes(bits: dict[str, int], params: dict[str, int]) -> int:
    return sum((bits[n] * params[n] + 7) // 8 for n in bits)
