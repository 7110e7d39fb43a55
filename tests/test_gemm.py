"""Every accumulator backend (`fxq.integers.gemm`) gives the int64 reference's integers, bit for bit, at the
bounds: |I_q − z| at its largest, |W_q| = 2^(b−1) − 1, K up to 4608 and past the float32 chunk."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxq
from fxq.graphs.records import QuantizedWeight
from fxq.integers import gemm
from fxq.integers.affine import ActQParams
from fxq.ops.layers import QConv2d, QLinear
from tests.helpers import EXACT_BACKENDS, needs_exact_int8_gemm

BACKENDS = EXACT_BACKENDS


def _layer(kind, weight_q: torch.Tensor, input_qp: ActQParams, bias_scale: float = 0.0, **geometry):
    """A QConv2d/QLinear holding exactly ``weight_q``, with a bias of about ``bias_scale``·2^20 steps."""
    torch.manual_seed(0)
    c_out = weight_q.shape[0]
    if kind is QConv2d:
        groups = geometry.get("groups", 1)
        layer = nn.Conv2d(weight_q.shape[1] * groups, c_out, tuple(weight_q.shape[2:]), **geometry)
    else:
        layer = nn.Linear(weight_q.shape[1], c_out)
    weight_scale = torch.full((c_out,), 0.01, dtype=torch.float64)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(c_out) * bias_scale * input_qp.scale * 0.01 * 2**20)
    output_qp = ActQParams(1000.0, 3, 8)
    return kind(layer, QuantizedWeight(weight_q, weight_scale), input_qp, output_qp, "layer")


def reference(m, x_q: torch.Tensor) -> torch.Tensor:
    """Formula (1) in int64: unfold (a copy: exact), then an int64 product; ``[positions, C_out]``."""
    centred = x_q.to(torch.int64) - int(m.input_zero_point)
    w = m.weight.to(torch.int64).reshape(m.weight.shape[0], -1)
    bias = m.bias.to(torch.int64)
    if isinstance(m, QLinear):
        return centred.reshape(-1, w.shape[1]) @ w.T + bias
    cols = F.unfold(centred.to(torch.float64), m.weight.shape[2:], m.dilation, m.padding, m.stride)
    cols = cols.to(torch.int64)  # integers below 2^16: exact in float64
    n, g, k = cols.shape[0], m.groups, w.shape[1]
    acc = torch.einsum("gok,ngkl->nlgo", w.reshape(g, -1, k), cols.reshape(n, g, k, -1))
    return acc.reshape(-1, w.shape[0]) + bias


def _extreme_input(shape, qp: ActQParams, seed: int) -> torch.Tensor:
    """Mostly the value farthest from the zero point, some random, some at the other end."""
    gen = torch.Generator().manual_seed(seed)
    far = 0 if qp.zero_point > qp.qmax - qp.zero_point else qp.qmax
    x = torch.full(shape, far, dtype=torch.int64)
    noise = torch.rand(shape, generator=gen)
    x = torch.where(noise < 0.2, torch.randint(0, qp.qmax + 1, shape, generator=gen), x)
    x = torch.where(noise > 0.95, torch.full(shape, qp.qmax - far), x)
    return x.to(torch.uint8 if qp.bits <= 8 else torch.int32)


def _extreme_weight(shape, bits: int, seed: int) -> torch.Tensor:
    """±(2^(b−1) − 1) everywhere; channel 0 all positive, channel 1 all negative (the worst sums)."""
    gen = torch.Generator().manual_seed(seed)
    top = 2 ** (bits - 1) - 1
    w = torch.where(torch.rand(shape, generator=gen) < 0.5, -top, top)
    w[0], w[1] = top, -top
    return w.to(torch.int8)


def _assert_every_backend_exact(m, x_q):
    expected = reference(m, x_q)
    for backend in filter(BACKENDS.__contains__, m.backends()):
        acc, _ = m.accumulate_by(backend, x_q)
        assert torch.equal(acc.to(torch.int64), expected), backend
    outputs = []
    for backend in BACKENDS:
        with gemm.forced(backend):
            outputs.append(m(x_q))
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])


@pytest.mark.parametrize("zero_point", [0, 255])
def test_every_backend_is_exact_on_a_k_4608_conv_at_the_bounds(zero_point):
    """K = 512·3·3 = 4608, |I_q − z| = 255, |W_q| = 127: sums up to 1.5·10^8, nine float32 chunks."""
    qp = ActQParams(0.05, zero_point, 8)
    m = _layer(QConv2d, _extreme_weight((8, 512, 3, 3), 8, 0), qp, bias_scale=1.0, padding=1)
    assert m.accumulator_bound > 8 * gemm.FLOAT32_EXACT and len(m.float32_chunks) >= 9
    _assert_every_backend_exact(m, _extreme_input((2, 512, 5, 5), qp, 1))


def test_every_backend_is_exact_on_a_linear_layer_past_the_float32_chunk():
    qp = ActQParams(0.05, 0, 8)
    m = _layer(QLinear, _extreme_weight((6, 5000), 8, 2), qp, bias_scale=4.0)
    assert len(m.float32_chunks) > 1
    _assert_every_backend_exact(m, _extreme_input((3, 5000), qp, 3))
    _assert_every_backend_exact(m, _extreme_input((2, 2, 3, 5000), qp, 4))  # positions before K


@pytest.mark.parametrize("weight_bits, act_bits", [(2, 2), (3, 8), (4, 4), (6, 7), (8, 5), (8, 16), (7, 16)])
def test_every_backend_is_exact_at_every_width(weight_bits, act_bits):
    qp = ActQParams(0.05, (1 << act_bits) // 3, act_bits)
    m = _layer(QConv2d, _extreme_weight((5, 96, 3, 3), weight_bits, 5), qp, bias_scale=1.0, padding=1)
    _assert_every_backend_exact(m, _extreme_input((2, 96, 6, 6), qp, 6))


@pytest.mark.parametrize("geometry", [
    dict(groups=4, padding=1), dict(groups=16, padding=2, dilation=2), dict(groups=16, stride=2),
    dict(stride=2, padding=0), dict(padding=3, dilation=3)])
def test_every_backend_is_exact_on_grouped_depthwise_strided_and_dilated_convs(geometry):
    qp = ActQParams(0.05, 17, 8)
    c_in_per_group = 16 // geometry.get("groups", 1)
    m = _layer(QConv2d, _extreme_weight((32, c_in_per_group, 3, 3), 8, 7), qp, bias_scale=0.5, **geometry)
    _assert_every_backend_exact(m, _extreme_input((2, 16, 9, 9), qp, 8))


@pytest.mark.parametrize("shape", [(4, 700, 3, 3), (6, 5000)])
def test_float32_chunks_cover_every_channel_and_each_is_the_longest_below_2_to_the_24(shape):
    weight = _extreme_weight(shape, 8, 9)

    def bound(start, end):
        return int(weight[:, start:end].to(torch.int64).abs().reshape(shape[0], -1).sum(1).max()) * 255

    chunks = gemm.float32_chunks(weight, 255)
    assert chunks[0][0] == 0 and chunks[-1][1] == shape[1] and len(chunks) > 1
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert all(bound(start, end) <= gemm.FLOAT32_EXACT for start, end in chunks)
    assert all(bound(start, end + 1) > gemm.FLOAT32_EXACT for start, end in chunks[:-1])  # greedy: none is short
    assert gemm.float32_chunks(torch.full((1, 1, 23, 23), 127, dtype=torch.int8), 255) is None  # one channel past it


@needs_exact_int8_gemm
@pytest.mark.parametrize("m, k, n", [(1, 9, 1), (16, 8, 8), (17, 27, 5), (40, 576, 64)])
def test_the_padded_int8_gemm_that_cuda_needs_gives_the_same_product(m, k, n):
    gen = torch.Generator().manual_seed(m + k)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=gen)
    assert torch.equal(gemm.int_mm(a, b, pad=True), a.to(torch.int32) @ b.to(torch.int32))


def test_fxq_gemm_in_the_environment_forces_a_backend_and_a_bad_name_says_which_exist(monkeypatch):
    qp = ActQParams(0.05, 0, 8)
    m = _layer(QConv2d, _extreme_weight((4, 8, 3, 3), 8, 10), qp, padding=1)
    x = _extreme_input((1, 8, 4, 4), qp, 11)
    for backend in BACKENDS:
        monkeypatch.setenv(gemm.ENVIRONMENT, backend.value)
        m(x)
        assert m.backend is backend
    monkeypatch.setenv(gemm.ENVIRONMENT, "int4")
    with pytest.raises(ValueError, match="integer.*float32.*float64"):
        m(x)


def test_a_16_bit_input_forced_to_the_int8_gemm_accumulates_in_float64_its_only_exact_backend():
    qp = ActQParams(0.05, 300, 16)
    m = _layer(QConv2d, _extreme_weight((4, 8, 3, 3), 8, 12), qp, padding=1)
    with gemm.forced("integer"):
        m(_extreme_input((1, 8, 4, 4), qp, 13))
    assert m.backends() == [gemm.Backend.FLOAT64] and m.backend is gemm.Backend.FLOAT64


def test_the_timed_choice_is_remembered_per_layer_shape(monkeypatch):
    monkeypatch.delenv(gemm.ENVIRONMENT, raising=False)
    qp = ActQParams(0.05, 0, 8)
    m = _layer(QConv2d, _extreme_weight((4, 8, 3, 3), 8, 14), qp, padding=1)
    m(_extreme_input((3, 8, 6, 6), qp, 15))
    chosen = [b for key, b in gemm.choices().items() if key[1] == (4, 8, 3, 3) and key[6] == (8, 6, 6)]
    assert chosen == [m.backend] and m.backend in gemm.admitted("cpu")


def test_a_backend_that_misses_one_bit_on_the_probe_is_not_admitted_nor_run_when_asked_for(monkeypatch):
    real = gemm._probe_runs

    def off_by_one(columns, weight):
        runs = real(columns, weight)
        return {**runs, gemm.Backend.FLOAT32: lambda: runs[gemm.Backend.FLOAT64]() + 1}

    monkeypatch.setattr(gemm, "_probe_runs", off_by_one)
    gemm.exact.cache_clear()
    gemm.admitted.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="float32"):
            assert gemm.Backend.FLOAT32 not in gemm.admitted("cpu")
        qp = ActQParams(0.05, 0, 8)
        m = _layer(QConv2d, _extreme_weight((4, 8, 3, 3), 8, 16), qp, padding=1)
        monkeypatch.setenv(gemm.ENVIRONMENT, "float32")
        with pytest.raises(RuntimeError, match="FXQ_GEMM=float32 asks for the float32 backend, which gives wrong "
                                               "integers on this cpu .*'float64'"):
            m(_extreme_input((1, 8, 4, 4), qp, 17))
    finally:
        gemm.exact.cache_clear()
        gemm.admitted.cache_clear()


def test_a_quantized_network_gives_the_same_logits_with_every_backend():
    from tests.helpers import Residual, randomize_bn
    model = randomize_bn(Residual())
    torch.manual_seed(1)
    qmodel = fxq.quantize(model, [torch.randn(8, 3, 8, 8)])
    x = torch.randn(5, 3, 8, 8) * 2
    outputs = []
    for backend in BACKENDS:
        with gemm.forced(backend):
            outputs.append(qmodel(x))
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])
