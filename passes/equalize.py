"""equalize: cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization") of
``conv → ReLU → conv`` chains, so one per-tensor weight scale fits every channel."""
from __future__ import annotations

import torch
from torch import fx, nn

from fxq.context import PassContext
from fxq.graph import finish, module_name
from fxq import ops

SWEEPS = 20  # a chain of n layers converges in a few sweeps; pairs in ResNets need one


def equalize(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Rescale channel pairs so that each channel's weight range is the same in both layers.

    Pattern: ``B(relu(A(x)))`` with A, B conv/linear (groups = 1), the ReLU (and any max-pool or
    flatten between) positively homogeneous, and every intermediate value read only by the next
    op. Rewrite: for each channel i of A's output, with r_A = max|W_A[i]| and r_B = max|W_B[:, i]|,
    ``s_i = sqrt(r_A / r_B)``; ``W_A[i] /= s_i``, ``b_A[i] /= s_i``, ``W_B[:, i] *= s_i``. Since
    ``relu(x / s) = relu(x) / s`` for s > 0, the float function is unchanged, and both layers'
    channel i now span ``sqrt(r_A·r_B)``. Runs only when ``config.cross_layer_equalization``.

    In a ResNet basic block this applies to conv1 → relu → conv2 inside each block. It does not
    cross a residual add: the conv feeding the add would need the shortcut scaled too, and the
    block's input feeds both branches.
    """
    if not ctx.config.cross_layer_equalization:
        return gm
    modules = dict(gm.named_modules())
    pairs = [pair for node in gm.graph.nodes if (pair := _pair_after(node, modules, ctx))]
    with torch.no_grad():
        for _ in range(SWEEPS):
            for first, second in pairs:
                _equalize_pair(first, second)
    return finish(gm)


def _pair_after(node: fx.Node, modules: dict[str, nn.Module], ctx: PassContext):
    """``(A, B)`` modules if ``node`` calls A and the pattern above leads to B, else None."""
    first = _equalizable(node, modules, ctx)
    if first is None:
        return None
    current, saw_relu = node, False
    while len(current.users) == 1:
        current = next(iter(current.users))
        second = _equalizable(current, modules, ctx)
        if second is not None:
            return (first, second) if saw_relu and second.weight.shape[1] == first.weight.shape[0] else None
        # Between the two layers, only ops that commute with a positive per-channel scale
        # (relu(s·x) = s·relu(x), max-pooling likewise) and keep channels apart. A residual add
        # does not (the other branch is not scaled), nor does ReLU6 (its bound is not scaled).
        op = ops.classify(current, modules)[0] if current.op in ops.CALLS else None
        if op is None or not (op.homogeneous and op.channelwise):
            return None
        saw_relu |= op.clamps
    return None


def _equalizable(node: fx.Node, modules: dict[str, nn.Module], ctx: PassContext):
    if node.op != "call_module" or not ops.classify(node, modules)[0].weighted:
        return None
    layer = modules[node.target]
    if getattr(layer, "groups", 1) != 1 or ctx.config_for(module_name(node)) is None:
        return None
    return layer


def _equalize_pair(first: nn.Module, second: nn.Module) -> None:
    """Out of place: a weight tensor may be shared (a module called at several places, tied
    weights), and only this pair is rescaled."""
    w_a = first.weight.reshape(first.weight.shape[0], -1)
    r_a = w_a.abs().amax(dim=1)
    r_b = second.weight.transpose(0, 1).reshape(second.weight.shape[1], -1).abs().amax(dim=1)
    usable = (r_a > 0) & (r_b > 0)
    scale = torch.where(usable, torch.sqrt(r_a / torch.where(usable, r_b, 1.0)), 1.0)
    shape_a = (-1,) + (1,) * (first.weight.dim() - 1)
    first.weight = _parameter(first.weight / scale.reshape(shape_a))
    if first.bias is not None:
        first.bias = _parameter(first.bias / scale)
    shape_b = (1, -1) + (1,) * (second.weight.dim() - 2)
    second.weight = _parameter(second.weight * scale.reshape(shape_b))


def _parameter(value: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value, requires_grad=False)
