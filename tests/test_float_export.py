"""Every op a quantized model keeps in float saves and deploys: fxq's own ONNX forms where it
has them, otherwise the op as torch.onnx exports it, spliced in (`fxq.deployment.onnx_splice`)."""
import io
import warnings

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxq
from fxq.analysis.comparison import sqnr_db
from fxq.graphs.runtime import count_ops
from tests.helpers import output_steps, quantize_whole, randomize_bn


class FloatIslands(nn.Module):
    """Float ops fxq has no integer form for: a softmax across three branches asked for a dtype, bicubic
    upsampling, a reduction (logsumexp); a group norm kept in float by overrides; between them
    integer ops."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branches = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1),
                                       nn.Conv2d(8, 8, 5, padding=2)])
        self.attend, self.norm, self.head = nn.Conv2d(8, 24, 1), nn.GroupNorm(3, 9), nn.Conv2d(9, 4, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        branches = torch.stack([branch(x) for branch in self.branches], dim=1)  # B, 3, C, H, W
        weights = self.attend(branches.sum(dim=1).mean((2, 3), keepdim=True))
        weights = weights.view(x.shape[0], 3, 8, 1, 1).softmax(dim=1, dtype=torch.float32)
        x = (branches * weights).sum(dim=1)
        x = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
        x = self.norm(torch.cat([x, torch.logsumexp(x, 1, keepdim=True)], 1))
        return self.head(x).mean((2, 3))


def _quantized():
    torch.manual_seed(0)
    model = randomize_bn(FloatIslands()).eval()
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(8, 3, 10, 10, generator=g) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
        return model, fxq.quantize(model, calibration, fxq.QConfig(requantize="onnxruntime"), overrides={"norm": None})


def test_float_islands_save_load_and_deploy_within_a_step_of_fxq(tmp_path):
    model, qmodel = _quantized()
    x = torch.randn(16, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    assert set(count_ops(qmodel, x).float_ops) == {"softmax", "interpolate", "logsumexp", "norm"}
    fxq.save(qmodel, tmp_path / "model.fxq")
    loaded = fxq.load(tmp_path / "model.fxq")
    deployed = fxq.deploy(loaded, x[:1], threads=1, weights="exact")
    assert not deployed.bit_exact and "float op(s)" in repr(deployed)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
        ours, theirs = qmodel(x), deployed(x)
    assert float((ours == theirs).float().mean()) > 0.9
    assert int((ours.argmax(1) == theirs.argmax(1)).sum()) >= 15


def test_the_spliced_graph_passes_the_checker_and_takes_any_batch():
    _, qmodel = _quantized()
    buffer = io.BytesIO()
    fxq.export_onnx(qmodel, buffer)
    graph = onnx.load_from_string(buffer.getvalue()).graph
    kinds = {n.op_type for n in graph.node}
    assert {"Softmax", "Resize", "ReduceLogSumExp"} <= kinds
    deployed = fxq.deploy(qmodel, threads=1)
    for batch in (1, 5):
        assert deployed(torch.randn(batch, 3, 10, 10)).shape == (batch, 4)


def test_a_float_op_torch_onnx_cannot_export_is_named():
    class Spectral(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return torch.fft.rfft2(self.conv(x)).abs()

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
        qmodel = fxq.quantize(Spectral().eval(), [torch.randn(4, 3, 4, 4)])
    with pytest.raises(ValueError, match=r"node 'fft_rfft2' .*torch.onnx .*could not export it"):
        fxq.export_onnx(qmodel, io.BytesIO())


def test_unbound_integers_export_item_by_item():
    class Unbound(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            first, second = torch.relu(self.conv(x)).view(x.shape[0], 2, 2, 6, 6).unbind(1)
            return torch.cat([first, second.flip(1)], 1)

    torch.manual_seed(0)
    qmodel = fxq.quantize(Unbound().eval(), [torch.randn(4, 3, 6, 6) for _ in range(2)],
                          fxq.QConfig(requantize="onnxruntime"))
    x = torch.randn(3, 3, 6, 6)
    assert count_ops(qmodel, x).float == 0
    deployed = fxq.deploy(qmodel, threads=1, weights="exact")
    assert deployed.bit_exact and torch.equal(deployed(x), qmodel(x))


def test_a_float_op_after_an_integer_conv_agrees_with_the_twin_bit_for_bit():
    """The integer conv's output is channels-last; a float GroupNorm (kept so by overrides)
    reduces in another order on that layout, so the dequantized floats it reads are handed on in
    the standard layout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
        qmodel = fxq.quantize(model, [torch.randn(8, 3, 16, 16) for _ in range(4)], overrides={"1": None})
    integer, simulated = output_steps(qmodel, fxq.simulate(qmodel), torch.randn(64, 3, 16, 16))
    assert torch.equal(integer, simulated)


