"""The op registry: every entry has every facet, runs on integers as its twin does, saves and
exports; and the properties it declares hold. A new entry is tested by being added."""
import pytest
import torch
from torch import nn

import fxq
from fxq import ops
from fxq.files import saved_graph, serialize
from fxq.files.schema import Schema
from fxq.graphs.runtime import count_ops
from fxq.ops import Output
from tests.helpers import assert_deploys_bit_exact, check_quantized

ENTRIES = list(ops.REGISTRY)


@pytest.mark.parametrize("op", ENTRIES, ids=lambda op: op.name)
def test_every_entry_has_every_facet(op):
    assert op.doc and callable(op.lower) and isinstance(op.output, Output)
    assert op.modules or op.functions or op.methods, "an entry must match some call"
    assert op.example is not None, "an example instance, on which the properties are checked"
    for module in op.integer_modules:
        assert isinstance(module.schema, Schema), f"{module.__name__}: how it is saved and loaded"
        assert serialize.SCHEMAS[module] is module.schema
        assert callable(getattr(module, "twin", None)), f"{module.__name__}: its float twin"
        assert callable(getattr(module, "to_onnx", None)), f"{module.__name__}: how it exports"
    if op.keeps_call:
        assert callable(op.export), "a call the integer graph keeps must say how it exports"
    for function in op.functions:
        assert saved_graph.FUNCTIONS[f"{function.__module__}.{function.__name__}"] is function
    assert set(op.methods) <= saved_graph.METHODS


class Probe(nn.Module):
    """An entry's example between two convs: integers in, integers out, so the example's call is
    lowered by its entry; an example that returns sizes reshapes the tensor by them."""

    def __init__(self, op):
        super().__init__()
        self.before, self.example = nn.Conv2d(3, 4, 3, padding=1), op.example()
        self.sizes = op.output is Output.NONE
        y = self._middle(torch.zeros(1, 4, 8, 8))
        self.after = nn.Conv2d(y.shape[1], 4, 1) if y.dim() == 4 else nn.Identity()

    def _middle(self, h):
        return h.reshape(self.example(h)) if self.sizes else self.example(h)

    def forward(self, x):
        return self.after(self._middle(self.before(x)))


@pytest.mark.parametrize("op", ENTRIES, ids=lambda op: op.name)
def test_every_entry_runs_on_integers_like_its_twin_saves_and_exports(op, tmp_path):
    torch.manual_seed(0)
    model = Probe(op).eval()
    calib = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    qmodel = fxq.quantize(model, calib, fxq.QConfig(requantize="onnxruntime"))
    x = torch.randn(5, 3, 8, 8)
    assert count_ops(qmodel, x).float == 0, f"{op.name}'s example ran in float"
    check_quantized(qmodel, model, x, tmp_path)  # the twin bit for bit, save → load identical
    assert_deploys_bit_exact(qmodel, x)


def test_a_module_type_belongs_to_one_entry():
    seen = [form for op in ENTRIES for form in op.modules]
    assert len(seen) == len(set(seen))


def _scaled(x, a):
    return x * a.reshape(1, -1, *([1] * (x.dim() - 2)))


@pytest.mark.parametrize("op", [op for op in ENTRIES if op.homogeneous], ids=lambda op: op.name)
def test_homogeneous_entries_commute_with_a_positive_per_channel_scale(op):
    """What cross-layer equalization relies on: f(a·x) = a·f(x) for every a > 0 per channel."""
    f = op.example()
    x = torch.randn(2, 4, 6, 6)
    a = torch.rand(4) * 10 + 0.01 if op.channelwise else torch.full((4,), 3.7)  # else one scale
    scaled_output = f(x)
    scaled_output = _scaled(scaled_output, a) if op.channelwise else scaled_output * a[0]
    assert torch.allclose(f(_scaled(x, a)), scaled_output, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", [op for op in ENTRIES if op.channelwise], ids=lambda op: op.name)
def test_channelwise_entries_keep_channels_apart(op):
    f = op.example()
    x = torch.randn(2, 4, 6, 6)
    moved = x.clone()
    moved[:, 2] += torch.randn(2, 6, 6)
    changed = (f(moved) != f(x)).flatten(2).any(2).any(0)
    assert changed.tolist() == [False, False, True, False]


@pytest.mark.parametrize("op", [op for op in ENTRIES if op.clamps], ids=lambda op: op.name)
def test_clamping_entries_are_piecewise_identities(op):
    """A clamp fuses after a producer: its output is either its input or a constant bound."""
    f = op.example()
    x = torch.randn(2, 4, 6, 6) * 10
    y = f(x)
    kept = y == x
    assert kept.any() and torch.unique(y[~kept]).numel() <= 2
