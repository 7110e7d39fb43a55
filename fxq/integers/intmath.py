"""Integer kernels: the arithmetic every quantized op, the simulator and `explain` share.

Notation (DESIGN.md): a real value is ``r = s · (q − z)``. A conv/linear layer computes

    (1) acc[c] = Σ_k W_q[c,k] · (I_q[k] − z_I) + b_q[c]            (int32, exact)
    (2) O_q[c] = clamp(z_O + round(M[c] · acc[c]), 0, 2^b − 1),   M[c] = s_I · s_W[c] / s_O

and ``M`` is held in fixed point as ``M = m · 2^(shift − 31)`` with an integer ``m ∈ [2^30, 2^31)``
(TFLite's form: ``shift > 0`` is a left shift, ``shift ≤ 0`` a right shift). Applying it is one
int64 product and one rounding right shift by ``31 − shift`` bits, which rounds **half away from
zero**: ``round(p / 2^r) = sign(p) · ⌊(|p| + 2^(r−1)) / 2^r⌋``. ``|acc| < 2^31`` and ``m < 2^31`` keep
the product below 2^62, so the int64 arithmetic never overflows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fxq.integers import gemm

FLOAT64_EXACT = 2**53
INT32_MAX = 2**31 - 1
MULTIPLIER_BITS = 31


def fixed_point(real_multiplier: torch.Tensor, precision: int = MULTIPLIER_BITS,
                bound: int | torch.Tensor = INT32_MAX) -> tuple[torch.Tensor, torch.Tensor]:
    """``M ≥ 0`` (float64, any shape) → ``(m, shift)`` int64 with ``M ≈ m · 2^(shift − 31)``.

    ``m`` lies in ``[2^(p−1), 2^p)`` for ``precision`` p (31 by default): relative error ≤ 2^-p.
    A wide accumulator takes a smaller p so that ``acc · m`` still fits int64. ``bound`` is the
    largest ``|acc|`` the multiplier will see (a number, or one per element of ``M``): where even
    ``bound · m`` rounds to 0 (``bound · m < 2^(r−1)``, ``r = 31 − shift``) the multiplier cannot
    move any output and becomes ``m = 0, shift = 0`` — exactly the same outputs, and every right
    shift that remains is at most 62 bits, so :func:`requantize` never overflows int64.
    Raises ``ValueError`` for a multiplier that needs ``shift ≥ 31`` (``M ≥ 2^(31 − ...)``: not
    representable); callers name the layer.
    """
    real = real_multiplier.to(torch.float64)
    if (real < 0).any() or not torch.isfinite(real).all():
        raise ValueError(f"requantization multipliers must be finite and ≥ 0, got {real}")
    mantissa, exponent = torch.frexp(real)  # real = mantissa · 2^exponent, mantissa ∈ [0.5, 1)
    m = torch.round(mantissa * 2**precision).to(torch.int64)
    carry = m == 2**precision  # mantissa rounded up to 1.0
    m = torch.where(carry, m // 2, m)
    shift = exponent.to(torch.int64) + carry.to(torch.int64) + MULTIPLIER_BITS - precision
    r = MULTIPLIER_BITS - shift
    largest = torch.as_tensor(bound, dtype=torch.int64) * m  # < 2^62 by the choice of precision
    half_step = torch.ones_like(r) << (r - 1).clamp(0, 62)
    negligible = (r > 62) | (largest < half_step)
    m = torch.where(negligible, torch.zeros_like(m), m)
    shift = torch.where(negligible, torch.zeros_like(shift), shift)
    if (shift >= MULTIPLIER_BITS).any():  # keeps every right shift 31 − shift ≥ 1
        raise ValueError(f"requantization multiplier {real.max().item():.3g} is too large: not representable")
    return m, shift


def multiplier_precision(accumulator_bound: int) -> int:
    """The most multiplier bits (≤ 31) with ``bound · 2^p < 2^62``: the int64 product never overflows."""
    return min(MULTIPLIER_BITS, 62 - max(1, int(accumulator_bound).bit_length()))


def storage_dtype(bits: int) -> torch.dtype:
    """Activation integers of up to 8 bits are uint8; wider ones (16) are int32."""
    return torch.uint8 if bits <= 8 else torch.int32


def lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for integer indices of any shape: one flat ``index_select`` with int32
    indices (advanced indexing converts them to int64 first; 2.3× as long on a 25M-value map,
    AMD EPYC, 2 threads)."""
    return torch.index_select(table, 0, index.reshape(-1).to(torch.int32)).reshape(index.shape)