class FourierPositions(nn.Module):
    """EdgeNeXt's positional encoding: a tensor made from the input's sizes alone
    (``torch.zeros(B, H, W)``), cumulative sums and sines of it, projected and added to the
    features; or joined to them, or made different for each sample."""

    def __init__(self, use: str = "added"):
        super().__init__()
        self.conv, self.project = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(2, 4, 1)
        self.use = use

    def forward(self, x):
        b, _, h, w = x.shape
        base = torch.zeros((b, h, w))
        y, x_pos = (base + 1).cumsum(1), (base + 1).cumsum(2)
        y, x_pos = y / y[:, -1:], x_pos / x_pos[:, :, -1:]
        if self.use == "batch-dependent":  # a different value for each sample: no one-sample constant
            y = y * torch.arange(1, b + 1).view(b, 1, 1)
        positions = self.project(torch.stack([y.sin(), x_pos.cos()], 1))
        return torch.cat([self.conv(x), positions], 1) if self.use == "joined" else self.conv(x) + positions


def test_a_tensor_made_from_sizes_is_computed_once_and_runs_on_integers(tmp_path):
    torch.manual_seed(0)
    model, x = FourierPositions().eval(), torch.randn(3, 3, 6, 6)
    qmodel = quantize_whole(model, [torch.randn(4, 3, 6, 6) for _ in range(2)], x, tmp_path, min_sqnr=20.0)
    assert not any(n.target in (torch.zeros, "cumsum", "sin") for n in qmodel.graph.nodes)
    with pytest.raises(ValueError, match="6, 6"):  # the positions were computed for that size
        qmodel(torch.randn(1, 3, 8, 8))


def test_a_tensor_made_from_sizes_deploys_for_any_batch():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
        qmodel = fxq.quantize(FourierPositions("joined").eval(), [torch.randn(4, 3, 6, 6) for _ in range(2)],
                              fxq.QConfig(requantize="onnxruntime"))
    assert any(n.target is torch.zeros for n in qmodel.graph.nodes)  # a join reads it: not folded
    deployed = fxq.deploy(qmodel, threads=1, weights="exact")
    for batch in (1, 3):
        x = torch.randn(batch, 3, 6, 6)
        assert torch.equal(deployed(x), qmodel(x))


def test_a_tensor_made_from_the_batch_size_is_refused_by_name():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
        qmodel = fxq.quantize(FourierPositions("batch-dependent").eval(), [torch.randn(4, 3, 6, 6)])
    with pytest.raises(ValueError, match="node 'arange' makes a tensor from the batch size"):
        fxq.export_onnx(qmodel, io.BytesIO())


class Indexed(nn.Module):
    """Items and slices of integer tensors: an Ellipsis (EfficientViT's ``out[..., :-1]``), an
    integer index, a new dim (``[:, None]``), a list of positions (CSATv2's zigzag order)."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        first = y[..., :-1]
        second = y[:, 0][:, None, :, 1:]
        third = y[:, 2:5, ..., None].flatten(3)[..., 1:]
        zigzag = y[:, :, [0, 2, 1, 4, 3, -1]][..., 1, None, :-1]
        return self.head(first * second + third.mean(1, keepdim=True) + zigzag)


def test_items_slices_ellipses_and_new_dims_deploy_bit_exact(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 6, 6)
    quantize_whole(Indexed().eval(), [torch.randn(4, 3, 6, 6) for _ in range(2)], x, tmp_path)


def test_torch_math_kept_in_float_saves_by_name_and_deploys(tmp_path):
    """A detector's decoder as RT-DETR writes it: the top scores' values, a cast, a sampled grid."""
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            top = torch.topk(y.flatten(2), 5, dim=2).values.max(1).values
            grid = torch.tanh(y[:, :2].permute(0, 2, 3, 1))
            sampled = F.grid_sample(y, grid, align_corners=False)
            return sampled.flatten(1) + top.long().float().sum(1, keepdim=True)

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
        qmodel = fxq.quantize(Decoder().eval(), [torch.randn(4, 3, 6, 6) for _ in range(2)])
    x = torch.randn(3, 3, 6, 6)
    fxq.save(qmodel, tmp_path / "decoder.fxq")
    with torch.no_grad():
        ours = qmodel(x)
        assert torch.equal(fxq.load(tmp_path / "decoder.fxq")(x), ours)
        theirs = fxq.deploy(qmodel, threads=1, weights="exact")(x)
    assert sqnr_db(ours, theirs) > 30


class TopQueries(nn.Module):
    """RT-DETR's query selection: the top-k positions of each sample, picked by a batch index made
    with ``torch.arange`` of the batch size (ONNX Range, GatherND); a dim added before the batch."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(36, 5)

    def forward(self, x):
        h = self.conv(x)
        top = torch.topk(h.mean((2, 3)), 2, dim=1).indices.view(-1)
        batch = torch.arange(end=x.shape[0], dtype=top.dtype).unsqueeze(-1).repeat(1, 2).view(-1)
        picked = h.flatten(2)[batch, top].view(x.shape[0], 2, -1).unsqueeze(0)  # the batch moved to dim 1
        return self.head(picked.squeeze(0))


def test_a_batch_index_from_arange_of_the_batch_size_deploys_for_any_batch():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
        qmodel = fxq.quantize(TopQueries().eval(), [torch.randn(4, 3, 6, 6) for _ in range(2)])
    deployed = fxq.deploy(qmodel, threads=1, weights="exact")
    for batch in (1, 3):
        x = torch.randn(batch, 3, 6, 6)
        assert sqnr_db(qmodel(x), deployed(x)) > 30
