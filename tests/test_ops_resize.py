"""Resampling on integers (`fxq.ops.resize`): nearest neighbours are copies of the integers;
bilinear is fixed-point weights, exact sums and one rounding. Both save and deploy bit-exact."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxq
from fxq.graphs import records
from fxq.ops.resize import QResizeBilinear, QResizeNearest
from tests.helpers import assert_deploys_bit_exact, check_quantized, images, quantize_whole


class Upsampling(nn.Module):
    """An HRNet-style fusion: a low-resolution branch brought up by nearest upsampling and added,
    in every form torch spells it; and GhostNetV2's gate, resized to another tensor's shape."""

    def __init__(self):
        super().__init__()
        self.stem, self.down = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.up, self.up_module = nn.Upsample(scale_factor=2), nn.UpsamplingNearest2d(size=(5, 5))
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        low = torch.relu(self.down(h))
        fused = h + self.up(low)[:, :, :9, :9]
        exact = F.interpolate(low, scale_factor=1.5, mode="nearest-exact")
        odd = F.interpolate(low, size=(7, 11)) + exact[:, :, :7, :1]
        gated = h * F.interpolate(torch.sigmoid(low), size=(h.shape[-2], h.shape[-1]), mode="nearest")
        branches = (fused, odd, self.up_module(low), gated)
        return sum(self.head(branch).mean((2, 3)) for branch in branches)


def test_nearest_upsampling_copies_integers_saves_and_deploys_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = Upsampling().eval()
    qmodel = fxq.quantize(model, [torch.randn(8, 3, 9, 9) for _ in range(4)], fxq.QConfig(requantize="onnxruntime"))
    resized = [n for n in qmodel.graph.nodes if n.op == "call_module"
               and type(qmodel.get_submodule(n.target)).__name__ == "QResizeNearest"]
    assert len(resized) == 5
    assert not any(records.has(n, records.FloatOp) for n in qmodel.graph.nodes)
    x = torch.randn(16, 3, 9, 9)
    assert check_quantized(qmodel, model, x, tmp_path) > 25
    assert_deploys_bit_exact(qmodel, x, tmp_path / "model.fxq")


def test_nearest_resampling_is_torchs_on_the_integers():
    q = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    cases = [(None, (2.0,), "nearest"), ((8, 3), None, "nearest"), (None, (1.7, 0.6), "nearest-exact")]
    for size, scale, mode in cases:
        resize = QResizeNearest(size, scale, mode, False)
        expected = F.interpolate(q.double(), size, scale if scale is None or len(scale) > 1 else scale[0], mode)
        assert torch.equal(resize(q).double(), expected) and resize(q).dtype == torch.uint8
        assert torch.equal(resize(q.to(torch.int32)), resize(q).to(torch.int32))


class Bilinear(nn.Module):
    """A feature-pyramid merge: a branch resized bilinearly to another tensor's size and added, by
    a factor, by a module of each kind, and both corner conventions."""

    def __init__(self):
        super().__init__()
        self.conv, self.side, self.head = nn.Conv2d(3, 6, 3, stride=2), nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)
        self.up, self.fixed = nn.Upsample(scale_factor=2, mode="bilinear"), nn.UpsamplingBilinear2d(size=(9, 7))

    def forward(self, x):
        y = torch.relu(self.conv(x))
        merged = F.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=False) + self.side(x)
        odd = F.interpolate(self.fixed(y), scale_factor=(1.5, 0.7), mode="bilinear")
        return sum(self.head(branch).mean((2, 3)) for branch in (merged, self.up(y), odd))


@pytest.mark.parametrize("requantize", ["fixed_point", "onnxruntime"])
def test_bilinear_resampling_runs_on_integers_saves_and_deploys_bit_exact(requantize, tmp_path):
    torch.manual_seed(0)
    calibration, x = images(13)
    qmodel = quantize_whole(Bilinear().eval(), calibration, x, tmp_path, requantize, min_sqnr=30.0)
    assert sum(isinstance(m, QResizeBilinear) for m in qmodel.modules()) == 4


def _centred_bilinear(q: torch.Tensor, z: int, size, scale, align_corners: bool) -> torch.Tensor:
    """torch's float64 bilinear resampling of the centred integers."""
    return F.interpolate(q.double() - z, size, scale, mode="bilinear", align_corners=align_corners)


def test_bilinear_resampling_by_two_is_torchs_rounded_once():
    q = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    resize = QResizeBilinear(None, (2.0,), False, False, 131, 8)
    expected = torch.round(_centred_bilinear(q, 131, None, 2.0, False)) + 131  # weights ¼, ¾: exact in fixed point
    assert torch.equal(resize(q).double(), expected) and resize(q).dtype == torch.uint8


@pytest.mark.parametrize("size, scale, align_corners", [((8, 3), None, False), ((11, 13), None, True),
                                                         (None, (1.7, 0.6), False), (None, (0.5,), True)])
def test_bilinear_resampling_is_within_one_step_of_torchs(size, scale, align_corners):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=g)
    resize = QResizeBilinear(size, scale, align_corners, False, 17, 8)
    floats = _centred_bilinear(q, 17, size, scale if scale is None or len(scale) > 1 else scale[0], align_corners)
    out = resize(q).double() - 17
    assert out.shape == floats.shape and (out - floats).abs().max() <= 0.5 + 1e-3
    assert (out - torch.round(floats)).abs().max() <= 1
    wide = resize.__class__(size, scale, align_corners, False, 17, 16)
    assert torch.equal(wide(q.to(torch.int32)), resize(q).to(torch.int32))


class Smoothed(nn.Module):
    def __init__(self, mode: str, antialias: bool):
        super().__init__()
        self.conv, self.mode, self.antialias = nn.Conv2d(3, 4, 1), mode, antialias

    def forward(self, x):
        return F.interpolate(self.conv(x), scale_factor=0.5, mode=self.mode, antialias=self.antialias)


@pytest.mark.parametrize("mode, antialias, reason", [("bicubic", False, "bicubic resampling"),
                                                     ("bilinear", True, "bilinear antialiased resampling")])
def test_other_resampling_stays_in_float_and_says_why(mode, antialias, reason):
    torch.manual_seed(0)
    with pytest.warns(fxq.FloatFallbackWarning, match=reason):
        qmodel = fxq.quantize(Smoothed(mode, antialias).eval(), [torch.randn(4, 3, 6, 6)])
    (node,) = [n for n in qmodel.graph.nodes if records.has(n, records.FloatOp)]
    assert reason in records.get(node, records.FloatOp).reason
