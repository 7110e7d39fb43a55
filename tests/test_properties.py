"""Property tests on generated networks: whatever small CNN hypothesis draws (convs of any stride,
padding, dilation and bias, grouped and depthwise convs, linear layers, ReLUs, ReLU6, lookup-table
activations, residual adds, squeeze-and-excitation products, concatenations, every kind of
pooling, reused modules, batch norms with near-zero and huge γ, an op with no integer form),
fxq either quantizes it or says clearly why not, and then

- the integer graph and `fxq.simulate` agree bit for bit,
- the user's model is untouched,
- save → load gives identical outputs.

The unit loop draws 50 networks; `make test` draws 200 more (the "ci" profile of
tests/conftest.py, the same ones every run); ``pytest --hypothesis-profile=thorough`` draws 2,000
new ones.
"""
import copy
import io
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxq
from fxq.integers import gemm
from tests.helpers import EXACT_BACKENDS, output_steps

GAMMAS = [1e-9, 1e-6, 1e-5, 1e-3, 0.1, 1.0, 10.0, 1e3]


class Generated(nn.Module):
    """A network described by a list of steps; ``forward`` unrolls it, so torch.fx traces it."""

    def __init__(self, steps: list[tuple], channels: int, classes: int, head: str):
        super().__init__()
        self.steps = steps
        self.layers = nn.ModuleDict()
        for index, step in enumerate(steps):
            for name, module in step[1].items():
                self.layers[f"s{index}_{name}"] = module
        self.head = head
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        for index, (kind, _) in enumerate(self.steps):
            get = lambda name: self.layers[f"s{index}_{name}"]  # noqa: E731
            if kind == "conv":
                x = get("conv")(x)
            elif kind == "conv_bn":
                x = get("bn")(get("conv")(x))
            elif kind == "relu":
                x = torch.relu(x)
            elif kind == "relu_module":
                x = get("relu")(x)
            elif kind == "residual":
                x = torch.relu(get("conv")(x) + x)
            elif kind == "reused":  # one conv applied twice
                x = get("conv")(torch.relu(get("conv")(x)))
            elif kind in ("maxpool", "avgpool", "padded_avgpool", "adaptive", "depthwise", "grouped"):
                x = get("op")(x) if kind in ("depthwise", "grouped") else get("pool")(x)
            elif kind == "relu6":
                x = nn.functional.relu6(x)
            elif kind == "lookup":
                x = nn.functional.hardswish(x * 0.5 + 0.25)
            elif kind == "gate":  # squeeze-and-excitation
                x = x * torch.sigmoid(get("conv")(x.mean((2, 3), keepdim=True)))
            elif kind == "cat":
                x = torch.cat([x, torch.relu(get("conv")(x))], 1)
            elif kind == "float":  # no integer form: runs in float between integers
                x = get("norm")(x)
        if self.head == "mean":
            x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        else:
            x = torch.flatten(x, 1)
        return self.fc(x)


def _bn(channels: int, draw) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([draw(st.sampled_from(GAMMAS)) * draw(st.sampled_from([1, -1]))
                                      for _ in range(channels)]))
        bn.bias.copy_(torch.randn(channels))
        bn.running_mean.copy_(torch.randn(channels))
        bn.running_var.copy_(torch.rand(channels) + 0.1)
    return bn


