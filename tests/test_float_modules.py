"""Every torch.nn layer a vision model may hold, kept in float (by ``overrides``, whether or not it
has an integer form), between integer convs: it runs, saves → loads identically and deploys."""
import warnings

import pytest
import torch
from torch import nn

import fxq
from fxq.analysis.comparison import sqnr_db
from fxq.graphs import records
from fxq.ops import KEPT_BY_OVERRIDES
from fxq.ops.fallback import FLOAT_SCHEMAS
from tests.helpers import images


class Island(nn.Module):
    """``layer`` on the [N, 4, 8, 8] output of a conv, through ``before`` and ``after`` reshapes."""

    def __init__(self, layer: nn.Module, before=None, after=None):
        super().__init__()
        self.conv, self.island, self.head = nn.Conv2d(3, 4, 3, padding=1), layer, nn.Conv2d(4, 4, 1)
        self.before, self.after = before or (lambda x: x), after or (lambda y: y)

    def forward(self, x):
        inputs = self.before(self.conv(x))
        y = self.after(self.island(*inputs) if isinstance(inputs, tuple) else self.island(inputs))
        return self.head(y.reshape(x.shape[0], 4, -1, 8))  # any output with 4 × k × 8 values per sample


def _rows(x):  # [N, 4, 8, 8] → [N, 32, 8]: a sequence of 32 tokens of 8 features
    return x.reshape(x.shape[0], 32, 8)


def _first(out):  # an RNN's (output, state)
    return out[0]


def _crop(y):  # a padding's border off again
    return y[..., 1:-1, 1:-1]


def _tile(y):  # 8 features → 64 values per sample, whatever the layer made
    return y.reshape(y.shape[0], -1)[:, :8].repeat(1, 32)


# (layer, before, after): torch.nn's layers that fit an image's features
LAYERS = [
    (nn.ReLU(), None, None), (nn.ReLU6(), None, None), (nn.ELU(), None, None), (nn.CELU(), None, None),
    (nn.SELU(), None, None), (nn.GELU(), None, None), (nn.SiLU(), None, None), (nn.Mish(), None, None),
    (nn.Sigmoid(), None, None), (nn.Tanh(), None, None), (nn.Hardtanh(-0.5, 0.5), None, None),
    (nn.Hardswish(), None, None), (nn.Hardsigmoid(), None, None), (nn.LeakyReLU(0.2), None, None),
    (nn.LogSigmoid(), None, None), (nn.Softplus(), None, None), (nn.Softshrink(), None, None),
    (nn.Hardshrink(), None, None), (nn.Tanhshrink(), None, None), (nn.Softsign(), None, None),
    (nn.Threshold(0.1, 0.0), None, None), (nn.RReLU(), None, None), (nn.PReLU(4), None, None),
    (nn.Softmax(dim=1), None, None), (nn.Softmin(dim=1), None, None), (nn.LogSoftmax(dim=1), None, None),
    (nn.Softmax2d(), None, None), (nn.GLU(dim=1), None, lambda y: y.repeat(1, 2, 1, 1)),
    (nn.Identity(), None, None), (nn.Dropout(), None, None), (nn.Dropout2d(), None, None),
    (nn.AlphaDropout(), None, None), (nn.FeatureAlphaDropout(), None, None),
    (nn.Flatten(), None, None), (nn.Unflatten(1, (2, 2)), None, None),
    (nn.BatchNorm2d(4), torch.relu, None), (nn.InstanceNorm2d(4, affine=True), None, None),
    (nn.GroupNorm(2, 4), None, None), (nn.LayerNorm([4, 8, 8]), None, None), (nn.RMSNorm(8), None, None),
    (nn.LocalResponseNorm(2), None, None), (nn.LocalResponseNorm(5, k=2.0), None, None),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), None, None),
    (nn.ConvTranspose2d(4, 4, 2, stride=2), None, None),
    (nn.Conv3d(1, 1, 3, padding=1), lambda x: x.unsqueeze(1), None),
    (nn.Conv1d(4, 4, 3, padding=1), lambda x: x.flatten(2), None),
    (nn.ConvTranspose1d(4, 4, 1), lambda x: x.flatten(2), None),
    (nn.BatchNorm1d(4), lambda x: x.flatten(2), None), (nn.InstanceNorm1d(4), lambda x: x.flatten(2), None),
    (nn.MaxPool2d(3, 1, 1), None, None), (nn.AvgPool2d(3, 1, 1), None, None), (nn.LPPool2d(2, 2), None, _tile),
    (nn.AdaptiveAvgPool2d(4), None, None), (nn.AdaptiveMaxPool2d(4), None, None),
    (nn.MaxPool1d(2), lambda x: x.flatten(2), None), (nn.AvgPool1d(2), lambda x: x.flatten(2), None),
    (nn.PixelShuffle(2), None, None), (nn.PixelUnshuffle(2), None, None), (nn.ChannelShuffle(2), None, None),
    (nn.Upsample(scale_factor=2, mode="bilinear"), None, None), (nn.UpsamplingNearest2d(scale_factor=2), None, None),
    (nn.UpsamplingBilinear2d(scale_factor=2), None, None),
    (nn.ZeroPad2d(1), None, _crop), (nn.ConstantPad2d(1, 0.5), None, _crop), (nn.ReflectionPad2d(1), None, _crop),
    (nn.ReplicationPad2d(1), None, _crop), (nn.CircularPad2d(1), None, _crop),
    (nn.Unfold(2, stride=2), None, None), (nn.Linear(8, 8), None, None),
    (nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 1))), None, None),
    (nn.LSTM(8, 8, batch_first=True), _rows, _first), (nn.GRU(8, 8, num_layers=2, batch_first=True), _rows, _first),
    (nn.RNN(8, 8, batch_first=True, bidirectional=True), _rows, _first),
    (nn.MultiheadAttention(8, 2, batch_first=True), lambda x: (_rows(x),) * 3, _first),
]


