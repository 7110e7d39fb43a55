"""Formula (1) of `fxq.integers.intmath`, ``acc = Σ W_q·(I_q − z) + b``, by whichever exact backend is fastest.

    backend   how the sum is formed                                   why it is exact
    integer   int8 × int8 → int32 GEMM (``torch._int_mm``);           integer arithmetic
              depthwise convs: int32 multiply-adds
    float32   float32 conv / GEMM on ``I_q − z``, the input           every partial sum of a chunk is
              channels split so that Σ_chunk |W_q|·max|I_q − z|       an integer of magnitude ≤ 2^24,
              ≤ 2^24; the chunks added in int32                        where float32 is exact
    float64   float64 conv / GEMM on ``I_q − z``                      partial sums < 2^53

The three give the same integers on every input (tests/test_gemm.py: each against int64 at the
bounds); only their speed differs, and it differs by machine. With AVX-512 VNNI the int8 GEMM is
the fastest; on an x86 CPU with AVX2 alone ``torch._int_mm`` is 12–59× slower than a float32
matmul of the same shape (DESIGN.md), and float32 wins there.

The choice: ``FXQ_GEMM=integer|float32|float64`` in the environment, or :func:`forced`, fixes it
(tests, benchmarks); otherwise every layer shape takes the fastest of its candidates in a short
timing on one sample the first time it runs, remembered for the process (:func:`choices`).
A probe run once per process and device first drops a backend that gives a wrong answer on
worst-case operands (:func:`exact`; asking for one by name is then an error), and the int8 GEMM
where it is ``SLOW``× slower than float32, so that the timing stays short where ``torch._int_mm``
is slow.

Float kernels run with NNPACK and cuDNN off (their Winograd and FFT algorithms are not exact on
integers); PyTorch's oneDNN convolutions on the CPU and every GEMM only multiply and add.
"""
from __future__ import annotations

import enum
import functools
import os
import time
from contextlib import contextmanager
from typing import Callable, Hashable

import torch
import torch.nn.functional as F

FLOAT32_EXACT = 2**24
ENVIRONMENT = "FXQ_GEMM"
SLOW = 4.0  # the int8 GEMM is not timed per layer where the probe finds it this much slower
TIMED_RUNS = 2


class Backend(str, enum.Enum):
    """How a conv/linear forms its integer accumulator (the module docstring's table)."""

    INTEGER = "integer"
    FLOAT32 = "float32"
    FLOAT64 = "float64"

    def __str__(self) -> str:
        return self.value


_forced: list[Backend] = []
_choices: dict[Hashable, Backend] = {}


@contextmanager
def forced(backend: Backend | str):
    """Every layer inside the block uses ``backend`` where it has it (a 16-bit input has only
    float64; a kernel too wide for float32 chunks falls back to the next exact one)."""
    _forced.append(Backend(backend))
    try:
        yield
    finally:
        _forced.pop()


def requested() -> Backend | None:
    """The backend :func:`forced` or ``FXQ_GEMM`` asks for, if any."""
    if _forced:
        return _forced[-1]
    name = os.environ.get(ENVIRONMENT, "").strip().lower()
    if not name or name == "auto":
        return None
    try:
        return Backend(name)
    except ValueError:
        raise ValueError(f"{ENVIRONMENT}={name!r}: use one of {[b.value for b in Backend]} or 'auto'") from None


def choose(key: Hashable, device: torch.device, candidates: dict[Backend, Callable[[], object]]) -> Backend:
    """The backend for the layer shape ``key``: the requested one if the layer has it, else the
    fastest of ``candidates`` (zero-argument runs of the layer on one sample), timed once."""
    wanted = requested()
    if wanted is not None:
        if wanted in candidates and wanted not in exact(device.type):
            raise RuntimeError(f"{how_chosen().removeprefix('forced by ')} asks for the {wanted} backend, which gives "
                               f"wrong integers on this {device.type} ({torch.backends.cpu.get_cpu_capability()}): "
                               f"use one of {sorted(b.value for b in exact(device.type))}, or 'auto'")
        return wanted if wanted in candidates else next(iter(candidates))
    if key not in _choices:
        usable = {b: run for b, run in candidates.items() if b in admitted(device.type)}
        if Backend.FLOAT32 in usable:  # float64 is never the faster float
            usable.pop(Backend.FLOAT64, None)
        _choices[key] = _fastest(usable or candidates)
    return _choices[key]


