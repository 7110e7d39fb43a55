"""Tiny models the pass tests are built on, and graph-reading helpers."""
import torch
from torch import fx, nn


class ConvBnRelu(nn.Module):
    """conv → bn → relu, the unit every CNN repeats."""

    def __init__(self, cin=3, cout=4):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Residual(nn.Module):
    """A basic block: conv-bn-relu, conv-bn, += identity, relu; then pool and a classifier."""

    def __init__(self, c=3):
        super().__init__()
        self.unit = ConvBnRelu(c, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        out = self.bn2(self.conv2(self.unit(x)))
        out += x
        out = torch.relu(out)
        return self.fc(torch.flatten(self.pool(out), 1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics, so folding has something to fold."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def ops(gm: fx.GraphModule) -> list[tuple[str, object]]:
    """(op, target type or function) for each call node: the graph's structure at a glance."""
    modules = dict(gm.named_modules())
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out.append((n.op, type(modules[n.target])))
        elif n.op in ("call_function", "call_method"):
            out.append((n.op, n.target))
    return out


def module_types(gm: fx.GraphModule) -> list[type]:
    return [t for op, t in ops(gm) if op == "call_module"]
