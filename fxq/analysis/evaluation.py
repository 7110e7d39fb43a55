"""`fxq.evaluate`: accuracy of a quantized model over a loader, and the per-layer SQNR of
`fxq.compare` over all of it; in a torch.distributed group, over every rank's shard.

    result = fxq.evaluate(qmodel, test_loader, model)   # model: the float model, for the SQNR
    print(result.accuracy, result.layers)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import fx, nn

from fxq import distributed
from fxq.analysis import measure
from fxq.analysis.comparison import Comparison, folded_float, integer_layers, power_sums
from fxq.config import QConfig
from fxq.graphs import outputs, records
from fxq.graphs.outputs import OutputComparison
from passes.calibrate import batch_input


@dataclass(frozen=True)
class Evaluation:
    """Over every batch (of every rank): top-1 accuracy in % (None if the loader has no labels,
    or the model returns no classifier logits: `fxq.graphs.outputs.logits`), how many samples, each
    conv/linear's SQNR against the float model and each output's SQNR and class agreement
    (None without the float model)."""

    accuracy: float | None
    samples: int
    layers: Comparison | None
    outputs: OutputComparison | None = None

    def __str__(self) -> str:
        head = f"{self.samples} samples" + ("" if self.accuracy is None else f", accuracy {self.accuracy:.2f} %")
        parts = [head] + [str(part) for part in (self.outputs, self.layers) if part is not None]
        return "\n".join(parts)


def evaluate(qmodel: fx.GraphModule, loader: Iterable, model: nn.Module | None = None) -> Evaluation:
    """Run ``loader``'s batches (tensors, or ``(images, labels, ...)``) through ``qmodel``.

    With the float ``model``, also measure each conv/linear output's SQNR, cumulative and isolated
    (as `fxq.compare`), from signal and noise summed over every batch. Called on every rank of a
    process group with each rank's shard, the counts and sums are added over the ranks, and every
    rank returns the result for the union.
    """
    folded = None  # traced at the first batch, with its sizes (as quantize traced the model)
    hits = samples = labelled = 0
    sums: dict[str, torch.Tensor] = {}
    output_sums: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for index, item in enumerate(loader):
            x = batch_input(item, index)
            if model is None:
                output = qmodel(x)
            else:
                folded = folded or folded_float(model, _config_of(qmodel), x)
                batch_sums, output, reference = power_sums(folded, qmodel, x)
                sums = {name: sums.get(name, 0) + value for name, value in batch_sums.items()}
                output_sums = {name: output_sums.get(name, 0) + value
                               for name, value in outputs.sums(reference, output).items()}
            scores = outputs.logits(output)
            if isinstance(item, (tuple, list)) and len(item) > 1 and scores is not None:
                hits += measure.correct(scores, item[1])
                labelled += len(item[1])
            samples += len(x)
    hits, samples, labelled = distributed.reduce_sum(torch.tensor([hits, samples, labelled])).tolist()
    if samples == 0:
        raise ValueError("the loader yielded no batches: pass a non-empty DataLoader or list of batches")
    layers = None
    if model is not None:  # every rank stacks the same layers, zeros where it saw no batch
        names = list(integer_layers(qmodel))  # none for a deployed model
        total = distributed.reduce_sum(torch.stack([sums.get(n, torch.zeros(3, dtype=torch.float64))
                                                    for n in names])) if names else []
        layers = Comparison.of(dict(zip(names, total))) if names else None
        kept = distributed.reduce_sum(torch.stack(list(output_sums.values())))
        compared = OutputComparison.of(dict(zip(output_sums, kept)))
    accuracy = 100.0 * hits / labelled if labelled == samples else None
    return Evaluation(accuracy, samples, layers, compared if model is not None else None)


def _config_of(qmodel: nn.Module) -> QConfig | None:
    """The config ``qmodel`` was quantized with (None for a deployed model: it is not a graph)."""
    return records.get(qmodel, QConfig) if isinstance(qmodel, fx.GraphModule) else None