def how_chosen() -> str:
    """Why layers use the backends they do, in a phrase for reports."""
    if _forced:
        return "forced by fxq.integers.gemm.forced"
    if requested() is not None:
        return f"forced by {ENVIRONMENT}={os.environ[ENVIRONMENT]}"
    return f"the fastest of those timed on this CPU ({torch.backends.cpu.get_cpu_capability()})"


def choices() -> dict[Hashable, Backend]:
    """Every layer shape this process has timed, and the backend it chose."""
    return dict(_choices)


def _fastest(candidates: dict[Backend, Callable[[], object]]) -> Backend:
    best, best_time = None, float("inf")
    for backend, run in candidates.items():
        elapsed = _seconds(run)  # the warm-up: a first call may build kernels
        if elapsed > 10 * best_time:
            continue
        elapsed = min(_seconds(run) for _ in range(TIMED_RUNS))
        if elapsed < best_time:
            best, best_time = backend, elapsed
    return best


def _seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        run()
    return time.perf_counter() - start


@functools.cache
def exact(device_type: str) -> frozenset[Backend]:
    """The backends that give the probe's worst-case integers on this device (oneDNN's int8 GEMM
    limited to AVX2 on an AVX-512 CPU, ``ONEDNN_MAX_CPU_ISA=AVX2``, saturates: not every build and CPU
    is exact, so each is checked where it runs)."""
    columns, weight = _probe_operands(device_type)
    expected = columns.to(torch.float64) @ weight.to(torch.float64)
    ok = {backend: torch.equal(run().to(torch.float64), expected)
          for backend, run in _probe_runs(columns, weight).items()}
    if not all(ok.values()):
        import warnings
        warnings.warn(f"fxq: on {device_type}, backends {[b.value for b, e in ok.items() if not e]} "
                      "gave a wrong integer on the probe and are not used", RuntimeWarning)
    return frozenset(b for b, is_exact in ok.items() if is_exact)


@functools.cache
def admitted(device_type: str) -> frozenset[Backend]:
    """The backends worth timing on this device: `exact` ones, and the int8 GEMM only where it is
    less than ``SLOW``× slower than float32 on the probe's shape."""
    found = exact(device_type)
    if {Backend.INTEGER, Backend.FLOAT32} <= found:
        runs = _probe_runs(*_probe_operands(device_type))
        integer, float32 = (min(_seconds(runs[b]) for _ in range(3)) for b in (Backend.INTEGER, Backend.FLOAT32))
        if integer > SLOW * float32:
            found -= {Backend.INTEGER}
    return found


