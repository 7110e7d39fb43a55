"""fold_bn: ``layer → batchnorm`` becomes one layer whose weight and bias absorb the batchnorm, for
every layer whose registry entry lists that batchnorm (`fxq.ops.weighted`); a 2-d batchnorm with
no layer to fold into becomes the per-channel affine map it is, a 1×1 depthwise conv."""
from __future__ import annotations

from torch import fx, nn

from fxq import ops
from fxq.graphs.canonical import is_shape_query, torch_class
from fxq.graphs.context import PassContext
from fxq.graphs.graph import finish, replace_module
from fxq.ops.layers import norm_as_conv


def fold_bn(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Fold eval-mode batchnorm into the weighted layer before it.

    Before: ``y = bn(layer(x))``. After: ``y = layer'(x)`` with, per output channel c,
    ``γ' = γ_c / sqrt(var_c + ε)``, ``W'[c] = γ'·W[c]``, ``b'[c] = γ'·(b_c − mean_c) + β_c``, along
    the axis the layer's entry declares (a transposed conv's output channels are on axis 1).
    The folded layer is a new module (the traced copy's is not mutated in place).
    Guards: the layer's output feeds only the batchnorm (otherwise the unfolded value is still
    needed), and the batchnorm uses running statistics.

    Any other eval-mode 2-d batchnorm (DenseNet's batchnorm → ReLU → conv, one after an add)
    computes ``y_c = γ'_c·x_c + b'_c``: it becomes ``conv'(x)``, a 1×1 conv with ``groups = C``,
    weight ``γ'`` and bias ``b' = β − γ'·mean``, which quantizes like any conv.
    """
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        weights = _folds_into(node, modules)
        if weights is None:
            continue
        layer_node = node.args[0]
        if any(user is not node and not is_shape_query(user) for user in layer_node.users):
            continue  # the layer's own values are read elsewhere (its shape may be): cannot replace them
        folded = weights.folded(modules[layer_node.target], modules[node.target])
        replace_module(gm, layer_node.target, folded)
        modules[layer_node.target] = folded
        node.replace_all_uses_with(layer_node)
        gm.graph.erase_node(node)
    for node in gm.graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if bn is not None and torch_class(bn) is nn.BatchNorm2d and _fixed(bn):
            replace_module(gm, node.target, norm_as_conv(bn))
    return finish(gm)


def _folds_into(node: fx.Node, modules: dict[str, nn.Module]) -> ops.Weights | None:
    """The layout of the layer whose output the batchnorm ``node`` reads alone, if it folds."""
    if node.op != "call_module" or not isinstance(node.args[0], fx.Node) or node.args[0].op != "call_module":
        return None
    norm, layer = modules[node.target], modules[node.args[0].target]
    # by what they compute: a conv subclass with a forward of its own (dynamic padding) does not fold
    weights = ops.weights_of(layer)
    if weights is None or torch_class(norm) not in weights.norms or not _fixed(norm):
        return None
    return weights


def _fixed(norm: nn.Module) -> bool:
    """Running statistics: a fixed affine map at inference."""
    return norm.track_running_stats and norm.running_mean is not None
