"""Dense bit packing of narrow integers: ``b`` bits per value, no padding between values.

A b-bit symmetric weight ``w ∈ [−(2^(b−1) − 1), 2^(b−1) − 1]`` is stored as the unsigned field
``w + 2^(b−1)``; field i occupies bits ``[i·b, (i+1)·b)`` of the byte stream, least significant
bit first. n values take ``⌈n·b / 8⌉`` bytes.
"""
from __future__ import annotations

import torch


def signed_width(values: torch.Tensor) -> int:
    """The least b whose symmetric range ``±(2^(b−1) − 1)`` holds every value (at least 2)."""
    largest = max(-int(values.min()), int(values.max())) if values.numel() else 0  # no wide copy
    return max(2, largest.bit_length() + 1)


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed integers that fit ``bits`` → a uint8 stream of ``⌈n·bits/8⌉`` bytes."""
    fields = values.flatten().to(torch.int64) + (1 << (bits - 1))
    if fields.numel() and (fields.min() < 0 or fields.max() >= 1 << bits):
        raise ValueError(f"values outside the {bits}-bit symmetric range cannot be packed")
    stream = ((fields[:, None] >> torch.arange(bits)) & 1).flatten()
    stream = torch.cat([stream, stream.new_zeros(-len(stream) % 8)])
    return (stream.reshape(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`pack`: the first ``prod(shape)`` fields, as ``dtype`` of ``shape``."""
    count = 1
    for size in shape:
        count *= size
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1).flatten()[:count * bits]
    fields = (stream.reshape(count, bits) << torch.arange(bits)).sum(1)
    return (fields - (1 << (bits - 1))).to(dtype).reshape(shape)
