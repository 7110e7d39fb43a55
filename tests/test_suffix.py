"""fxq.graphs.suffix: a run with one module replaced, from a recorded run, equals running the whole model so."""
import copy

import pytest
import torch
from torch import nn

from fxq.analysis.comparison import folded_float
from fxq.graphs.graph import replace_module
from fxq.graphs.suffix import Runs, chunk_size
from tests.helpers import Residual, randomize_bn


class Branches(nn.Module):
    """In-place ReLUs and adds, a concatenation, a module called twice: what a record must survive."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.left, self.right = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.relu(self.stem(x))
        left = self.relu(self.left(x))
        left += x
        y = torch.cat([left, self.right(x)], 1)
        return self.relu(self.head(y)).mean((2, 3))


def _perturbed(module: nn.Module) -> nn.Module:
    other = copy.deepcopy(module)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return other


@pytest.mark.parametrize("make", [lambda: randomize_bn(Residual()), Branches], ids=["residual", "branches"])
def test_a_run_with_one_module_replaced_equals_the_whole_model_run_so(make):
    torch.manual_seed(0)
    gm = folded_float(make())
    x = torch.randn(6, 3, 8, 8)
    runs = Runs(gm, x)
    assert torch.equal(runs.output, gm(x))
    targets = list(dict.fromkeys(n.target for n in gm.graph.nodes if n.op == "call_module"))
    assert len(targets) >= 3
    for target in targets:
        replacement = _perturbed(gm.get_submodule(target))
        whole = copy.deepcopy(gm)
        replace_module(whole, target, replacement)
        expected = whole(x)
        assert torch.equal(runs.with_module(target, replacement), expected), target
        assert not torch.equal(expected, runs.output) or not list(replacement.parameters()), target
    assert torch.equal(runs.with_module(targets[0], gm.get_submodule(targets[0])), runs.output)  # record intact


def test_chunks_hold_the_record_under_the_limit():
    torch.manual_seed(0)
    gm = folded_float(Branches())
    x = torch.randn(40, 3, 8, 8)
    assert chunk_size(gm, x, limit=2**30) >= 40
    small = chunk_size(gm, x, limit=20_000)
    assert 1 <= small < 40


def test_calls_are_each_call_sites_recorded_input_and_output():
    """What an in-place ReLU after a layer does cannot change its record."""
    torch.manual_seed(0)
    gm = folded_float(Branches())
    runs = Runs(gm, torch.randn(4, 3, 8, 8))
    for target in ("stem", "left", "right", "head"):
        (call,) = runs.calls(target)
        x, y = call
        assert torch.equal(gm.get_submodule(target)(x), y)
        assert (y < 0).any()  # recorded before the ReLU that follows it
