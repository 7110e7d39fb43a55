"""The float / fxq / deployed table of `fxq evaluate` and `fxq report`."""
from __future__ import annotations

import importlib.util
import math
import statistics
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import fx, nn

from fxq import distributed
from fxq.analysis import measure
from fxq.analysis.comparison import folded_float, integer_layers
from fxq.analysis.evaluation import evaluate
from fxq.cli.usage import UsageError
from fxq.config import QConfig
from fxq.graphs import outputs, records

# what the table measures when the model returns no classifier logits (`fxq.graphs.outputs.logits`)
AGREEMENT_NOTE = ("the model returns no classifier logits, so the table shows its outputs against the float "
                  "model's instead of an accuracy: the worst output's SQNR, and the share of positions whose "
                  "largest channel is the float model's (per output: fxq.evaluate(qmodel, loader, model).outputs)")


NOT_COMPARED = "—"  # a cell measured against a float row that is not the model fxq quantized


@dataclass(frozen=True)
class Measured:
    """The table's rows, and why its float row is no reference (then nothing is compared with it)."""

    rows: list[dict]
    reference_problems: list[str]


def measure_rows(qmodel: fx.GraphModule, data, model: nn.Module | None, limit: int | None, runs: int,
                 runtimes: Sequence[str], threads: int | None, reference_problems: list[str] = ()) -> Measured:
    """One row per model: accuracy on the test images, saved size, latency at batch 1 and at the
    batch size (median of ``runs``); a deployed row per runtime of ``runtimes`` (onnxruntime's is
    left out where it is not installed). Under torchrun the ranks share the test images
    (`fxq.evaluate`) and rank 0 alone times the latency, so that no rank competes with it.

    ``reference_problems`` (:func:`float_problems`), and a float accuracy at chance, make the float
    row no reference: it is measured, but the cells that compare with it hold ``—``."""
    candidates = [("float32", model)] if model is not None else []
    candidates.append(("fxq (integer executor)", qmodel))
    for runtime in runtimes:
        if runtime == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
            continue
        if importlib.util.find_spec(runtime) is None:
            raise UsageError(f"--runtime {runtime}: {runtime} is not installed (pip install 'fxq[{runtime}]')")
        import fxq
        deployed = fxq.deploy(qmodel, data.example(1), threads=threads or 2, runtime=runtime)
        agreement = "bit-exact" if deployed.bit_exact else "within a few steps"
        candidates.append((f"fxq deployed ({runtime}, {agreement})", deployed))
    x1, xb = data.example(1), data.example(data.batch_size)
    problems, rows, float_row = list(reference_problems), [], None
    with torch.no_grad():
        classifier = outputs.logits(qmodel(x1)) is not None
    for name, m in candidates:
        row = {"model": name, **(_accuracy(m, data, limit, name, float_row) if classifier
                                 else _agreement(m, data, limit, name, model))}
        if m is model and classifier and not problems:
            problems += _at_chance(row["accuracy %"], data.labels(limit))
        size = measure.saved_bytes(m)
        timed = distributed.rank() == 0
        row.update({"size MB": round(size / 1e6, 2),
                    "× float size": None if float_row is None else round(size / float_row["_bytes"], 3),
                    "ms batch 1": round(measure.latency_ms(m, x1, runs), 2) if timed else None,
                    f"ms batch {len(xb)}": round(measure.latency_ms(m, xb, max(3, runs // 4)), 1) if timed else None,
                    "_bytes": size})
        float_row = float_row or (row if model is not None else None)
        rows.append(row)
    if problems:
        rows[0]["model"] += " (no reference: see below)"
        for row in rows[1:]:
            row.update({k: NOT_COMPARED for k in ("vs float (points)", "× float size") if k in row})
    return Measured([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], problems)


def check_classes(data, qmodel: fx.GraphModule) -> None:
    """Refuse data with more classes than the model has outputs: those images can never be
    predicted right, and the accuracy would be quietly low."""
    with torch.no_grad():
        scores = outputs.logits(qmodel(data.example(1)))
    names = data.class_names()
    if scores is not None and len(names) > scores.shape[1]:
        raise UsageError(f"--data {data.name} has {len(names)} classes but the model gives {scores.shape[1]} "
                         f"outputs: images of {', '.join(names[scores.shape[1]:][:5])} can never be predicted "
                         "right; evaluate on the classes the model was trained for")


def float_problems(model: nn.Module, qmodel: fx.GraphModule, example: torch.Tensor, random_weights: bool) -> list[str]:
    """Why the float model cannot be the reference of fxq's rows, if it cannot: it was built
    without its trained weights, or it is not the model fxq quantized (its layers or weights
    differ from the integer model's)."""
    problems = []
    if random_weights:
        problems.append("no --weights: the float model has the random weights its constructor gives it")
    mismatch = _not_quantized_from(model, qmodel, example)
    if mismatch:
        problems.append(f"it is not the model fxq quantized: {mismatch}")
    return problems


def _at_chance(accuracy: float | None, labels: torch.Tensor) -> list[str]:
    """A float accuracy within three standard deviations of always answering the commonest class."""
    if accuracy is None or not len(labels):
        return []
    commonest = float(torch.bincount(labels).max()) / len(labels)
    chance = 100 * (commonest + 3 * math.sqrt(commonest * (1 - commonest) / len(labels)))
    if accuracy > chance:
        return []
    return [f"its accuracy ({accuracy:.1f} %) is at chance (the commonest class is {100 * commonest:.1f} % of "
            "the images): is this the trained model?"]


def _not_quantized_from(model: nn.Module, qmodel: fx.GraphModule, example: torch.Tensor) -> str | None:
    """What shows that ``qmodel`` was not made from ``model``: layers it lacks or shapes it
    disagrees on, or weights uncorrelated with the integer ones (median correlation below 0.2:
    rounding left 0.38 at 2 bits per tensor, 0.61 per channel, 0.95 at 3 bits on the suite's
    ResNet-18; a differently trained one of the same architecture gave 0.0)."""
    try:
        folded = dict(folded_float(model, records.get(qmodel, QConfig), example).named_modules())
    except Exception as error:  # noqa: BLE001 — a model fxq cannot trace is not the one it quantized
        return f"fxq cannot trace it ({type(error).__name__})"
    layers = integer_layers(qmodel)
    matched = [(folded[name].weight, layer.weight) for name, layer in layers.items()
               if isinstance(getattr(folded.get(name), "weight", None), torch.Tensor)
               and folded[name].weight.shape == layer.weight.shape]
    if len(matched) < len(layers) / 2:
        strangers = [name for name in layers if not (name in folded and hasattr(folded[name], "weight")
                                                     and folded[name].weight.shape == layers[name].weight.shape)]
        return f"it has no layer of the integer model's shape at {', '.join(strangers[:3])}"
    median = statistics.median(_correlation(weight, integers) for weight, integers in matched)
    return None if median >= 0.2 else f"its weights are unlike the integer model's (median correlation {median:.2f})"


def _correlation(weight: torch.Tensor, integers: torch.Tensor) -> float:
    """Per-channel-scale-free: each output channel's integers against its float weights, averaged."""
    a, b = weight.detach().double().flatten(1), integers.double().flatten(1)
    norms = a.norm(dim=1) * b.norm(dim=1)
    kept = norms > 0
    return float(((a * b).sum(1)[kept] / norms[kept]).mean()) if kept.any() else 0.0


def _accuracy(m, data, limit: int | None, name: str, float_row: dict | None) -> dict:
    accuracy = evaluate(m, data.evaluation(limit, f"accuracy of {name}")).accuracy
    if accuracy is None:  # a float model that gives no logits is not the classifier fxq quantized
        return {"accuracy %": None, "vs float (points)": None}
    reference = None if float_row is None else float_row["accuracy %"]
    return {"accuracy %": round(accuracy, 2),
            "vs float (points)": None if reference is None else round(accuracy - reference, 2)}


def _agreement(m, data, limit: int | None, name: str, model: nn.Module | None) -> dict:
    """The worst output's SQNR and class agreement against the float model (none for its own row)."""
    if model is None or m is model:
        return {"worst output SQNR dB": None, "same class %": None}
    rows = evaluate(m, data.evaluation(limit, f"outputs of {name}"), model).outputs.rows
    agreements = [agree for _, _, agree in rows if agree is not None]
    return {"worst output SQNR dB": round(min(sqnr for _, sqnr, _ in rows), 1),
            "same class %": round(min(agreements), 2) if agreements else None}
