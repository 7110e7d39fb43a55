"""Conv1d and Conv3d as the int8 Conv2d they equal (`fxq.ops.convolutions`), and batch norm folded
into every weighted layer along the axis its entry declares (`fxq.ops.weighted`): the same float
function, every op on integers, bit-exact when deployed."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxq
from fxq import ops
from fxq.graphs.runtime import count_ops
from passes.fold_bn import fold_bn
from passes.rewrite_layers import rewrite_layers
from passes.trace import trace
from tests.helpers import assert_deploys_bit_exact, check_quantized, images, quantize_whole


def _settled(norm: nn.Module) -> nn.Module:
    with torch.no_grad():
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    return norm


def _float_graph(model: nn.Module, calibration: list):
    ctx = fxq.PassContext(fxq.QConfig(), calibration)
    return rewrite_layers(fold_bn(trace(model, ctx), ctx), ctx)


class Volume(nn.Module):
    """A 3-d conv (and its batch norm) on a volume made from an image: ``[N, 4, 4, H, W]``."""

    def __init__(self, conv: nn.Module, norm: nn.Module | None):
        super().__init__()
        self.stem, self.conv, self.norm = nn.Conv2d(3, 16, 1), conv, norm or nn.Identity()

    def forward(self, x):
        v = self.stem(x)
        return torch.relu(self.norm(self.conv(v.reshape(v.shape[0], 4, 4, *v.shape[2:]))))


CONV3D = [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 3, 1), padding=(1, 1, 0)),
          dict(kernel_size=(1, 3, 3), padding=(0, 1, 1)), dict(kernel_size=(3, 1, 3), padding=(1, 0, 1)),
          dict(kernel_size=2, stride=2), dict(kernel_size=3, stride=(2, 1, 1), dilation=(2, 1, 1), padding=2),
          dict(kernel_size=3, padding="same", groups=2, bias=False)]


@pytest.mark.parametrize("geometry", CONV3D, ids=str)
def test_a_conv3d_and_its_batch_norm_are_one_int8_conv2d_on_windows(geometry, tmp_path):
    """Windows along one axis beside the channels (none where the kernel spans it by 1)."""
    torch.manual_seed(0)
    model = Volume(nn.Conv3d(4, 6, **geometry), _settled(nn.BatchNorm3d(6))).eval()
    calibration, x = images(8)
    graph = _float_graph(model, calibration)
    kinds = [type(m) for m in graph.modules()]
    assert nn.Conv3d not in kinds and nn.BatchNorm3d not in kinds  # folded, then rewritten
    torch.testing.assert_close(graph(x), model(x), rtol=0, atol=1e-5)
    quantize_whole(model, calibration, x, tmp_path)


class Sequence1d(nn.Module):
    def __init__(self, layer: nn.Module, norm: nn.Module):
        super().__init__()
        self.stem, self.layer, self.norm = nn.Conv2d(3, 8, 3, padding=1), layer, norm

    def forward(self, x):
        return torch.relu(self.norm(self.layer(self.stem(x).flatten(2))))


@pytest.mark.parametrize("layer", [nn.Conv1d(8, 6, 3, padding=1), nn.Conv1d(8, 6, 5, stride=2, groups=2),
                                   nn.ConvTranspose1d(8, 6, 3, stride=2, padding=1, output_padding=1)],
                         ids=lambda m: type(m).__name__)
def test_a_1d_layer_and_its_batch_norm_are_one_int8_conv(layer, tmp_path):
    torch.manual_seed(0)
    model = Sequence1d(layer, _settled(nn.BatchNorm1d(6))).eval()
    calibration, x = images(8)
    graph = _float_graph(model, calibration)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in graph.modules())
    torch.testing.assert_close(graph(x), model(x), rtol=0, atol=1e-5)
    quantize_whole(model, calibration, x, tmp_path)


class Functional(nn.Module):
    """Layers written as F calls on their own parameters."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.Parameter(torch.randn(8, 3, 4, 4) * 0.2)
        self.line = nn.Parameter(torch.randn(6, 3, 3) * 0.2)
        self.cube = nn.Parameter(torch.randn(4, 3, 3, 3, 3) * 0.2)

    def forward(self, x):
        y = F.conv_transpose2d(torch.relu(self.stem(x)), self.up, stride=2, padding=1, groups=2)
        z = F.conv1d(y.flatten(2), self.line, padding=1, groups=2)
        return F.conv3d(z.reshape(z.shape[0], 3, 2, 16, 16), self.cube, padding=1)


def test_layers_written_as_functions_of_their_parameters_are_int8_convs(tmp_path):
    torch.manual_seed(0)
    model = Functional().eval()
    calibration, x = images(8)
    quantize_whole(model, calibration, x, tmp_path)


def test_every_weighted_entry_declares_how_its_batch_norm_folds():
    """The layout on the entry, tested on a random layer of each kind: folding scales each output
    channel by the norm's factor, wherever the layout keeps it."""
    torch.manual_seed(0)
    for op in ops.REGISTRY:
        if op.weights and op.rewrite is None:  # weight ranges and equalization read rows as channels
            assert op.weights.output_axis == 0, f"{op.name} lowers itself with output channels off axis 0"
        if not op.weights or not op.weights.norms:
            continue
        layer = op.example()
        layer = next(m for m in layer.modules() if ops.weights_of(m) is op.weights) if isinstance(
            layer, nn.Sequential) else layer
        channels = op.weights.output_channels(layer)
        norm = next(n for n in op.weights.norms if n is {3: nn.BatchNorm1d, 4: nn.BatchNorm2d,
                                                         5: nn.BatchNorm3d}[op.weights.output_rank])
        norm = _settled(norm(channels)).eval()
        x = torch.randn(2, op.weights.input_channels(layer), *[6] * (op.weights.output_rank - 2))
        torch.testing.assert_close(op.weights.folded(layer, norm)(x), norm(layer(x)), rtol=1e-5, atol=1e-5)


class ChannelAttention(nn.Module):
    """ECA: a Conv1d across the pooled channels gates them."""

    def __init__(self):
        super().__init__()
        self.conv, self.gate = nn.Conv2d(3, 8, 3, padding=1), nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        y = self.gate(x.mean((2, 3)).view(x.shape[0], 1, -1)).view(x.shape[0], -1, 1, 1)
        return x * y.sigmoid().expand_as(x)


def test_a_conv1d_runs_on_integers_as_the_conv2d_it_equals_and_deploys_exactly(tmp_path):
    torch.manual_seed(0)
    model = ChannelAttention().eval()
    calibration = [torch.randn(8, 3, 12, 12) for _ in range(4)]
    qmodel = fxq.quantize(model, calibration, fxq.QConfig(requantize="onnxruntime"))
    x = torch.randn(5, 3, 12, 12)
    assert count_ops(qmodel, x).float == 0
    assert check_quantized(qmodel, model, x, tmp_path) > 25
    assert_deploys_bit_exact(qmodel, x, tmp_path / "model.fxq")
    kept = fxq.quantize(model, calibration, overrides={"gate": None})  # the user's name still reaches it
    assert len([m for m in kept.modules() if type(m) in (nn.Conv1d, nn.Conv2d)]) == 1  # the gate, in float
