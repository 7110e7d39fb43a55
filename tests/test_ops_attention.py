"""Attention on integers: the matrix product of two activations (`fxq.ops.matmul`), the softmax
over a long axis (`fxq.ops.softmax.QSoftmax`) and ``F.scaled_dot_product_attention`` rewritten
into them (`fxq.graphs.canonical.attention_as_matmuls`) — MobileViT's and GCNet's attention quantize,
save and deploy bit-exact."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxq
from fxq.graphs.runtime import count_ops
from fxq.integers.affine import ActQParams
from fxq.ops.matmul import QMatMul
from fxq.ops.reductions import QNormalize
from fxq.ops.softmax import QSoftmax
from tests.helpers import quantize_whole

A, B, OUT = ActQParams(0.05, 131, 8), ActQParams(0.02, 90, 8), ActQParams(0.4, 120, 8)


def _integers(shape: tuple[int, ...], seed: int, bits: int = 8) -> torch.Tensor:
    return torch.randint(0, 1 << bits, shape, generator=torch.Generator().manual_seed(seed))


def test_a_product_of_activations_is_the_exact_integer_product_rounded_once():
    a, b = _integers((2, 3, 5, 40), 0), _integers((2, 3, 40, 6), 1)
    exact = torch.matmul(a - A.zero_point, b - B.zero_point)  # int64: no rounding anywhere
    once = torch.round(exact.double() * (A.scale * B.scale / OUT.scale)) + OUT.zero_point
    out = QMatMul(A, B, OUT)(a, b).to(torch.int64)
    assert torch.equal(out, once.clamp(0, 255).to(torch.int64))
    assert 0 < int((once < 0).sum() + (once > 255).sum())  # the clamp was tested too
    float_steps = OUT.quantize(exact.double() * (A.scale * B.scale)).to(torch.int64)
    assert int((out - float_steps).abs().max()) <= 1  # and it is the quantized float product


def test_a_product_too_long_for_exact_float64_sums_is_refused():
    wide = ActQParams(1.0, 0, 16)
    with pytest.raises(ValueError, match="passes 2\\^53"):
        QMatMul(wide, wide, wide)(torch.zeros(1, 1 << 21), torch.zeros(1 << 21, 1))


def test_a_long_softmax_is_the_quantized_float_softmax():
    before, after = ActQParams(0.08, 140, 8), ActQParams(1 / 255, 0, 8)
    q = _integers((4, 2, 7, 196), 2)
    softmax = QSoftmax(-1, before, after)
    real = torch.softmax(before.scale * (q.double() - before.zero_point), -1)
    steps = (softmax(q).to(torch.int64) - after.quantize(real).to(torch.int64)).abs()
    assert int(steps.max()) <= 1 and float((steps == 0).float().mean()) > 0.999


def test_a_normalized_vector_is_the_quantized_float_one_and_zero_stays_zero():
    before, after = ActQParams(0.08, 140, 8), ActQParams(2 / 255, 128, 8)
    q = _integers((3, 4, 50), 3)
    q[0, 0] = before.zero_point  # a zero vector: eps keeps it zero, not a division by zero
    normalize = QNormalize(-1, 1e-12, before, after)
    real = F.normalize(before.scale * (q.double() - before.zero_point), dim=-1)
    got = normalize(q).to(torch.int64)
    steps = (got - after.quantize(real).to(torch.int64)).abs()
    assert int(steps.max()) <= 1 and float((steps == 0).float().mean()) > 0.999
    assert bool((got[0, 0] == after.zero_point).all())


def test_a_softmax_of_equal_values_splits_evenly():
    after = ActQParams(1 / 255, 0, 8)
    out = QSoftmax(1, ActQParams(0.1, 7, 8), after)(torch.full((2, 5, 3), 200))
    assert torch.equal(out.to(torch.int64), torch.full((2, 5, 3), round(0.2 * 255)))


class Attention(nn.Module):
    """timm's ViT attention as MobileViT runs it: qkv as one linear, heads split, fused
    ``F.scaled_dot_product_attention``, then a projection; tokens from a conv."""

    def __init__(self, fused: bool = True):
        super().__init__()
        self.fused = fused
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.qkv, self.proj, self.head = nn.Linear(16, 48), nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        n = tokens.shape[1]
        q, k, v = self.qkv(tokens).reshape(-1, n, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = ((q * 8 ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        y = self.proj(y.transpose(1, 2).reshape(-1, n, 16))
        return self.head((tokens + y).mean(1))


class CrossCovariance(nn.Module):
    """EdgeNeXt's cross-covariance attention (timm's XCA): q and k normalized along the tokens,
    a learned temperature per head, attention across channels."""

    def __init__(self):
        super().__init__()
        self.conv, self.qkv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 24), nn.Linear(8, 4)
        self.temperature = nn.Parameter(torch.tensor([[[0.7]], [[1.6]]]))

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        n = tokens.shape[1]
        q, k, v = self.qkv(tokens).reshape(-1, n, 3, 2, 4).permute(2, 0, 3, 4, 1).unbind(0)
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature
        y = (attn.softmax(dim=-1) @ v).permute(0, 3, 1, 2).reshape(-1, n, 8)
        return self.head((tokens + y).mean(1))


class GlobalContext(nn.Module):
    """GCNet's context block (timm's GlobalContext): a softmax over every position weights the
    pixels, summed by a matrix product."""

    def __init__(self):
        super().__init__()
        self.conv, self.attn = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 1, 1)
        self.transform, self.head = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        b, c, h, w = x.shape
        weights = F.softmax(self.attn(x).reshape(b, 1, h * w).squeeze(1), dim=-1).unsqueeze(2)
        context = (x.reshape(b, c, h * w) @ weights).view(b, c, 1, 1)
        return self.head(x + self.transform(context))


class RelativeBias(Attention):
    """TinyViT's attention: a learned bias per head and token offset, gathered by a buffer of
    indices, passed to fused attention as its float mask."""

    def __init__(self):
        super().__init__()
        self.biases = nn.Parameter(torch.randn(2, 11) * 0.5)
        tokens = torch.arange(36)
        self.register_buffer("offsets", (tokens[:, None] - tokens[None, :]).abs() % 11, persistent=False)

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        n = tokens.shape[1]
        q, k, v = self.qkv(tokens).reshape(-1, n, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.biases[:, self.offsets])
        y = self.proj(y.transpose(1, 2).reshape(-1, n, 16))
        return self.head((tokens + y).mean(1))


def _calib(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 12, 12, generator=g) for _ in range(4)]


@pytest.mark.parametrize("build", [Attention, lambda: Attention(fused=False), GlobalContext, CrossCovariance,
                                   RelativeBias],
                         ids=["fused", "spelled-out", "global-context", "cross-covariance", "relative-bias"])
@pytest.mark.parametrize("requantize", ["fixed_point", "onnxruntime"])
def test_attention_runs_whole_on_integers_saves_and_deploys(build, requantize, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    qmodel = quantize_whole(build().eval(), _calib(), x, tmp_path, requantize, min_sqnr=20.0)
    kinds = {type(m) for m in qmodel.modules()}
    assert QMatMul in kinds and QSoftmax in kinds


class Masked(Attention):
    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        return self.head(F.scaled_dot_product_attention(q, k, v, is_causal=True).mean(1))


def test_a_causal_attention_stays_one_float_call_between_integers(tmp_path):
    torch.manual_seed(0)
    with pytest.warns(fxq.FloatFallbackWarning, match="scaled_dot_product_attention"):
        qmodel = fxq.quantize(Masked().eval(), _calib())
    x = torch.randn(2, 3, 12, 12)
    assert count_ops(qmodel, x).float == 1


class ScaledAttention(nn.Module):
    """Fused attention with its own scale, and two with masks fxq leaves fused: a boolean one and
    a float one with infinities."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.register_buffer("blocked", torch.full((5, 5), -torch.inf).triu(1))

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        return (F.scaled_dot_product_attention(q, k, v, scale=0.3) + F.scaled_dot_product_attention(q, k, v, mask)
                + F.scaled_dot_product_attention(q, k, v, self.blocked))