def rounding_right_shift(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``round(p / 2^r)`` on int64, half away from zero; ``r ≥ 1`` broadcasts against ``p``.

    Computed as ``⌊(p + 2^(r−1) − [p < 0]) / 2^r⌋`` (an arithmetic shift floors), which equals
    ``sign(p) · ⌊(|p| + 2^(r−1)) / 2^r⌋`` for every integer ``p`` and ``r ≥ 1``.
    """
    return (p + (torch.ones_like(r) << (r - 1)) - (p < 0).to(torch.int64)) >> r


def requantize(acc: torch.Tensor, m: torch.Tensor, shift: torch.Tensor, zero_point: int,
               qmax: int) -> torch.Tensor:
    """Formula (2): accumulator ``[..., C]`` (channels last) → ``clamp(z + round(M[c]·acc), 0, qmax)``
    as uint8 (int32 for 16-bit outputs).

    The same rounding as :func:`rounding_right_shift`; ``m ≥ 0`` makes ``sign(m · acc) = sign(acc)``.
    When ``(2z + 1)·2^(r−1) < 2^62`` (``acc·m < 2^62`` already), ``z·2^r`` is folded into the
    nudge (adding a multiple of ``2^r`` before the shift adds ``z`` after it), which saves a pass
    over the tensor; for the long shifts of tiny multipliers ``z`` is added after the shift.
    """
    r = MULTIPLIER_BITS - shift
    longest = int(r.max()) if r.numel() else 1
    fold = (2 * zero_point + 1) << (longest - 1) < 2**62
    offset = torch.ones_like(r) << (r - 1)
    if fold:
        offset = offset + (zero_point << r)

    def block(a: torch.Tensor) -> torch.Tensor:
        # a copy (the caller's int64 accumulator stays); m ≥ 0 keeps acc's sign in p, and where m = 0
        # the −1 of a negative acc changes nothing (offset − 1 and offset shift alike); p >> 63 is −[p < 0]
        p = a.to(torch.int64, copy=True).mul_(m)
        q = p.add_(p >> 63).add_(offset).bitwise_right_shift_(r)
        if not fold:
            q.add_(zero_point)
        return q.clamp_(0, qmax)

    return by_blocks(block, acc, storage_dtype(qmax.bit_length()), m, r, offset)


BLOCK_ELEMENTS = 2**19


def by_blocks(elementwise, acc: torch.Tensor, dtype: torch.dtype, *parameters: torch.Tensor) -> torch.Tensor:
    """``elementwise(acc)`` converted to ``dtype``, a block of leading rows at a time.

    Requantization is a chain of passes over a wide intermediate (int64): on a whole activation
    tensor each pass goes to memory, on blocks of ~2^19 elements (4 MB of int64) they stay in the
    cache — 0.69 → 0.17 s on a [98 000, 576] accumulator (AMD EPYC, AVX2). Elementwise, so the
    result is the same; a strided accumulator, or ``parameters`` that vary along the leading
    dim, are done whole.
    """
    rows = acc.shape[0] if acc.dim() else 1
    along_rows = any(p.dim() >= acc.dim() and p.shape[0] > 1 for p in parameters)
    if not acc.is_contiguous() or along_rows or acc.numel() <= BLOCK_ELEMENTS:
        return elementwise(acc).to(dtype)
    out = torch.empty(acc.shape, dtype=dtype, device=acc.device)
    step = max(1, BLOCK_ELEMENTS * rows // acc.numel())
    for start in range(0, rows, step):
        out[start:start + step].copy_(elementwise(acc[start:start + step]))
    return out


def runtime_multiplier(input_scale: torch.Tensor, weight_scale: torch.Tensor,
                       output_scale: torch.Tensor) -> torch.Tensor:
    """onnxruntime's requantization scale per channel: ``(s_I · s_W[c]) / s_O`` in float32, each
    scale first rounded to the float32 the ONNX graph carries."""
    f32 = torch.float32
    return input_scale.to(f32) * weight_scale.to(f32) / output_scale.to(f32)


def runtime_requantize(acc: torch.Tensor, multiplier: torch.Tensor, zero_point: int, qmax: int) -> torch.Tensor:
    """Formula (2) as onnxruntime's int8 kernels compute it (MLAS ``RequantizeOutput``): the int32
    accumulator converted to float32, times the float32 ``multiplier`` (`runtime_multiplier`),
    rounded half to even, plus ``z``, clamped; channels last."""
    def block(a: torch.Tensor) -> torch.Tensor:  # float32 integers in [0, qmax]: exact in any storage
        scaled = torch.round(a.to(torch.int32).to(torch.float32) * multiplier)
        return scaled.clamp_(-zero_point, qmax - zero_point).add_(zero_point)

    return by_blocks(block, acc, storage_dtype(qmax.bit_length()), multiplier)


def runtime_add(a_q: torch.Tensor, b_q: torch.Tensor, scales: tuple[float, float, float],
                zero_points: tuple[int, int, int], qmax: int) -> torch.Tensor:
    """``A + B`` as onnxruntime's QLinearAdd computes it on x86 (MLAS, AVX2): with float32 ratios
    ``r_A = s_A / s_O``, ``r_B = s_B / s_O`` and ``c = z_O − fma(r_A, z_A, r_B·z_B)``,
    ``O = clamp(round_half_even(fma(A, r_A, fma(B, r_B, c))), 0, qmax)``.

    Each fused multiply-add rounds once: it is formed exactly in float64 (an 8-bit integer times a
    float32 fits 32 bits) and then rounded to float32.
    """
    f32, f64 = torch.float32, torch.float64
    s_a, s_b, s_o = (torch.tensor(s, dtype=f32) for s in scales)
    z_a, z_b, z_o = zero_points
    r_a, r_b = s_a / s_o, s_b / s_o
    c = torch.tensor(z_o, dtype=f32) - (r_a.to(f64) * z_a + (r_b * z_b).to(f64)).to(f32)
    inner = (b_q.to(f64) * r_b.to(f64) + c.to(f64)).to(f32)
    total = (a_q.to(f64) * r_a.to(f64) + inner.to(f64)).to(f32)
    return torch.round(total).clamp_(0, qmax).to(storage_dtype(qmax.bit_length()))


def runtime_mul(a_q: torch.Tensor, b_q: torch.Tensor, scales: tuple[float, float, float],
                zero_points: tuple[int, int, int], qmax: int) -> torch.Tensor:
    """``A · B`` as onnxruntime's QLinearMul computes it (MLAS on x86 and 64-bit ARM): the int32
    product ``P = (A − z_A)·(B − z_B)`` (exact in float32: |P| ≤ 2^16), the float32 ratio
    ``r = (s_A·s_B)/s_O``, ``O = clamp(round_half_even((P·r) + z_O), 0, qmax)``, each float32
    operation rounded on its own (a multiply, then an add: no fused multiply-add)."""
    f32 = torch.float32
    s_a, s_b, s_o = (torch.tensor(s, dtype=f32) for s in scales)
    z_a, z_b, z_o = zero_points
    ratio = (s_a * s_b) / s_o
    product = ((a_q.to(torch.int32) - z_a) * (b_q.to(torch.int32) - z_b)).to(f32)
    total = product * ratio + torch.tensor(z_o, dtype=f32)
    return torch.round(total).clamp_(0, qmax).to(storage_dtype(qmax.bit_length()))


def runtime_global_mean(q: torch.Tensor, scale: float, zero_point: int, qmax: int) -> torch.Tensor:
    """The mean over the last two dims at the input's own parameters, as onnxruntime's
    QLinearGlobalAveragePool computes it (MLAS): the int32 sum of ``q − z`` over the ``N`` values,
    times the float32 ``s / (s · N)``, rounded half to even, plus ``z``; dims kept."""
    count = q.shape[-1] * q.shape[-2]
    total = q.to(torch.int32).sum((-2, -1), keepdim=True, dtype=torch.int32) - zero_point * count
    s = torch.tensor(scale, dtype=torch.float32)
    factor = s / (s * torch.tensor(count, dtype=torch.float32))
    scaled = torch.round(total.to(torch.float32) * factor)
    q_out = scaled.clamp_(-zero_point, qmax - zero_point).to(torch.int32) + zero_point
    return q_out.to(storage_dtype(qmax.bit_length()))


def accumulator_bounds(weight_q: torch.Tensor, input_absmax: int, bias_q: torch.Tensor) -> torch.Tensor:
    """Worst-case ``|acc[c]|`` of formula (1) per output channel, int64:
    ``Σ_k |W_q[c,k]| · max|I_q − z_I| + |b_q[c]|``."""
    per_channel = gemm.magnitudes(weight_q).reshape(weight_q.shape[0], -1).sum(1, dtype=torch.int64)
    return per_channel * input_absmax + bias_q.to(torch.int64).abs()


def accumulator_bound(weight_q: torch.Tensor, input_absmax: int, bias_q: torch.Tensor) -> int:
    """Worst-case ``|acc|`` of formula (1) over all channels."""
    return int(accumulator_bounds(weight_q, input_absmax, bias_q).max())


def conv_columns(x_q: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int], pad_value: int) -> tuple:
    """im2col on integers: uint8 ``[N, C, H, W]`` → int8 ``[N·H'·W', k_h·k_w·C]`` of ``q − 128``.

    Shifting by 128 makes uint8 data int8 for the GEMM; padding uses ``pad_value − 128`` (the
    zero point: a padded pixel is real 0). Returns the columns and ``(N, H', W')``.
    """
    nhwc = x_q.permute(0, 2, 3, 1)
    signed = (nhwc ^ 128).contiguous().view(torch.int8)  # q − 128 in two's complement
    return _im2col(signed, kernel, stride, padding, dilation, pad_value - 128)


def output_size(size: int, kernel: int, stride: int, dilation: int = 1) -> int:
    """A conv's (or window's) output length along one dim of a ``size`` input, padding included."""
    return (size - dilation * (kernel - 1) - 1) // stride + 1


def _im2col(nhwc: torch.Tensor, kernel, stride, padding, dilation, pad_value) -> tuple:
    padded = F.pad(nhwc, (0, 0, padding[1], padding[1], padding[0], padding[0]), value=pad_value)
    n, h, w, c = padded.shape
    out_h, out_w = (output_size(s, k, st, d) for s, k, st, d in zip((h, w), kernel, stride, dilation))
    sn, sh, sw, sc = padded.stride()
    windows = padded.as_strided((n, out_h, out_w, kernel[0], kernel[1], c),
                                (sn, sh * stride[0], sw * stride[1], sh * dilation[0],
                                 sw * dilation[1], sc))
    return windows.reshape(n * out_h * out_w, kernel[0] * kernel[1] * c), (n, out_h, out_w)


def gemm_weight(weight_q: torch.Tensor) -> torch.Tensor:
    """int8 ``[C_out, C_in, k_h, k_w]`` (or ``[C_out, K]``) → ``[K, C_out]`` in :func:`conv_columns`' order."""
    if weight_q.dim() == 4:
        weight_q = weight_q.permute(0, 2, 3, 1)
    return weight_q.reshape(weight_q.shape[0], -1).t()


