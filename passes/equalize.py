"""equalize: cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization") of
``conv → ReLU → conv`` chains, so one per-tensor weight scale fits every channel."""
from __future__ import annotations

import torch
from torch import fx, nn

from fxq import ops
from fxq.graphs.context import PassContext
from fxq.graphs.graph import add_module_near, finish, replace_module
from fxq.ops.activations import clamp_bounds
from fxq.ops.lookup import ChannelClamp

SWEEPS = 20  # a chain of n layers converges in a few sweeps; pairs in ResNets need one


def equalize(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Rescale channel pairs so that each channel's weight range is the same in both layers.

    Pattern: ``B(act(A(x)))`` with A, B conv/linear layers (grouped and depthwise convs too), and
    between them only ops that commute with a positive per-channel scale and keep channels apart
    (ReLU, max pooling, average pooling, dropout), each read only by the next op. Rewrite: for
    each channel i of A's output, with r_A = max|W_A[i]| and r_B the largest weight B applies to
    its input channel i, ``s_i = sqrt(r_A / r_B)``; ``W_A[i] /= s_i``, ``b_A[i] /= s_i``, B's
    weights on input channel i ``*= s_i``. Since ``relu(x / s) = relu(x) / s`` for s > 0, the
    float function is unchanged, and both layers' channel i now span ``sqrt(r_A·r_B)``.

    A clamp with an upper bound (ReLU6, Hardtanh) does not commute with the scale, but a clamp
    whose bounds are scaled with it does (``relu6(x)/s = clamp(x/s, 0, 6/s)``): such a clamp
    between A and B becomes a per-channel `fxq.ops.lookup.ChannelClamp` whose bounds follow the
    scales, so MobileNet's conv → ReLU6 → depthwise → ReLU6 → conv chains are equalized exactly.
    Runs only when ``config.cross_layer_equalization``; layers overrides keep in float are left.

    In a ResNet basic block this applies to conv1 → relu → conv2 inside each block. It does not
    cross a residual add: the conv feeding the add would need the shortcut scaled too, and the
    block's input feeds both branches.
    """
    if not ctx.config.cross_layer_equalization:
        return gm
    modules = dict(gm.named_modules())
    chains = [chain for node in gm.graph.nodes if (chain := _chain_after(node, modules, ctx))]
    pairs = [(first, second, [_channel_clamp(gm, n, modules, first.weight.shape[0]) for n in between])
             for first, between, second in chains]
    with torch.no_grad():
        for _ in range(SWEEPS):
            for first, second, clamps in pairs:
                _equalize_pair(first, second, clamps)
    return finish(gm)


def _chain_after(node: fx.Node, modules: dict[str, nn.Module], ctx: PassContext):
    """``(A, [bounded clamps between], B)`` if ``node`` calls A and the pattern above leads to B."""
    first = _equalizable(node, modules, ctx)
    if first is None:
        return None
    current, saw_activation, clamps = node, False, []
    while len(current.users) == 1:
        current = next(iter(current.users))
        second = _equalizable(current, modules, ctx)
        if second is not None:
            fits = _input_channels(second) == first.weight.shape[0]
            return (first, clamps, second) if saw_activation and fits else None
        op = ops.classify(current, modules, ctx)[0] if current.op in ops.CALLS else None
        if op is not None and op.rescalable_bounds:
            clamps.append(current)
        elif op is None or not (op.homogeneous and op.channelwise):
            return None
        saw_activation |= op.clamps
    return None


def _equalizable(node: fx.Node, modules: dict[str, nn.Module], ctx: PassContext):
    if node.op != "call_module" or not ops.classify(node, modules, ctx)[0].weighted:
        return None
    return modules[node.target]


def _input_channels(layer: nn.Module) -> int:
    return layer.weight.shape[1] * getattr(layer, "groups", 1)


def _channel_clamp(gm: fx.GraphModule, node: fx.Node, modules: dict[str, nn.Module], channels: int) -> ChannelClamp:
    """Replace a clamp between two equalized layers by a per-channel clamp of the same bounds."""
    low, high = clamp_bounds(node, modules.get(node.target) if node.op == "call_module" else None)
    bound = lambda value, default: torch.full((channels,), float(default if value is None else value))  # noqa: E731
    clamp = ChannelClamp(bound(low, float("-inf")), bound(high, float("inf")))
    if node.op == "call_module":
        replace_module(gm, node.target, clamp)
    else:
        path = add_module_near(gm, node, "clamp", clamp)
        node.op, node.target, node.args, node.kwargs = "call_module", path, node.args[:1], {}
    return clamp


def _input_ranges(layer: nn.Module) -> torch.Tensor:
    """``[C_in, ...]``: row i holds every weight the layer applies to its input channel i (a
    grouped conv applies channel i of group g only to group g's outputs)."""
    w, groups = layer.weight, getattr(layer, "groups", 1)
    if w.dim() == 2:
        return w.t()
    c_out, c_group = w.shape[:2]
    return w.reshape(groups, c_out // groups, c_group, -1).permute(0, 2, 1, 3).reshape(groups * c_group, -1)


def _equalize_pair(first: nn.Module, second: nn.Module, clamps: list[ChannelClamp]) -> None:
    """Out of place: a weight tensor may be shared (a module called at several places, tied
    weights), and only this pair is rescaled."""
    r_a = first.weight.reshape(first.weight.shape[0], -1).abs().amax(dim=1)
    r_b = _input_ranges(second).abs().amax(dim=1)
    usable = (r_a > 0) & (r_b > 0)
    scale = torch.where(usable, torch.sqrt(r_a / torch.where(usable, r_b, 1.0)), 1.0)
    shape_a = (-1,) + (1,) * (first.weight.dim() - 1)
    first.weight = _parameter(first.weight / scale.reshape(shape_a))
    if first.bias is not None:
        first.bias = _parameter(first.bias / scale)
    for clamp in clamps:
        clamp.low, clamp.high = clamp.low / scale, clamp.high / scale
    second.weight = _parameter(second.weight * _per_input(scale, second))


def _per_input(scale: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``scale`` (one per input channel) shaped to multiply the layer's weights."""
    w, groups = layer.weight, getattr(layer, "groups", 1)
    if w.dim() == 2:
        return scale.reshape(1, -1)
    c_out, c_group = w.shape[:2]
    per_group = scale.reshape(groups, 1, c_group, 1, 1).expand(groups, c_out // groups, c_group, 1, 1)
    return per_group.reshape(c_out, c_group, 1, 1)


def _parameter(value: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value, requires_grad=False)