def _probe_operands(device_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3×3 conv's int8 columns and weight (64 channels, 28×28 positions), the largest products in front."""
    gen = torch.Generator().manual_seed(0)
    columns = torch.randint(-128, 128, (784, 576), dtype=torch.int8, generator=gen)
    weight = torch.randint(-127, 128, (576, 64), dtype=torch.int8, generator=gen)
    columns[:, :8], weight[:8] = -128, -127
    return columns.to(device_type), weight.to(device_type)


def _probe_runs(columns: torch.Tensor, weight: torch.Tensor) -> dict[Backend, Callable[[], torch.Tensor]]:
    limit = FLOAT32_EXACT // (128 * 127)  # K per float32 chunk at these bounds
    as32, w32 = columns.to(torch.float32), weight.to(torch.float32)
    return {
        Backend.INTEGER: lambda: int_mm(columns, weight),
        Backend.FLOAT32: lambda: sum(
            (exact_float(torch.mm, as32[:, k:k + limit], w32[k:k + limit]).to(torch.int32)
             for k in range(0, columns.shape[1], limit))),
        Backend.FLOAT64: lambda: columns.to(torch.float64) @ weight.to(torch.float64),
    }


def exact_float(op: Callable, *args, **kwargs) -> torch.Tensor:
    """``op(*args)`` with the float kernels that only multiply and add: NNPACK and cuDNN (whose
    Winograd/FFT convolutions round) off."""
    with torch.backends.nnpack.flags(enabled=False), torch.backends.cudnn.flags(enabled=False):
        return op(*args, **kwargs)


def int_mm(a: torch.Tensor, b: torch.Tensor, pad: bool | None = None) -> torch.Tensor:
    """int8 ``[M, K] @ [K, N]`` → int32, exact. CUDA's ``torch._int_mm`` needs M > 16 and K, N
    multiples of 8: with ``pad`` (the default on CUDA) the operands are padded with zeros, which
    add nothing, and the product cut back."""
    if pad is None:
        pad = a.is_cuda
    if not pad:
        return torch._int_mm(a, b)
    m, k = a.shape
    n = b.shape[1]
    rows, depth, cols = max(m, 17), -(-k // 8) * 8, -(-n // 8) * 8
    if (rows, depth, cols) != (m, k, n):
        a = F.pad(a, (0, depth - k, 0, rows - m))
        b = F.pad(b, (0, cols - n, 0, depth - k))
    return torch._int_mm(a.contiguous(), b.contiguous())[:m, :n]


def magnitudes(weight_q: torch.Tensor) -> torch.Tensor:
    """``|W_q|`` in the narrowest type that holds it (int16 for 8-bit weights: ``|−128|`` too)."""
    return weight_q.to(torch.int16 if weight_q.element_size() == 1 else torch.int64).abs()


def float32_chunks(weight_q: torch.Tensor, input_absmax: int) -> list[tuple[int, int]] | None:
    """Input-channel ranges ``[start, end)`` (within a group) whose partial sums stay exact in
    float32: for every output channel c, ``Σ_{i in chunk} Σ_taps |W_q[c, i]| · input_absmax ≤ 2^24``.
    Greedy, in channel order; None when one input channel alone passes the limit."""
    # compared with 2^24 // max|I_q − z| rather than multiplied: no int64 copy of a big weight
    limit = FLOAT32_EXACT // max(int(input_absmax), 1)
    outputs, inputs = weight_q.shape[:2]
    # an 8-bit |W_q| ≤ 128: int32 holds every partial sum of a row below 2^24 taps
    total = torch.int32 if weight_q.element_size() == 1 and 128 * weight_q[0].numel() < 2**31 else torch.int64
    per_input = magnitudes(weight_q).reshape(outputs, inputs, -1)
    per_input = per_input[..., 0] if per_input.shape[2] == 1 else per_input.sum(2, dtype=total)
    if per_input.numel() and int(per_input.max()) > limit:
        return None
    # cumulative[c, e − 1]: output channel c's bound of input channels [0, e); a chunk [start, end)
    # costs max_c of its difference, which grows with end: the longest chunk that fits is found
    # by bisection (a full scan per chunk took seconds on VGG's 25088-input linears)
    cumulative = per_input.cumsum(1, dtype=total)

    def prefix(end: int) -> torch.Tensor | int:
        return cumulative[:, end - 1] if end else 0

    chunks, start, channels = [], 0, inputs
    while start < channels:
        fits, too_far = start + 1, channels + 1
        while too_far - fits > 1:
            middle = (fits + too_far) // 2
            if int((prefix(middle) - prefix(start)).max()) <= limit:
                fits = middle
            else:
                too_far = middle
        chunks.append((start, fits))
        start = fits
    return chunks


def input_channels(x: torch.Tensor, groups: int, start: int, end: int) -> torch.Tensor:
    """Channels ``[start, end)`` of every group of ``[N, groups·C_g, ...]``."""
    if groups == 1:
        return x[:, start:end]
    shape = x.shape
    grouped = x.reshape(shape[0], groups, shape[1] // groups, *shape[2:])[:, :, start:end]
    return grouped.reshape(shape[0], groups * (end - start), *shape[2:])