def gemm_operands(weight_q: torch.Tensor, zero_point: int, bias_q: torch.Tensor) -> tuple:
    """The int8 ``[K, C_out]`` GEMM weight and the int32 per-channel constant of :func:`accumulate`.

        Σ W·(I_q − z) + b = Σ W·(I_q − 128) + ((128 − z)·Σ W + b)

    so the zero point and the bias become one int32 constant per output channel.
    """
    weight = _dense(gemm_weight(weight_q))
    constant = (128 - zero_point) * weight.to(torch.int32).sum(0, dtype=torch.int32) + bias_q
    return weight, constant


def accumulate(columns: torch.Tensor, weight: torch.Tensor, constant: torch.Tensor) -> torch.Tensor:
    """Formula (1) as one int8 × int8 → int32 GEMM: ``[M, K]`` columns of ``I_q − 128`` times the
    :func:`gemm_operands` weight, plus their constant → ``[M, C_out]``.

    The GEMM is integer arithmetic (``torch._int_mm`` by `fxq.integers.gemm.int_mm`, int32 accumulation):
    exact whenever the worst case ``128·127·K`` fits int32 (K < 132,000; ResNet-18's widest layer
    has K = 4608).
    """
    return gemm.int_mm(_dense(columns), weight).add_(constant)


