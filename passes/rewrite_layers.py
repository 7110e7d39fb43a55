"""rewrite_layers: each weighted layer whose registry entry computes it as other entries' ops (a
``Conv1d``, ``Conv3d``, ``ConvTranspose1d/2d``) becomes those ops around an int8 ``Conv2d``."""
from __future__ import annotations

from torch import fx

from fxq import ops
from fxq.graphs.context import PassContext
from fxq.graphs.graph import finish, module_name
from passes.trace import probe


def rewrite_layers(gm: fx.GraphModule, ctx: PassContext | None) -> fx.GraphModule:
    """Rewrite each call whose entry has a ``rewrite`` and accepts it, after `passes.fold_bn` has
    folded a following batch norm into the layer itself.

    Before: ``y = ConvTranspose2d(x)``, ``y = Conv1d(x)``, ``y = Conv3d(x)``.
    After:  ``y = Conv2d'(insert_zeros(x, s))``, ``y = squeeze(Conv2d_{k×1}(unsqueeze(x, -1)), -1)``,
    ``y = permute(reshape(Conv2d'(reshape(permute(cat(windows of x)))))))`` — the same values
    (`fxq.ops.transposed`, `fxq.ops.convolutions`); each new conv records the user's layer as
    its origin, so overrides and reports still name it. A call the entry does not accept (reflect
    padding) or cannot rewrite (a Conv3d whose input sizes calibration never showed) stays, and
    runs in float with that reason; one ``overrides`` keeps in float stays the user's layer.
    """
    modules = dict(gm.named_modules())
    shape_of = probe(gm, ctx, lambda value: tuple(value.shape))
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        layer = modules[node.target]
        entry = next((op for op in ops.match(node, modules) if op.rewrite is not None), None)
        if entry is not None and entry.accepts(node, layer) is None and not _kept_in_float(node, ctx):
            entry.rewrite(gm, node, shape_of)
    gm.delete_all_unused_submodules()
    return finish(gm)


def _kept_in_float(node: fx.Node, ctx: PassContext | None) -> bool:
    return ctx is not None and ctx.config_for(module_name(node)) is None
