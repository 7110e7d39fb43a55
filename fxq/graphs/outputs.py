"""What a model returns, as named tensors: one tensor, or tuples, lists and dicts of them, nested
(a detector's boxes and scores, a segmenter's ``{"out": ..., "aux": ...}``, an FPN's feature maps).

    named(qmodel(x))            [("out", tensor), ("aux", tensor)]; a lone tensor is "output"
    logits(qmodel(x))           the classifier's [N, C] logits, where there are such
    OutputComparison.of(sums)   per output: SQNR against float and class agreement
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tabulate import tabulate

LONE = "output"  # the name of a model's only output


def sqnr_of_sums(signal: float, noise: float) -> float:
    """``10·log10(signal / noise)`` in dB; inf where there is no noise."""
    return float("inf") if noise == 0 else 10 * math.log10(signal / noise)


def named(output) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of ``output`` with its path: dict keys and list positions joined by dots
    (``"1.boxes"``), ``"output"`` for a lone tensor; in the order the model returns them."""
    if isinstance(output, torch.Tensor):
        return [(LONE, output)]
    found: list[tuple[str, torch.Tensor]] = []

    def walk(value, path: str) -> None:
        if isinstance(value, torch.Tensor):
            found.append((path, value))
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{key}" if path else str(key))
        elif isinstance(value, (tuple, list)):
            for index, item in enumerate(value):
                walk(item, f"{path}.{index}" if path else str(index))
    walk(output, "")
    return found


def logits(output) -> torch.Tensor | None:
    """The classifier's logits in ``output``: a lone tensor, or the only ``[N, C]`` tensor of
    several outputs; None where there is none, or more than one to choose from."""
    if isinstance(output, torch.Tensor):
        return output
    candidates = [t for _, t in named(output) if t.dim() == 2]
    return candidates[0] if len(candidates) == 1 else None


def sums(reference, approx) -> dict[str, torch.Tensor]:
    """Per output, float64 ``[Σ r², Σ (r − a)², positions whose largest channel agrees, positions]``
    (channels on dim 1; no positions where there is one channel): sums, so that batches and
    ranks add up."""
    found = {}
    for (name, r), (_, a) in zip(named(reference), named(approx)):
        r, a = r.detach().double(), a.detach().double()
        classes = r.dim() >= 2 and r.shape[1] > 1
        agree = float((r.argmax(1) == a.argmax(1)).sum()) if classes else 0.0
        positions = float(r.numel() // r.shape[1]) if classes else 0.0
        found[name] = torch.tensor([float((r ** 2).sum()), float(((r - a) ** 2).sum()), agree, positions],
                                   dtype=torch.float64)
    return found


@dataclass(frozen=True)
class OutputComparison:
    """Per output of the model: its SQNR against the float model in dB, and the share of
    positions (samples, pixels, anchors) whose largest channel is the float model's, in %
    (None for a one-channel output)."""

    rows: list[tuple[str, float, float | None]]

    @classmethod
    def of(cls, totals: dict[str, torch.Tensor]) -> "OutputComparison":
        return cls([(name, sqnr_of_sums(float(s[0]), float(s[1])),
                     100.0 * float(s[2]) / float(s[3]) if s[3] > 0 else None) for name, s in totals.items()])

    def __str__(self) -> str:
        rows = [(name, f"{sqnr:.1f}", "—" if agree is None else f"{agree:.1f}") for name, sqnr, agree in self.rows]
        return tabulate(rows, headers=["output", "SQNR dB", "same class %"], tablefmt="simple")
