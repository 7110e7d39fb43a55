import torch

from fxq.observers import MinMaxObserver
from passes.fold_bn import fold_bn
from passes.fuse import fuse
from passes.insert_observers import insert_observers
from passes.trace import trace
from tests.helpers import Residual, randomize_bn


def observed_nodes(gm):
    modules = dict(gm.named_modules())
    return [n.args[0].name for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(modules[n.target], MinMaxObserver)]


def prepared(model, ctx):
    return insert_observers(fuse(fold_bn(trace(model, ctx), ctx), ctx), ctx)


def test_input_and_every_conv_linear_add_output_is_observed_before_relu(ctx):
    model = randomize_bn(Residual())
    gm = prepared(model, ctx)
    assert observed_nodes(gm) == ["x", "unit_conv", "conv2", "add", "fc"]
    # "pre": the relu reads the observed conv output, not the raw one
    relu = next(n for n in gm.graph.nodes if n.name == "unit_relu")
    assert relu.args[0].target == "observers.unit_conv"


def test_observers_do_not_change_the_output(ctx):
    model = randomize_bn(Residual())
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(prepared(model, ctx)(x), model(x), atol=1e-5)  # bn folding rounds
