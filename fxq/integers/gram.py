"""Gram matrices of a layer's input columns, ``H = Σ x·xᵀ`` over every position: the statistics
the output-aware weight rule measures ``‖ΔW·X‖²`` with (`fxq.integers.observers.InputGram`).

    add_gram(gram, columns)       from the im2col rows [P, K]: H's upper blocks, mirrored
    add_conv_gram(gram, sums, x)  a k×k, stride-1, "same" conv's H from its input, no im2col

A stride-1 conv's columns are shifted copies of one image: the block of H between kernel offsets
δ₁ and δ₂ is ``Σ_p x[p+δ₁]·x[p+δ₂]ᵀ``, which depends on δ₂ − δ₁ but for the positions near the
border that one of the two offsets moves outside the image. So each of the (2k−1)² differences
is one correlation of the zero-padded input with itself, ``A_d = Σ_q x[q]·x[q+d]ᵀ`` (half of them
the transposes of the other half), and each block is its difference's correlation less the few
border positions it does not read: ((2k−1)² + 1)/2 = 2k²−2k+1 products of C channels over every
position instead of about k⁴/2 — 13 instead of 40 for a 3×3 kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GRAM_BLOCK = 512


def add_gram(gram: torch.Tensor, columns: torch.Tensor) -> None:
    """``gram += columnsᵀ·columns``, computing the upper triangle only, by blocks of rows, and
    mirroring it: 56 % of the full product's work at K = 4608 (a ResNet's widest layer)."""
    size = columns.shape[1]
    for start in range(0, size, GRAM_BLOCK):
        end = min(start + GRAM_BLOCK, size)
        product = columns[:, start:end].T @ columns[:, start:]  # [block, K − start]
        gram[start:end, start:] += product
        gram[end:, start:end] += product[:, end - start:].T


def same_conv_kernel(geometry: dict | None, shape: torch.Size) -> int | None:
    """The kernel size k if ``geometry`` (`F.unfold`'s arguments) is a k×k conv (odd k > 1) with
    stride 1, no dilation and k // 2 zero padding, on an input of ``shape`` at least ``4·k`` high
    and wide: the convs whose Gram matrix `add_conv_gram` computes faster than the im2col rows
    give it (on smaller maps the border corrections and the padding cost more than they save:
    2.5× faster at 56×56, 1.7× at 14×14, 0.94× at 7×7 for 3×3 kernels on 2 cores). None otherwise."""
    if geometry is None or len(shape) != 4:
        return None
    k = tuple(geometry["kernel_size"])
    same = (k[0] == k[1] and k[0] % 2 == 1 and k[0] > 1 and tuple(geometry["stride"]) == (1, 1)
            and tuple(geometry["dilation"]) == (1, 1) and tuple(geometry["padding"]) == (k[0] // 2,) * 2)
    return k[0] if same and min(shape[2:]) >= 4 * k[0] else None


def add_conv_gram(gram: torch.Tensor, column_sum: torch.Tensor, x: torch.Tensor, k: int) -> None:
    """``gram`` [C·k², C·k²] and ``column_sum`` [C·k²] (float64, in ``weight.reshape(C_out, −1)``'s
    column order) plus what the im2col columns of ``x`` [N, C, H, W] add, for a k×k, stride-1,
    k // 2-padded conv (odd k; H and W at least k): the same sums, from ((2k−1)² + 1)/2
    correlations of ``x``."""
    channels, taps = x.shape[1], k * k
    flat = _Flat(x, k)
    total = flat.z.sum(0).double()
    correlations = {}
    for t1, first in enumerate(flat.offsets):
        edge = flat.edge(first)
        border = flat.z[edge]
        column_sum.view(channels, taps)[:, t1] += total - border.sum(0).double()
        for t2 in range(t1, taps):
            difference = flat.shift(flat.offsets[t2]) - flat.shift(first)
            block = _correlation(flat, difference, correlations) - (border.T @ flat.z[edge + difference]).double()
            gram.view(channels, taps, channels, taps)[:, t1, :, t2] += block
            if t2 != t1:
                gram.view(channels, taps, channels, taps)[:, t2, :, t1] += block.T


def _correlation(flat: "_Flat", shift: int, known: dict) -> torch.Tensor:
    """``Σ_q z[q]·z[q+shift]ᵀ`` over the whole padded input (float64), each computed once."""
    if shift < 0:
        return _correlation(flat, -shift, known).T
    if shift not in known:
        z = flat.z
        known[shift] = (z[:len(z) - shift].T @ z[shift:]).double()
    return known[shift]


class _Flat:
    """``x`` zero-padded by k // 2 on every side, channels last, every position of every image in
    one row ``z`` [rows, C], with zero rows before and after: a kernel offset (a, b) is a shift of
    ``a·W_padded + b`` rows. A pair of rows at that shift is either that 2-D offset or reads a
    zero (padding separates rows and images by more than the kernel reaches)."""

    def __init__(self, x: torch.Tensor, k: int):
        self.r = k // 2
        n, c, self.h, self.w = x.shape
        self.wp, self.hp = self.w + 2 * self.r, self.h + 2 * self.r
        self.margin = 2 * self.r * self.wp + 2 * self.r
        padded = F.pad(x.detach(), (self.r,) * 4).permute(0, 2, 3, 1).reshape(-1, c)
        zeros = padded.new_zeros(self.margin, c)
        self.z = torch.cat([zeros, padded, zeros])
        self.offsets = [(a, b) for a in range(-self.r, self.r + 1) for b in range(-self.r, self.r + 1)]
        rows, cols = torch.meshgrid(torch.arange(self.h, device=x.device), torch.arange(self.w, device=x.device),
                                    indexing="ij")
        self.rows, self.cols = rows.reshape(-1), cols.reshape(-1)
        self.real = ((torch.arange(n, device=x.device)[:, None] * self.hp * self.wp + (self.rows + self.r) * self.wp
                      + self.cols + self.r) + self.margin)  # [N, H·W]: each image's real positions

    def shift(self, offset: tuple[int, int]) -> int:
        return offset[0] * self.wp + offset[1]

    def edge(self, offset: tuple[int, int]) -> torch.Tensor:
        """The rows of the real positions q that no output position p reads at ``offset``
        (q − offset is outside the image)."""
        a, b = offset
        outside = ((self.rows - a < 0) | (self.rows - a >= self.h) | (self.cols - b < 0) | (self.cols - b >= self.w))
        return self.real[:, outside].reshape(-1)
