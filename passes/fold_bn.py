"""fold_bn: ``conv → batchnorm`` becomes one conv whose weight and bias absorb the batchnorm; a
batchnorm with no conv to fold into becomes the per-channel affine map it is, a 1×1 depthwise conv."""
from __future__ import annotations

import torch
from torch import fx, nn

from fxq.canonical import is_shape_query, torch_class
from fxq.context import PassContext
from fxq.graph import finish, replace_module

PATTERNS = [(nn.Conv2d, nn.BatchNorm2d)]


def fold_bn(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Fold eval-mode batchnorm into the conv before it.

    Before: ``y = bn(conv(x))``. After: ``y = conv'(x)`` with, per output channel c,
    ``γ' = γ_c / sqrt(var_c + ε)``, ``W'[c] = γ'·W[c]``, ``b'[c] = γ'·(b_c − mean_c) + β_c``.
    The folded conv is a new module (the traced copy's conv is not mutated in place).
    Guards: the conv's output feeds only the batchnorm (otherwise the unfolded value is still
    needed), and the batchnorm uses running statistics.

    Any other eval-mode batchnorm (DenseNet's batchnorm → ReLU → conv, one after an add) computes
    ``y_c = γ'_c·x_c + b'_c``: it becomes ``conv'(x)``, a 1×1 conv with ``groups = C``, weight
    ``γ'`` and bias ``b' = β − γ'·mean``, which quantizes like any conv.
    """
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if not _matches(node, modules):
            continue
        conv_node = node.args[0]
        if any(user is not node and not is_shape_query(user) for user in conv_node.users):
            continue  # the conv's own values are read elsewhere (its shape may be): cannot replace them
        bn = modules[node.target]
        if not bn.track_running_stats or bn.running_mean is None:
            continue  # batch statistics at inference: nothing fixed to fold
        folded = _folded_conv(modules[conv_node.target], bn)
        replace_module(gm, conv_node.target, folded)
        modules[conv_node.target] = folded
        node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(node)
    for node in gm.graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if bn is not None and torch_class(bn) is nn.BatchNorm2d and bn.track_running_stats \
                and bn.running_mean is not None:
            replace_module(gm, node.target, _affine_conv(bn))
    return finish(gm)


def _matches(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op != "call_module" or not isinstance(node.args[0], fx.Node):
        return False
    producer = node.args[0]
    if producer.op != "call_module":
        return False
    # by what they compute: a conv subclass with a forward of its own (dynamic padding) does not fold
    return any(torch_class(modules[producer.target]) is c and torch_class(modules[node.target]) is b
               for c, b in PATTERNS)


@torch.no_grad()
def _affine_conv(bn: nn.BatchNorm2d) -> nn.Conv2d:
    identity = nn.utils.skip_init(nn.Conv2d, bn.num_features, bn.num_features, 1, groups=bn.num_features, bias=False)
    identity.weight.fill_(1.0)
    return _folded_conv(identity, bn)


@torch.no_grad()
def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_mean)
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    factor = gamma / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    folded = nn.utils.skip_init(nn.Conv2d, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                conv.padding, conv.dilation, conv.groups, bias=True,
                                padding_mode=conv.padding_mode)  # no random init: both tensors are written
    folded.weight.copy_(conv.weight * factor.reshape(-1, 1, 1, 1))
    folded.bias.copy_((bias - bn.running_mean) * factor + beta)
    return folded.eval()
