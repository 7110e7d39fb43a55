"""Average pooling on integers: the windows torch defines along each dimension, and their
exact mean at the input's scale."""
from __future__ import annotations

import torch

from fxq.integers.intmath import rounding_divide


def pool_windows(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool,
                 include_pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows of average pooling along one dimension, as torch defines them: a 0/1
    ``[out, size]`` membership matrix, and each window's divisor (its size clipped to the padded
    input with ``include_pad``, else its number of real elements)."""
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:  # a last window starting in the padding
        out -= 1
    members = torch.zeros(out, size, dtype=torch.float64)
    divisors = torch.empty(out, dtype=torch.int64)
    for i in range(out):
        start = i * stride - padding
        end = min(start + kernel, size + padding)
        padded = end - start
        start, end = max(start, 0), min(end, size)
        members[i, start:end] = 1
        divisors[i] = padded if include_pad else end - start
    return members, divisors


def adaptive_windows(size: int, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive average pooling's windows along one dimension: window i is
    ``[⌊i·size/out⌋, ⌈(i+1)·size/out⌉)``; its divisor is its length."""
    members = torch.zeros(out, size, dtype=torch.float64)
    divisors = torch.empty(out, dtype=torch.int64)
    for i in range(out):
        start, end = (i * size) // out, -(-((i + 1) * size) // out)
        members[i, start:end] = 1
        divisors[i] = end - start
    return members, divisors


def window_mean(q: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, divisors: torch.Tensor,
                zero_point: int, qmax: int) -> torch.Tensor:
    """Average pooling on integers at the input's scale and zero point, any windows:

        O_q = clamp(z + round(Σ_window (I_q − z) / divisor), 0, qmax)

    The window sums ``rows · (I_q − z) · columnsᵀ`` (0/1 membership matrices) run in float64 on
    integers, exact below 2^53; a padded position adds real 0, which is 0 once centred. Rounding
    the centred mean half away from zero is the requantization rule.
    """
    centred = q.to(torch.float64) - zero_point
    total = torch.einsum("oh,nchw,pw->ncop", rows, centred, columns).to(torch.int64)
    return (rounding_divide(total, divisors) + zero_point).clamp_(0, qmax).to(q.dtype)
