import pytest
import torch
from torch import fx, nn

from passes.trace import trace
from tests.helpers import ConvBnRelu


class DataDependent(nn.Module):
    """Python control flow on a tensor value: not traceable."""

    def __init__(self):
        super().__init__()
        self.body = Branchy()

    def forward(self, x):
        return self.body(x)


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_trace_returns_a_graph_module_of_a_copy(ctx):
    model = ConvBnRelu()
    gm = trace(model, ctx)
    assert isinstance(gm, fx.GraphModule)
    assert gm.conv is not model.conv  # a deep copy: later passes cannot touch the user's model
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gm(x), model.eval()(x))


def test_untraceable_model_names_the_line_and_fix(ctx):
    with pytest.raises(TypeError) as error:
        trace(Branchy(), ctx)
    message = str(error.value)
    assert "top-level module" in message and "x.sum() > 0" in message and "overrides=" in message


def test_an_untraceable_submodule_is_refused_by_name_and_line(ctx):
    with pytest.raises(TypeError, match=r"(?s)1 submodule.*'body'.*x.sum\(\) > 0.*overrides=\{'body': None\}"):
        trace(DataDependent(), ctx)


def test_non_module_is_refused(ctx):
    with pytest.raises(TypeError, match="nn.Module"):
        trace(lambda x: x, ctx)
