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

from fxq import distributed, measure, records
from fxq.comparison import Comparison, folded_float, integer_layers, power_sums
from fxq.config import QConfig
from passes.calibrate import batch_input


@dataclass(frozen=True)
class Evaluation:
    """Over every batch (of every rank): top-1 accuracy in % (None if the loader has no labels),
    how many samples, and each conv/linear's SQNR against the float model (None without it)."""

    accuracy: float | None
    samples: int
    layers: Comparison | None

    def __str__(self) -> str:
        head = f"{self.samples} samples" + ("" if self.accuracy is None else f", accuracy {self.accuracy:.2f} %")
        return head if self.layers is None else f"{head}\n{self.layers}"


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
    with torch.no_grad():
        for index, item in enumerate(loader):
            x = batch_input(item, index)
            if model is None:
                output = qmodel(x)
            else:
                folded = folded or folded_float(model, records.get(qmodel, QConfig), x)
                batch_sums, output = power_sums(folded, qmodel, x)
                sums = {name: sums.get(name, 0) + value for name, value in batch_sums.items()}
            if isinstance(item, (tuple, list)) and len(item) > 1:
                hits += measure.correct(output, item[1])
                labelled += len(item[1])
            samples += len(x)
    hits, samples, labelled = distributed.reduce_sum(torch.tensor([hits, samples, labelled])).tolist()
    if samples == 0:
        raise ValueError("the loader yielded no batches: pass a non-empty DataLoader or list of batches")
    layers = None
    if model is not None:  # every rank stacks the same layers, zeros where it saw no batch
        names = list(integer_layers(qmodel))
        total = distributed.reduce_sum(torch.stack([sums.get(n, torch.zeros(3, dtype=torch.float64)) for n in names]))
        layers = Comparison.of(dict(zip(names, total)))
    accuracy = 100.0 * hits / labelled if labelled == samples else None
    return Evaluation(accuracy, samples, layers)