def _name(case) -> str:
    return type(case[0]).__name__


@pytest.mark.parametrize("case", LAYERS, ids=map(_name, LAYERS))
@pytest.mark.real_data  # 80 quantize → save → load → deploy rounds: left to `make test`
def test_a_torch_layer_kept_in_float_saves_loads_and_deploys(case, tmp_path):
    torch.manual_seed(0)
    model = Island(*case).eval()
    calibration, x = images(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
        qmodel = fxq.quantize(model, calibration, fxq.QConfig(requantize="onnxruntime"), overrides={"island": None})
    assert any(records.get(n, records.FloatOp) == records.FloatOp(KEPT_BY_OVERRIDES) for n in qmodel.graph.nodes)
    fxq.save(qmodel, tmp_path / "island.fxq")
    loaded = fxq.load(tmp_path / "island.fxq")
    with torch.no_grad():
        ours = qmodel(x)
        assert torch.equal(loaded(x), ours)
        deployed = fxq.deploy(loaded, x[:1], threads=1, weights="exact")(x)
    assert sqnr_db(ours, deployed) >= 30  # another runtime's float kernels: a step here and there


def test_every_torch_layer_a_vision_model_holds_is_in_the_table():
    """The float table is torch.nn's own: a layer the walk above leaves out is one that takes no
    image features (losses, embeddings, cells)."""
    walked = {type(case[0]) for case in LAYERS}
    left = {cls.__name__ for cls in FLOAT_SCHEMAS} - {cls.__name__ for cls in walked}
    assert walked <= set(FLOAT_SCHEMAS)
    assert len(FLOAT_SCHEMAS) >= 100 and "Embedding" in left and "LSTMCell" in left


def test_a_torch_layer_its_constructor_cannot_rebuild_is_refused_when_saving(tmp_path):
    torch.manual_seed(0)
    model = Island(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), _rows).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
        qmodel = fxq.quantize(model, images(8)[0], overrides={"island": None})
    with pytest.raises(ValueError, match="cannot save 'island'.*does not build from its fields"):
        fxq.save(qmodel, tmp_path / "island.fxq")
