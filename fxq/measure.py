"""What a model costs and how well it does: accuracy, saved size, latency."""
from __future__ import annotations

import io
import statistics
import time
from typing import Iterable

import torch
from torch import fx

from fxq import records
from fxq.config import QConfig
from fxq.serialize import save


def saved_bytes(model: torch.nn.Module) -> int:
    """Bytes of the file the model is kept in: `fxq.save`'s for a quantized model (weights
    bit-packed at their widths), the ONNX file for a deployed one, else
    ``torch.save(model.state_dict())``."""
    if hasattr(model, "model_bytes"):
        return len(model.model_bytes)
    buffer = io.BytesIO()
    if isinstance(model, fx.GraphModule) and records.get(model, QConfig) is not None:
        save(model, buffer)
    else:
        torch.save(model.state_dict(), buffer)
    return buffer.tell()


@torch.no_grad()
def latency_ms(model: torch.nn.Module, x: torch.Tensor, runs: int) -> float:
    """Median wall time of ``model(x)`` over ``runs`` calls, after one warm-up call."""
    model(x)  # first-call allocations and kernel selection
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def correct(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """How many rows of ``logits`` have their largest value at the label (top-1 hits)."""
    return int((logits.argmax(1) == labels).sum())


@torch.no_grad()
def top1_hits(model, batches: Iterable) -> tuple[int, int]:
    """``(hits, images)`` of ``model`` over ``(images, labels)`` batches."""
    if isinstance(model, torch.nn.Module):
        model.eval()
    hits = total = 0
    for images, labels in batches:
        hits += correct(model(images), labels)
        total += len(labels)
    return hits, total


def accuracy(model, batches: Iterable) -> float:
    """Top-1 accuracy in % over ``(images, labels)`` batches."""
    hits, total = top1_hits(model, batches)
    if total == 0:
        raise ValueError("no labelled images to measure accuracy on: the evaluation data is empty")
    return 100.0 * hits / total
