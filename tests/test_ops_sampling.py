"""Sampling at a grid's points on integers (`fxq.ops.sampling`): tables of neighbours and
fixed-point weights per grid integer, exact sums, one rounding; saved and deployed bit-exact."""
import io
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxq
from fxq.graphs import records
from fxq.ops.sampling import QGridSample
from scripts import emulated_cpu
from tests.helpers import images, quantize_whole

SETTINGS = list(itertools.product(("bilinear", "nearest"), ("zeros", "border", "reflection"), (False, True)))


def _dequantized(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return (q.double() - zero_point) * scale


@pytest.mark.parametrize("mode, padding_mode, align_corners", SETTINGS)
def test_sampling_is_torchs_on_the_values_within_one_step(mode, padding_mode, align_corners):
    """Against torch's float64 sampling of the values the integers stand for: nearest picks the
    very same integers; bilinear is at most one step away (its weights have 16 fractional bits)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 256, (3, 4, 7, 9), dtype=torch.uint8, generator=g)
    grid = torch.randint(0, 256, (3, 5, 6, 2), dtype=torch.uint8, generator=g)
    sample = QGridSample(mode, padding_mode, align_corners, zero_point=100, bits=8,
                         grid_scale=1.3 / 127, grid_zero_point=128, grid_bits=8)
    expected = F.grid_sample(_dequantized(q, 1.0, 100), _dequantized(grid, 1.3 / 127, 128), mode, padding_mode,
                             align_corners) + 100
    got = sample(q, grid)
    assert got.dtype == torch.uint8 and got.shape == (3, 4, 5, 6)
    difference = (got.double() - expected).abs().max().item()
    assert difference <= (0.5 + 1e-9 if mode == "nearest" else 1.0)
    assert torch.equal(sample(q.to(torch.int64), grid.to(torch.int64)), got)


def test_points_outside_the_image_read_real_zero_with_zeros_padding():
    q = torch.full((1, 1, 4, 4), 200, dtype=torch.uint8)
    grid = torch.tensor([[[[255, 128], [0, 128], [128, 128]]]], dtype=torch.uint8)  # far right, far left, centre
    sample = QGridSample("bilinear", "zeros", False, zero_point=30, bits=8,
                         grid_scale=4.0 / 127, grid_zero_point=128, grid_bits=8)
    assert sample(q, grid).flatten().tolist() == [30, 30, 200]


class Deformable(nn.Module):
    """Deformable attention's sampling (RT-DETR, Deformable DETR): offsets predicted from the
    features, mapped to [−1, 1] as ``2·loc − 1``, the features sampled there and weighted."""

    def __init__(self, mode: str = "bilinear", padding_mode: str = "zeros", align_corners: bool = False):
        super().__init__()
        self.value, self.offsets = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 2, 3, stride=2, padding=1)
        self.mode, self.padding_mode, self.align_corners = mode, padding_mode, align_corners

    def forward(self, x):
        locations = torch.sigmoid(self.offsets(x)).permute(0, 2, 3, 1)
        sampled = F.grid_sample(torch.relu(self.value(x)), 2 * locations - 1, mode=self.mode,
                                padding_mode=self.padding_mode, align_corners=self.align_corners)
        return sampled.flatten(1)


@pytest.mark.parametrize("mode, padding_mode, align_corners", [("bilinear", "zeros", False),
                                                               ("nearest", "border", True),
                                                               ("bilinear", "reflection", True)])
def test_deformable_sampling_runs_on_integers_saves_and_deploys_bit_exact(tmp_path, mode, padding_mode,
                                                                         align_corners):
    torch.manual_seed(0)
    model = Deformable(mode, padding_mode, align_corners).eval()
    calib, x = images(12)
    qmodel = quantize_whole(model, calib, x, tmp_path, min_sqnr=8 if mode == "nearest" else 20)
    sampled = [n for n in qmodel.graph.nodes if n.op == "call_module"
               and isinstance(qmodel.get_submodule(n.target), QGridSample)]
    assert len(sampled) == 1 and not any(records.has(n, records.FloatOp) for n in qmodel.graph.nodes)


def test_bicubic_sampling_stays_float_and_says_why():
    class Bicubic(Deformable):
        def forward(self, x):
            grid = torch.tanh(self.offsets(x)).permute(0, 2, 3, 1)
            return F.grid_sample(torch.relu(self.value(x)), grid, mode="bicubic", align_corners=False)

    torch.manual_seed(0)
    calib, _ = images(12)
    with pytest.warns(fxq.FloatFallbackWarning, match="bicubic sampling"):
        fxq.quantize(Bicubic().eval(), calib)


@pytest.mark.real_data
@pytest.mark.skipif(not emulated_cpu.available(), reason="needs x86-64 and qemu-x86_64 (make setup)")
def test_sampling_deploys_identically_on_an_emulated_avx2_cpu():
    """The Gathers and int64 sums as an AVX2-only CPU runs them (QEMU's Haswell), whatever this one is."""
    torch.manual_seed(0)
    model = Deformable("bilinear", "zeros", False).eval()
    calib, x = images(12)
    qmodel = fxq.quantize(model, calib, fxq.QConfig(requantize="onnxruntime"))
    model_bytes = io.BytesIO()
    fxq.export_onnx(qmodel, model_bytes, "exact")
    emulated = torch.from_numpy(emulated_cpu.run(model_bytes.getvalue(), x.numpy()))
    assert torch.equal(emulated, qmodel(x))
