"""A conv or linear layer as one matrix product over rows, each row one output position's input
(its im2col patch; a linear layer's input vector): so a layer's output can be computed, and
learned on, at sampled positions only (`passes.reconstruct`).

    conv   y[n, :, p] = W · patch(x[n], p) + b     W: (out, in/groups · kernel) per group
    linear y[n, t, :] = W · x[n, t, :] + b
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROW_FLOATS = 1 << 24  # the floats one tensor of sampled rows may hold (64 MB)


def sampled_rows(layer: nn.Module, inputs: tuple[torch.Tensor, ...], generator: torch.Generator,
                 chunk: int = 64) -> tuple[torch.Tensor, ...]:
    """The rows of each input tensor (same images, same positions in all of them): every position
    of each image while they fit in ``ROW_FLOATS``, else the same number of random ones per image."""
    images = inputs[0].shape[0]
    first = _rows(layer, inputs[0][:1])
    positions, width = first.shape[1], first.shape[2]
    keep = min(positions, max(1, ROW_FLOATS // (images * width)))
    picked = [[] for _ in inputs]
    for start in range(0, images, chunk):
        count = min(chunk, images - start)
        index = (torch.rand(count, positions, generator=generator).argsort(1)[:, :keep]
                 if keep < positions else None)
        for rows, x in zip(picked, inputs):
            patches = _rows(layer, x[start:start + count])
            if index is not None:
                patches = patches.gather(1, index.unsqueeze(2).expand(-1, -1, width))
            rows.append(patches.reshape(-1, width))
    return tuple(torch.cat(rows) for rows in picked)


def _rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(images, positions, row width)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(2)
    kernel, stride, dilation = (_pair(layer, name) for name in ("kernel_size", "stride", "dilation"))
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    x = F.pad(x, _padding(layer, kernel, dilation), mode=mode)
    return F.unfold(x, kernel, dilation=dilation, stride=stride).transpose(1, 2)


def _pair(layer: nn.Module, name: str) -> tuple[int, int]:
    value = getattr(layer, name)
    return (1, value[0]) if isinstance(layer, nn.Conv1d) else tuple(value)


def _padding(layer: nn.Module, kernel: tuple, dilation: tuple) -> tuple[int, int, int, int]:
    """F.pad's (left, right, top, bottom), as the layer pads."""
    if layer.padding == "valid":
        return (0, 0, 0, 0)
    if layer.padding == "same":  # torch puts the odd one on the right and bottom
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)
    height, width = (0, layer.padding[0]) if isinstance(layer, nn.Conv1d) else layer.padding
    return (width, width, height, height)


def apply(layer: nn.Module, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's output at each row: (rows, out) for linear, (rows, out, 1[, 1]) for conv, so
    per-channel activations and observers broadcast as they do on the layer's own output."""
    if isinstance(layer, nn.Linear):
        return F.linear(rows, weight, layer.bias)
    if layer.groups == 1:
        out = F.linear(rows, weight.flatten(1))
    else:  # a product per group; broadcasting beats einsum's batched matmuls on thin groups
        groups = layer.groups
        grouped = weight.reshape(groups, weight.shape[0] // groups, -1)
        out = (rows.reshape(rows.shape[0], groups, 1, -1) * grouped).sum(-1).reshape(rows.shape[0], -1)
    if layer.bias is not None:
        out = out + layer.bias
    return out.reshape(out.shape + (1,) * (weight.dim() - 2))