@st.composite
def networks(draw):
    """(model, input shape) for a random small CNN."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    channels, size = draw(st.integers(1, 4)), draw(st.integers(5, 10))
    input_shape = (channels, size, size)
    steps = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "conv_bn", "relu", "relu_module", "residual", "reused", "maxpool",
                                     "avgpool", "padded_avgpool", "adaptive", "depthwise", "grouped", "relu6",
                                     "lookup", "gate", "cat", "float"]))
        if kind in ("conv", "conv_bn"):
            out = draw(st.integers(1, 5))
            kernel, stride, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
            padding = draw(st.integers(0, kernel))
            reach = dilation * (kernel - 1) + 1
            if size + 2 * padding < reach:
                continue
            conv = nn.Conv2d(channels, out, kernel, stride, padding, dilation, bias=draw(st.booleans()))
            parts = {"conv": conv} | ({"bn": _bn(out, draw)} if kind == "conv_bn" else {})
            steps.append((kind, parts))
            channels, size = out, (size + 2 * padding - reach) // stride + 1
        elif kind in ("residual", "reused"):
            steps.append((kind, {"conv": nn.Conv2d(channels, channels, 3, padding=1)}))
        elif kind == "relu_module":
            steps.append((kind, {"relu": nn.ReLU()}))
        elif kind in ("maxpool", "avgpool") and size >= 2:
            steps.append((kind, {"pool": nn.MaxPool2d(2) if kind == "maxpool" else nn.AvgPool2d(2)}))
            size //= 2
        elif kind in ("relu", "relu6", "lookup"):
            steps.append((kind, {}))
        elif kind == "padded_avgpool":
            steps.append((kind, {"pool": nn.AvgPool2d(3, 1, 1, count_include_pad=draw(st.booleans()))}))
        elif kind == "adaptive" and size >= 2:
            size = draw(st.integers(1, size + 2))
            steps.append((kind, {"pool": nn.AdaptiveAvgPool2d(size)}))
        elif kind == "depthwise":
            multiplier = draw(st.integers(1, 2))
            steps.append((kind, {"op": nn.Conv2d(channels, channels * multiplier, 3, padding=1, groups=channels)}))
            channels *= multiplier
        elif kind == "grouped" and channels % 2 == 0:
            steps.append((kind, {"op": nn.Conv2d(channels, 4, 3, padding=1, groups=2)}))
            channels = 4
        elif kind == "gate":
            steps.append((kind, {"conv": nn.Conv2d(channels, channels, 1)}))
        elif kind == "cat":
            steps.append((kind, {"conv": nn.Conv2d(channels, 2, 1)}))
            channels += 2
        elif kind == "float":
            steps.append((kind, {"norm": nn.GroupNorm(1, channels)}))
    head = draw(st.sampled_from(["mean", "flatten"]))
    features = channels if head == "mean" else channels * size * size
    model = Generated(steps, features, draw(st.integers(2, 5)), head).eval()
    return model, input_shape


configs = st.builds(
    fxq.QConfig,
    weight_bits=st.sampled_from([2, 4, 8]), act_bits=st.sampled_from([4, 8, 16]),
    per_channel=st.booleans(), placement=st.sampled_from(["pre", "post", "both"]),
    weight_range=st.sampled_from(["minmax", "mse"]), act_range=st.sampled_from(["minmax", "percentile"]),
)


@settings(max_examples=50)
@given(network=networks(), config=configs)
def test_generated_networks_quantize_exactly_and_round_trip(network, config):
    _quantizes_exactly_and_round_trips(network, config)


@pytest.mark.real_data
@given(network=networks(), config=configs)
def test_many_generated_networks_quantize_exactly_and_round_trip(network, config):
    _quantizes_exactly_and_round_trips(network, config)


def _quantizes_exactly_and_round_trips(network, config):
    model, shape = network
    calib = [torch.randn(4, *shape) * 3 for _ in range(2)]
    state = copy.deepcopy(model.state_dict())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
            qmodel = fxq.quantize(model, calib, config)
    except ValueError as error:  # a refusal must say which layer and what to do
        assert "'" in str(error) and len(str(error)) > 40, error
        return
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    x = torch.randn(6, *shape) * 3
    integer, simulated = output_steps(qmodel, fxq.simulate(qmodel), x)
    assert torch.equal(integer, simulated)
    step = qmodel.get_submodule("dequantize").scale.item()
    for backend in EXACT_BACKENDS:  # every exact accumulator gives the twin's integers
        with gemm.forced(backend), torch.no_grad():
            assert torch.equal(torch.round(qmodel(x).double() / step), simulated)
    buffer = io.BytesIO()
    fxq.save(qmodel, buffer)
    buffer.seek(0)
    assert torch.equal(fxq.load(buffer)(x), qmodel(x))
