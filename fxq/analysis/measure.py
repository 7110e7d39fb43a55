"""What a model costs and how well it does: accuracy, saved size, latency."""
from __future__ import annotations

import io
import statistics
import time
from typing import Iterable

import torch
from torch import fx

from fxq.config import QConfig
from fxq.files.serialize import save
from fxq.graphs import records


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
def latency_ms(model, x, runs: int, seconds: float = 0.0, most: int | None = None, warmup: int = 1) -> float:
    """Median wall time in ms of ``model(x)`` over ``runs`` calls, or more until ``seconds`` have
    passed (``most`` calls at the most), after ``warmup`` calls (first-call allocations and kernel
    selection). On CUDA each call is waited for."""
    cuda = isinstance(x, torch.Tensor) and x.is_cuda
    for _ in range(warmup):
        model(x)
    if cuda:
        torch.cuda.synchronize()
    times: list[float] = []
    while len(times) < runs or (sum(times) < 1000 * seconds and len(times) < (most or runs)):
        start = time.perf_counter()
        model(x)
        if cuda:
            torch.cuda.synchronize()
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
