"""What a model costs and how well it does: accuracy, saved size, latency."""
from __future__ import annotations

import io
import statistics
import time
from typing import Iterable

import torch


def saved_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())`` (a deployed model: its ONNX file)."""
    if hasattr(model, "model_bytes"):
        return len(model.model_bytes)
    buffer = io.BytesIO()
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


@torch.no_grad()
def accuracy(model: torch.nn.Module, batches: Iterable) -> float:
    """Top-1 accuracy in % over ``(images, labels)`` batches."""
    if isinstance(model, torch.nn.Module):
        model.eval()
    correct = total = 0
    for images, labels in batches:
        correct += (model(images).argmax(1) == labels).sum().item()
        total += len(labels)
    if total == 0:
        raise ValueError("no labelled images to measure accuracy on: the evaluation data is empty")
    return 100.0 * correct / total