def test_fused_attention_is_rewritten_into_the_ops_it_fuses_with_the_same_values():
    from passes import trace
    torch.manual_seed(0)
    model = ScaledAttention().eval()
    x = torch.randn(2, 5, 8)
    gm = trace.trace(model, fxq.PassContext(fxq.QConfig(), [x]))
    fused = [n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention]
    assert len(fused) == 2 and all(len(f.args) + len(f.kwargs) == 4 for f in fused)  # the masked ones stay
    assert sum(n.target is torch.matmul for n in gm.graph.nodes) == 2
    torch.testing.assert_close(gm(x), model(x))


class Attending(nn.Module):
    """A torch MultiheadAttention over an image's positions, self- or cross- (keys and values from a
    second conv, of another width), sequence-first or batch-first, as ViT and RT-DETR call it."""

    def __init__(self, batch_first: bool, cross: bool, bias: bool = True, **extra):
        super().__init__()
        self.conv, self.memory = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.cross, self.batch_first, self.extra = cross, batch_first, extra
        dims = dict(kdim=6, vdim=6) if cross else {}
        self.attention = nn.MultiheadAttention(8, 2, bias=bias, batch_first=batch_first, **dims)
        self.head = nn.Linear(8, 5)

    def _tokens(self, x):
        t = x.flatten(2).transpose(1, 2)  # [N, L, C]
        return t if self.batch_first else t.transpose(0, 1)

    def forward(self, x):
        q = self._tokens(self.conv(x))
        kv = self._tokens(self.memory(x)) if self.cross else q
        out, weights = self.attention(q, kv, kv, **self.extra)
        y = self.head(out if self.batch_first else out.transpose(0, 1))
        return (y, weights) if self.extra.get("need_weights") else y


@pytest.mark.parametrize("batch_first, cross, bias", [(True, False, True), (False, False, True),
                                                      (False, True, False), (True, True, True)],
                         ids=["self", "sequence-first", "cross-without-bias", "cross"])
def test_multihead_attention_is_its_projections_and_products_on_integers(batch_first, cross, bias, tmp_path):
    torch.manual_seed(0)
    model = Attending(batch_first, cross, bias).eval()
    calibration = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    qmodel = quantize_whole(model, calibration, torch.randn(4, 3, 6, 6), tmp_path)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in qmodel.modules())
    assert sum(type(m).__name__ == "QLinear" for m in qmodel.modules()) == 5  # q, k, v, out, head


def test_multihead_attention_whose_weights_are_read_stays_whole_and_says_why():
    torch.manual_seed(0)
    model = Attending(True, False, need_weights=True).eval()
    with pytest.warns(fxq.FloatFallbackWarning, match="attention weights are read"):
        qmodel = fxq.quantize(model, [torch.randn(8, 3, 6, 6) for _ in range(3)])
    assert any(isinstance(m, nn.MultiheadAttention) for m in qmodel.modules())
