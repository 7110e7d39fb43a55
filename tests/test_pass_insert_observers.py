import warnings

import torch

from fxq.integers.observers import MinMaxObserver
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


class NamedLikeModuleMethods(torch.nn.Module):
    """Values whose node names are nn.Module attributes (``x.to(...)`` gives a node ``to``;
    EdgeNeXt has one), which cannot name submodules as they are."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.sigmoid(self.conv(x).to(torch.float32)).float()


def test_an_observer_of_a_node_named_like_a_module_method_gets_a_free_name():
    import fxq
    torch.manual_seed(0)
    model = NamedLikeModuleMethods().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxq.FloatFallbackWarning)  # casts to float32 are no ops
        qmodel = fxq.quantize(model, [torch.randn(4, 3, 8, 8) for _ in range(2)])
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert (qmodel(x) - model(x)).abs().max() < 0.02