def group_columns(columns: torch.Tensor, groups: int, group_channels: int) -> list[torch.Tensor]:
    """im2col columns ``[M, k_h·k_w·C]`` (channels fastest) → each group's ``[M, k_h·k_w·C/groups]``
    (``group_channels = C/groups``), in the order of its slice of :func:`gemm_weight`."""
    m = columns.shape[0]
    per_group = columns.reshape(m, -1, groups, group_channels)  # [M, k_h·k_w, groups, C/groups]
    return [per_group[:, :, g].reshape(m, -1) for g in range(groups)]


def depthwise_accumulate(x_q: torch.Tensor, weight_q: torch.Tensor, bias_q: torch.Tensor,
                         stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                         zero_point: int, dtype: torch.dtype) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Formula (1) of a depthwise conv (one input channel per group, ``C_out = m·C_in``):
    ``acc[c] = Σ_ij W[c, i, j]·(I[c // m] − z)`` shifted by (i, j), as k_h·k_w multiply-adds of
    whole feature maps in ``dtype`` (int32: exact while the layer's worst case fits, which it
    checks). Padding adds real 0, which is 0 once centred. Returns ``[N·H'·W', C_out]`` and
    ``(N, H', W')``, like the GEMM path."""
    channels, (kh, kw) = weight_q.shape[0], weight_q.shape[2:]
    centred = x_q.to(dtype) - zero_point
    if channels != centred.shape[1]:
        centred = centred.repeat_interleave(channels // centred.shape[1], 1)
    padded = F.pad(centred, (padding[1], padding[1], padding[0], padding[0]))
    n, _, h, w = padded.shape
    out_h, out_w = (output_size(s, k, st, d) for s, k, st, d in zip((h, w), (kh, kw), stride, dilation))
    acc = bias_q.to(dtype).reshape(1, -1, 1, 1).expand(n, channels, out_h, out_w).clone()
    taps = weight_q.to(dtype).reshape(channels, kh, kw)
    for i in range(kh):
        for j in range(kw):
            top, left = i * dilation[0], j * dilation[1]
            window = padded[:, :, top:top + stride[0] * (out_h - 1) + 1:stride[0],
                            left:left + stride[1] * (out_w - 1) + 1:stride[1]]
            acc.add_(window * taps[:, i, j].reshape(1, -1, 1, 1))
    return acc.permute(0, 2, 3, 1).reshape(-1, channels), (n, out_h, out_w)


def _dense(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` with row-major strides. A dimension of size 1 may carry any stride and still
    count as contiguous (im2col of a 1×1 kernel on one channel gives ``[M, 1]`` with stride
    ``(1, 25)``); ``torch._int_mm`` reads such a stride as the row pitch and returns garbage."""
    if matrix.stride() == (matrix.shape[1], 1):
        return matrix
    return matrix.clone(memory_format=torch.contiguous_format)


def add(a_q: torch.Tensor, b_q: torch.Tensor, a: "AddOperand", b: "AddOperand", zero_point: int,
        qmax: int) -> torch.Tensor:
    """Residual add ``O = A + B`` on uint8: each input rescaled to the output scale, one rounding.

        O_q = clamp(z_O + round(M_A·(A_q − z_A) + M_B·(B_q − z_B)), 0, qmax),  M_X = s_X / s_O

    Both products are brought to the finer of the two fixed-point exponents and summed in int64
    (|A_q − z_A| < 2^b, m < 2^31, exponent gap ≤ 31 − b bits: below 2^62), then rounded once.
    """
    common = min((x.shift for x in (a, b) if x.multiplier), default=0)  # m = 0 adds nothing
    total = ((a_q.to(torch.int64) - a.zero_point) * (a.multiplier << max(a.shift - common, 0))
             + (b_q.to(torch.int64) - b.zero_point) * (b.multiplier << max(b.shift - common, 0)))
    r = torch.tensor(MULTIPLIER_BITS - common)
    q = rounding_right_shift(total, r) + zero_point
    return q.clamp_(0, qmax).to(storage_dtype(qmax.bit_length()))


def add_max_shift_gap(bits: int) -> int:
    """The largest exponent gap between an add's two multipliers its int64 sum can hold."""
    return 62 - MULTIPLIER_BITS - bits


def add_shift_gap(a: "AddOperand", b: "AddOperand") -> int:
    """The exponent gap between two add operands (0 when one of them is negligible, m = 0)."""
    return abs(a.shift - b.shift) if a.multiplier and b.multiplier else 0


@dataclass(frozen=True)
class AddOperand:
    """One input of an integer add: its zero point and fixed-point multiplier ``s_in / s_out``."""

    zero_point: int
    multiplier: int
    shift: int

    @classmethod
    def rescale(cls, zero_point: int, input_scale: float, output_scale: float, bits: int) -> "AddOperand":
        """``M = s_in / s_out`` for a ``bits``-bit input: ``|q − z| < 2^bits`` bounds what it scales."""
        m, shift = fixed_point(torch.tensor(input_scale / output_scale, dtype=torch.float64),
                               bound=(1 << bits) - 1)
        return cls(zero_point, int(m), int(shift))


def relu(q: torch.Tensor, zero_point: int) -> torch.Tensor:
    """ReLU in the integer domain: real 0 is ``q = z``, so ``relu(s·(q − z)) = s·(max(q, z) − z)``."""
    return torch.clamp_min(q, zero_point)


def rounding_divide(total: torch.Tensor, count) -> torch.Tensor:
    """``round(total / count)`` on integers, half away from zero (the requantization rule);
    ``count`` a positive int or a tensor of them broadcasting with ``total``."""
    magnitude = (total.abs() + count // 2) // count
    return torch.where(total < 0, -magnitude, magnitude)
